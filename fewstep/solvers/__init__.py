"""Samplers: pure functions ``(denoiser, x_T, grid, schedule, *, options) -> SamplerOutput``.

One module per family: ``baseline`` (DDIM/DDPM, Euler, Heun), ``dpm_solver``
(DPM-Solver and DPM-Solver++, singlestep and multistep, SDE), ``adaptive``
(DPM-Solver-12/23) and ``unipc``. ``registry`` names them and maps a budget of
model calls to a grid.
"""
from ._common import SamplerOutput, randn_like
from .adaptive import dpm_adaptive
from .baseline import ddim, euler, heun
from .dpm_solver import dpm_multistep, dpm_singlestep, fast_orders
from .unipc import unipc
from .registry import SOLVERS, SolverSpec, get_solver

__all__ = ["SamplerOutput", "randn_like", "dpm_adaptive", "ddim", "euler", "heun", "dpm_multistep",
           "dpm_singlestep", "fast_orders", "unipc", "SOLVERS", "SolverSpec", "get_solver"]
