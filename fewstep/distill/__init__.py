"""Distillation: guided (stage 1) and progressive distillation (Meng et al. 2022; Salimans & Ho
2022), Distribution Matching Distillation (DMD / DMD2), samplers for distilled students, and the
times all of them train and sample at (:mod:`fewstep.distill.times`).

Each objective is a loss object ``loss(student, batch) -> per-sample loss`` run by the one
training loop, :func:`fewstep.train.train`.
"""
from ._common import NetX0, ddim_jump, null_labels, with_w_input
from .guided import GuidedDistillLoss
from .progressive import ProgressiveLoss, encoder_grid, progressive_target, student_grid
from .samplers import encode_student, sample_student, stochastic_step, translate
from .times import dm_time_range, fraction_to_time, generator_times, student_times

__all__ = ["GuidedDistillLoss", "ProgressiveLoss", "progressive_target", "student_grid", "sample_student", "encode_student", "translate", "encoder_grid",
           "stochastic_step", "with_w_input", "NetX0", "null_labels", "ddim_jump", "fraction_to_time", "dm_time_range",
           "student_times", "generator_times"]
