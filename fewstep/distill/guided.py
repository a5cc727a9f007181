"""Guided distillation, stage 1 (Meng et al. 2022, arXiv 2210.03142, Sec. 4.1).

One student with a guidance-weight input w learns the classifier-free guided teacher
for every w in [w_min, w_max]: at (x_t, t, w) its x0 prediction is regressed onto
x_w = (1 + w) x_cond - w x_uncond of the frozen teacher, weighted by max(SNR, 1).
"""
from __future__ import annotations

import torch

from ..denoisers import ClassifierFreeGuidance
from ..losses import noised, truncated_snr_weight, unpack_batch
from ..schedules import NoiseSchedule
from ._common import NetX0, check_prediction, guidance_null_class, null_labels, sample_w, teacher_mode
from .times import training_times

__all__ = ["GuidedDistillLoss"]


class GuidedDistillLoss:
    """Stage-1 objective ``loss(student, batch) -> (B,)`` for labelled batches ``(x0, labels)``.

    teacher: the frozen class-conditional net ``teacher(x, t, labels)``, output type
      ``teacher_prediction``; it is only called (no grad, eval mode), never modified.
    null_class: the teacher's unconditional class index (without it: the teacher's declared
      ``null_class`` attribute, with a warning).
    student: called as ``student(x, t, labels, w)``; output type ``student_prediction``
      (default: the teacher's). Build it with :func:`fewstep.distill.with_w_input`.
    t: the teacher's training times (:func:`fewstep.distill.times.training_times`), w ~ U[w_min, w_max].
    Loss per sample: max(SNR, 1) * mean_CHW (x0_student - x_w)^2 (Meng et al. eq. 7 with
    Salimans & Ho's truncated-SNR weight).
    """

    def __init__(self, teacher, schedule: NoiseSchedule, teacher_prediction: str,
                 student_prediction: str | None = None, w_min: float = 0.0, w_max: float = 4.0,
                 null_class: int | None = None):
        if not 0 <= w_min <= w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        training_times(schedule, 1, "cpu")  # refuses a schedule without defined distillation times
        self.teacher, self.schedule, self.w_min, self.w_max = teacher, schedule, float(w_min), float(w_max)
        self.teacher_prediction = check_prediction(teacher_prediction, "teacher_prediction")
        self.student_prediction = check_prediction(student_prediction or teacher_prediction, "student_prediction")
        self.uncond = null_labels(guidance_null_class(teacher, null_class, "GuidedDistillLoss"))
        self.teacher_x0 = NetX0(teacher, schedule, teacher_prediction)

    def target(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The guided teacher's x0: x_w = (1 + w) x_cond - w x_uncond, one batched call."""
        with teacher_mode(self.teacher):
            return ClassifierFreeGuidance(self.teacher_x0, w, self.uncond)(x_t, t, labels=labels)

    def __call__(self, student, batch) -> torch.Tensor:
        x0, labels = unpack_batch(batch)
        if labels is None:
            raise ValueError("guided distillation needs labelled batches (x0, labels)")
        b = x0.shape[0]
        t = training_times(self.schedule, b, x0.device)
        w = sample_w(b, self.w_min, self.w_max, x0.device)
        x_t, alpha, sigma = noised(self.schedule, x0, t, torch.randn_like(x0))
        target = self.target(x_t, t, labels, w)
        x0_student = NetX0(student, self.schedule, self.student_prediction)(x_t, t, labels, w)
        mse = (x0_student.float() - target.float()).pow(2).flatten(1).mean(1)
        return truncated_snr_weight(alpha, sigma) * mse
