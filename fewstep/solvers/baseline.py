"""Baseline samplers: DDIM / DDPM ancestral (Song et al. 2021; Ho et al. 2020) and
Euler / Heun in EDM's variables (Karras et al. 2022, Alg. 1)."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from ._common import SamplerOutput, eps_from_x0, prepare, randn_like, report, run_steps, steps_iter

__all__ = ["ddim", "ddim_step", "euler", "heun"]


def ddim_step(x, x0, i, pts, state=None, generator=None, *, eta: float = 0.0):
    """One DDIM step from pts[i] to pts[i + 1] (see ``ddim``)."""
    s, t = pts[i], pts[i + 1]
    if t.sigma == 0:
        return x0, state
    eps = eps_from_x0(x, x0, s)
    c = eta * t.sigma * math.sqrt(-math.expm1(-2.0 * (t.lam - s.lam))) if eta > 0 else 0.0
    x = t.alpha * x0 + math.sqrt(max(t.sigma ** 2 - c * c, 0.0)) * eps
    if c > 0:
        x = x + c * randn_like(x, generator)
    return x, state


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
    # EDM variables: x_hat = x / alpha, sigma_hat = sigma / alpha; dx_hat/dsigma_hat = (x_hat - D) / sigma_hat
    model, counter, pts, grid = prepare(denoiser, x, grid, schedule, cond)
    x_hat = x / pts[0].alpha
    for i in steps_iter(len(pts) - 1, progress, "heun" if second_order else "euler"):
        s, t = pts[i], pts[i + 1]
        sig_cur, sig_next = s.sigma / s.alpha, t.sigma / t.alpha
        x0 = model(x_hat * s.alpha, s.t)
        report(callback, i, s.t, x_hat * s.alpha, x0)
        d_cur = (x_hat - x0) / sig_cur
        x_next = x_hat + (sig_next - sig_cur) * d_cur  # Euler step
        if second_order and t.sigma > 0:  # 2nd-order correction (EDM Alg. 1, lines 9-11)
            d_next = (x_next - model(x_next * t.alpha, t.t)) / sig_next
            x_next = x_hat + (sig_next - sig_cur) * (0.5 * d_cur + 0.5 * d_next)
        x_hat = x_next
    return SamplerOutput(x_hat * pts[-1].alpha, counter.nfe, grid)


def euler(denoiser: Callable, x: torch.Tensor, grid, schedule, *, cond: dict | None = None,
          generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """Euler on the probability-flow ODE in EDM's variables (first order, one call per step)."""
    return _edm_heun(denoiser, x, grid, schedule, False, cond, callback, progress)


def heun(denoiser: Callable, x: torch.Tensor, grid, schedule, *, cond: dict | None = None,
         generator=None, callback=None, progress: bool = False) -> SamplerOutput:
    """Heun's second-order method (EDM, arXiv 2206.00364, Alg. 1): two calls per step,
    one for a final step to sigma = 0."""
    return _edm_heun(denoiser, x, grid, schedule, True, cond, callback, progress)
