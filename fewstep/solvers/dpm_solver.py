"""DPM-Solver (arXiv 2206.00927) and DPM-Solver++ (arXiv 2211.01095): singlestep and
multistep, noise or data prediction, and the SDE variant of DPM-Solver++.

All updates are exponential-integrator steps (``_common.frame`` / ``ei_update``);
only the derivative estimates differ between solvers. ``data=True`` is
DPM-Solver++ (x0 prediction), ``data=False`` DPM-Solver (noise prediction).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from ..schedules import SPACINGS, time_grid
from ._common import (Point, SamplerOutput, eps_from_x0, ei_update, frame, prepare, randn_like,
                      report, run_steps, steps_iter)

__all__ = ["dpm_multistep", "dpm_multistep_step", "dpm_singlestep", "fast_orders", "singlestep_update",
           "singlestep_outer_grid", "PLACEMENTS", "default_placement"]

# Where a singlestep solver puts its points (``singlestep_outer_grid`` and ``dpm_singlestep(inner=)``):
#   "official"          as the official DPM-Solver code: for a time-based spacing the step ends are the
#                       budget-interval grid of that spacing taken at the cumulative orders (a step of
#                       order k spans k fine intervals) and a step's inner points are its own k-interval
#                       grid of the same spacing; for "logsnr" the ends are a uniform grid with one
#                       interval per step (the official code's choice "to reproduce the paper").
#   "logsnr_fractions"  one interval of the spacing per step; inner points at the log-SNR fractions
#                       r1 = 1/2 (order 2) and r1, r2 = 1/3, 2/3 (order 3) of the step (paper, App. A).
# Both agree on the "logsnr" spacing (the default spacing). Measured (RMS error against an RK4
# reference, budgets 6-30 calls) on the solver benchmark's model (gmm-mnist, w = 1 and w = 0) and on
# 64-D mixtures with LinearVP and CosineVP: "official" is better for DPM-Solver++(3S) on every grid
# (1.6-5.7x, geometric mean over budgets) and for DPM-Solver-fast on time_uniform grids of linear
# schedules (1.5-4x); "logsnr_fractions" is better for the noise-prediction solvers on
# time_quadratic grids (1.3-2.6x) and far better on CosineVP's time-uniform/quadratic grids (25-50x:
# inner points uniform in t crowd the fast-changing lambda near t_max). On the benchmark's model
# "official" wins 12 of 18 (solver, spacing) groups, all time_uniform ones. The default follows the
# prediction type, so that no default is ever the 25-50x-worse choice: "official" for the data-
# prediction DPM-Solver++ singlestep solvers (better on every grid measured), "logsnr_fractions" for
# the noise-prediction ones (whose losses with "official" are the large ones).
PLACEMENTS = ("official", "logsnr_fractions")


def default_placement(solver: str) -> str:
    """The placement a singlestep solver uses unless told: see the measurements above."""
    return "official" if solver.startswith("dpmpp") else "logsnr_fractions"


def _pred(x: torch.Tensor, x0: torch.Tensor, p: Point, data: bool) -> torch.Tensor:
    return x0 if data else eps_from_x0(x, x0, p)


def multistep_terms(fr, hist: Sequence[tuple[float, torch.Tensor]], order: int, solver_type: str,
                    third_order: str = "exact"):
    """Taylor terms for a multistep update, as (weight, model output) pairs over the newest
    history entries (lambda, model output), so the update needs no temporary tensors.

    Order 2: D1 = (m0 - m1) / r0 ~ h m'. "midpoint" weighs it by w0 / 2 (the DPM-Solver++(2M)
    update, arXiv 2211.01095 Alg. 2), "taylor" by w1 / h.
    Order 3: D1 ~ h m' and D2 ~ h^2 m''/2 from three points. The m'' weight is w2, so D2
    gets 2 w2 / h^2 ("exact", third order). The official DPM-Solver code and diffusers
    weigh D2 by w2 / h^2 ("legacy"), which our convergence tests show is only second
    order; "legacy" exists to reproduce them.
    """
    (l0, m0), h, w = hist[-1], fr.h, fr.weights
    if order == 1:
        return [(w[0], m0)]
    l1, m1 = hist[-2]
    r0 = (l0 - l1) / h
    d1_0 = (1.0 / r0, -1.0 / r0, 0.0)  # D1_0 = (m0 - m1) / r0, as coefficients on (m0, m1, m2)
    if order == 2:
        c1 = 0.5 * w[0] if solver_type == "midpoint" else w[1] / h
        return [(w[0] + c1 * d1_0[0], m0), (c1 * d1_0[1], m1)]
    l2, m2 = hist[-3]
    r1 = (l1 - l2) / h
    d1_1 = (0.0, 1.0 / r1, -1.0 / r1)  # D1_1 = (m1 - m2) / r1
    diff = [a - b for a, b in zip(d1_0, d1_1)]
    d1 = [a + r0 / (r0 + r1) * d for a, d in zip(d1_0, diff)]
    d2 = [d / (r0 + r1) for d in diff]
    kappa = {"exact": 2.0, "legacy": 1.0}[third_order]
    c1, c2 = w[1] / h, kappa * w[2] / h ** 2
    coef = [c1 * a + c2 * b for a, b in zip(d1, d2)]
    return [(w[0] + coef[0], m0), (coef[1], m1), (coef[2], m2)]


def dpm_multistep_step(x, x0, i, pts, hist, generator=None, *, order: int = 2, data: bool = True,
                       sde: bool = False, solver_type: str = "midpoint", lower_order_final: bool = True,
                       third_order: str = "exact"):
    """One multistep update from pts[i] to pts[i + 1]; ``hist`` holds (lambda, model output) pairs."""
    s, t = pts[i], pts[i + 1]
    if t.sigma == 0:  # final step to clean data
        return x0, hist
    hist = (list(hist or []) + [(s.lam, _pred(x, x0, s, data))])[-order:]
    n = len(pts) - 1
    k = min(order, len(hist))
    if lower_order_final and n < 15:
        k = min(k, n - i)
    fr = frame(s, t, data=data, sde=sde, n=k)
    noise = randn_like(x, generator) if sde else None
    return ei_update(x, fr, multistep_terms(fr, hist, k, solver_type, third_order), noise), hist


def check_multistep_options(order=2, solver_type="midpoint", third_order="exact", **_) -> None:
    _check_order(order, 3)
    if solver_type not in ("midpoint", "taylor"):
        raise ValueError(f"solver_type must be 'midpoint' or 'taylor', got {solver_type!r}")
    if third_order not in ("exact", "legacy"):
        raise ValueError(f"third_order must be 'exact' or 'legacy', got {third_order!r}")


def dpm_multistep(denoiser: Callable, x: torch.Tensor, grid, schedule, *, order: int = 2,
                  data: bool = True, sde: bool = False, solver_type: str = "midpoint",
                  lower_order_final: bool = True, third_order: str = "exact",
                  cond: dict | None = None, generator=None, callback=None,
                  progress: bool = False) -> SamplerOutput:
    """Multistep DPM-Solver / DPM-Solver++ of order 1-3 (one model call per step).

    The first steps warm up with lower orders. With ``lower_order_final`` and fewer
    than 15 steps the last steps drop to order min(order, steps left), which steadies
    few-step sampling (as diffusers does). A step to t = 0 is a pure denoising step.
    ``sde=True`` gives SDE-DPM-Solver++ (fresh noise each step; needs data=True).
    ``solver_type`` ("midpoint" | "taylor") picks the second-order weight and
    ``third_order`` ("exact" | "legacy") the third-order one; see ``multistep_terms``.
    """
    check_multistep_options(order, solver_type, third_order)
    step = partial(dpm_multistep_step, order=order, data=data, sde=sde, solver_type=solver_type,
                   lower_order_final=lower_order_final, third_order=third_order)
    return run_steps(step, [], denoiser, x, grid, schedule, cond=cond, generator=generator, callback=callback,
                     progress=progress, desc=f"dpm{'pp' if data else ''}_{order}m", allow_increasing=not sde)


# ---------------------------------------------------------------------------
# Singlestep
# ---------------------------------------------------------------------------

def _point_at(schedule, lam: float) -> Point:
    t = float(schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64)))
    tt = torch.tensor(t, dtype=torch.float64)
    return Point(t, float(schedule.alpha(tt)), float(schedule.sigma(tt)), lam)


def singlestep_update(model, x: torch.Tensor, x0_s: torch.Tensor, s: Point, t: Point, order: int,
                      schedule, *, data: bool, r1: float | None = None, r2: float = 2.0 / 3.0,
                      embedded: bool = False):
    """One singlestep DPM-Solver(++) step of order 1-3 from s to t (arXiv 2206.00927, Alg. 1 and
    App. A: DPM-Solver-2 with r1 = 1/2, DPM-Solver-3 with r1 = 1/3, r2 = 2/3).
    ``x0_s`` is the model's x0_hat at s (already paid for). Returns x_t and, with
    ``embedded=True``, the update of one order lower built from the same model calls (the
    embedded pair of the adaptive solver: DPM-Solver-12 and -23, arXiv 2206.00927, Sec. 3.3),
    else None."""
    m0 = _pred(x, x0_s, s, data)
    fr = frame(s, t, data=data, n=order)
    first_terms = [(fr.weights[0], m0)]
    if order == 1:
        return ei_update(x, fr, first_terms), None
    r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
    p1 = _point_at(schedule, s.lam + r1 * fr.h)
    f1 = frame(s, p1, data=data, n=1)
    x1 = ei_update(x, f1, [(f1.weights[0], m0)])
    x0_1 = model(x1, p1.t)
    d1 = (_pred(x1, x0_1, p1, data) - m0) / r1  # ~ h m'
    second_terms = [(fr.weights[0], m0), (0.5 * fr.weights[0], d1)]  # the "midpoint"-type 2nd-order update
    if order == 2:
        return ei_update(x, fr, second_terms), ei_update(x, fr, first_terms) if embedded else None
    p2 = _point_at(schedule, s.lam + r2 * fr.h)
    f2 = frame(s, p2, data=data, n=2)
    x2 = ei_update(x, f2, [(f2.weights[0], m0), (f2.weights[1] / fr.h, d1)])
    x0_2 = model(x2, p2.t)
    d2 = (_pred(x2, x0_2, p2, data) - m0) / r2
    return (ei_update(x, fr, [(fr.weights[0], m0), (fr.weights[1] / fr.h, d2)]),
            ei_update(x, fr, second_terms) if embedded else None)


def fast_orders(nfe: int, order: int = 3) -> list[int]:
    """Per-step orders that spend exactly ``nfe`` model calls with order <= ``order``
    (DPM-Solver-fast, arXiv 2206.00927, Sec. 3.4)."""
    _check_order(order, 3)
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if order == 1:
        return [1] * nfe
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    k, rem = divmod(nfe, 3)
    if rem == 0:
        return [3] * (k - 1) + [2, 1] if k > 1 else [2, 1]
    return [3] * k + [rem]


def singlestep_outer_grid(schedule, orders: Sequence[int], spacing: str = "logsnr",
                          placement: str = "official", **grid_kw) -> tuple[torch.Tensor, str | None]:
    """The step ends (t_max -> t_min, ``len(orders) + 1`` points) for singlestep steps of the given
    orders, and the ``inner`` option of ``dpm_singlestep`` that goes with ``placement`` (see
    ``PLACEMENTS``). ``grid_kw`` goes to ``time_grid`` (t_max, t_min, rho)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {placement!r}")
    if placement == "logsnr_fractions":
        return time_grid(schedule, len(orders), spacing, final="tmin", **grid_kw), None
    if spacing == "logsnr":  # the official code: uniform outer steps in lambda, inner points uniform too,
        # i.e. the fractions 1/2 and 1/3, 2/3 (kept exact rather than recomputed from lambdas)
        return time_grid(schedule, len(orders), spacing, final="tmin", **grid_kw), None
    fine = time_grid(schedule, sum(orders), spacing, final="tmin", **grid_kw)
    at = [0]
    for o in orders:
        at.append(at[-1] + o)
    return fine[at], spacing


