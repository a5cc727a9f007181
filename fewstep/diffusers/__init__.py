"""The diffusers edge: a scheduler that runs fewstep's solvers inside any pipeline,
and adapters that make diffusers models fewstep denoisers."""
from .models import DiffusersDenoiser, pipeline_denoiser, prediction_from_config, sample, schedule_from_config
from .nets import DiffusersNet, guidance_embedding
from .scheduler import FewstepScheduler

__all__ = ["FewstepScheduler", "DiffusersNet", "guidance_embedding", "DiffusersDenoiser", "pipeline_denoiser", "prediction_from_config", "sample",
           "schedule_from_config"]
