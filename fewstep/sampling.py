"""The front door: pick a solver by name and a step budget; get a sample and its NFE."""
from __future__ import annotations

from typing import Callable

import torch

from .denoisers import Thresholded
from .grids import TunedGrid
from .schedules import NoiseSchedule, custom_grid, default_end, time_grid
from .solvers import SOLVERS, SamplerOutput, fast_orders, get_solver
from .solvers.dpm_solver import PLACEMENTS, default_placement, singlestep_outer_grid
from .solvers.learned import learned_sample

__all__ = ["sample", "invert", "solver_grid", "expected_nfe", "DEFAULT_SOLVER"]

# the default solver: the most accurate on the default grid over the exact benchmark models together
# (gmm-mnist, gmm-sd-v, gmm-cosine at 4-20 calls; BENCHMARKS.md, "Defaults against diffusers' default")
DEFAULT_SOLVER = "unipc_bh2_3"


def solver_grid(schedule: NoiseSchedule, solver: str, steps: int, spacing: str = "logsnr",
                final: str = "zero", placement: str | None = None, **grid_kw) -> tuple[torch.Tensor, dict]:
    """The grid (and extra solver options) that spends ``steps`` model calls with ``solver``.

    ``steps`` is the budget of model calls. Multistep solvers: one call per interval;
    singlestep: split into per-step orders (DPM-Solver-fast); a final denoising step
    costs one call and is part of the budget for both. Heun: ``steps`` intervals
    (2 calls each). Adaptive: the grid only fixes the ends, [t_max, t_min(, 0)].
    ``placement`` (singlestep solvers only): where the steps' ends and inner points go,
    ``"official"`` or ``"logsnr_fractions"``; default: official for DPM-Solver++ (data prediction),
    fractions for the noise-prediction ones (measured; see ``fewstep.solvers.dpm_solver.PLACEMENTS``).
    """
    spec = get_solver(solver)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_placement(spec, placement)
    if spec.kind == "adaptive":  # only the ends matter: t_max -> t_min (then denoise unless final="tmin")
        return time_grid(schedule, 1, spacing, final="tmin" if final == "tmin" else "denoise", **grid_kw), {}
    if spec.kind == "multistep" and final == "denoise":  # the extra denoising call is part of the budget
        if steps < 2:
            raise ValueError("final='denoise' needs steps >= 2 (one step plus the final denoising call)")
        return time_grid(schedule, steps - 1, spacing, final="denoise", **grid_kw), {}
    if spec.kind != "singlestep":
        return time_grid(schedule, steps, spacing, final=final, **grid_kw), {}
    budget = steps - (final in ("zero", "denoise"))
    if budget < 1:  # one call: straight to clean data
        if final != "zero":
            raise ValueError("with final='denoise' a singlestep solver needs steps >= 2 (the denoising call "
                             "is part of the budget)")
        return time_grid(schedule, 1, spacing, final="zero", **grid_kw), {"order": [1]}
    if final not in ("zero", "tmin", "denoise"):
        raise ValueError(f"final must be 'zero', 'tmin' or 'denoise', got {final!r}")
    orders = fast_orders(budget, spec.options["order"])
    if final == "zero" and grid_kw.get("t_min") is None:  # the denoising call starts at a real point, not t_min
        grid_kw["t_min"] = default_end(schedule, budget + 1, spacing, grid_kw.get("t_max"), grid_kw.get("rho", 7.0))
    grid, inner = singlestep_outer_grid(schedule, orders, spacing, placement or default_placement(solver), **grid_kw)
    if final != "tmin":  # the step to clean data: one denoising call
        grid, orders = torch.cat([grid, torch.zeros(1, dtype=torch.float64)]), orders + [1]
    return grid, {"order": orders, "inner": inner}


def _check_placement(spec, placement) -> None:
    if placement is None:
        return
    if spec.kind != "singlestep":
        raise ValueError(f"placement applies to singlestep solvers only, not {spec.name!r} ({spec.kind})")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {placement!r}")


def _check_cond(cond: dict | None, x: torch.Tensor) -> None:
    """Every batched condition (labels, embeddings) must have one row per sample."""
    for key, value in (cond or {}).items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != x.shape[0]:
            raise ValueError(f"condition {key!r} has {value.shape[0]} rows for a batch of {x.shape[0]} samples; "
                             "give one per sample (or a scalar)")


def expected_nfe(solver: str, grid: torch.Tensor, options: dict | None = None) -> int | None:
    """Model calls a solver spends on a grid (None for adaptive solvers)."""
    spec = get_solver(solver)
    n = grid.numel() - 1
    to_zero = float(grid[-1]) == 0.0
    if spec.kind == "multistep":
        return n
    if spec.kind == "heun":
        return 2 * n - 1 if to_zero else 2 * n
    if spec.kind == "singlestep":
        orders = (options or {}).get("order", spec.options["order"])
        return sum(orders) if isinstance(orders, list) else orders * (n - to_zero) + to_zero
    return None


