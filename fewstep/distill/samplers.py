"""Samplers for distilled N-step students (Meng et al. 2022, Sec. 4.3).

Both run on the student's own grid (:func:`student_grid`, ending at 0; uniform in t for VP and
flow schedules, Karras-spaced for EDM: :mod:`fewstep.distill.times`)
through the solvers' one-call-per-step loop, one model call per step:

* deterministic: DDIM from grid point to grid point;
* stochastic: from t_i a deterministic DDIM step of twice the length, to t_{i+2}, then
  forward diffusion q(x_{t_{i+1}} | x_{t_{i+2}}) back to t_{i+1} with fresh noise; the
  last step is deterministic. ``churn`` in [0, 1] scales the overshoot
  (t_{i+1} - churn (t_{i+1} - t_{i+2})): churn = 1 is the paper's sampler, churn = 0
  adds no noise and equals the deterministic sampler.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from ..schedules import NoiseSchedule
from ..solvers._common import SamplerOutput, grid_points, randn_like, run_steps
from ..solvers.baseline import ddim_step
from .progressive import encoder_grid, student_grid

__all__ = ["sample_student", "stochastic_step", "encode_student", "translate"]


def _renoise(x_u: torch.Tensor, u, t, generator) -> torch.Tensor:
    """Forward diffusion from u to a noisier t: x_t = (alpha_t / alpha_u) x_u + sqrt(sigma_t^2 - r^2 sigma_u^2) z."""
    r = t.alpha / u.alpha
    return x_u * r + randn_like(x_u, generator) * math.sqrt(max(t.sigma ** 2 - (r * u.sigma) ** 2, 0.0))


def stochastic_step(x, x0, i, pts, state=None, generator=None, *, schedule: NoiseSchedule, churn: float = 1.0):
    """Step from pts[i] to pts[i + 1]: overshoot deterministically, then diffuse back with fresh noise."""
    if churn == 0 or i + 2 >= len(pts):  # the last step (and churn 0) is plain DDIM
        return ddim_step(x, x0, i, pts)
    s, t, after = pts[i], pts[i + 1], pts[i + 2]
    u = grid_points(schedule, torch.tensor([t.t - churn * (t.t - after.t)], dtype=torch.float64))[0]
    k = u.sigma / s.sigma
    x_u = x * k + x0 * (u.alpha - k * s.alpha)  # DDIM to the overshoot point u
    return _renoise(x_u, u, t, generator), state


def sample_student(denoiser: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                   stochastic: bool | float = False, cond: dict | None = None, generator=None,
                   callback=None, progress: bool = False) -> SamplerOutput:
    """Sample a distilled ``steps``-step student (``denoiser`` = D(x, t, **cond) -> x0_hat) from x_T at t_max.

    stochastic: False (deterministic DDIM), True (the paper's stochastic sampler) or a churn in [0, 1].
    generator: one torch.Generator or one per sample (images then do not depend on the batch size).
    """
    churn = float(stochastic)
    if not 0.0 <= churn <= 1.0:
        raise ValueError(f"stochastic must be a bool or a churn in [0, 1], got {stochastic!r}")
    grid = student_grid(schedule, steps)
    step = partial(stochastic_step, schedule=schedule, churn=churn) if churn > 0 else ddim_step
    return run_steps(step, None, denoiser, x_T, grid, schedule, cond=cond, generator=generator,
                     callback=callback, progress=progress, desc=f"{steps}-step student")


def encode_student(denoiser: Callable, x0: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                   cond: dict | None = None, callback=None, progress: bool = False) -> SamplerOutput:
    """Encode data with a distilled ``steps``-step encoder (or any denoiser): DDIM inversion on
    :func:`encoder_grid` from t_min up to t_max; decode with :func:`sample_student`."""
    grid = encoder_grid(schedule, steps)
    return run_steps(ddim_step, None, denoiser, x0, grid, schedule, cond=cond, generator=None, callback=callback,
                     progress=progress, desc=f"{steps}-step encoder", allow_increasing=True)


@torch.no_grad()
def translate(encoder: Callable, decoder: Callable, x0: torch.Tensor, schedule: NoiseSchedule, *,
              source_labels: torch.Tensor, target_labels: torch.Tensor, encoder_steps: int,
              decoder_steps: int) -> torch.Tensor:
    """Class-to-class translation (Meng et al. 2022, Sec. 4.4 / SDEdit-free): encode x0 under its
    class with the deterministic encoder, then decode the latent under the target class.
    ``encoder`` / ``decoder`` are denoisers D(x, t, labels=...) (guidance already bound)."""
    z = encode_student(encoder, x0, schedule, encoder_steps, cond={"labels": source_labels}).x
    return sample_student(decoder, z, schedule, decoder_steps, cond={"labels": target_labels}).x
