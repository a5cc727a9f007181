"""fewstep: fast sampling for diffusion models — training-free solvers and distillation."""
from .denoisers import ClassifierFreeGuidance, ClassifierGuidance, ModelDenoiser, Thresholded, dynamic_threshold
from .sampling import expected_nfe, invert, sample, solver_grid
from .schedules import CosineVP, DiscreteVP, EDM, LinearVP, RectifiedFlow, custom_grid, time_grid
from .solvers import SOLVERS, SamplerOutput
from .api import generate, load, shipped_solver
from .grids import TunedGrid, load_grid
from .tune import tune_grid, tune_solver

__version__ = "0.1.0"
__all__ = ["TunedGrid", "load_grid", "tune_grid", "tune_solver", "ClassifierFreeGuidance", "ClassifierGuidance", "ModelDenoiser", "Thresholded", "dynamic_threshold",
           "expected_nfe", "invert", "sample", "solver_grid", "CosineVP", "DiscreteVP", "EDM", "LinearVP",
           "RectifiedFlow", "custom_grid", "time_grid", "SOLVERS", "SamplerOutput", "generate", "load", "shipped_solver"]


def __getattr__(name):  # import the diffusers edge only when asked for
    if name == "FewstepScheduler":
        from .diffusers import FewstepScheduler
        return FewstepScheduler
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
