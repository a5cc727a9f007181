"""Machinery shared by every sampler: grid points, NFE counting, noise, progress, callbacks.

The exponential-integrator weights live here too, because DDIM, DPM-Solver,
DPM-Solver++, their SDE variants and UniPC all share them:

  data prediction (DPM-Solver++, arXiv 2211.01095, eq. 9):
    x_t = (sigma_t / sigma_s) x_s + alpha_t * int_0^h e^{tau - h} x0(lambda_s + tau) dtau
  noise prediction (DPM-Solver, arXiv 2206.00927, eq. 3.4):
    x_t = (alpha_t / alpha_s) x_s - sigma_t * int_0^h e^{h - tau} eps(lambda_s + tau) dtau
  with h = lambda_t - lambda_s. Expanding the prediction in a Taylor series in
  lambda, the k-th term's weight is h^{k+1} phi_{k+1}(-h) (data) or
  h^{k+1} phi_{k+1}(h) (noise), phi_k the usual exponential-integrator functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from ..denoisers import CountingDenoiser
from ..schedules import NoiseSchedule

__all__ = ["SamplerOutput", "Point", "prepare", "randn_like", "steps_iter", "report", "run_steps",
           "phi", "ei_weights", "Frame", "frame", "ei_update", "eps_from_x0"]


@dataclass
class SamplerOutput:
    """A sampler's result: the final sample, the model evaluations spent and the grid used.
    A sample with NaN or inf is refused here, so none leaves a sampler."""
    x: torch.Tensor
    nfe: int
    grid: torch.Tensor

    def __post_init__(self):
        if not torch.isfinite(self.x).all():
            raise FloatingPointError(
                f"sampling produced NaN or inf after {self.nfe} model calls: a model output or an update was "
                "not finite; check the model, its prediction type, its dtype (float16 overflow?) and the grid")


class Point(NamedTuple):
    t: float
    alpha: float
    sigma: float
    lam: float  # +inf at t = 0 (clean data)


def grid_points(schedule: NoiseSchedule, grid: torch.Tensor) -> list[Point]:
    g = grid.to(torch.float64).cpu()
    a, s = schedule.alpha(g), schedule.sigma(g)
    lam = torch.where(s > 0, torch.log(a) - torch.log(s.clamp_min(1e-300)), torch.full_like(s, math.inf))
    return [Point(*map(float, v)) for v in zip(g, a, s, lam)]


def prepare(denoiser: Callable, x: torch.Tensor, grid, schedule: NoiseSchedule,
            cond: dict | None = None, *, allow_increasing: bool = False):
    """Validate the inputs; return (counting denoiser with cond bound, grid points, grid)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fewstep NoiseSchedule, got {type(schedule).__name__}")
    grid = schedule.check_times(torch.as_tensor(grid, dtype=torch.float64).flatten(), "grid")
    if grid.numel() < 2:
        raise ValueError("a time grid needs at least two points (one step)")
    d = grid[1:] - grid[:-1]
    if not ((d < 0).all() or (allow_increasing and (d > 0).all())):
        raise ValueError("time grid must be strictly decreasing with no repeated time "
                         + ("(or strictly increasing, for inversion)" if allow_increasing else ""))
    if (grid[:-1] == 0).any() or (allow_increasing and grid[0] == 0 and (d > 0).all()):
        raise ValueError("t = 0 (clean data) may only be the last point of a sampling grid")
    if not torch.isfinite(x).all():
        raise ValueError("the starting sample x contains NaN or inf")
    counting = CountingDenoiser(denoiser)
    cond = dict(cond or {})
    model = (lambda xx, tt: counting(xx, tt, **cond)) if cond else counting
    return model, counting, grid_points(schedule, grid), grid


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Gaussian noise like x. ``generator`` may be one torch.Generator or a list with one per
    sample, so that sample i depends only on its own generator, whatever the batch size."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=x.device)
                          for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def steps_iter(n: int, progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm
    return tqdm(range(n), desc=desc, leave=False)


def report(callback, i: int, t: float, x: torch.Tensor, x0: torch.Tensor | None) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})


