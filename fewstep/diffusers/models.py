"""diffusers models as fewstep denoisers, and a helper that samples a pipeline with any fewstep solver."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser, as_batch_times
from ..sampling import sample as fewstep_sample
from ..sampling import solver_grid
from ..schedules import NoiseSchedule, time_grid
from ..solvers import randn_like
from .families import Family, build_schedule, family_of, translate_config

__all__ = ["schedule_from_config", "prediction_from_config", "DiffusersDenoiser", "pipeline_denoiser", "sample",
           "COVERED_TRANSFORMERS"]

_COND_KEYS = ("encoder_hidden_states", "class_labels", "added_cond_kwargs", "timestep_cond",
              "cross_attention_kwargs", "encoder_attention_mask", "pooled_projections", "joint_attention_kwargs",
              "attention_kwargs")
# transformers whose call is model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=...,
# pooled_projections=...) on unpacked (B, C, H, W) latents: wrapped generically
COVERED_TRANSFORMERS = ("SD3Transformer2DModel",)
# transformers that need pipeline-specific latent packing, ids or timestep scaling: use FewstepScheduler
_NOT_COVERED = ("FluxTransformer2DModel", "SanaTransformer2DModel", "WanTransformer3DModel",
                "CogView4Transformer2DModel", "Lumina2Transformer2DModel", "HunyuanVideoTransformer3DModel",
                "LTXVideoTransformer3DModel")


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _our_config(config) -> dict:
    ours, _ = translate_config(dict(config))
    return ours


def schedule_from_config(config) -> NoiseSchedule:
    """The fewstep schedule of a diffusers scheduler config: DiscreteVP (or ZeroSNRDiscreteVP) for
    VP configs, FlowMatching for flow matching, EDM for EDM; unknown or unsupported configs raise."""
    return build_schedule(_our_config(config))


def prediction_from_config(config) -> str:
    """fewstep's name (eps, v, x0, flow) of the prediction type of a diffusers scheduler config;
    raises for one its family does not support."""
    return family_of(_our_config(config)).prediction


class DiffusersDenoiser(ModelDenoiser):
    """A diffusers UNet2DModel / UNet2DConditionModel (``model(sample, timestep, **cond).sample``)
    or a flow transformer called as ``model(hidden_states=x, timestep=..., **cond)`` (SD3's
    SD3Transformer2DModel) as a denoiser.

    Conditioning keywords (encoder_hidden_states, pooled_projections, class_labels,
    added_cond_kwargs, ...) pass through; class labels are checked against the model's number of
    class embeddings. The family (``fewstep.diffusers.families``: VP, flow, EDM), prediction type,
    betas / shift / EDM constants come from the pipeline's scheduler config, and the family object
    (``.family``) does the rest: VP models see the discrete timestep, flow models
    sigma * num_train_timesteps, EDM models c_in x and c_noise = log(sigma) / 4 (their output is
    combined as c_skip x + c_out F). ``prediction`` is fewstep's name of the config's prediction
    type (for EDM, eps or v name the sign of F). A model predicting a learned variance (2C output
    channels) keeps the mean half.
    """

    def __init__(self, model, scheduler_config, model_dtype: torch.dtype | None = None):
        cfg = _our_config(scheduler_config)
        self.family: Family = family_of(cfg)
        self.cfg = cfg
        out_ch = _get(getattr(model, "config", {}), "out_channels")
        in_ch = _get(getattr(model, "config", {}), "in_channels")
        learned = bool(out_ch and in_ch and out_ch == 2 * in_ch)
        super().__init__(self._net, self.family.schedule, self.family.prediction, time_input=self.family.timestep,
                         learned_variance=learned, model_dtype=model_dtype or _model_dtype(model))
        self.net = model
        self.num_classes = _get(getattr(model, "config", {}), "num_class_embeds")
        self._keyword = "hidden_states" in inspect.signature(model.forward).parameters \
            if hasattr(model, "forward") else False

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        unknown = set(cond) - set(_COND_KEYS)
        if unknown:
            raise ValueError(f"unknown conditioning {sorted(unknown)} for a diffusers model; use {', '.join(_COND_KEYS)}")
        if cond.get("class_labels") is not None and self.num_classes:
            check_labels(cond["class_labels"], self.num_classes, "class_labels")
        t = as_batch_times(t, x)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        dtype = self.model_dtype or x.dtype
        out = self._net(self.family.scale_model_input(x, sigma).to(dtype), self.family.timestep(t).to(dtype), **cond)
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match the input {tuple(x.shape)}")
        return self.family.x0(out, x, alpha, sigma)

    def _net(self, x, timestep, **cond):
        if self._keyword:
            out = self.net(hidden_states=x, timestep=timestep, **cond)
        else:
            out = self.net(x, timestep, **cond)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def check_labels(labels, num_classes: int, what: str = "labels") -> None:
    """Raise one line if a class label lies outside the model's class embeddings 0..num_classes-1."""
    labels = torch.as_tensor(labels)
    if labels.is_complex() or (labels.is_floating_point() and not torch.equal(labels, labels.round())):
        raise ValueError(f"{what} must be integer class ids, got {labels.dtype} values that are not whole numbers")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise ValueError(f"{what} holds class {bad}, but the model has {num_classes} class embeddings "
                         f"(classes 0..{num_classes - 1}); pass labels in that range")


