"""Distillation: guided (stage 1) and progressive distillation (Meng et al. 2022; Salimans & Ho
2022), samplers for distilled students, and the recipes that make fewstep's shipped students.

Each objective is a loss object ``loss(student, batch) -> per-sample loss`` run by the one
training loop, :func:`fewstep.train.train`.
"""
from ._common import GuidedX0, NetX0, ddim_jump, with_w_input
from .guided import GuidedDistillLoss
from .progressive import ProgressiveLoss, encoder_grid, progressive_target, student_grid
from .samplers import encode_student, sample_student, stochastic_step, translate

__all__ = ["GuidedDistillLoss", "ProgressiveLoss", "progressive_target", "student_grid", "sample_student", "encode_student", "translate", "encoder_grid",
           "stochastic_step", "with_w_input", "NetX0", "GuidedX0", "ddim_jump"]