def run_steps(step: Callable, state, denoiser: Callable, x: torch.Tensor, grid, schedule: NoiseSchedule, *,
              cond: dict | None, generator, callback, progress: bool, desc: str,
              allow_increasing: bool = False) -> SamplerOutput:
    """The loop of every one-call-per-step sampler.

    ``step(x, x0_hat, i, points, state, generator) -> (x_next, state)`` is the solver's
    update from point i to i + 1 given the model's x0_hat at (x, t_i). The diffusers
    scheduler adapter drives the same ``step`` functions one call at a time.
    """
    model, counter, pts, grid = prepare(denoiser, x, grid, schedule, cond, allow_increasing=allow_increasing)
    for i in steps_iter(len(pts) - 1, progress, desc):
        x0 = model(x, pts[i].t)
        report(callback, i, pts[i].t, x, x0)
        x, state = step(x, x0, i, pts, state, generator)
    return SamplerOutput(x, counter.nfe, grid)


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, p: Point) -> torch.Tensor:
    return (x - p.alpha * x0) / p.sigma


# ---------------------------------------------------------------------------
# Exponential-integrator weights
# ---------------------------------------------------------------------------

def phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du; phi_0 = e^z, phi_{k+1} = (phi_k - 1/k!) / z."""
    if abs(z) < 1e-2:  # series, avoids cancellation
        return sum(z ** j / math.factorial(j + k) for j in range(12))
    v = math.exp(z)
    for j in range(k):
        v = (v - 1.0 / math.factorial(j)) / z
    return v


def ei_weights(h: float, n: int, z_scale: float = -1.0) -> list[float]:
    """[h^{k+1} phi_{k+1}(z_scale * h) for k < n]: weights of the Taylor terms x0^{(k)}(lambda_s).

    z_scale = -1: DPM-Solver++ ODE; +1: DPM-Solver (noise) ODE; -2: SDE-DPM-Solver++
    (the SDE weights carry an extra factor 2, applied by ``frame``).
    """
    return [h ** (k + 1) * phi(k + 1, z_scale * h) for k in range(n)]


class Frame(NamedTuple):
    """x_t = ratio * x_s + mult * sum_k weights[k] * d_k (+ noise_std * z)."""
    ratio: float
    mult: float
    h: float
    weights: list
    noise_std: float


def frame(s: Point, t: Point, *, data: bool = True, sde: bool = False, n: int = 3) -> Frame:
    """The exponential-integrator frame of the step s -> t (see module docstring)."""
    h = t.lam - s.lam
    if sde:  # SDE-DPM-Solver++ (arXiv 2211.01095, App. / Lu et al.): variance-preserving noise injection
        if not data:
            raise ValueError("the SDE variant is implemented for data prediction (DPM-Solver++) only")
        w = [2.0 * v for v in ei_weights(h, n, -2.0)]
        return Frame(t.sigma / s.sigma * math.exp(-h), t.alpha, h, w, t.sigma * math.sqrt(-math.expm1(-2.0 * h)))
    if data:
        return Frame(t.sigma / s.sigma, t.alpha, h, ei_weights(h, n, -1.0), 0.0)
    return Frame(t.alpha / s.alpha, -t.sigma, h, ei_weights(h, n, 1.0), 0.0)


def ei_update(x: torch.Tensor, fr: Frame, terms: Sequence[tuple[float, torch.Tensor]],
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """ratio * x + mult * sum(weight * tensor) (+ noise_std * noise), without temporaries per term."""
    out = x * fr.ratio
    for w, d in terms:
        out.add_(d, alpha=fr.mult * w)
    if noise is not None and fr.noise_std > 0:
        out.add_(noise, alpha=fr.noise_std)
    return out
