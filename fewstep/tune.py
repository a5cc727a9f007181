"""Fit a time grid to a model: the grid on which a solver's final sample is closest to the exact
probability-flow ODE solution, for a given budget of model calls.

    cal = calibration_set(64, (1, 28, 28), seed=1234, num_classes=10)
    tuned = tune_grid(denoiser, schedule, solver="dpmpp_2m", nfe=5, calibration=cal)
    out = fewstep.sample(denoiser, x_T, schedule, solver="dpmpp_2m", grid=tuned)

Two methods, and their combination (the default):

``dp``  dynamic programming over a fine candidate grid (GITS, arXiv 2405.11326, Sec. 4): one
        accurate solve of the calibration noises records x and the model's x0 at M candidate
        times uniform in log-SNR; the cost of a step from candidate i to j is the error of the
        solver's own update from the reference x_i (with the reference history at the previous
        chosen point h) against the reference x_j; the grid is the cheapest path of exactly
        NFE steps ending in the denoising step. No model calls beyond the reference solve.
``refine``  direct minimisation of the final-sample RMSE over the free log-SNR points (the
        objective of LD3, arXiv 2405.15506, without its gradients: Nelder-Mead on the gaps'
        softmax logits, one restart), started from the best fixed spacing (or the ``dp`` grid when
        that is better). Costs NFE model calls per objective evaluation.

The grid starts at the schedule's t_max (where the noise is drawn) and ends in 0 (a final
denoising step, as every default fewstep grid); the NFE - 1 times in between, including the
last finite one, are free within [t_min, t_max].
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoisers import CountingDenoiser
from .grids import TunedGrid, lambdas_of, model_identity, schedule_identity
from .reference import reference_path, rmse
from .sampling import sample
from .schedules import NoiseSchedule, time_grid
from .solvers import get_solver
from .solvers._common import grid_points
from .solvers.baseline import ddim_step

__all__ = ["Calibration", "Trajectory", "calibration_set", "reference_trajectory", "dp_grid", "refine_grid",
           "tune_grid", "tune_model", "grid_rmse", "step_costs", "METHODS"]

METHODS = ("dp", "refine", "dp+refine")
FIXED_SPACINGS = ("logsnr", "karras", "time_uniform", "time_quadratic")  # the starts refine chooses from


@dataclass
class Trajectory:
    """An accurate solve of the calibration noises, recorded at candidate times uniform in log-SNR."""
    times: torch.Tensor  # (M + 1,) from t_max down to t_min
    xs: list  # x at each candidate time
    x0s: list  # the model's x0_hat at each (time, x)
    final: torch.Tensor  # x0_hat at t_min: the limit of every grid ending in 0
    error: dict  # the final answer's own error: its difference from RK4 with half the steps
    model_calls: int
    seconds: float


@dataclass
class Calibration:
    """Calibration noises x_T (at the schedule's t_max) and conditioning, drawn with their own seed.
    The reference trajectory and the DP costs are computed once and cached here."""
    x_T: torch.Tensor
    cond: dict | None = None
    seed: int | None = None
    trajectory: Trajectory | None = None
    costs: dict = field(default_factory=dict)


def calibration_set(n: int, shape, *, seed: int, num_classes: int | None = None,
                    dtype=torch.float32) -> Calibration:
    """n standard-normal noises (and, for a class-conditional model, uniform random labels)."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, *shape), generator=g, dtype=dtype)
    cond = None if num_classes is None else {"labels": torch.randint(0, num_classes, (n,), generator=g)}
    return Calibration(x_T, cond, seed)


# ---------------------------------------------------------------------------
# The reference trajectory
# ---------------------------------------------------------------------------

@torch.no_grad()
def reference_trajectory(denoiser: Callable, schedule: NoiseSchedule, x_T: torch.Tensor, cond: dict | None = None,
                         *, steps: int = 128, candidates: int = 64) -> Trajectory:
    """The reference solve of ``fewstep.reference`` (classic RK4 in log-SNR on y = x / sigma, float64 state)
    from t_max to t_min, then one denoising call, in ``steps`` steps, recording every
    ``steps // candidates``-th step; its error is taken as the difference from a second solve with half
    the steps (RMSE and max; a bound, ~15x the error only in RK4's asymptotic range)."""
    if steps % candidates:
        raise ValueError(f"steps ({steps}) must be a multiple of candidates ({candidates})")
    start = time.perf_counter()
    counted = CountingDenoiser(denoiser)
    fine = reference_path(counted, schedule, x_T, schedule.t_max, 0.0, steps=steps, every=steps // candidates,
                          cond=cond)
    coarse = reference_path(counted, schedule, x_T, schedule.t_max, 0.0, steps=steps // 2, cond=cond)
    diff = fine.x - coarse.x
    # the difference bounds the finer answer's error; only in RK4's asymptotic range is it ~15x that error
    # (a learned model's ODE may not be there: measured on mnist-teacher, 128 -> 256 steps still moves ~0.003)
    error = {"rmse": rmse(fine.x, coarse.x), "max_abs": float(diff.abs().max()),
             "how": f"|x({steps} RK4 steps) - x({steps // 2} steps)|, taken as the {steps}-step answer's error"}
    xs, x0s = [v.to(x_T.dtype) for v in fine.xs], [v.to(x_T.dtype) for v in fine.x0s]
    return Trajectory(fine.times, xs, x0s, fine.x, error, counted.nfe, time.perf_counter() - start)


# ---------------------------------------------------------------------------
# Method 1: dynamic programming over the candidates (GITS)
# ---------------------------------------------------------------------------

def _stepper(solver: str, options: dict | None) -> Callable:
    """The solver's one-step update with lower_order_final off (each cost is one step in the middle
    of a run); DDIM's for solvers without a step function (Euler equals DDIM)."""
    spec = get_solver(solver)
    if spec.step is None:
        return ddim_step
    opts = dict(options or {})
    if spec.name != "ddim":
        opts["lower_order_final"] = False
    return spec.stepper(**opts)


def _transports(traj: Trajectory, pts) -> list:
    """Per-value factors that carry an error in x at each candidate to the final sample, exact for
    Gaussian data N(m, diag(s^2)): x0 - x0_ref = s (dx) / sqrt(alpha^2 s^2 + sigma^2), since
    (x - alpha m) / sqrt(alpha^2 s^2 + sigma^2) is constant along the flow. s: the reference
    samples' per-value spread (over the calibration set)."""
    s = traj.final.to(torch.float64).std(0, keepdim=True).clamp_min(1e-3)
    return [(s / torch.sqrt(p.alpha ** 2 * s ** 2 + p.sigma ** 2)).to(traj.final.dtype) for p in pts]


def step_costs(traj: Trajectory, schedule: NoiseSchedule, solver: str, options: dict | None = None) -> dict:
    """Local errors of the solver's update between candidates, carried to the final sample
    (``_transports``): ``first[j]`` (from t_max, no history), ``pair[h, i, j]`` (from i to j with
    the previous point h) and ``final[i]`` (denoising at i)."""
    step, pts = _stepper(solver, options), grid_points(schedule, traj.times)
    w, m = _transports(traj, pts), len(pts)
    first = torch.full((m,), math.inf, dtype=torch.float64)
    pair = torch.full((m, m, m), math.inf, dtype=torch.float64)
    for j in range(1, m):
        x_j = step(traj.xs[0], traj.x0s[0], 0, [pts[0], pts[j]], None)[0]
        first[j] = rmse(w[j] * x_j, w[j] * traj.xs[j])
    for h in range(m - 2):
        for i in range(h + 1, m - 1):
            _, state = step(traj.xs[h], traj.x0s[h], 0, [pts[h], pts[i]], None)  # the history at h
            for j in range(i + 1, m):
                x_j = step(traj.xs[i], traj.x0s[i], 1, [pts[h], pts[i], pts[j]], state)[0]
                pair[h, i, j] = rmse(w[j] * x_j, w[j] * traj.xs[j])
    final = torch.tensor([rmse(d, traj.final) for d in traj.x0s], dtype=torch.float64)
    return {"first": first, "pair": pair, "final": final}


def dp_grid(traj: Trajectory, costs: dict, nfe: int, free_end: bool = False) -> tuple[torch.Tensor, float]:
    """The candidate path [t_max, ..., t_last, 0] of ``nfe`` steps with the least summed local error;
    t_last = t_min unless ``free_end``."""
    first, pair, final = costs["first"], costs["pair"], costs["final"]
    m = first.numel()
    if nfe == 1:
        return torch.tensor([float(traj.times[0]), 0.0], dtype=torch.float64), float(final[0])
    value = torch.full((m, m), math.inf, dtype=torch.float64)  # value[h, i]: best path whose last two points are h, i
    value[0] = first
    back = []
    for _ in range(nfe - 2):  # each pass adds one finite point
        total = value[:, :, None] + pair  # [h, i, j]
        best, arg = total.min(dim=0)
        value = torch.full((m, m), math.inf, dtype=torch.float64)
        value[:m, :m] = best  # now indexed [i, j]
        back.append(arg)
    total = value + final[None, :]
    if not free_end:
        total[:, :-1] = math.inf
    flat = int(torch.argmin(total))
    h, i = divmod(flat, m)
    path = [h, i]
    for arg in reversed(back):
        path.insert(0, int(arg[path[0], path[1]]))
    times = torch.cat([traj.times[path].to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    return times, float(total.flatten()[flat])


# ---------------------------------------------------------------------------
# Method 2: direct minimisation of the final error (LD3's objective, gradient-free)
# ---------------------------------------------------------------------------

def grid_rmse(denoiser: Callable, schedule: NoiseSchedule, solver: str, grid: torch.Tensor, x_T: torch.Tensor,
              cond: dict | None, target: torch.Tensor, **options) -> float:
    """RMSE of the solver's final sample on ``grid`` against ``target`` (the reference answer)."""
    with torch.no_grad():
        out = sample(denoiser, x_T, schedule, solver=solver, grid=grid, cond=cond, **options)
    return rmse(out.x, target)


def _times_of(u: torch.Tensor, lam0: float, span: float, schedule, t_max: float, free_end: bool) -> torch.Tensor:
    """Free log-SNR points from logits: gaps = span * softmax([u, 0]) cut [lambda(t_max), lambda(t_min)];
    with ``free_end`` the last gap is slack before t_min, else the last point is t_min."""
    gaps = span * torch.softmax(torch.cat([u, torch.zeros(1, dtype=torch.float64)]), 0)
    t = schedule.t_of_lambda(lam0 + torch.cumsum(gaps, 0)[:-1]).clamp(schedule.t_min, t_max)
    end = [] if free_end else [schedule.t_min]
    return torch.cat([torch.tensor([t_max], dtype=torch.float64), t, torch.tensor(end + [0.0], dtype=torch.float64)])


def refine_grid(denoiser: Callable, schedule: NoiseSchedule, solver: str, start: torch.Tensor,
                x_T: torch.Tensor, cond: dict | None, target: torch.Tensor, *, max_evals: int = 80,
                options: dict | None = None, free_end: bool = False) -> tuple[torch.Tensor, list]:
    """Nelder-Mead on the gaps' logits from the grid ``start``; returns (grid, best objective after each
    evaluation). The grid keeps t_max first and 0 last (and t_min before it unless ``free_end``)."""
    from scipy.optimize import minimize
    options = options or {}
    t_max = float(start[0])
    lam0, lam1 = (float(v) for v in schedule.lambda_(torch.tensor([t_max, schedule.t_min], dtype=torch.float64)))
    span = lam1 - lam0
    inner = schedule.lambda_(start[1:-1 if free_end else -2].to(torch.float64)).clamp(lam0, lam1)
    gaps = torch.diff(torch.cat([torch.tensor([lam0], dtype=torch.float64), inner,
                                 torch.tensor([lam1], dtype=torch.float64)])).clamp_min(1e-3 * span)
    u0 = torch.log(gaps[:-1] / gaps[-1])
    history, best = [], [start, u0.numpy()]

    def objective(u):
        grid = _times_of(torch.as_tensor(u, dtype=torch.float64), lam0, span, schedule, t_max, free_end)
        if not (grid[1:] < grid[:-1]).all():
            return 1e3
        value = grid_rmse(denoiser, schedule, solver, grid, x_T, cond, target, **options)
        if not history or value < history[-1]:
            best[:] = [grid, u.copy()]
        history.append(min(value, history[-1]) if history else value)
        return value

    if u0.numel() == 0:
        return start, [grid_rmse(denoiser, schedule, solver, start, x_T, cond, target, **options)]
    u, size = best[1], 0.5
    for share in (0.6, 1.0):  # one restart from the best point with a fresh, smaller simplex
        budget = int(share * max_evals) - len(history)
        if budget < len(u) + 2:
            break
        simplex = [u] + [u + size * torch.eye(len(u), dtype=torch.float64)[k].numpy() for k in range(len(u))]
        minimize(objective, u, method="Nelder-Mead",
                 options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 0.0})
        u, size = best[1], 0.2
    return best[0], history


# ---------------------------------------------------------------------------
# The front door
# ---------------------------------------------------------------------------

@torch.no_grad()
def tune_grid(denoiser: Callable, schedule: NoiseSchedule, *, solver: str = "dpmpp_2m", nfe: int = 5,
              calibration: Calibration | torch.Tensor | tuple, method: str = "dp+refine",
              reference_steps: int = 128, candidates: int = 64, max_evals: int | None = None,
              options: dict | None = None, free_end: bool = False, model=None, conditioning: dict | None = None,
              starts: dict | None = None, log: Callable[[str], None] | None = None) -> TunedGrid:
    """Fit the grid of ``nfe`` model calls for ``solver`` that minimises the final-sample RMSE
    against the converged reference ODE solution on the calibration noises.

    calibration: a ``Calibration`` (``calibration_set(...)``; its reference solve and DP costs are
      cached on it, so several solvers / NFEs share them), an x_T tensor, or (x_T, cond).
    method: ``dp``, ``refine`` (from the best fixed spacing) or ``dp+refine`` (from the better of that and
      the DP grid); see the module docstring. The result is never worse on the calibration set than the
      best of the fixed spacings (logsnr, karras, time_uniform, time_quadratic) it starts from, except
      with ``dp`` alone.
    max_evals: objective evaluations of ``refine`` (default 12 * (nfe - 1) + 20).
    free_end: let the last finite time move too (default: it stays at t_min, as in every fixed spacing and
      in GITS / LD3). A free end lowers the RMSE further by denoising from a noisier point (the
      conditional mean), which blurs samples: on mnist-teacher it worsened FID (BENCHMARKS.md).
    model / conditioning: recorded in the grid (``model_identity`` of a model; e.g. {"w": 1.0}).
    starts: more starting grids by name ({name: NFE + 1 times ending in 0}), e.g. the grid a pipeline
      uses today (a flow model's shifted sigmas): the result is never worse on the calibration set
      than any of them either.
    Only one-call-per-step (multistep) deterministic solvers are tuned.
    """
    spec = get_solver(solver)
    if spec.kind != "multistep" or spec.stochastic:
        raise ValueError(f"tune_grid tunes deterministic one-call-per-step solvers; {solver!r} is "
                         f"{'stochastic' if spec.stochastic else spec.kind}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    cal, log = _as_calibration(calibration), log or (lambda msg: None)
    if cal.trajectory is None:
        cal.trajectory = reference_trajectory(denoiser, schedule, cal.x_T, cal.cond, steps=reference_steps,
                                              candidates=candidates)
        log(f"reference: {cal.trajectory.model_calls} calls, {cal.trajectory.seconds:.0f} s, "
            f"own error {cal.trajectory.error['rmse']:.2g}")
    start, counted = time.perf_counter(), CountingDenoiser(denoiser)  # the tuning's own cost
    grid, record = _search(counted, schedule, solver, nfe, cal, method, max_evals or 12 * (nfe - 1) + 20,
                           options or {}, free_end, starts)
    log(f"{solver} NFE {nfe} ({method}): calibration RMSE {record['start_rmse']:.4g} ({record['start']}) -> "
        f"{record['rmse']:.4g}")
    traj = cal.trajectory
    return TunedGrid(
        solver=solver, nfe=nfe, times=grid.tolist(), lambdas=lambdas_of(schedule, grid),
        schedule=schedule_identity(schedule),
        model={**(model_identity(model) if model is not None else {}), **(conditioning or {})},
        calibration={"samples": int(cal.x_T.shape[0]), "seed": cal.seed, "method": method, "free_end": free_end,
                     **record,
                     "reference": {**traj.error, "candidates": len(traj.times)}, "options": dict(options or {})},
        cost={"model_calls": counted.nfe, "seconds": round(time.perf_counter() - start, 1),
              "reference_model_calls": traj.model_calls, "reference_seconds": round(traj.seconds, 1),
              "batch": int(cal.x_T.shape[0])})


def _search(counted, schedule, solver, nfe, cal, method, max_evals, opts, free_end,
            starts=None) -> tuple[torch.Tensor, dict]:
    """Start from the best fixed spacing (or given start, or the DP grid when better), then refine; the
    objective after each stage and evaluation, never increasing, is recorded."""
    traj = cal.trajectory
    error_of = lambda g: grid_rmse(counted, schedule, solver, g, cal.x_T, cal.cond, traj.final, **opts)  # noqa: E731
    fixed = {sp: time_grid(schedule, nfe, sp) for sp in FIXED_SPACINGS}
    fixed.update({name: _check_start(schedule, name, g, nfe) for name, g in (starts or {}).items()})
    scores = {sp: error_of(g) for sp, g in fixed.items()}
    start = min(scores, key=scores.get)
    grid, history, dp_cost = fixed[start], [scores[start]], None
    if "dp" in method:
        key = (solver, tuple(sorted(opts.items())))
        if key not in cal.costs:
            cal.costs[key] = step_costs(traj, schedule, solver, opts)
        dp, dp_cost = dp_grid(traj, cal.costs[key], nfe, free_end)
        value = error_of(dp)
        if method == "dp" or value < history[-1]:  # dp+refine starts from the better of the two
            grid = dp
        history.append(value if method == "dp" else min(value, history[-1]))
    if "refine" in method:
        refined, trace = refine_grid(counted, schedule, solver, grid, cal.x_T, cal.cond, traj.final,
                                     max_evals=max_evals, options=opts, free_end=free_end)
        if trace and min(trace) < history[-1]:
            grid = refined
        history += [min(v, history[-1]) for v in trace]
    return grid, {"rmse": error_of(grid), "start": start, "start_rmse": scores[start], "fixed_spacings": scores,
                  "dp_summed_local_error": dp_cost, "objective": [float(v) for v in history]}


def _check_start(schedule: NoiseSchedule, name: str, grid, nfe: int) -> torch.Tensor:
    """A given starting grid: nfe + 1 decreasing times, its first moved to t_max (where the noise is
    drawn in tuning), its last 0, the others within [t_min, t_max]."""
    g = torch.as_tensor(grid, dtype=torch.float64).flatten().clone()
    if len(g) != nfe + 1 or float(g[-1]) != 0.0 or bool((g[1:] >= g[:-1]).any()):
        raise ValueError(f"start {name!r} must be {nfe + 1} strictly decreasing times ending in 0, got "
                         f"{[round(v, 5) for v in g.tolist()]}")
    g[0] = schedule.t_max
    inner = g[1:-1]
    if inner.numel() and (float(inner.min()) < schedule.t_min or float(inner.max()) >= schedule.t_max):
        raise ValueError(f"start {name!r}: its inner times must lie in [t_min, t_max) = [{schedule.t_min:g}, "
                         f"{schedule.t_max:g})")
    return g


def _as_calibration(calibration) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return Calibration(calibration)
    if isinstance(calibration, tuple) and len(calibration) == 2:
        return Calibration(calibration[0], calibration[1])
    raise TypeError("calibration must be a Calibration (calibration_set(...)), an x_T tensor or (x_T, cond)")


def tune_model(model, *, solver: str = "dpmpp_2m", nfe: int = 5, w: float = 0.0, samples: int = 64,
               seed: int = 1234, **kwargs) -> TunedGrid:
    """``tune_grid`` for a ``fewstep.load`` diffusion model at guidance ``w``: ``samples`` calibration
    noises (and uniform random labels for a class-conditional model) from ``seed``."""
    if not hasattr(model, "denoiser") or not hasattr(model, "schedule") or getattr(model, "w_input", False) \
            or type(model).__name__ != "DiffusionModel":
        raise ValueError(f"tuning needs a diffusion model sampled by a solver; {model!r} has its own sampler")
    if w and model.num_classes is None:
        raise ValueError("guidance w needs a class-conditional model")
    classes = model.num_classes if model.num_classes is not None else None
    cal = calibration_set(samples, model.image_shape, seed=seed, num_classes=classes)
    with torch.no_grad():
        return tune_grid(model.denoiser(w), model.schedule, solver=solver, nfe=nfe, calibration=cal, model=model,
                         conditioning={"w": float(w)}, **kwargs)
