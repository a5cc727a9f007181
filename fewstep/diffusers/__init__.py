"""The diffusers edge: a scheduler that runs fewstep's solvers inside any pipeline (flow matching,
discrete VP incl. zero terminal SNR, EDM; see ``families``), and adapters that make diffusers
models (UNets, SD3's transformer) fewstep denoisers."""
from .models import COVERED_TRANSFORMERS, DiffusersDenoiser, pipeline_denoiser, prediction_from_config, sample, schedule_from_config
from .nets import DiffusersNet, guidance_embedding
from .scheduler import FewstepScheduler

__all__ = ["FewstepScheduler", "COVERED_TRANSFORMERS", "DiffusersNet", "guidance_embedding", "DiffusersDenoiser", "pipeline_denoiser", "prediction_from_config", "sample",
           "schedule_from_config"]
