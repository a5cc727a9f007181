"""Adaptive step-size DPM-Solver-12 and -23 (arXiv 2206.00927, Sec. 3.3 / Alg. 4).

A lower- and a higher-order singlestep update share their model calls; their
difference, scaled by max(atol, rtol * max(|x_lower|, |x_prev|)), gives the local
error E (root-mean-square per sample, max over the batch). A step is accepted when
E <= 1, and the next step size in lambda is h <- theta * h * E^(-1/order).
"""
from __future__ import annotations

from typing import Callable

import torch

from ._common import SamplerOutput, prepare, report
from .dpm_solver import _point_at, singlestep_update

__all__ = ["dpm_adaptive"]


def dpm_adaptive(denoiser: Callable, x: torch.Tensor, grid, schedule, *, order: int = 3,
                 data: bool = True, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 theta: float = 0.9, t_err: float = 1e-5, max_nfe: int = 10_000, cond: dict | None = None,
                 callback=None, progress: bool = False, generator=None) -> SamplerOutput:
    """DPM-Solver-12 (order=2) or -23 (order=3) from grid[0] to the last positive grid time;
    if the grid ends at 0, a final denoising step follows. Stops with an error after
    ``max_nfe`` model calls rather than looping forever."""
    if order not in (2, 3):
        raise ValueError(f"adaptive DPM-Solver has order 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order!r}")
    if not (rtol > 0 and atol > 0 and h_init > 0 and 0 < theta < 1):
        raise ValueError("rtol, atol and h_init must be > 0 and theta in (0, 1)")
    model, counter, pts, grid = prepare(denoiser, x, grid, schedule, cond)
    start, end = pts[0], (pts[-2] if pts[-1].sigma == 0 else pts[-1])
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s, h, i, x0 = start, h_init, 0, None
    bar = _bar(progress, end.lam - start.lam)
    while abs(s.t - end.t) > t_err:
        if counter.nfe > max_nfe:
            raise RuntimeError(f"adaptive solver did not finish within max_nfe={max_nfe}; loosen rtol/atol")
        t = _point_at(schedule, min(s.lam + h, end.lam))
        if x0 is None:  # after a rejected step x and s are unchanged: reuse the call
            x0 = model(x, s.t)
        x_hi, x_lo = singlestep_update(model, x, x0, s, t, order, schedule, data=data, r1=r1,
                                       embedded=True)
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_lo.abs(), x.abs()))
        err = ((x_hi - x_lo) / delta).flatten(1).pow(2).mean(1).sqrt().max().item()
        if err <= 1.0:
            report(callback, i, s.t, x, x0)
            if bar is not None:
                bar.update(t.lam - s.lam)
            x, s, i, x0 = x_hi, t, i + 1, None
        h = min(theta * h * max(err, 1e-10) ** (-1.0 / order), end.lam - s.lam)
    if pts[-1].sigma == 0:
        x = model(x, s.t)
    if bar is not None:
        bar.close()
    return SamplerOutput(x, counter.nfe, grid)


def _bar(progress: bool, total: float):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="dpm_adaptive (lambda)", leave=False)
