"""The times at which distillation trains and samples, defined once for every schedule.

The papers give these times as fractions u in [0, 1] of the teacher's training-time range:
DMD's noise range u in [0.02, 0.98] (Yin et al. 2023, Sec. 5: t in [0.02 T, 0.98 T]), DMD2's
4-step generator at u = 1, 3/4, 1/2, 1/4 (Yin et al. 2024, Sec. 4.4: timesteps 999, 749, 499,
249 of 1000), the N-step student at u = i / N (Salimans & Ho 2022, Alg. 2). What a fraction
means depends on how the teacher was trained:

* discrete VP (DDPM / SD: a fraction of the training-time index), continuous VP (linear,
  cosine) and rectified flow (t in [0, 1]): t = u t_max, linear in t;
* EDM / VE (t = sigma in [sigma_min, sigma_max]): the fraction indexes the Karras
  discretisation, sigma(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho
  with rho = 7 (Karras et al. 2022, eq. 5), as DMD2's EDM models index their 1000 training sigmas.

Any other schedule is refused: its fractions have no agreed meaning.
"""
from __future__ import annotations

import torch

from ..losses import sample_times
from ..schedules import EDM, CosineVP, DiscreteVP, LinearVP, NoiseSchedule, RectifiedFlow

__all__ = ["RHO", "DM_FRACTIONS", "fraction_to_time", "dm_time_range", "dm_times", "student_times",
           "generator_times", "encoder_times", "training_times"]

RHO = 7.0
DM_FRACTIONS = (0.02, 0.98)  # DMD Sec. 5: t ~ U[0.02 T, 0.98 T]
_LINEAR = (DiscreteVP, LinearVP, CosineVP, RectifiedFlow)  # subclasses too (ZeroSNRDiscreteVP, FlowMatching)


def _karras(schedule: NoiseSchedule) -> bool:
    """True for EDM / VE schedules (rho-spaced fractions), False for t-linear ones; refuses others."""
    if isinstance(schedule, EDM):
        return True
    if isinstance(schedule, _LINEAR):
        return False
    raise ValueError(f"distillation times are defined for DiscreteVP, LinearVP, CosineVP, RectifiedFlow and EDM "
                     f"schedules, not {type(schedule).__name__}; convert the teacher's schedule to one of them")


def _fractions(u) -> torch.Tensor:
    u = torch.as_tensor(u, dtype=torch.float64)
    if not torch.isfinite(u).all() or u.min() < 0 or u.max() > 1:
        raise ValueError(f"time fractions must lie in [0, 1], got values in [{float(u.min())}, {float(u.max())}]")
    return u


def fraction_to_time(schedule: NoiseSchedule, u) -> torch.Tensor:
    """The time at fraction u in [0, 1] of the schedule's training range (float64, u's shape).

    t-linear schedules: t = u t_max (u = 0 is clean data), but diffusers' flow matching (``FlowMatching``,
    SD3 / Flux) t = u: its networks are trained up to sigma = 1 (pure noise), where its pipelines start, so
    the N-step grid i / N is what FlowMatchEuler samples (shift 1, ending at 1 / N); EDM: the Karras sigma(u)
    above (u = 0 is sigma_min, u = 1 sigma_max)."""
    u = _fractions(u)
    if getattr(schedule, "kind", "") == "flow_matching":
        return u * schedule.t_upper
    if not _karras(schedule):
        return u * schedule.t_max
    lo, hi = schedule.t_min ** (1.0 / RHO), schedule.t_max ** (1.0 / RHO)
    return (lo + u * (hi - lo)) ** RHO  # Karras et al. 2022, eq. 5


def dm_time_range(schedule: NoiseSchedule, fractions: tuple[float, float] = DM_FRACTIONS) -> tuple[float, float]:
    """(t_lo, t_hi): the ends of DMD's distribution-matching noise range for this schedule."""
    lo, hi = fractions
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"the DM noise fractions must satisfy 0 <= lo < hi <= 1, got {fractions}")
    ends = fraction_to_time(schedule, torch.tensor([lo, hi], dtype=torch.float64))
    return float(ends[0]), float(ends[1])


def dm_times(schedule: NoiseSchedule, batch: int, device,
             fractions: tuple[float, float] = DM_FRACTIONS) -> torch.Tensor:
    """DM noise times (B,) float64: u ~ U[lo, hi], t = fraction_to_time(u) (rho-spaced for EDM)."""
    lo, hi = fractions
    return fraction_to_time(schedule, lo + (hi - lo) * torch.rand(batch, dtype=torch.float64, device=device))


def student_times(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The N-step student's grid, t at u = i / N for i = N..1, then 0 (clean data); float64, N + 1 points.
    t-linear schedules: t_max i / N; EDM: Karras-spaced sigmas from sigma_max, then 0."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    u = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    t = fraction_to_time(schedule, u)
    t[-1] = 0.0  # the last step lands on clean data
    return t


def generator_times(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The input times of a ``steps``-step generator (DMD2): the student grid without its final 0
    (4 steps: t_max [1, 3/4, 1/2, 1/4] for t-linear schedules, Karras-spaced sigmas for EDM)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"generator steps must be an integer >= 1, got {steps!r}")
    return student_times(schedule, steps)[:-1]


def encoder_time(schedule: NoiseSchedule, u) -> torch.Tensor:
    """The distilled encoder's time at fraction u: t_min + u (t_max - t_min) (t-linear), sigma(u) (EDM);
    it starts at t_min (u = 0), where a DDIM inversion step still has sigma > 0."""
    u = _fractions(u)
    if _karras(schedule):
        return fraction_to_time(schedule, u)
    return schedule.t_min + u * (schedule.t_max - schedule.t_min)


def encoder_times(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The N-step encoder's grid from t_min up to t_max (float64, N + 1 points)."""
    student_times(schedule, steps)  # validates steps and the schedule
    return encoder_time(schedule, torch.arange(steps + 1, dtype=torch.float64) / steps)


def training_times(schedule: NoiseSchedule, batch: int, device) -> torch.Tensor:
    """Denoising-loss times (B,) float64 over the whole training range: the schedule's own training
    times for t-linear schedules (a DiscreteVP's knots), u ~ U[0, 1] through sigma(u) for EDM."""
    if _karras(schedule):
        return fraction_to_time(schedule, torch.rand(batch, dtype=torch.float64, device=device))
    return sample_times(schedule, batch, device, schedule.t_min, schedule.t_max)
