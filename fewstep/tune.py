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

``tune_solver`` (same arguments) fits a learned solver (``fewstep.solvers.learned``): the grid above, then
per-step coefficients of the base solver, fitted together with the times, on a fitting split of the
calibration noises, with early stopping and model selection on a validation split:

    tuned = tune_solver(denoiser, schedule, solver="dpmpp_2m", nfe=5, calibration=cal)
    out = fewstep.sample(denoiser, x_T, schedule, grid=tuned)      # the coefficients are applied
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .denoisers import CountingDenoiser, MemoDenoiser
from .grids import TunedGrid, lambdas_of, model_identity, schedule_identity
from .reference import reference_path, rmse
from .sampling import sample
from .schedules import NoiseSchedule, time_grid
from .solvers import get_solver
from .solvers._common import grid_points
from .solvers.baseline import ddim_step

__all__ = ["Calibration", "Trajectory", "calibration_set", "reference_trajectory", "dp_grid", "refine_grid",
           "tune_grid", "tune_model", "grid_rmse", "step_costs", "METHODS", "tune_solver", "SOLVER_METHODS",
           "DEFAULT_SOLVER_METHOD", "default_starts", "flow_shift_grid", "trajectory_targets",
           "heldout_errors", "is_flow",
           "heldout_reference", "pure_noise_top", "from_pure_noise", "prompt_split"]