def sample(denoiser: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, *, solver: str | None = None,
           steps: int = 10, spacing: str = "logsnr", final: str = "zero", grid=None, cond: dict | None = None,
           thresholding: bool | dict = False, generator=None, callback=None, progress: bool = False,
           placement: str | None = None, **options) -> SamplerOutput:
    """Sample from ``denoiser`` starting at ``x_T`` (noise at the grid's first time).

    solver: a name from ``fewstep.solvers.SOLVERS`` (e.g. ``dpmpp_2m``); default: a ``TunedGrid``'s own solver,
      else ``DEFAULT_SOLVER`` (UniPC-3 bh2).
    steps: the budget of model calls (see ``solver_grid``); ignored if ``grid`` is given.
    grid: an explicit decreasing time grid (ending in 0 for a final denoising step).
      or a ``TunedGrid`` (``fewstep.grids.load_grid``; warns when fitted to another solver or schedule).
      A learned solver's grid (``fewstep.tune.tune_solver``) also applies its coefficients to every step.
    thresholding: True (or a dict of ``dynamic_threshold`` arguments) to clip x0_hat.
    placement: singlestep solvers only, ``"official"`` or ``"logsnr_fractions"`` (default: by solver): where
    the steps' ends and inner model calls go (``fewstep.solvers.dpm_solver.PLACEMENTS``).
    options: solver options (``lower_order_final``, ``eta`` for ddim, ``rtol`` ...).
    """
    _check_cond(cond, x_T)
    tuned = grid if isinstance(grid, TunedGrid) else None
    solver = solver or (tuned.solver if tuned is not None else DEFAULT_SOLVER)
    spec = get_solver(solver)
    if grid is None:
        grid, extra = solver_grid(schedule, solver, steps, spacing, final, placement)
        options = {**extra, **options}
    else:
        if isinstance(grid, TunedGrid):  # a fitted grid: checked against this solver and schedule (warns)
            grid = grid.grid_for(schedule, solver=solver)
        grid = custom_grid(schedule, grid)
        if placement is not None:  # a given grid fixes the step ends; placement still places inner points
            _check_placement(spec, placement)
            options.setdefault("inner", None if placement == "logsnr_fractions" else spacing)
    if thresholding:
        denoiser = Thresholded(denoiser, **(thresholding if isinstance(thresholding, dict) else {}))
    if tuned is not None and tuned.learned:  # a learned solver: the base solver's steps with its coefficients
        return _sample_learned(tuned, spec, denoiser, x_T, grid, schedule, cond=cond, generator=generator,
                               callback=callback, progress=progress, **options)
    return spec(denoiser, x_T, grid, schedule, cond=cond, generator=generator, callback=callback,
                progress=progress, **options)


def _sample_learned(tuned: TunedGrid, spec, denoiser, x_T, grid, schedule, **kw) -> SamplerOutput:
    """``sample`` with a learned solver (``fewstep.solvers.learned``) over ``spec``'s step function."""
    if spec.step is None or spec.kind != "multistep":
        raise ValueError(f"a learned solver corrects one-call-per-step solvers; {spec.name!r} is {spec.kind}: "
                         f"leave solver out (the grid's is {tuned.solver!r})")
    run = {k: kw.pop(k) for k in ("cond", "generator", "callback", "progress")}
    base = spec.stepper(**{**tuned.learned.get("options", {}), **kw})
    return learned_sample(denoiser, x_T, grid, schedule, base=base, method=tuned.learned["method"],
                          coefficients=tuned.learned["coefficients"], basis=int(tuned.learned.get("basis", 4)),
                          desc=f"{tuned.learned['method']}[{spec.name}]", **run)


def invert(denoiser: Callable, x0: torch.Tensor, schedule: NoiseSchedule, *, solver: str = "dpmpp_2m",
           steps: int = 50, spacing: str = "logsnr", cond: dict | None = None, progress: bool = False,
           **options) -> SamplerOutput:
    """Encode data into noise by running the probability-flow ODE forwards (t_min -> t_max).

    Decode with ``sample(..., steps=steps, spacing=spacing, final="tmin")`` and the same
    solver to return to x0; the round-trip error shrinks as steps grow.
    Only deterministic multistep solvers (ddim, dpm_solver_2m/3m, dpmpp_2m/3m) invert.
    """
    spec = get_solver(solver)
    if not spec.invertible:
        invertible = [n for n, s in SOLVERS.items() if s.invertible]
        raise ValueError(f"solver {solver!r} cannot run backwards; use one of {', '.join(invertible)}")
    grid = time_grid(schedule, steps, spacing, final="tmin").flip(0)
    return spec(denoiser, x0, grid, schedule, cond=cond, progress=progress, **options)
