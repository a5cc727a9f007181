"""diffusers models as fewstep denoisers, and a helper that samples a pipeline with any fewstep solver."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..sampling import sample as fewstep_sample
from ..schedules import DiscreteVP, betas_by_name
from ..solvers import randn_like
from .scheduler import PREDICTION_TYPES

__all__ = ["schedule_from_config", "prediction_from_config", "DiffusersDenoiser", "pipeline_denoiser", "sample"]

_COND_KEYS = ("encoder_hidden_states", "class_labels", "added_cond_kwargs", "timestep_cond",
              "cross_attention_kwargs", "encoder_attention_mask")


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def schedule_from_config(config) -> DiscreteVP:
    """The DiscreteVP schedule of a diffusers scheduler config (betas, beta schedule, timesteps)."""
    betas = _get(config, "trained_betas")
    if betas is not None:
        return DiscreteVP(betas=torch.as_tensor(betas, dtype=torch.float64))
    return DiscreteVP(betas=betas_by_name(_get(config, "beta_schedule", "linear"),
                                          int(_get(config, "num_train_timesteps", 1000)),
                                          float(_get(config, "beta_start", 0.0001)),
                                          float(_get(config, "beta_end", 0.02))))


def prediction_from_config(config) -> str:
    p = _get(config, "prediction_type", "epsilon")
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {p!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[p]


class DiffusersDenoiser(ModelDenoiser):
    """A diffusers UNet2DModel / UNet2DConditionModel (or any model with their call
    signature ``model(sample, timestep, **cond).sample``) as a denoiser.

    Conditioning keywords (encoder_hidden_states, class_labels, added_cond_kwargs,
    timestep_cond, ...) pass through. Prediction type and betas come from the
    pipeline's scheduler config; a model predicting a learned variance (2C output
    channels) keeps the mean half.
    """

    def __init__(self, model, scheduler_config, model_dtype: torch.dtype | None = None):
        schedule = schedule_from_config(scheduler_config)
        out_ch = _get(getattr(model, "config", {}), "out_channels")
        in_ch = _get(getattr(model, "config", {}), "in_channels")
        learned = bool(out_ch and in_ch and out_ch == 2 * in_ch)
        super().__init__(self._call, schedule, prediction_from_config(scheduler_config), time_input="discrete",
                         learned_variance=learned, model_dtype=model_dtype or _model_dtype(model))
        self.net = model

    def _call(self, x, timestep, **cond):
        unknown = set(cond) - set(_COND_KEYS)
        if unknown:
            raise ValueError(f"unknown conditioning {sorted(unknown)} for a diffusers model; use {', '.join(_COND_KEYS)}")
        out = self.net(x, timestep, **cond)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def _model_dtype(model):
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return None


def pipeline_denoiser(pipe) -> DiffusersDenoiser:
    """The denoiser of a diffusers pipeline's ``unet`` with its scheduler's config."""
    net = getattr(pipe, "unet", None)
    if net is None:
        raise ValueError("the pipeline has no `unet`; wrap its denoising network with DiffusersDenoiser(model, "
                         "pipe.scheduler.config) instead")
    return DiffusersDenoiser(net, pipe.scheduler.config)


@torch.no_grad()
def sample(pipe, *, solver: str = "dpmpp_2m", steps: int = 20, guidance: float = 0.0, batch_size: int | None = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           class_labels: torch.Tensor | None = None, uncond_class_labels: torch.Tensor | None = None,
           added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None,
           generator=None, spacing: str = "logsnr", final: str = "zero", progress: bool = True,
           **options: Any) -> torch.Tensor:
    """Sample a diffusers pipeline's model with any fewstep solver (singlestep, Heun and adaptive too).

    guidance: w in x_w = (1 + w) x_cond - w x_uncond (diffusers' guidance_scale = 1 + w);
      w > 0 needs the unconditional inputs (negative_prompt_embeds, uncond_class_labels,
      negative_added_cond_kwargs where used).
    Returns images in [-1, 1], shape (N, C, H, W); latent pipelines are decoded by their VAE.
    """
    den = pipeline_denoiser(pipe)
    cond, uncond = {}, {}
    for key, c, u in (("encoder_hidden_states", prompt_embeds, negative_prompt_embeds),
                      ("class_labels", class_labels, uncond_class_labels),
                      ("added_cond_kwargs", added_cond_kwargs, negative_added_cond_kwargs)):
        if c is not None:
            cond[key] = c
            if guidance != 0 and u is None:
                raise ValueError(f"guidance={guidance} needs the unconditional counterpart of {key} "
                                 f"(pass the negative/unconditional value)")
            uncond[key] = u
    n = batch_size or next((v.shape[0] for v in cond.values() if isinstance(v, torch.Tensor)),
                           len(generator) if isinstance(generator, (list, tuple)) else 1)
    model = ClassifierFreeGuidance(den, guidance, uncond) if guidance != 0 else den
    cfg = den.net.config
    size = _get(cfg, "sample_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    device = next(den.net.parameters()).device
    x_T = torch.empty((n, _get(cfg, "in_channels"), *size), device=device, dtype=torch.float32)
    x_T = randn_like(x_T, generator)
    x = fewstep_sample(model, x_T, den.schedule, solver=solver, steps=steps, spacing=spacing, final=final,
                       cond=cond or None, generator=generator, progress=progress, **options).x
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        x = vae.decode(x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return x.float().clamp(-1, 1)
