"""Baseline samplers: DDIM / DDPM ancestral (Song et al. 2021; Ho et al. 2020) and
Euler / Heun in EDM's variables (Karras et al. 2022, Alg. 1)."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from ._common import SamplerOutput, prepare, randn_like, report, run_steps, steps_iter

__all__ = ["ddim", "ddim_step", "euler", "heun"]


def ddim_step(x, x0, i, pts, state=None, generator=None, *, eta: float = 0.0):
    """One DDIM step from pts[i] to pts[i + 1] (see ``ddim``), written as
    x_t = (k / sigma_s) x + (alpha_t - k alpha_s / sigma_s) x0 + c z with k = sqrt(sigma_t^2 - c^2)."""
    s, t = pts[i], pts[i + 1]
    if t.sigma == 0:
        return x0, state
    c = eta * t.sigma * math.sqrt(-math.expm1(-2.0 * (t.lam - s.lam))) if eta > 0 else 0.0
    k = math.sqrt(max(t.sigma ** 2 - c * c, 0.0))
    out = x * (k / s.sigma)
    out.add_(x0, alpha=t.alpha - k * s.alpha / s.sigma)
    if c > 0:
        out.add_(randn_like(x, generator), alpha=c)
    return out, state


def ddim(denoiser: Callable, x: torch.Tensor, grid, schedule, *, eta: float = 0.0,
         cond: dict | None = None, generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """DDIM with stochasticity eta (eta = 0: deterministic DDIM; eta = 1: DDPM ancestral sampling).

    x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z,  c = eta sigma_t sqrt(1 - e^{-2h})
    (DDIM eq. 12 with the posterior std written through h = lambda_t - lambda_s).
    Works on increasing grids too (eta = 0), which gives DDIM inversion.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    return run_steps(partial(ddim_step, eta=eta), None, denoiser, x, grid, schedule, cond=cond,
                     generator=generator, callback=callback, progress=progress,
                     desc="ddim" if eta == 0 else f"ddim(eta={eta})", allow_increasing=eta == 0)


def _edm_heun(denoiser, x, grid, schedule, second_order: bool, cond, callback, progress) -> SamplerOutput:
    # EDM variables x_hat = x / alpha, sigma_hat = sigma / alpha: dx_hat/dsigma_hat = (x_hat - D) / sigma_hat.
    # The updates below are those steps with x_hat, D and D at the Euler point collected into weights.
    model, counter, pts, grid = prepare(denoiser, x, grid, schedule, cond)
    for i in steps_iter(len(pts) - 1, progress, "heun" if second_order else "euler"):
        s, t = pts[i], pts[i + 1]
        x0 = model(x, s.t)
        report(callback, i, s.t, x, x0)
        sig_cur, sig_next = s.sigma / s.alpha, t.sigma / t.alpha
        r = sig_next / sig_cur
        x_e = x * (t.alpha / s.alpha * r)  # Euler step: x_hat' = r x_hat + (1 - r) D
        x_e.add_(x0, alpha=t.alpha * (1.0 - r))
        if not (second_order and t.sigma > 0):
            x = x_e
            continue
        # 2nd-order correction (EDM Alg. 1, lines 9-11): x_hat' = x_hat + dsig (d_cur + d_next) / 2
        x0_e, ds = model(x_e, t.t), sig_next - sig_cur
        x_next = x * (t.alpha / s.alpha * r)
        x_next.add_(x0, alpha=t.alpha * (-ds / (2 * sig_cur) + ds * (1 - r) / (2 * sig_next)))
        x = x_next.add_(x0_e, alpha=t.alpha * (-ds / (2 * sig_next)))
    return SamplerOutput(x, counter.nfe, grid)


def euler(denoiser: Callable, x: torch.Tensor, grid, schedule, *, cond: dict | None = None,
          generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """Euler on the probability-flow ODE in EDM's variables (first order, one call per step)."""
    return _edm_heun(denoiser, x, grid, schedule, False, cond, callback, progress)


def heun(denoiser: Callable, x: torch.Tensor, grid, schedule, *, cond: dict | None = None,
         generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """Heun's second-order method (EDM, arXiv 2206.00364, Alg. 1): two calls per step,
    one for a final step to sigma = 0."""
    return _edm_heun(denoiser, x, grid, schedule, True, cond, callback, progress)
