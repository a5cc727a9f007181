"""Guided distillation, stage 1 (Meng et al. 2022, arXiv 2210.03142, Sec. 4.1).

One student with a guidance-weight input w learns the classifier-free guided teacher
for every w in [w_min, w_max]: at (x_t, t, w) its x0 prediction is regressed onto
x_w = (1 + w) x_cond - w x_uncond of the frozen teacher, weighted by max(SNR, 1).
"""
from __future__ import annotations

import torch

from ..losses import noised, null_class_of, sample_times, truncated_snr_weight, unpack_batch
from ..schedules import NoiseSchedule
from ._common import GuidedX0, NetX0, sample_w

__all__ = ["GuidedDistillLoss"]


class GuidedDistillLoss:
    """Stage-1 objective ``loss(student, batch) -> (B,)`` for labelled batches ``(x0, labels)``.

    teacher: the frozen class-conditional net ``teacher(x, t, labels)`` (null class =
      unconditional), output type ``teacher_prediction``.
    student: called as ``student(x, t, labels, w)``; output type ``student_prediction``
      (default: the teacher's). Build it with :func:`fewstep.distill.with_w_input`.
    t ~ U over the schedule's range (its knots for a DiscreteVP), w ~ U[w_min, w_max].
    Loss per sample: max(SNR, 1) * mean_CHW (x0_student - x_w)^2.
    """

    def __init__(self, teacher, schedule: NoiseSchedule, teacher_prediction: str,
                 student_prediction: str | None = None, w_min: float = 0.0, w_max: float = 4.0,
                 null_class: int | None = None):
        if not 0 <= w_min <= w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.schedule, self.w_min, self.w_max = schedule, float(w_min), float(w_max)
        self.teacher_prediction = teacher_prediction
        self.student_prediction = student_prediction or teacher_prediction
        self.guided = GuidedX0(NetX0(self.teacher, schedule, teacher_prediction), null_class_of(teacher, null_class))

    def __call__(self, student, batch) -> torch.Tensor:
        x0, labels = unpack_batch(batch)
        if labels is None:
            raise ValueError("guided distillation needs labelled batches (x0, labels)")
        b = x0.shape[0]
        t = sample_times(self.schedule, b, x0.device, self.schedule.t_min, self.schedule.t_max)
        w = sample_w(b, self.w_min, self.w_max, x0.device)
        x_t, alpha, sigma = noised(self.schedule, x0, t, torch.randn_like(x0))
        with torch.no_grad():
            target = self.guided(x_t, t, labels, w)
        x0_student = NetX0(student, self.schedule, self.student_prediction)(x_t, t, labels, w)
        mse = (x0_student.float() - target.float()).pow(2).flatten(1).mean(1)
        return truncated_snr_weight(alpha, sigma) * mse