def _inner_fractions(schedule, s: Point, t: Point, order: int, inner: str | None):
    """(r1, r2): the inner points' fractions of the step's h in lambda."""
    if inner is None or order == 1:
        return (0.5 if order == 2 else 1.0 / 3.0), 2.0 / 3.0
    lam = schedule.lambda_(time_grid(schedule, order, inner, t_max=s.t, t_min=t.t, final="tmin"))
    h = t.lam - s.lam
    r = [float(v - s.lam) / h for v in lam[1:order]]
    return r[0], (r[1] if order == 3 else 2.0 / 3.0)


def dpm_singlestep(denoiser: Callable, x: torch.Tensor, grid, schedule, *,
                   order: int | Sequence[int] = 2, data: bool = False, inner: str | None = None,
                   cond: dict | None = None, callback=None, progress: bool = False,
                   generator=None) -> SamplerOutput:
    """Singlestep DPM-Solver / DPM-Solver++ (2S, 3S): order model calls per step.

    ``order`` is one order for every step or a list with one order per step (e.g.
    ``fast_orders``). A step to t = 0 is a pure denoising step (one call).
    ``inner``: where a step's inner model calls go. None: at the log-SNR fractions
    r1 = 1/2 (order 2), r1, r2 = 1/3, 2/3 (order 3); a spacing name (``time_uniform`` ...):
    on the step's own ``order``-interval grid of that spacing, as the official DPM-Solver
    code does. ``fewstep.sample`` sets it from ``placement`` (see ``PLACEMENTS``).
    """
    model, counter, pts, grid = prepare(denoiser, x, grid, schedule, cond)
    n = len(pts) - 1
    orders = [order] * n if isinstance(order, int) else list(order)
    if len(orders) != n:
        raise ValueError(f"got {len(orders)} per-step orders for a grid of {n} steps")
    for o in orders:
        _check_order(o, 3)
    if inner is not None:
        if inner not in SPACINGS:
            raise ValueError(f"inner must be None or a spacing ({', '.join(SPACINGS)}), got {inner!r}")
    for i in steps_iter(n, progress, f"dpm{'pp' if data else ''}_{max(orders)}s"):
        s, t = pts[i], pts[i + 1]
        x0 = model(x, s.t)
        report(callback, i, s.t, x, x0)
        if t.sigma == 0:
            x = x0
            break
        r1, r2 = _inner_fractions(schedule, s, t, orders[i], inner)
        x, _ = singlestep_update(model, x, x0, s, t, orders[i], schedule, data=data, r1=r1, r2=r2)
    return SamplerOutput(x, counter.nfe, grid)


def _check_order(order, max_order: int) -> None:
    if not isinstance(order, int) or not 1 <= order <= max_order:
        raise ValueError(f"order must be an integer from 1 to {max_order}, got {order!r}")
