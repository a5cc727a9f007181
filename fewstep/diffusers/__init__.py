"""The diffusers edge: a scheduler that runs fewstep's solvers inside any pipeline (flow matching,
discrete VP incl. zero terminal SNR, EDM; see ``families``: one object per family, used by the
scheduler and the model adapters alike), and adapters that make diffusers models (UNets, SD3's
transformer) fewstep denoisers (``DiffusersDenoiser``) and trainable fewstep nets (``DiffusersNet``)."""
from .families import EDMFamily, Family, FlowFamily, VPFamily, family_of
from .models import (COVERED_TRANSFORMERS, DiffusersDenoiser, pipeline_denoiser, prediction_from_config, sample,
                     schedule_from_config)
from .nets import DiffusersNet, WEmbedding, guidance_embedding
from .scheduler import FewstepScheduler

__all__ = ["FewstepScheduler", "COVERED_TRANSFORMERS", "DiffusersNet", "WEmbedding", "guidance_embedding",
           "DiffusersDenoiser", "pipeline_denoiser", "prediction_from_config", "sample", "schedule_from_config",
           "Family", "VPFamily", "FlowFamily", "EDMFamily", "family_of"]
