"""diffusers models as fewstep denoisers, and a helper that samples a pipeline with any fewstep solver."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..sampling import sample as fewstep_sample
from ..sampling import solver_grid
from ..schedules import NoiseSchedule, time_grid
from ..solvers import randn_like
from .scheduler import PREDICTION_TYPES
from .families import PREDICTION_OF, build_schedule, flow_shift_sigmas, translate_config

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
    ours = _our_config(config)
    p = ours.get("prediction_type", "epsilon")
    if p not in PREDICTION_OF:
        raise ValueError(f"prediction_type {p!r} is not supported; supported: {', '.join(PREDICTION_OF)}")
    return PREDICTION_OF[p]


class DiffusersDenoiser(ModelDenoiser):
    """A diffusers UNet2DModel / UNet2DConditionModel (``model(sample, timestep, **cond).sample``)
    or a flow transformer called as ``model(hidden_states=x, timestep=..., **cond)`` (SD3's
    SD3Transformer2DModel) as a denoiser.

    Conditioning keywords (encoder_hidden_states, pooled_projections, class_labels,
    added_cond_kwargs, ...) pass through. The family, prediction type, betas / shift / EDM
    constants come from the pipeline's scheduler config: VP models see the discrete timestep,
    flow models sigma * num_train_timesteps, EDM models c_in x and c_noise = log(sigma) / 4 (their
    output is combined as c_skip x + c_out F). A model predicting a learned variance (2C output
    channels) keeps the mean half.
    """

    def __init__(self, model, scheduler_config, model_dtype: torch.dtype | None = None):
        cfg = _our_config(scheduler_config)
        self.family, self.cfg = cfg.get("family", "vp"), cfg
        schedule = build_schedule(cfg)
        out_ch = _get(getattr(model, "config", {}), "out_channels")
        in_ch = _get(getattr(model, "config", {}), "in_channels")
        learned = bool(out_ch and in_ch and out_ch == 2 * in_ch)
        n_train = int(cfg.get("num_train_timesteps", 1000))
        if self.family == "flow":
            prediction, time_input = "flow", (lambda t: t * n_train)  # diffusers' flow models take sigma * N
        elif self.family == "edm":
            prediction, time_input = "x0", (lambda t: t)  # _call applies EDM's preconditioning to sigma = t
        else:
            p = cfg.get("prediction_type", "epsilon")
            if p not in PREDICTION_TYPES:
                raise ValueError(f"prediction_type {p!r} is not supported for a VP model; supported: "
                                 f"{', '.join(PREDICTION_TYPES)}")
            prediction, time_input = PREDICTION_TYPES[p], "discrete"
        super().__init__(self._call, schedule, prediction, time_input=time_input,
                         learned_variance=learned, model_dtype=model_dtype or _model_dtype(model))
        self.net = model
        self._keyword = "hidden_states" in inspect.signature(model.forward).parameters \
            if hasattr(model, "forward") else False

    def _call(self, x, timestep, **cond):
        unknown = set(cond) - set(_COND_KEYS)
        if unknown:
            raise ValueError(f"unknown conditioning {sorted(unknown)} for a diffusers model; use {', '.join(_COND_KEYS)}")
        if self.family == "edm":
            sig = timestep.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
            sd = float(self.cfg.get("sigma_data", 0.5))
            c_in = (1.0 / torch.sqrt(sig ** 2 + sd ** 2)).to(x.dtype)
            f = self._net(x * c_in, (0.25 * torch.log(sig.flatten())).to(x.dtype), cond)
            sign = -1.0 if self.cfg.get("prediction_type") == "v_prediction" else 1.0
            # D = c_skip x + c_out F (Karras et al. 2022, eq. 7, Table 1)
            c_skip = sd ** 2 / (sig ** 2 + sd ** 2)
            c_out = sign * sig * sd / torch.sqrt(sig ** 2 + sd ** 2)
            return (c_skip * x.double() + c_out * f[:, : x.shape[1]].double()).to(x.dtype)
        return self._net(x, timestep, cond)

    def _net(self, x, timestep, cond):
        if self._keyword:
            out = self.net(hidden_states=x, timestep=timestep, **cond)
        else:
            out = self.net(x, timestep, **cond)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


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
    return DiffusersDenoiser(net, pipe.scheduler.config)


def _flow_grid(den: DiffusersDenoiser, solver: str, steps: int, spacing: str, final: str, mu):
    """(t_max, t_min) of fewstep's spacing for a flow model: its lowest and highest finite-SNR
    training sigmas after the shift (as FewstepScheduler)."""
    n = int(den.cfg.get("num_train_timesteps", 1000))
    lo, hi = flow_shift_sigmas([1.0 / n, (n - 1.0) / n], {**den.cfg, "shift_terminal": None}, mu)
    return float(hi), float(lo)


@torch.no_grad()
def sample(pipe, *, solver: str = "dpmpp_2m", steps: int = 20, guidance: float = 0.0, batch_size: int | None = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           pooled_prompt_embeds: torch.Tensor | None = None, negative_pooled_prompt_embeds: torch.Tensor | None = None,
           class_labels: torch.Tensor | None = None, uncond_class_labels: torch.Tensor | None = None,
           added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None,
           generator=None, spacing: str = "logsnr", final: str = "zero", mu: float | None = None,
           height: int | None = None, width: int | None = None, progress: bool = True,
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
    sch = den.schedule
    if den.family == "flow":
        t_max, t_min = _flow_grid(den, solver, steps, spacing, final, mu)
        if den.cfg.get("use_dynamic_shifting") and mu is None:
            raise ValueError("this flow-matching pipeline uses dynamic shifting: pass mu (e.g. from the "
                             "pipeline's calculate_shift for your image size)")
        # sigma = 1 is pure noise (alpha = 0, lambda = -inf): one DDIM step to the grid's second point,
        # the exact limit of every solver's first step; the solver then spends the remaining calls
        x0 = model(x, 1.0, **cond)
        if steps == 1:
            x = x0
        else:
            g1 = float(time_grid(sch, steps, spacing, t_max=t_max, t_min=t_min, final=final)[1])
            x = (1.0 - g1) * x0 + g1 * x  # DDIM from sigma = 1: alpha_s = 0, sigma_s = 1
            grid, extra = solver_grid(sch, solver, steps - 1, spacing, final, t_max=g1, t_min=t_min)
            x = fewstep_sample(model, x, sch, solver=solver, grid=grid, cond=cond or None,
                               generator=generator, progress=progress, **{**extra, **options}).x
    else:
        if den.family == "edm":
            x = x * sch.t_max  # VE: x_T = sigma_max noise
        x = fewstep_sample(model, x, sch, solver=solver, steps=steps, spacing=spacing, final=final,
                           cond=cond or None, generator=generator, progress=progress, **options).x
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        lat = x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        shift = _get(vae.config, "shift_factor", None)
        x = vae.decode(lat + shift if shift is not None else lat).sample
    return x.float().clamp(-1, 1)