def _model_dtype(model):
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return None


def pipeline_denoiser(pipe) -> DiffusersDenoiser:
    """The denoiser of a diffusers pipeline's ``unet`` or ``transformer`` with its scheduler's config.

    Transformers covered: UNet pipelines of every family and SD3Transformer2DModel (flow matching).
    Flux, Sana, Wan, CogView4, Lumina, HunyuanVideo and LTX transformers pack latents, take extra ids
    or rescale the timestep inside their pipeline: run those pipelines with FewstepScheduler instead."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError("the pipeline has neither `unet` nor `transformer`; wrap its denoising network with "
                         "DiffusersDenoiser(model, pipe.scheduler.config) instead")
    name = type(net).__name__
    if getattr(pipe, "unet", None) is None and name not in COVERED_TRANSFORMERS:
        raise ValueError(f"{name} is not covered by fewstep.diffusers.sample / pipeline_denoiser (covered: "
                         f"{', '.join(COVERED_TRANSFORMERS)}); use pipe.scheduler = FewstepScheduler.from_config("
                         "pipe.scheduler.config, solver=...) inside the pipeline, or DiffusersDenoiser(model, "
                         "pipe.scheduler.config) for a model called as model(hidden_states=x, timestep=...)")
    if getattr(getattr(pipe, "scheduler", None), "config", None) is None:
        raise ValueError("the pipeline's scheduler is None, and its config says how the model was trained (betas, "
                         "prediction type, shift): set pipe.scheduler, e.g. from the model folder's scheduler/, or "
                         "use DiffusersDenoiser(model, scheduler_config)")
    return DiffusersDenoiser(net, pipe.scheduler.config)


@torch.no_grad()
def sample(pipe, *, solver: str = "dpmpp_2m", steps: int = 20, guidance: float = 0.0, batch_size: int | None = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           pooled_prompt_embeds: torch.Tensor | None = None, negative_pooled_prompt_embeds: torch.Tensor | None = None,
           class_labels: torch.Tensor | None = None, uncond_class_labels: torch.Tensor | None = None,
           added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None,
           generator=None, spacing: str = "logsnr", final: str = "zero", mu: float | None = None,
           height: int | None = None, width: int | None = None, progress: bool = True, grid=None,
           **options: Any) -> torch.Tensor:
    """Sample a diffusers pipeline's model with any fewstep solver (singlestep, Heun and adaptive too).

    guidance: w in x_w = (1 + w) x_cond - w x_uncond (diffusers' guidance_scale = 1 + w);
      w > 0 needs the unconditional inputs (negative_prompt_embeds, negative_pooled_prompt_embeds,
      uncond_class_labels, negative_added_cond_kwargs where used).
    Flow-matching pipelines (SD3): pooled_prompt_embeds are the transformer's pooled_projections;
      mu is dynamic shifting's log-shift (needed when the config has use_dynamic_shifting); the
      sample starts from pure noise at sigma = 1 with one DDIM step, then the solver runs on
      fewstep's grid between the shifted training sigmas (as FewstepScheduler does).
    height, width: latent size for models without a fixed ``sample_size``.
    grid: a tuned solver (``fewstep.grids.TunedGrid`` from ``fewstep tune`` on this pipeline): its solver, times
      (from pure noise on flow pipelines) and learned coefficients replace solver / steps / spacing.
    Returns images in [-1, 1], shape (N, C, H, W); latent pipelines are decoded by their VAE.
    """
    den = pipeline_denoiser(pipe)
    cond, uncond = {}, {}
    for key, c, u in (("encoder_hidden_states", prompt_embeds, negative_prompt_embeds),
                      ("pooled_projections", pooled_prompt_embeds, negative_pooled_prompt_embeds),
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
    if height is not None or width is not None:
        size = (height or size[0], width or size[1])
    device = next(den.net.parameters()).device
    x = randn_like(torch.empty((n, _get(cfg, "in_channels"), *size), device=device, dtype=torch.float32), generator)
    sch, fam = den.schedule, den.family
    fam.check_mu(mu)
    if grid is not None:  # a tuned solver: its own times from where the pipeline's noise is, coefficients applied
        if not fam.tuned_grids:
            raise ValueError(f"a tuned grid is supported for the VP and flow-matching families, not {fam.name}")
        x = x * fam.initial_sigma(sch.t_max) if not fam.starts_from_pure_noise else x
        x = fewstep_sample(model, x, sch, grid=grid, cond=cond or None, generator=generator, progress=progress,
                           **options).x
        return _decode(pipe, x)
    ends = fam.grid_ends(mu)  # flow: between the shifted training sigmas, as FewstepScheduler
    if fam.starts_from_pure_noise:
        # the top (flow: sigma = 1) is pure noise (alpha = 0, lambda = -inf): one DDIM step to the grid's
        # second point, the exact limit of every solver's first step; the solver spends the remaining calls
        x0 = model(x, sch.t_upper, **cond)
        if steps == 1:
            x = x0
        else:
            g1 = float(time_grid(sch, steps, spacing, final=final, **ends)[1])
            x = float(sch.alpha(g1)) * x0 + float(sch.sigma(g1)) * x  # DDIM from alpha = 0, sigma = 1
        if steps == 2 and final == "zero":  # one call left: straight to clean data (every solver's one-step limit)
            x = model(x, g1, **cond)
        elif steps > 1:
            grid, extra = solver_grid(sch, solver, steps - 1, spacing, final, **{**ends, "t_max": g1})
            x = fewstep_sample(model, x, sch, solver=solver, grid=grid, cond=cond or None,
                               generator=generator, progress=progress, **{**extra, **options}).x
    else:
        x = x * fam.initial_sigma(sch.t_max)  # EDM (VE): x_T = sigma_max noise
        x = fewstep_sample(model, x, sch, solver=solver, steps=steps, spacing=spacing, final=final,
                           cond=cond or None, generator=generator, progress=progress, **options).x
    return _decode(pipe, x)


def _decode(pipe, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1]: latents decoded by the pipeline's VAE (unscaled as its call does), pixels as they are."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        lat = x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        shift = _get(vae.config, "shift_factor", None)
        x = vae.decode(lat + shift if shift is not None else lat).sample
    return x.float().clamp(-1, 1)
