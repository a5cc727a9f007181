"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Alg. 2), guided or not
(Meng et al. 2022, Sec. 4.2): a student's one DDIM step of length 1/N reproduces two
DDIM steps of its teacher (the previous round's model) at the same class and w.

The N-step grid of a student sits at the fractions u_i = i / N, i = N..0, of the teacher's
training range (:func:`student_grid`; t_i = t_max i / N for t-linear schedules, Karras-spaced
sigmas for EDM, see :mod:`fewstep.distill.times`); its last step lands on clean data (t = 0).
The teacher's two steps meet at the midpoint fraction, a point of the 2N-step grid.
"""
from __future__ import annotations

import torch

from ..losses import _bcast, noised, truncated_snr_weight, unpack_batch
from ..schedules import NoiseSchedule
from ._common import NetX0, check_prediction, ddim_jump, sample_w, teacher_mode
from .times import encoder_time, encoder_times, fraction_to_time, student_times

__all__ = ["ProgressiveLoss", "progressive_target", "student_grid", "encoder_grid"]


def student_grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The N-step student's grid t_max -> 0 (float64, N + 1 points): :func:`fewstep.distill.times.student_times`."""
    return student_times(schedule, steps)


def encoder_grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The N-step distilled encoder's grid t_min -> t_max (float64, N + 1 points): it starts at t_min, not 0,
    because a DDIM inversion step needs sigma > 0 where it starts (:func:`fewstep.distill.times.encoder_times`)."""
    return encoder_times(schedule, steps)


def progressive_target(x_t: torch.Tensor, x_next: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
                       t_next: torch.Tensor) -> torch.Tensor:
    """The x0 that takes x_t to x_next in one DDIM step (Salimans & Ho 2022, Alg. 2):
    x~ = (x_next - (sigma_next / sigma_t) x_t) / (alpha_next - (sigma_next / sigma_t) alpha_t)."""
    a_t, s_t = _bcast(schedule.alpha(t), x_t), _bcast(schedule.sigma(t), x_t)
    a_n, s_n = _bcast(schedule.alpha(t_next), x_t), _bcast(schedule.sigma(t_next), x_t)
    ratio = s_n / s_t
    return ((x_next.double() - ratio * x_t.double()) / (a_n - ratio * a_t)).to(x_t.dtype)


class ProgressiveLoss:
    """One progressive round ``loss(student, batch) -> (B,)``: student steps = ``student_steps`` (N'),
    teacher steps = 2 N'.

    teacher: the previous round's net (for round 1 the stage-1 student, or an unguided
      teacher), output type ``teacher_prediction``; called with w when it has a w input.
    w_range: (w_min, w_max) for w-conditioned students; None for plain progressive
      distillation of an unguided model.
    Times t at the grid fractions i / N' with i ~ U{1..N'} (t_max i / N' for t-linear schedules);
    loss max(SNR, 1) * mean_CHW (x0_student - x~)^2 (Salimans & Ho 2022, Sec. 4, "truncated SNR").
    The teacher is only called (no grad, eval mode), never modified.

    direction="encode" distills the deterministic encoder (DDIM inversion, the reversed ODE)
    instead: on :func:`encoder_grid`, the student's one inversion step from t to the next point
    must land where two of the teacher's land; its loss is measured on that landing point,
    mean_CHW (x_next_student - x_next_teacher)^2 (an x0 error near t_min is amplified by
    sigma_next / sigma_t, so an x0-space weight would be ill-scaled there).
    """

    def __init__(self, teacher, schedule: NoiseSchedule, student_steps: int, teacher_prediction: str,
                 student_prediction: str | None = None, w_range: tuple[float, float] | None = (0.0, 4.0),
                 direction: str = "decode"):
        if direction not in ("decode", "encode"):
            raise ValueError(f"direction must be 'decode' or 'encode', got {direction!r}")
        if w_range is not None and not 0 <= w_range[0] <= w_range[1]:
            raise ValueError(f"w_range must satisfy 0 <= w_min <= w_max, got {w_range}")
        student_times(schedule, student_steps)  # validates the steps and the schedule
        self.direction, self.teacher = direction, teacher
        self.schedule, self.steps, self.w_range = schedule, student_steps, w_range
        self.teacher_x0 = NetX0(teacher, schedule, check_prediction(teacher_prediction, "teacher_prediction"))
        self.student_prediction = check_prediction(student_prediction or teacher_prediction, "student_prediction")

    def time_of(self, u: torch.Tensor) -> torch.Tensor:
        """Time at grid fraction u: the student grid (decode, u = 0 is clean data) or the encoder's."""
        if self.direction == "encode":
            return encoder_time(self.schedule, u)
        return torch.where(u == 0, torch.zeros_like(u), fraction_to_time(self.schedule, u))

    def step_times(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, t_mid, t_next) of the student's step i in 1..N (decode: from u = i/N down to (i-1)/N;
        encode: up from (N-i)/N to (N-i+1)/N); t_mid is the 2N-step teacher grid point between them."""
        u = i.to(torch.float64) / self.steps
        u_next = u - 1.0 / self.steps
        if self.direction == "encode":
            u, u_next = 1.0 - u, 1.0 - u_next
        return self.time_of(u), self.time_of(0.5 * (u + u_next)), self.time_of(u_next)

    def two_teacher_steps(self, x_t, t, t_mid, t_next, labels, w):
        """x at t_next after two teacher DDIM steps (t -> t_mid -> t_next) from x_t at t
        (``step_times`` gives the three times: t_mid is the 2N-step grid point between t and t_next)."""
        with teacher_mode(self.teacher):
            x_mid = ddim_jump(x_t, self.teacher_x0(x_t, t, labels, w), self.schedule, t, t_mid)
            return ddim_jump(x_mid, self.teacher_x0(x_mid, t_mid, labels, w), self.schedule, t_mid, t_next)

    def __call__(self, student, batch) -> torch.Tensor:
        x0, labels = unpack_batch(batch)
        b = x0.shape[0]
        i = torch.randint(1, self.steps + 1, (b,), device=x0.device)
        t, t_mid, t_next = self.step_times(i)
        w = None if self.w_range is None else sample_w(b, *self.w_range, x0.device)
        x_t, alpha, sigma = noised(self.schedule, x0, t, torch.randn_like(x0))
        x_two = self.two_teacher_steps(x_t, t, t_mid, t_next, labels, w)
        x0_student = NetX0(student, self.schedule, self.student_prediction)(x_t, t, labels, w)
        if self.direction == "encode":
            x_one = ddim_jump(x_t, x0_student, self.schedule, t, t_next)
            return (x_one.float() - x_two.float()).pow(2).flatten(1).mean(1)
        target = progressive_target(x_t, x_two, self.schedule, t, t_next)
        mse = (x0_student.float() - target.float()).pow(2).flatten(1).mean(1)
        return truncated_snr_weight(alpha, sigma) * mse
