"""The diffusers edge: a scheduler that runs fewstep's solvers inside any pipeline,
and adapters that make diffusers models fewstep denoisers."""
from .scheduler import FewstepScheduler

__all__ = ["FewstepScheduler"]