METHODS = ("dp", "refine", "dp+refine")
REFERENCE_ERROR_SAMPLES = 16  # the calibration reference's own error is checked on this many noises (a report)
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
                    dtype=torch.float32, classes=None) -> Calibration:
    """n standard-normal noises (and, for a class-conditional model, uniform random labels: over
    ``range(num_classes)``, or over the ids in ``classes`` when given, e.g. a prompt split)."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, *shape), generator=g, dtype=dtype)
    if classes is not None:
        ids = torch.as_tensor(list(classes), dtype=torch.long)
        return Calibration(x_T, {"labels": ids[torch.randint(0, len(ids), (n,), generator=g)]}, seed)
    cond = None if num_classes is None else {"labels": torch.randint(0, num_classes, (n,), generator=g)}
    return Calibration(x_T, cond, seed)


def prompt_split(n_prompts: int, every: int = 4) -> tuple[list[int], list[int]]:
    """(calibration ids, held-out ids) of a prompt bank: every ``every``-th prompt (ids every-1, 2 every-1, ...)
    is held out, never seen in fitting, so held-out errors are on other prompts as well as other noises."""
    if n_prompts < 2:
        raise ValueError(f"tuning a text-to-image model needs at least 2 prompts (calibration and held-out ones), "
                         f"got {n_prompts}: pass more prompts, one per line")
    held = [i for i in range(n_prompts) if i % every == every - 1] or [n_prompts - 1]
    return [i for i in range(n_prompts) if i not in held], held


# ---------------------------------------------------------------------------
# The reference trajectory
# ---------------------------------------------------------------------------

@torch.no_grad()
def reference_trajectory(denoiser: Callable, schedule: NoiseSchedule, x_T: torch.Tensor, cond: dict | None = None,
                         *, steps: int = 128, candidates: int = 64, error_samples: int | None = None) -> Trajectory:
    """The reference solve of ``fewstep.reference`` (classic RK4 in log-SNR on y = x / sigma, float64 state)
    from t_max to t_min, then one denoising call, in ``steps`` steps, recording every
    ``steps // candidates``-th step; its error is taken as the difference from a second solve with half
    the steps (RMSE and max; a bound, ~15x the error only in RK4's asymptotic range), on the first
    ``error_samples`` noises only when given (the check then costs that share of a third of the solve)."""
    if steps % candidates:
        raise ValueError(f"steps ({steps}) must be a multiple of candidates ({candidates})")
    if error_samples is not None and (not isinstance(error_samples, int) or error_samples < 1):
        raise ValueError(f"error_samples must be a positive integer or None, got {error_samples!r}")
    start = time.perf_counter()
    counted = CountingDenoiser(denoiser)
    fine = reference_path(counted, schedule, x_T, schedule.t_max, 0.0, steps=steps, every=steps // candidates,
                          cond=cond)
    k = x_T.shape[0] if error_samples is None else min(error_samples, x_T.shape[0])
    head = torch.arange(k)
    coarse = reference_path(counted, schedule, x_T[:k], schedule.t_max, 0.0, steps=steps // 2,
                            cond=None if cond is None else {n: _rows(v, head, len(x_T)) for n, v in cond.items()})
    diff = fine.x[:k] - coarse.x
    # the difference bounds the finer answer's error; only in RK4's asymptotic range is it ~15x that error
    # (a learned model's ODE may not be there: measured on mnist-teacher, 128 -> 256 steps still moves ~0.003)
    error = {"rmse": rmse(fine.x[:k], coarse.x), "max_abs": float(diff.abs().max()),
             "how": f"|x({steps} RK4 steps) - x({steps // 2} steps)|, taken as the {steps}-step answer's error"
                    + (f", on the first {k} of {x_T.shape[0]} noises" if k < x_T.shape[0] else "")}
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
    u0, lam0, span, t_max = _gap_logits(schedule, start, free_end)
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
      uses today: the result is never worse on the calibration set than any of them either. A flow
      schedule always gets its pipelines' shifted grids (``default_starts``: shifts 1 to 7) as starts.
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
                                              candidates=candidates, error_samples=REFERENCE_ERROR_SAMPLES)
        log(f"reference: {cal.trajectory.model_calls} calls, {cal.trajectory.seconds:.0f} s, "
            f"own error {cal.trajectory.error['rmse']:.2g}")
    start, counted = time.perf_counter(), CountingDenoiser(denoiser)  # the tuning's own cost
    starts = {**default_starts(schedule, nfe), **(starts or {})}  # flow: the pipelines' shifted grids too
    remembered = MemoDenoiser(counted, size=2 * nfe + 8)  # each rerun from the noises repeats its first call
    grid, record = _search(remembered, schedule, solver, nfe, cal, method, max_evals or 12 * (nfe - 1) + 20,
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


def tune_model(model, *, solver: str = "dpmpp_2m", nfe=5, w: float = 0.0, samples: int = 64,
               seed: int = 1234, method: str = "dp+refine", heldout: int = 0, **kwargs):
    """``tune_grid`` (method dp / refine / dp+refine) or ``tune_solver`` (method learned = its default, coeff,
    pas or grid) for a ``fewstep.load`` diffusion model at guidance ``w``: ``samples`` calibration noises (and
    uniform random labels for a class-conditional model) from ``seed``; ``heldout`` more from ``seed + 1``,
    whose errors ``tune_solver`` records. A text-to-image teacher (``fewstep.recipes.teachers.PipelineTeacher``,
    a diffusers pipeline over a prompt bank) draws its calibration and held-out prompts from disjoint sets
    (``prompt_split``), recorded in the result. ``nfe`` a list of budgets: one result per budget, in a list,
    sharing the calibration and held-out sets and their reference solves (computed once)."""
    if not hasattr(model, "denoiser") or not hasattr(model, "schedule") or getattr(model, "w_input", False) \
            or getattr(model, "fixed_steps", False):  # students and generators sample with their own steps
        raise ValueError(f"tuning needs a diffusion model sampled by a solver; {model!r} has its own sampler")
    if w and model.num_classes is None:
        raise ValueError("guidance w needs a class-conditional model")
    known = METHODS + SOLVER_METHODS + ("learned",)
    if method not in known:
        raise ValueError(f"method must be one of {', '.join(known)}, got {method!r}")
    classes = model.num_classes if model.num_classes is not None else None
    prompts = getattr(model, "prompts", None)
    conditioning = {"w": float(w)}
    cal_ids = ho_ids = None
    if prompts:
        cal_ids, ho_ids = prompt_split(len(prompts))
        conditioning.update(calibration_prompts=[prompts[i] for i in cal_ids],
                            heldout_prompts=[prompts[i] for i in ho_ids])
    cal = calibration_set(samples, model.image_shape, seed=seed, num_classes=classes, classes=cal_ids)
    if prompts and method not in METHODS and len(cal_ids) >= 2:  # validation on prompts of its own, as held-out
        cal, val_ids = _validation_prompts(cal, cal_ids, kwargs.get("validation", VALIDATION_SHARE), seed)
        conditioning["validation_prompts"] = sorted({prompts[i] for i in val_ids})
    ho = calibration_set(heldout, model.image_shape, seed=seed + 1, num_classes=classes,
                         classes=ho_ids) if heldout else None
    den, out = model.denoiser(w), []
    with torch.no_grad():
        for k in ([nfe] if isinstance(nfe, int) else list(nfe)):
            if method in METHODS:
                out.append(tune_grid(den, model.schedule, solver=solver, nfe=k, calibration=cal, model=model,
                                     conditioning=conditioning, method=method, **kwargs))
            else:
                out.append(tune_solver(den, model.schedule, solver=solver, nfe=k, calibration=cal, model=model,
                                       conditioning=conditioning, heldout=ho,
                                       method=DEFAULT_SOLVER_METHOD if method == "learned" else method, **kwargs))
    return out[0] if isinstance(nfe, int) else out


# ---------------------------------------------------------------------------
# Learned solvers: times and per-step coefficients fitted together (fewstep.solvers.learned)
# ---------------------------------------------------------------------------

SOLVER_METHODS = ("coeff", "pas", "auto", "grid")
TIMES = ("auto", "tuned", "fixed")  # tune_solver's times: see its docstring
VALIDATION_SHARE = 0.25  # the calibration samples tune_solver validates on (the last quarter)
DEFAULT_TIMES = "auto"
DEFAULT_SOLVER_METHOD = "auto"  # coeff and pas both fitted, the better on the validation split kept: neither
# wins everywhere on held-out noises (benchmarks/results/learned_*.md)
FLOW_SHIFTS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0)  # shifted flow grids tried as starts (SD3 / Sana 3, Flux ~3.2, Wan 5)
PAS_RIDGE = (0.0, 1e-3, 1e-2, 1e-1, 1.0)  # ridge strengths of the PAS fit, relative; chosen on the validation split


def is_flow(schedule: NoiseSchedule) -> bool:
    """Rectified flow / flow matching (alpha = 1 - t, sigma = t)."""
    return getattr(schedule, "kind", "") in ("rectified_flow", "flow_matching")


def flow_shift_grid(schedule: NoiseSchedule, nfe: int, shift: float) -> torch.Tensor:
    """The grid a flow-matching pipeline samples with ``nfe`` calls at ``shift`` (FlowMatchEuler and the flow
    modes of DPM-Solver / UniPC: sigma_k = k / nfe shifted, s sigma / (1 + (s - 1) sigma), SD3 paper eq. 23),
    its first point moved to the schedule's t_max, ending in 0."""
    sig = torch.arange(nfe, 0, -1, dtype=torch.float64) / nfe
    t = shift * sig / (1.0 + (shift - 1.0) * sig)
    t = t.clamp(schedule.t_min, schedule.t_max)
    t[0] = schedule.t_max
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def default_starts(schedule: NoiseSchedule, nfe: int) -> dict:
    """Starting grids beyond the fixed spacings: for a flow schedule the pipelines' own shifted grids
    (``FLOW_SHIFTS``); none for other families (their fixed spacings are their pipelines' grids)."""
    if not is_flow(schedule) or nfe < 2:
        return {}
    out = {}
    for s in FLOW_SHIFTS:
        g = flow_shift_grid(schedule, nfe, s)
        if bool((g[1:] < g[:-1]).all()):
            out[f"flow_shift{s:g}"] = g
    return out


def pure_noise_top(schedule: NoiseSchedule) -> float | None:
    """Flow matching's pure-noise top t_upper (alpha = 0, above the finite-log-SNR t_max), where its pipelines
    draw the noise; None for other schedules (their noise is drawn at t_max)."""
    if not is_flow(schedule) or not schedule.t_upper > schedule.t_max:
        return None
    return float(schedule.t_upper)


@torch.no_grad()
def from_pure_noise(denoiser: Callable, schedule: NoiseSchedule, x_T: torch.Tensor, cond: dict | None = None, *,
                    steps: int = 8) -> torch.Tensor:
    """x at t_max on the probability-flow ODE started from pure noise ``x_T`` at t_upper: RK4 in t on the
    data-prediction form dx/dt = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D(x, t) (DPM-Solver++,
    arXiv 2211.01095, eq. 6 rewritten; regular where alpha = 0, unlike the log-SNR form), derivatives by
    backward differences."""
    cond = dict(cond or {})
    h = 1e-7

    def f(x, t):
        tt = torch.tensor([t, t - h], dtype=torch.float64)
        (a, a_), (s, s_) = schedule.alpha(tt).tolist(), schedule.sigma(tt).tolist()
        da, ds = (a - a_) / h, (s - s_) / h
        d = denoiser(x.to(x_T.dtype), torch.full((x.shape[0],), t, dtype=torch.float64), **cond).to(torch.float64)
        return (ds / s) * x + (da - a * ds / s) * d

    t0, t1 = float(schedule.t_upper), float(schedule.t_max)
    dt, x = (t1 - t0) / steps, x_T.to(torch.float64)
    for k in range(steps):
        t = t0 + k * dt
        k1 = f(x, t)
        k2 = f(x + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = f(x + 0.5 * dt * k2, t + 0.5 * dt)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + f(x + dt * k3, t + dt))
    return x.to(x_T.dtype)


def _subset(cal: Calibration, idx: torch.Tensor) -> Calibration:
    """The calibration samples ``idx`` (noises, conditions and their slice of the reference trajectory)."""
    n = cal.x_T.shape[0]
    traj = cal.trajectory
    sub = None if traj is None else Trajectory(traj.times, [_rows(v, idx, n) for v in traj.xs],
                                               [_rows(v, idx, n) for v in traj.x0s], _rows(traj.final, idx, n),
                                               traj.error, traj.model_calls, traj.seconds)
    cond = None if cal.cond is None else {k: _rows(v, idx, n) for k, v in cal.cond.items()}
    return Calibration(_rows(cal.x_T, idx, n), cond, cal.seed, sub)


def _rows(v, idx: torch.Tensor, n: int):
    """The rows ``idx`` of a per-sample tensor (first dimension ``n``); anything else as it is."""
    return v[idx] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v


def _n_validation(n: int, validation: float) -> int:
    """How many of n calibration samples validate: the last ``validation`` share, at least one, never all."""
    return min(n - 1, max(1, round(n * validation)))


def _validation_prompts(cal: Calibration, cal_ids: list, validation: float, seed: int) -> tuple[Calibration, list]:
    """(the calibration set with its validation samples, the last ``validation`` share, on prompts the fitting
    samples never use (every 4th calibration prompt, ``prompt_split``), the prompt ids those samples drew), so
    that stopping and choosing on the validation split measure what the held-out prompts measure: how the fit
    carries over to other prompts."""
    n = int(cal.x_T.shape[0])
    fit_pos, val_pos = prompt_split(len(cal_ids))
    fit_ids, val_ids = [cal_ids[i] for i in fit_pos], [cal_ids[i] for i in val_pos]
    g = torch.Generator().manual_seed(seed + 2)
    n_val = _n_validation(n, validation)
    labels = torch.cat([torch.as_tensor(fit_ids)[torch.randint(0, len(fit_ids), (n - n_val,), generator=g)],
                        torch.as_tensor(val_ids)[torch.randint(0, len(val_ids), (n_val,), generator=g)]])
    return Calibration(cal.x_T, {**cal.cond, "labels": labels}, cal.seed), labels[n - n_val:].tolist()


def _split(cal: Calibration, validation: float) -> tuple[Calibration, Calibration]:
    """(train, validation): the last ``validation`` share of the calibration samples validate (at least one)."""
    n = int(cal.x_T.shape[0])
    if n < 2:
        raise ValueError(f"a learned solver needs at least 2 calibration noises (fit + validation), got {n}")
    n_val = _n_validation(n, validation)
    idx = torch.arange(n)
    return _subset(cal, idx[: n - n_val]), _subset(cal, idx[n - n_val:])


def _gap_logits(schedule, grid: torch.Tensor, free_end: bool):
    """(u, lam0, span, t_max): the free log-SNR points of ``grid`` as the logits ``_times_of`` maps back."""
    t_max = float(grid[0])
    lam0, lam1 = (float(v) for v in schedule.lambda_(torch.tensor([t_max, schedule.t_min], dtype=torch.float64)))
    span = lam1 - lam0
    inner = schedule.lambda_(grid[1:-1 if free_end else -2].to(torch.float64)).clamp(lam0, lam1)
    gaps = torch.diff(torch.cat([torch.tensor([lam0], dtype=torch.float64), inner,
                                 torch.tensor([lam1], dtype=torch.float64)])).clamp_min(1e-3 * span)
    return torch.log(gaps[:-1] / gaps[-1]), lam0, span, t_max


OUTLIER_SCALE = 3.0  # robust errors: a sample's error is capped at this many times the median (at the start)


class _Problem:
    """One calibration split seen by the fitter: the final-sample error of a (grid, coefficients) pair.

    After ``set_scale`` the error is robust: sqrt(mean_b min(e_b, delta)^2), e_b one sample's RMSE, delta =
    ``OUTLIER_SCALE`` x the median e_b at the starting grid (a capped, "trimmed" square loss). On a
    multi-modal model a few samples that a few-step solver sends to another mode carry most of the RMSE of a
    small set; fitting or early-stopping on them chases those samples, which does not carry over to other
    noises (measured on gmm-mnist: one such sample in 8 turned a 4x validation gain into a held-out loss)."""

    def __init__(self, denoiser, schedule, solver: str, options: dict, cal: Calibration, basis: int):
        self.denoiser, self.schedule, self.cal, self.basis = denoiser, schedule, cal, basis
        self.solver, self.options = solver, options
        self.step = get_solver(solver).stepper(**options)
        self.delta, self.top = None, None  # top: the pure-noise first point every grid starts from (flow)
        self.x_tmax = cal.x_T  # the noises at t_max (from the pure noises on flow): where reference paths start

    def per_sample(self, grid, method=None, rows=None) -> torch.Tensor:
        diff = self.run(grid, method, rows).to(torch.float64) - self.cal.trajectory.final.to(torch.float64)
        return diff.reshape(diff.shape[0], -1)

    def set_scale(self, grid) -> None:
        self.delta = OUTLIER_SCALE * float(self.per_sample(grid).pow(2).mean(1).sqrt().median())

    def residual(self, grid, method, rows) -> torch.Tensor:
        """Per-value residuals whose mean square is the (robust) error squared."""
        r = self.per_sample(grid, method, rows)
        if self.delta is None:
            return r.flatten()
        e = r.pow(2).mean(1).sqrt().clamp_min(1e-300)
        return (r * (self.delta / e).clamp(max=1.0)[:, None]).flatten()

    def error(self, grid: torch.Tensor, method: str | None = None, rows=None, plain: bool = False) -> float:
        if plain or self.delta is None:
            return rmse(self.run(grid, method, rows), self.cal.trajectory.final)
        return float(self.residual(grid, method, rows).pow(2).mean().sqrt())

    def run(self, grid: torch.Tensor, method: str | None, rows=None, fit=None) -> torch.Tensor:
        from .solvers.learned import learned_sample, zero_coefficients
        if self.top is not None:  # from pure noise: DDIM's first step, then the solver (as FewstepScheduler)
            grid = torch.cat([torch.tensor([self.top], dtype=torch.float64), grid[1:]])
            method, rows = (method, rows) if method is not None else ("coeff", None)
        if method is None:
            return sample(self.denoiser, self.cal.x_T, self.schedule, solver=self.solver, grid=grid,
                          cond=self.cal.cond, **self.options).x
        rows = rows if rows is not None else zero_coefficients(method, len(grid) - 1, self.basis)
        return learned_sample(self.denoiser, self.cal.x_T, grid, self.schedule, base=self.step, method=method,
                              coefficients=rows, basis=self.basis, cond=self.cal.cond, fit=fit).x


def trajectory_targets(traj: Trajectory, schedule: NoiseSchedule, times: torch.Tensor) -> list:
    """The converged ODE solution at each time of ``times`` after the first, read off the reference trajectory
    without model calls (PAS's per-step targets): cubic Hermite interpolation in lambda of y = x / sigma between
    the recorded candidates, whose slopes dy/dlambda = e^lambda x0_hat are recorded too (the reference's own
    ODE, ``fewstep.reference``; the interpolation error is O(h^4) in the candidates' spacing h, the order of the
    RK4 solve). The target at t = 0 is ``traj.final``."""
    lam_c = schedule.lambda_(traj.times.to(torch.float64))
    sig_c = schedule.sigma(traj.times.to(torch.float64))
    out = []
    for t in times[1:].tolist():
        if t == 0.0:
            out.append(traj.final.to(torch.float64))
            break
        lam = float(schedule.lambda_(torch.tensor([t], dtype=torch.float64)))
        i = int(torch.searchsorted(lam_c, torch.tensor([lam], dtype=torch.float64)).clamp(1, len(lam_c) - 1)) - 1
        lo, hi = float(lam_c[i]), float(lam_c[i + 1])
        if not lo - 1e-9 <= lam <= hi + 1e-9:
            raise ValueError(f"time {t!r} lies outside the reference trajectory's range "
                             f"[{float(traj.times[-1])!r}, {float(traj.times[0])!r}]")
        h, s = hi - lo, (lam - lo) / (hi - lo)
        y0, y1 = traj.xs[i].to(torch.float64) / float(sig_c[i]), traj.xs[i + 1].to(torch.float64) / float(sig_c[i + 1])
        d0 = math.exp(lo) * traj.x0s[i].to(torch.float64)
        d1 = math.exp(hi) * traj.x0s[i + 1].to(torch.float64)
        y = ((2 * s ** 3 - 3 * s ** 2 + 1) * y0 + (s ** 3 - 2 * s ** 2 + s) * h * d0
             + (3 * s ** 2 - 2 * s ** 3) * y1 + (s ** 3 - s ** 2) * h * d1)
        out.append(float(schedule.sigma(torch.tensor([t], dtype=torch.float64))) * y)
    return out


def _fit_pas(train: _Problem, val: _Problem, grid: torch.Tensor, targets: list, basis: int,
             log) -> tuple[list, list, dict]:
    """PAS coefficients on ``grid``: step by step, the ridge least-squares fit of the corrected step's output
    to the reference at the next grid time (PAS's per-step L2 loss to the teacher trajectory, arXiv 2411.06503,
    solved in closed form: the output is linear in the coefficients), for each ridge strength of ``PAS_RIDGE``; the strength with the lowest
    validation error is kept, then each step's correction is dropped where dropping it does not raise the
    validation error (PAS's adaptive search, judged on the validation split)."""
    def fit_rows(ridge: float) -> list:
        rows = {}

        def fit(i, parts):
            dirs, target = parts["dirs"] * parts["weight"], targets[i].reshape(len(parts["x_next"]), -1)
            resid = target - parts["x_next"].reshape(len(target), -1).to(torch.float64)
            a = torch.einsum("bkn,bjn->kj", dirs, dirs)
            rhs = torch.einsum("bkn,bn->k", dirs, resid)
            scale = float(a.diagonal().mean()) if float(a.diagonal().mean()) > 0 else 1.0
            reg = (ridge * scale + 1e-12 * scale) * torch.eye(len(rhs), dtype=torch.float64)
            c = torch.linalg.solve(a + reg, rhs) if bool(a.diagonal().gt(0).any()) else torch.zeros_like(rhs)
            c = torch.where(a.diagonal() > 0, c, torch.zeros_like(c))
            rows[i] = [float(v) for v in c]
            return rows[i]
        train.run(grid, "pas", fit=fit)
        return [rows[i] for i in range(len(grid) - 1)]

    zero = [[0.0] * basis for _ in range(len(grid) - 1)]
    base_val = val.error(grid, "pas", zero)
    history = [train.error(grid, "pas", zero)]
    best_rows, best_val, per_ridge = zero, base_val, {}
    for ridge in PAS_RIDGE:
        rows = fit_rows(ridge)
        v = val.error(grid, "pas", rows)
        per_ridge[ridge] = v
        history.append(min(history[-1], train.error(grid, "pas", rows)))
        if v < best_val:
            best_rows, best_val = rows, v
    dropped = []
    if best_rows is not zero:
        for i in range(len(best_rows)):
            if not any(best_rows[i]):
                continue
            trial = [r if j != i else [0.0] * basis for j, r in enumerate(best_rows)]
            v = val.error(grid, "pas", trial)
            if v <= best_val:
                best_rows, best_val = trial, v
                dropped.append(i)
    log(f"pas: validation RMSE {base_val:.4g} -> {best_val:.4g} (ridge {min(per_ridge, key=per_ridge.get):g}; "
        f"steps left uncorrected {dropped})")
    history.append(min(history[-1], train.error(grid, "pas", best_rows)))
    return best_rows, history, {"validation_by_ridge": {f"{k:g}": v for k, v in per_ridge.items()},
                                "validation_uncorrected": base_val, "dropped_steps": dropped}


def _fit_method(method, train: _Problem, val: _Problem, grid, nfe, free_end, max_evals, basis, log,
                move_times: bool = True) -> dict:
    """One method's fit from the starting ``grid``: its grid, coefficient rows (None for ``grid``), objective
    and validation error."""
    objective = [train.error(grid)]
    rows, extra = None, {}
    if method == "coeff":
        evals = max_evals or 15 * (2 * nfe - 3) + 30
        grid, rows, history, extra = _fit_coeff_lm(train, val, grid, nfe, free_end, evals, log, move_times)
        objective += history
    elif method == "pas":
        targets = trajectory_targets(train.cal.trajectory, train.schedule, grid)  # no model calls
        rows, history, extra = _fit_pas(train, val, grid, targets, basis, log)  # PAS's own per-step fit, then
        rows, history2, extra2 = _fit_pas_lm(train, val, grid, basis, rows, max_evals or 40 * nfe * basis, log)
        extra.update(extra2)  # the final error, all steps together
        objective += history + history2
    return {"grid": grid, "rows": rows, "objective": objective, "extra": extra, "method": method,
            "validation_error": val.error(grid, None if rows is None else method, rows)}


@torch.no_grad()
def tune_solver(denoiser: Callable, schedule: NoiseSchedule, *, solver: str = "dpmpp_2m", nfe: int = 5,
                calibration: Calibration | torch.Tensor | tuple, method: str = DEFAULT_SOLVER_METHOD,
                validation: float = VALIDATION_SHARE, reference_steps: int = 128, candidates: int = 64,
                max_evals: int | None = None, options: dict | None = None, free_end: bool | None = None,
                model=None, conditioning: dict | None = None, starts: dict | None = None, basis: int = 4,
                heldout: Calibration | torch.Tensor | tuple | None = None, times: str = DEFAULT_TIMES,
                log: Callable[[str], None] | None = None) -> TunedGrid:
    """Fit a learned solver: the time grid of ``nfe`` model calls and per-step coefficients of ``solver``
    (``fewstep.solvers.learned``) whose final sample comes closest to the converged probability-flow ODE
    solution. The sibling of ``tune_grid``, with the same arguments; use the result with
    ``fewstep.sample(denoiser, x_T, schedule, grid=tuned)``, ``FewstepScheduler(..., grid=tuned)`` or
    ``fewstep sample --grid``.

    calibration: as ``tune_grid`` (noises drawn with their own seed, e.g. ``calibration_set``; conditions
      too). Its last ``validation`` share (default 25 %) is never fitted on: it picks the starting grid, stops
      the coeff search early and picks PAS's ridge strength, so what improves is the error on noises the fit
      did not see.
    method: ``coeff`` (one scale per step on the high-order term, fitted together with the times by
      Levenberg-Marquardt on the final error from the tuned grid), ``pas`` (PCA-based coefficients, ``basis``
      per step, on the tuned grid: PAS's closed-form per-step fit, then Levenberg-Marquardt on the final
      error), ``auto`` (default: both, the one with the lower validation error kept) or ``grid`` (the tuned
      times alone). Fits and validation use a robust error (each sample's RMSE capped at 3x the median:
      samples sent to another mode of a multi-modal model would otherwise dominate). With tuned times every
      method starts with ``tune_grid`` (dp + refine) on the fitting split, from the fixed spacings, ``starts``
      and, for a flow schedule, the flow pipelines' shifted grids (``default_starts``); with fixed times from
      the best of those starts as it is. The result is never worse on the validation split than its grid,
      nor than the best start.
    free_end: let the last finite time move (default: yes for flow schedules, whose pipelines' grids end well
      above t_min; no for VP / EDM, see ``tune_grid``).
    heldout: more noises (and conditions), never used in fitting: their errors against a fresh reference solve
      (the result, its times alone, the best fixed spacing) are recorded in ``heldout``.
    max_evals: sampler runs on the fitting split for the Levenberg-Marquardt search (coeff: default
      15 * (2 nfe - 3) + 30; pas: 40 nfe basis); the grid stage keeps ``tune_grid``'s default.
    times: ``tuned`` (the grid stage above, and coeff moves the times with its scales), ``fixed`` (no grid
      stage: the fixed spacing or start with the lowest fitting error, kept as it is; only the coefficients are
      fitted: fewer parameters, a fraction of the cost) or ``auto`` (default: both fitted; the tuned times are
      kept only where their validation error is lower by more than one standard error of the paired
      per-sample difference, the one-standard-error rule: fitted times chase the few calibration samples near
      a boundary between modes, which does not carry over; ``_pick_times``). ``method='grid'`` implies tuned.
    """
    spec = get_solver(solver)
    if spec.kind != "multistep" or spec.stochastic or spec.step is None:
        raise ValueError(f"tune_solver fits deterministic one-call-per-step solvers with a step function; {solver!r} "
                         f"is {'stochastic' if spec.stochastic else spec.kind}: use e.g. dpmpp_2m or unipc_bh2_2")
    if method not in SOLVER_METHODS:
        raise ValueError(f"method must be one of {', '.join(SOLVER_METHODS)}, got {method!r}")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if not 0.0 < validation < 1.0:
        raise ValueError(f"validation must be a share in (0, 1), got {validation!r}")
    if not isinstance(basis, int) or not 1 <= basis <= 8:
        raise ValueError(f"basis must be an integer from 1 to 8, got {basis!r}")
    if times not in TIMES:
        raise ValueError(f"times must be 'tuned' (fitted), 'fixed' (the best fixed spacing) or 'auto' (both, the "
                         f"simpler kept unless the tuned times validate clearly better), got {times!r}")
    if times == "fixed" and method == "grid":
        raise ValueError("method 'grid' fits the times alone; with times='fixed' there is nothing to fit: "
                         "use times='tuned', or method 'coeff', 'pas' or 'auto'")
    if method == "coeff" and spec.order < 2:
        raise ValueError(f"method 'coeff' scales a high-order term; {solver!r} is first order: use 'pas' or a "
                         "solver such as dpmpp_2m")
    cal, log = _as_calibration(calibration), log or (lambda msg: None)
    if times == "auto" and method != "grid":  # both fits share the calibration's reference solve and split
        kw = dict(solver=solver, nfe=nfe, calibration=cal, method=method, validation=validation,
                  reference_steps=reference_steps, candidates=candidates, max_evals=max_evals, options=options,
                  free_end=free_end, model=model, conditioning=conditioning, starts=starts, basis=basis, log=log)
        result = _pick_times(tune_solver(denoiser, schedule, times="fixed", **kw),
                             tune_solver(denoiser, schedule, times="tuned", **kw), log)
        if heldout is not None:
            result.heldout = heldout_errors(denoiser, schedule, result, heldout, reference_steps=reference_steps)
            log(f"held-out RMSE {result.heldout['rmse']:.4g} (times alone {result.heldout['grid_alone']:.4g}, best "
                f"fixed spacing {result.heldout['best_fixed']:.4g})")
        return result
    times = "tuned" if times == "auto" else times
    candidates = min(candidates, reference_steps)  # a short reference solve records every step
    free_end = is_flow(schedule) if free_end is None else bool(free_end)
    opts = dict(options or {})
    top, inner = pure_noise_top(schedule), cal
    if top is not None:  # flow matching: the noise is at t_upper (pure noise); the reference starts there
        if "pure_noise" not in cal.costs:
            cal.costs["pure_noise"] = Calibration(from_pure_noise(denoiser, schedule, cal.x_T, cal.cond), cal.cond,
                                                  cal.seed)
        inner = cal.costs["pure_noise"]
    if inner.trajectory is None:
        inner.trajectory = reference_trajectory(denoiser, schedule, inner.x_T, inner.cond, steps=reference_steps,
                                                candidates=candidates, error_samples=REFERENCE_ERROR_SAMPLES)
        log(f"reference: {inner.trajectory.model_calls} calls, {inner.trajectory.seconds:.0f} s, "
            f"own error {inner.trajectory.error['rmse']:.2g}")
    key = ("split", validation)
    if key not in inner.costs:  # cached with the calibration, so the DP costs of the fitting split are reused
        inner.costs[key] = _split(inner, validation)
    fit_cal, val_cal = inner.costs[key]
    start, counted = time.perf_counter(), CountingDenoiser(denoiser)  # the model calls made
    # reruns from the same noises repeat calls (every run's first; in a Jacobian column, each call before the
    # step whose parameter moved): remembered, enough of them to keep a base run through all its columns (the
    # grid stage, tune_grid, remembers its own)
    memo = MemoDenoiser(counted, size=(basis + 2) * nfe + 8)
    all_starts = {**default_starts(schedule, nfe), **(starts or {})}  # (tune_grid adds the flow starts too)
    fixed = {sp: time_grid(schedule, nfe, sp) for sp in FIXED_SPACINGS}
    fixed.update({k: _check_start(schedule, k, g, nfe) for k, g in all_starts.items()})
    if times == "tuned":
        base = tune_grid(counted, schedule, solver=solver, nfe=nfe, calibration=fit_cal, method="dp+refine",
                         reference_steps=reference_steps, candidates=candidates, options=opts, free_end=free_end,
                         starts=all_starts)
        best_start, tuned_times = base.calibration["start"], torch.tensor(base.times, dtype=torch.float64)
        grid_objective, fixed_errors = base.calibration["objective"], base.calibration["fixed_spacings"]
    train, val = (_Problem(memo, schedule, solver, opts, c, basis) for c in (fit_cal, val_cal))
    if top is not None:  # the problems sample from the pure noises themselves
        n_fit = fit_cal.x_T.shape[0]
        train.cal = replace(fit_cal, x_T=cal.x_T[:n_fit])
        val.cal = replace(val_cal, x_T=cal.x_T[n_fit:])
        train.top = val.top = top
        train.x_tmax, val.x_tmax = fit_cal.x_T, val_cal.x_T
    if times == "fixed":  # the start with the lowest plain RMSE on the fitting split, as tune_grid ranks them
        fixed_errors = {k: train.error(g, plain=True) for k, g in fixed.items()}
        best_start = min(fixed_errors, key=fixed_errors.get)
        tuned_times, grid_objective = fixed[best_start], [fixed_errors[best_start]]
    # the starting grid: the tuned one or the best start on the fitting split, whichever validates better
    train.set_scale(fixed[best_start])
    val.set_scale(fixed[best_start])
    val_tuned, val_start = val.error(tuned_times), val.error(fixed[best_start])
    grid, grid_from = (tuned_times, "tune_grid" if times == "tuned" else best_start) if val_tuned <= val_start \
        else (fixed[best_start], best_start)
    log(f"grid ({grid_from}): fitting error {train.error(grid):.4g}, validation {min(val_tuned, val_start):.4g} "
        f"(best start {best_start}: {val_start:.4g}; robust errors, see _Problem)")
    record = {"grid_from": grid_from, "start": best_start, "grid_objective": grid_objective, "times": times,
              "grid_validation_error": min(val_tuned, val_start), "start_validation_error": val_start,
              "fixed_spacings": fixed_errors}
    start_grid = grid
    fits = {}
    both = ("coeff", "pas") if nfe >= 3 and spec.order >= 2 else ("pas",)  # coeff needs a high-order term
    for mth in (both if method == "auto" else (method,)):
        fits[mth] = _fit_method(mth, train, val, start_grid, nfe, free_end, max_evals, basis, log,
                                move_times=times == "tuned")
    # kept only if not worse than the grid alone on the validation split, by the robust error and by plain RMSE
    # (the robust error alone let a fit that sends more samples to another mode through, measured on the flow
    # mixture); auto keeps the better of the methods that pass
    grid_plain = val.error(start_grid, plain=True)
    for f in fits.values():
        f["validation_rmse"] = val.error(f["grid"], None if f["rows"] is None else f["method"], f["rows"], plain=True)
        f["passes"] = f["rows"] is None or (f["validation_error"] <= record["grid_validation_error"]
                                            and f["validation_rmse"] <= grid_plain)
    passing = [k for k in fits if fits[k]["passes"]]
    chosen = min(passing or fits, key=lambda k: fits[k]["validation_error"])
    fit = fits[chosen]
    grid, rows, m = fit["grid"], fit["rows"], (chosen if fit["rows"] is not None else None)
    record.update(fit["extra"], objective=fit["objective"], chosen=chosen, grid_validation_rmse=grid_plain,
                  **({"validation_by_method": {k: {"error": v["validation_error"], "rmse": v["validation_rmse"]}
                                               for k, v in fits.items()}} if method == "auto" else {}))
    learned = {} if m is None else {"method": m, "coefficients": rows, "options": opts,
                                    **({"basis": basis} if m == "pas" else {})}
    if not passing:  # never worse on the validation split than the grid
        learned, m, rows, grid = {}, None, None, start_grid
        record["fell_back_to_grid"] = True
    if m is not None and top is not None:  # a learned solver starts where the pipeline's noise is: pure noise
        grid = torch.cat([torch.tensor([top], dtype=torch.float64), grid[1:]])
    fit_rmse, val_rmse = train.error(grid, m, rows, plain=True), val.error(grid, m, rows, plain=True)
    record.update(fitting_error=train.error(grid, m, rows), validation_error=val.error(grid, m, rows),
                  outlier_cap={"fitting": train.delta, "validation": val.delta},
                  validation_per_sample=val.per_sample(grid, m, rows).pow(2).mean(1).sqrt().tolist())
    record["objective"] = [min(record["objective"][:k + 1]) for k in range(len(record["objective"]))]
    log(f"{method} {solver} NFE {nfe}: fitting RMSE {fit_rmse:.4g}, validation RMSE {val_rmse:.4g} "
        f"(grid alone {record['grid_validation_error']:.4g})")
    traj = inner.trajectory
    result = TunedGrid(
        solver=solver, nfe=nfe, times=grid.tolist(), lambdas=lambdas_of(schedule, grid),
        schedule=schedule_identity(schedule),
        model={**(model_identity(model) if model is not None else {}), **(conditioning or {})},
        calibration={"samples": int(cal.x_T.shape[0]), "seed": cal.seed, "method": method, "free_end": free_end,
                     "fitting_samples": int(fit_cal.x_T.shape[0]), "validation_samples": int(val_cal.x_T.shape[0]),
                     "rmse": fit_rmse, "validation_rmse": val_rmse, **record,
                     "reference": {**traj.error, "candidates": len(traj.times)}, "options": opts},
        cost={"model_calls": counted.nfe, "seconds": round(time.perf_counter() - start, 1),
              "reference_model_calls": traj.model_calls, "reference_seconds": round(traj.seconds, 1),
              "batch": int(cal.x_T.shape[0])},
        learned=learned)
    if heldout is not None:
        result.heldout = heldout_errors(denoiser, schedule, result, heldout, reference_steps=reference_steps)
        log(f"held-out RMSE {result.heldout['rmse']:.4g} (times alone {result.heldout['grid_alone']:.4g}, best fixed "
            f"spacing {result.heldout['best_fixed']:.4g})")
    return result


def _pick_times(fixed: TunedGrid, tuned: TunedGrid, log) -> TunedGrid:
    """``times='auto'``: the fit on fixed times unless the fit with tuned times has a lower validation error by
    more than one standard error of the paired per-sample difference of squared errors (the one-standard-error
    rule, Hastie, Tibshirani & Friedman, Elements of Statistical Learning, sec. 7.10: the simpler of two models
    whose errors are within noise of each other). The result records both and the cost of both fits."""
    e_f = torch.tensor(fixed.calibration["validation_per_sample"], dtype=torch.float64)
    e_t = torch.tensor(tuned.calibration["validation_per_sample"], dtype=torch.float64)
    d = e_t.pow(2) - e_f.pow(2)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    use_tuned = float(d.mean()) + se < 0.0
    out = tuned if use_tuned else fixed
    out.calibration["times_choice"] = {
        "chosen": "tuned" if use_tuned else "fixed", "rule": "one standard error",
        "validation_rmse": {"fixed": fixed.calibration["validation_rmse"], "tuned": tuned.calibration["validation_rmse"]},
        "mean_difference": float(d.mean()), "standard_error": se,
        "other": {"times": (fixed if use_tuned else tuned).times, "learned": (fixed if use_tuned else tuned).learned}}
    out.calibration["times"] = "auto"
    out.cost = {**out.cost, "model_calls": fixed.cost["model_calls"] + tuned.cost["model_calls"],
                "seconds": round(fixed.cost["seconds"] + tuned.cost["seconds"], 1)}
    log(f"times: {'tuned' if use_tuned else 'fixed'} kept (validation RMSE fixed {fixed.calibration['validation_rmse']:.4g}, "
        f"tuned {tuned.calibration['validation_rmse']:.4g}; paired difference {float(d.mean()):.3g} +- {se:.3g})")
    return out


@torch.no_grad()
def heldout_reference(denoiser, schedule: NoiseSchedule, heldout: Calibration, *, reference_steps: int = 128):
    """(converged solution, max |x(2N) - x(N)|) of held-out noises: RK4 (``fewstep.reference.reference_solution``)
    from t_max, on flow matching from the pure noises (``from_pure_noise``), as pipelines start. Solved once per
    set, denoiser and step count (cached in ``heldout.costs``: every budget tuned on the set shares it)."""
    from .reference import reference_solution
    key = ("heldout_reference", reference_steps, id(denoiser))
    if key not in heldout.costs:
        top = pure_noise_top(schedule)
        start = heldout.x_T if top is None else from_pure_noise(denoiser, schedule, heldout.x_T, heldout.cond)
        heldout.costs[key] = reference_solution(denoiser, schedule, start, schedule.t_max, 0.0,
                                                steps=reference_steps, cond=heldout.cond)
    return heldout.costs[key]


@torch.no_grad()
def heldout_errors(denoiser, schedule: NoiseSchedule, tuned: TunedGrid, heldout, *, reference_steps: int = 128) -> dict:
    """RMSE on held-out noises against their converged reference (RK4, ``fewstep.reference``; from pure noise on
    flow matching, ``from_pure_noise``): of ``tuned``, of its times alone, and of each fixed spacing with the
    same solver and NFE."""
    ho, top = _as_calibration(heldout), pure_noise_top(schedule)
    ref, err = heldout_reference(denoiser, schedule, ho, reference_steps=reference_steps)
    opts = tuned.calibration.get("options", {})
    problem = _Problem(denoiser, schedule, tuned.solver, opts, Calibration(ho.x_T, ho.cond, ho.seed, Trajectory(
        torch.zeros(0), [], [], ref, {}, 0, 0.0)), int(tuned.learned.get("basis", 4)))
    problem.top = top
    times = torch.tensor(tuned.times, dtype=torch.float64)
    fixed = {sp: problem.error(time_grid(schedule, tuned.nfe, sp), plain=True) for sp in FIXED_SPACINGS}
    return {"rmse": problem.error(times, tuned.learned.get("method"), tuned.learned.get("coefficients"), plain=True),
            "grid_alone": problem.error(times, plain=True), "fixed_spacings": fixed,
            "best_fixed": min(fixed.values()), "samples": int(ho.x_T.shape[0]), "seed": ho.seed,
            "reference": f"fewstep.reference.reference_solution, {2 * reference_steps} RK4 steps, "
                         f"max|x(2N) - x(N)| = {err:.2g}" + ("" if top is None else ", from pure noise")}


def _levenberg_marquardt(residual: Callable, p0, val_error: Callable, *, max_iters: int, log, h: float = 1e-3,
                         patience: int = 2, max_runs: int | None = None) -> tuple:
    """Minimise mean(residual(p)^2) by Levenberg-Marquardt with forward-difference Jacobians (one run per
    parameter), keeping the iterate with the lowest ``val_error`` and stopping when that has not improved
    for ``patience`` iterations (early stopping on the validation split). ``residual`` returns None where
    ``p`` is not allowed (e.g. times out of order). Returns (best p, fitting RMSE after each iteration,
    validation RMSE after each iteration, runs)."""
    p = torch.as_tensor(p0, dtype=torch.float64).clone()
    r, runs = residual(p), 1
    f = float(r.pow(2).mean())
    best_p, best_val = p.clone(), val_error(p)
    history, val_history, lam, since = [math.sqrt(f)], [best_val], 1e-3, 0
    for it in range(max_iters):
        if max_runs is not None and runs + p.numel() + 1 > max_runs:
            break
        cols = []
        for k in range(p.numel()):
            q = p.clone()
            q[k] += h
            rq = residual(q)
            if rq is None:  # step backwards where forwards leaves the allowed set
                q[k] -= 2 * h
                rq = residual(q)
                cols.append((r - rq) / h if rq is not None else torch.zeros_like(r))
            else:
                cols.append((rq - r) / h)
            runs += 1
        jac = torch.stack(cols, 1)  # (residuals, parameters)
        hess, grad = jac.T @ jac, jac.T @ r
        diag = hess.diagonal().clamp_min(1e-12 * float(hess.diagonal().max().clamp_min(1e-30)))
        accepted = False
        while lam < 1e8:
            step = torch.linalg.solve(hess + lam * torch.diag(diag), -grad)
            r_new = residual(p + step)
            runs += 1
            f_new = math.inf if r_new is None else float(r_new.pow(2).mean())
            if f_new < f:
                p, r, f, lam, accepted = p + step, r_new, f_new, max(lam / 3.0, 1e-7), True
                break
            lam *= 4.0
        history.append(math.sqrt(f))
        if not accepted:
            break
        v = val_error(p)
        val_history.append(v)
        if v < best_val:
            best_p, best_val, since = p.clone(), v, 0
        else:
            since += 1
            if since >= patience:
                log(f"early stop after {it + 1} iterations (validation error stopped improving)")
                break
    return best_p, history, val_history, runs


def _residual(problem: "_Problem", grid, method, rows):
    return problem.residual(grid, method, rows)


def _fit_coeff_lm(train: "_Problem", val: "_Problem", grid: torch.Tensor, nfe: int, free_end: bool, max_runs: int,
                  log, move_times: bool = True) -> tuple:
    """Times and one scale per step (``coeff``) together, by Levenberg-Marquardt on the fitting split's final
    error (LD3's objective, arXiv 2405.15506, with the scales added), from ``grid`` and zero scales;
    early-stopped on the validation split."""
    active = list(range(1, nfe - 1))  # the first step is first order and the last denoises: no correction term
    if not active:
        raise ValueError(f"method 'coeff' needs nfe >= 3 (a step with a high-order term), got {nfe}; use 'grid'")
    u0, lam0, span, t_max = _gap_logits(train.schedule, grid, free_end)
    u0 = u0 if move_times else u0[:0]  # fixed times: the scales alone
    nu = u0.numel()

    def unpack(p):
        times = _times_of(p[:nu], lam0, span, train.schedule, t_max, free_end) if nu else grid
        rows = [[0.0] for _ in range(nfe)]
        for j, v in zip(active, p[nu:].tolist()):
            rows[j] = [v]
        return times, rows

    def residual(p):
        times, rows = unpack(p)
        return _residual(train, times, "coeff", rows) if bool((times[1:] < times[:-1]).all()) else None

    def val_error(p):
        times, rows = unpack(p)
        return val.error(times, "coeff", rows)

    p0 = torch.cat([u0, torch.zeros(len(active), dtype=torch.float64)])
    best, history, val_history, runs = _levenberg_marquardt(residual, p0, val_error, max_iters=30, log=log,
                                                            max_runs=max_runs)
    times, rows = unpack(best)
    return times, rows, history, {"validation_objective": val_history, "evaluations": runs}


def _fit_pas_lm(train: "_Problem", val: "_Problem", grid: torch.Tensor, basis: int, start_rows: list, max_runs: int,
                log) -> tuple:
    """PAS coefficients on ``grid`` by Levenberg-Marquardt on the fitting split's final error (the
    coefficients of every step together), from ``start_rows``; early-stopped on the validation split."""
    n = len(grid) - 1

    def unpack(p):
        return [p[i * basis:(i + 1) * basis].tolist() for i in range(n)]

    best, history, val_history, runs = _levenberg_marquardt(
        lambda p: _residual(train, grid, "pas", unpack(p)), torch.tensor(start_rows, dtype=torch.float64).flatten(),
        lambda p: val.error(grid, "pas", unpack(p)), max_iters=20, log=log, max_runs=max_runs)
    return unpack(best), history, {"validation_objective": val_history, "evaluations": runs}
