"""fewstep: fast sampling for diffusion models — training-free solvers and distillation."""
from .denoisers import ClassifierFreeGuidance, ClassifierGuidance, ModelDenoiser, Thresholded, dynamic_threshold
from .sampling import expected_nfe, invert, sample, solver_grid
from .schedules import CosineVP, DiscreteVP, EDM, LinearVP, RectifiedFlow, custom_grid, time_grid
from .solvers import SOLVERS, SamplerOutput

__version__ = "0.1.0"
__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "ModelDenoiser", "Thresholded", "dynamic_threshold",
           "expected_nfe", "invert", "sample", "solver_grid", "CosineVP", "DiscreteVP", "EDM", "LinearVP",
           "RectifiedFlow", "custom_grid", "time_grid", "SOLVERS", "SamplerOutput"]
