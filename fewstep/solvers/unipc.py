"""UniPC (Zhao et al. 2023, arXiv 2302.04867): a multistep predictor UniP and a corrector
UniC that reuses the model call made at the new point, so it costs no extra NFE.

Data-prediction form with the B(h) variants bh1 (B(h) = h) and bh2 (B(h) = e^h - 1),
paper Alg. 2 / 3 with the coefficients rho solved from R rho = b (eq. 8).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import numpy as np
import torch

from ._common import Point, SamplerOutput, phi, run_steps

__all__ = ["unipc", "unipc_step", "unipc_rhos"]


def unipc_rhos(h: float, rks: list[float], variant: str) -> tuple[float, list[float]]:
    """B(h) and the coefficients rho for the differences D_k (UniPC eq. 8), data prediction.

    rks: the ratios r_k = (lambda_{s_k} - lambda_s) / h of the previous points, with 1.0
    appended by the corrector (the new point). The predictor of order 2 and the
    corrector of order 1 use rho = 1/2 as in the paper's reference implementation.
    """
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    # b_i = i! * hh * phi_{i+1}(hh) / B(h), i = 1..p  (eq. 8 right-hand side, hh = -h)
    b = [hh * phi(i + 1, hh) * math.factorial(i) / b_h for i in range(1, p + 1)]
    if p == 1:
        return b_h, [0.5]
    R = np.array([[r ** (i - 1) for r in rks] for i in range(1, p + 1)], dtype=np.float64)
    return b_h, list(np.linalg.solve(R, np.array(b)))


def _update(x: torch.Tensor, s: Point, t: Point, m0: torch.Tensor, diffs: list[torch.Tensor],
            rhos: list[float], b_h: float) -> torch.Tensor:
    h = t.lam - s.lam
    out = x * (t.sigma / s.sigma)
    out.add_(m0, alpha=-t.alpha * math.expm1(-h))
    for rho, d in zip(rhos, diffs):
        out.add_(d, alpha=-t.alpha * b_h * rho)
    return out


def unipc_step(x, x0, i, pts, state, generator=None, *, order: int = 2, variant: str = "bh2",
               corrector: bool = True, lower_order_final: bool = True):
    """One UniPC step: correct x at pts[i] with the new x0_hat (UniC), then predict pts[i + 1] (UniP).
    ``state`` = (history of (point, x0_hat), x before the last prediction, that prediction's order)."""
    hist, x_prev, k_prev = state or ([], None, 0)
    s, t = pts[i], pts[i + 1]
    if corrector and x_prev is not None:
        x = _corrector(x_prev, hist, s, x0, k_prev, variant)
    if t.sigma == 0:
        return x0, (hist, None, 0)
    hist = (list(hist) + [(s, x0)])[-order:]
    n = len(pts) - 1
    k = min(order, len(hist), n - i if lower_order_final else order)
    return _predictor(x, hist, t, k, variant), (hist, x, k)


def check_unipc_options(order=2, variant="bh2", **_) -> None:
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order must be an integer from 1 to 3, got {order!r}")


def unipc(denoiser: Callable, x: torch.Tensor, grid, schedule, *, order: int = 2, variant: str = "bh2",
          corrector: bool = True, lower_order_final: bool = True, cond: dict | None = None,
          generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """UniPC-p (UniP predictor + UniC corrector), data prediction, one model call per step.

    Warm-up with lower orders; with ``lower_order_final`` the last steps use order
    min(order, steps left). ``corrector=False`` gives plain UniP. A step to t = 0 is a
    pure denoising step (after the corrector has used that step's model call).
    """
    check_unipc_options(order, variant)
    step = partial(unipc_step, order=order, variant=variant, corrector=corrector,
                   lower_order_final=lower_order_final)
    return run_steps(step, None, denoiser, x, grid, schedule, cond=cond, generator=generator,
                     callback=callback, progress=progress, desc=f"unipc_{variant}_{order}")


def _differences(hist, h: float, k: int):
    s0, m0 = hist[-1]
    rks, diffs = [], []
    for j in range(1, k):
        sj, mj = hist[-1 - j]
        r = (sj.lam - s0.lam) / h
        rks.append(r)
        diffs.append((mj - m0) / r)
    return rks, diffs


def _predictor(x, hist, t: Point, k: int, variant: str):
    s0, m0 = hist[-1]
    h = t.lam - s0.lam
    rks, diffs = _differences(hist, h, k)
    if k == 1:
        return _update(x, s0, t, m0, [], [], 1.0)
    b_h, rhos = unipc_rhos(h, rks, variant)
    return _update(x, s0, t, m0, diffs, [0.5] if k == 2 else rhos, b_h)


def _corrector(x_prev, hist, t: Point, x0_t, k: int, variant: str):
    s0, m0 = hist[-1]
    h = t.lam - s0.lam
    rks, diffs = _differences(hist, h, k)
    b_h, rhos = unipc_rhos(h, rks + [1.0], variant)
    return _update(x_prev, s0, t, m0, diffs + [x0_t - m0], rhos, b_h)
