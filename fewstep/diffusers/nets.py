"""diffusers models in fewstep's network contract ``net(x, t, labels=None, w=None)``, so that every
distillation objective (guided stage 1, progressive rounds, DMD) trains them unchanged.

* model: a UNet2DModel, a UNet2DConditionModel or SD3's SD3Transformer2DModel; its raw output
  (eps, v or x0 for VP models, the velocity noise - x0 for flow models) is returned as is;
* time: fewstep's continuous t of the model's schedule becomes the model's timestep input by the
  family object (``fewstep.diffusers.families``): VP ``(t - 1/N) N`` (fractional between training
  steps), flow matching ``t N`` (t = sigma);
* labels: class ids. A model with a class embedding (``num_class_embeds``) gets them as
  ``class_labels``; a cross-attention model gets ``encoder_hidden_states = label_context[labels]``
  (SD3 also ``pooled_projections = pooled_context[labels]``; an SDXL UNet, ``addition_embed_type=
  "text_time"``, ``added_cond_kwargs = {"text_embeds": pooled_context[labels], "time_ids": time_ids}``
  with one ``time_ids`` vector (original size, crop corner, target size) for every sample), a bank of
  one context per class.
  The unconditional class is whatever ``null_class=`` says; there is none by default, and a net
  without one needs labels on every call and cannot do classifier-free guidance;
* guidance weight w (guided distillation): ``with_w_input()``. A UNet whose class takes
  ``time_cond_proj_dim`` (UNet2DConditionModel) gets its own guidance input, fed the sinusoidal
  embedding of 1000 w as latent-consistency models do, so the student stays a stock diffusers
  model. Any other (UNet2DModel, SD3) gets a :class:`WEmbedding` added to its time embedding's
  output. Both start at zero, so the student equals its teacher for every w. fewstep's w is
  diffusers' ``guidance_scale - 1``.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Mapping

import torch
from torch import nn

from ..nets._layers import batch_scalar
from ..schedules import DiscreteVP, NoiseSchedule
from .families import Family, VPFamily, family_of, translate_config
from .models import COVERED_TRANSFORMERS, check_labels

__all__ = ["DiffusersNet", "WEmbedding", "guidance_embedding"]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance weights -> (B, dim) sinusoidal features of 1000 w (sin | cos halves, the LCM convention)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class WEmbedding(nn.Module):
    """w -> sinusoidal features of 1000 w -> Linear, SiLU, Linear (zero-initialised): an embedding
    of the guidance weight that is 0 for every w until it is trained."""

    def __init__(self, width: int, features: int = 256):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(guidance_embedding(w, self.features).to(self.mlp[0].weight.dtype))


def _family(schedule) -> Family:
    if isinstance(schedule, DiscreteVP):
        return VPFamily({"num_train_timesteps": schedule.N}, schedule)
    if isinstance(schedule, Mapping):  # a diffusers scheduler config (pipe.scheduler.config) or its dict
        fam = family_of(translate_config(dict(schedule))[0])
        if fam.scales_model_input:
            raise ValueError(f"DiffusersNet takes VP and flow-matching models, not {fam.name}: an EDM model's "
                             "output is preconditioned (c_skip, c_out); sample it with DiffusersDenoiser or "
                             "FewstepScheduler")
        return fam
    if isinstance(schedule, NoiseSchedule):
        raise TypeError(f"a {type(schedule).__name__} schedule does not say how a diffusers model takes its timestep: "
                        "pass the pipeline's scheduler config (pipe.scheduler.config), or a DiscreteVP for a "
                        "discrete-time UNet")
    raise TypeError(f"schedule must be a DiscreteVP or a diffusers scheduler config, got {type(schedule).__name__}")


def _attention_widths(model) -> tuple[int, ...]:
    """The widths encoder_hidden_states must have (UNet2DConditionModel, SD3), () for none."""
    cfg = model.config
    if getattr(cfg, "joint_attention_dim", None) is not None:  # SD3
        return (int(cfg.joint_attention_dim),)
    if getattr(cfg, "encoder_hid_dim", None) is not None:  # a projection in front of the cross-attention
        return (int(cfg.encoder_hid_dim),)
    dim = getattr(cfg, "cross_attention_dim", None)
    if dim is None:
        return ()
    return tuple(sorted({int(d) for d in dim})) if isinstance(dim, (list, tuple)) else (int(dim),)


def _pooled_width(model, time_ids) -> int | None:
    """The width of the pooled text a model takes (SD3: pooled_projection_dim; SDXL: what add_embedding's input
    leaves after the time ids' sinusoidal features), None for none."""
    cfg = model.config
    if getattr(cfg, "pooled_projection_dim", None) is not None:
        return int(cfg.pooled_projection_dim)
    if getattr(cfg, "addition_embed_type", None) == "text_time":  # in = pooled + addition_time_embed_dim per id
        return int(cfg.projection_class_embeddings_input_dim) - len(time_ids) * int(cfg.addition_time_embed_dim)
    return None


def _check_added_conditions(model, time_ids) -> bool:
    """Whether the model takes SDXL's added conditions (text_time); one-line errors for any other added
    embedding, and for time_ids that do not fit."""
    kind = getattr(model.config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise ValueError(f"this UNet has addition_embed_type={kind!r} (Kandinsky-style added conditions), which "
                         "DiffusersNet cannot feed; use DiffusersDenoiser with added_cond_kwargs")
    if kind is None:
        if time_ids is not None:
            raise ValueError("time_ids are given, but this model has no SDXL added embedding (addition_embed_type is "
                             "not 'text_time'); leave them out")
        return False
    if time_ids is None or time_ids.ndim != 1 or not len(time_ids):
        got = None if time_ids is None else tuple(time_ids.shape)
        raise ValueError("this UNet has SDXL's added conditions (addition_embed_type='text_time'): pass time_ids, "
                         f"a (6,) vector of original size, crop corner and target size, got {got}")
    return True


def _time_embedding(model) -> tuple[nn.Module, int]:
    """The module whose output is the model's time embedding (where class embeddings are added), and its width."""
    for name in ("time_embedding", "time_text_embed"):  # UNets; SD3 (time + pooled text)
        m = getattr(model, name, None)
        inner = getattr(m, "timestep_embedder", m)
        if isinstance(getattr(inner, "linear_2", None), nn.Linear):
            return m, inner.linear_2.out_features
    raise ValueError(f"with_w_input cannot find the time embedding of {type(model).__name__} "
                     "(no time_embedding.linear_2 or time_text_embed.timestep_embedder.linear_2)")


class DiffusersNet(nn.Module):
    """A diffusers UNet or SD3 transformer as a fewstep net (see the module docstring).

    schedule: a :class:`DiscreteVP` (discrete-time UNets) or the pipeline's scheduler config
      (``pipe.scheduler.config``: VP or flow matching; the family, its timestep input and
      ``prediction`` come from it).
    label_context: (K, seq, width) contexts for a cross-attention model, one per class id.
    pooled_context: (K, width) pooled contexts, one per class id (SD3's pooled_projections, SDXL's
      text_embeds).
    time_ids: SDXL's added time ids (n,) (``StableDiffusionXLPipeline._get_add_time_ids``), the same for
      every sample; for ``addition_embed_type="text_time"`` UNets only.
    null_class: the class id that means "no condition" (a model trained with label dropout, or
      the bank row of the empty prompt); None: the model has none (no guidance, labels required).
    """

    def __init__(self, unet: nn.Module, schedule, label_context: torch.Tensor | None = None, *,
                 null_class: int | None = None, pooled_context: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None):
        super().__init__()
        self.family = _family(schedule)
        self.schedule = self.family.schedule
        self._schedule_arg = schedule  # for with_w_input's copy
        self.prediction = None if isinstance(schedule, NoiseSchedule) else self.family.prediction
        self.unet = unet
        cfg = unet.config
        self._keyword = "hidden_states" in inspect.signature(unet.forward).parameters
        if self._keyword and type(unet).__name__ not in COVERED_TRANSFORMERS:
            raise ValueError(f"{type(unet).__name__} is not supported by DiffusersNet (covered: UNets, "
                             f"{', '.join(COVERED_TRANSFORMERS)}): it packs latents or takes extra ids in its pipeline")
        self.text_time = _check_added_conditions(unet, time_ids)
        self.num_classes = self._check_context(unet, label_context, pooled_context, time_ids)
        self.register_buffer("label_context", label_context, persistent=False)
        self.register_buffer("pooled_context", pooled_context, persistent=False)
        self.register_buffer("time_ids", time_ids, persistent=False)
        if null_class is not None:
            if self.num_classes is None:
                raise ValueError("null_class is given, but this model takes no class labels (no num_class_embeds, "
                                 "no cross-attention); leave null_class out")
            if isinstance(null_class, bool) or not isinstance(null_class, int) or \
                    not 0 <= null_class < self.num_classes:
                raise ValueError(f"null_class must be a class id in 0..{self.num_classes - 1}, got {null_class!r}: "
                                 "pass the id the model was trained with as unconditional")
        self.null_class = null_class
        self.use_w = getattr(cfg, "time_cond_proj_dim", None) is not None
        self.w_embedding: WEmbedding | None = None  # set by with_w_input for models without time_cond_proj_dim
        self._w_emb = None  # the current call's w embedding, added by the hook on the time embedding

    @staticmethod
    def _check_context(unet, label_context, pooled_context, time_ids=None) -> int | None:
        """The number of class ids (None: an unconditional model); one-line errors for a bank that cannot fit."""
        cfg, widths = unet.config, _attention_widths(unet)
        if widths:
            if label_context is None:
                raise ValueError("this model attends to encoder_hidden_states: pass label_context, a (K, seq, "
                                 f"{widths[0]}) bank of contexts, one per class id (and null_class= for the "
                                 "unconditional one, e.g. the empty prompt)")
            if label_context.ndim != 3 or label_context.shape[-1] not in widths:
                raise ValueError(f"label_context has shape {tuple(label_context.shape)}, but this model's "
                                 f"cross-attention takes (K, seq, {' or '.join(map(str, widths))}) contexts: build "
                                 "the bank with the text encoder the model was trained with")
            width = _pooled_width(unet, time_ids)
            if width is not None:  # SD3's pooled_projections, SDXL's text_embeds
                want = (label_context.shape[0], width)
                if pooled_context is None or tuple(pooled_context.shape) != want:
                    got = None if pooled_context is None else tuple(pooled_context.shape)
                    raise ValueError(f"this model takes pooled text embeddings: pass pooled_context of shape {want} "
                                     f"(one pooled context per label_context row), got {got}")
            elif pooled_context is not None:
                raise ValueError("pooled_context is given, but this model takes no pooled_projections / text_embeds; "
                                 "leave it out")
            return label_context.shape[0]
        if label_context is not None or pooled_context is not None:
            raise ValueError("label_context / pooled_context are given, but this model has no cross-attention "
                             "(cross_attention_dim is None); leave them out")
        if getattr(cfg, "num_class_embeds", None):
            return int(cfg.num_class_embeds)
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError(f"this UNet's class embedding (class_embed_type={cfg.class_embed_type!r}) takes "
                             "vectors or timesteps, not class ids: DiffusersNet cannot feed it")
        return None

    def _labels(self, labels, b: int, device) -> torch.Tensor | None:
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("this model takes no class labels (no num_class_embeds, no cross-attention); "
                                 "pass labels=None")
            return None
        if labels is None:
            if self.null_class is None:
                raise ValueError("labels=None means the unconditional model, but this DiffusersNet has no null class: "
                                 "pass labels, or null_class= when building it")
            return torch.full((b,), self.null_class, dtype=torch.long, device=device)
        labels = batch_scalar(labels, b, device, "labels")
        check_labels(labels, self.num_classes)
        return labels.long()

    @property
    def feature_channels(self) -> int:
        """Channels of the features ``return_features=True`` gives (DMD2's GAN head reads them): a UNet's mid
        block output, a transformer's middle block's image tokens (an AttributeError for other modules)."""
        cfg = self.unet.config
        if self._feature_block() is getattr(self.unet, "mid_block", None):
            return cfg.block_out_channels[-1]
        return cfg.num_attention_heads * cfg.attention_head_dim

    def _feature_block(self) -> nn.Module:
        """The UNet's mid block, else the transformer's middle block (an AttributeError for other modules)."""
        module = self.unet
        if getattr(module, "mid_block", None) is not None:
            return module.mid_block
        if getattr(module, "transformer_blocks", None) is not None:
            return module.transformer_blocks[len(module.transformer_blocks) // 2]
        raise AttributeError(f"{type(module).__name__} has no mid block or transformer blocks to read features from")

    def _feature_map(self, out, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features from the block's output: a UNet block's map as is; a joint transformer block's
        (context, image tokens) -> its image tokens laid back on the patch grid."""
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            return out
        tokens = out[1] if isinstance(out, tuple) else out
        p = self.unet.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def forward(self, x, t, labels=None, w=None, return_features: bool = False):
        """The module's prediction; ``return_features=True``: (prediction, its mid-network features)."""
        if return_features:
            box = {}
            handle = self._feature_block().register_forward_hook(lambda module, args, out: box.setdefault("f", out))
            try:
                out = self.forward(x, t, labels, w)
            finally:
                handle.remove()
            return out, self._feature_map(box["f"], x)
        b = x.shape[0]
        timestep = self.family.timestep(torch.as_tensor(t, dtype=torch.float64).expand(b)).to(x.device)
        kwargs = {}
        labels = self._labels(labels, b, x.device)
        if labels is not None and self.label_context is not None:
            kwargs["encoder_hidden_states"] = self.label_context[labels].to(x.dtype)
            if self.text_time:  # SDXL: pooled text and size / crop ids through the added embedding
                kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_context[labels].to(x.dtype),
                                               "time_ids": self.time_ids.to(x.dtype).expand(b, -1)}
            elif self.pooled_context is not None:
                kwargs["pooled_projections"] = self.pooled_context[labels].to(x.dtype)
        elif labels is not None:
            kwargs["class_labels"] = labels
        if not self.use_w:
            if w is not None:
                raise ValueError("this model has no guidance input: do not pass w (with_w_input() adds one)")
            return self._call(x, timestep.to(torch.float32), kwargs)
        if w is None:
            raise ValueError("this model has a guidance input (with_w_input / time_cond_proj_dim): pass w")
        w = batch_scalar(w, b, x.device, "w").float()
        if self.w_embedding is None:
            kwargs["timestep_cond"] = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(x.dtype)
            return self._call(x, timestep.to(torch.float32), kwargs)
        self._w_emb = self.w_embedding(w)
        try:
            return self._call(x, timestep.to(torch.float32), kwargs)
        finally:
            self._w_emb = None

    def _call(self, x, timestep, kwargs):
        if self._keyword:
            return self.unet(hidden_states=x, timestep=timestep, **kwargs).sample
        return self.unet(x, timestep, **kwargs).sample

    def _add_w_embedding(self, module, inputs, output):
        """Forward hook on the time embedding: add this call's w embedding (none outside forward)."""
        return output if self._w_emb is None else output + self._w_emb.to(output.dtype)

    def with_w_input(self, time_cond_proj_dim: int = 256) -> "DiffusersNet":
        """A copy with a guidance-weight input that equals this model for every w (guided distillation,
        stage 1). A UNet class with ``time_cond_proj_dim`` gets it (a zero-initialised projection,
        a stock diffusers model); any other model a :class:`WEmbedding` (``time_cond_proj_dim``
        sinusoidal features, zero-initialised last layer) added to its time embedding's output,
        saved and loaded in this net's state_dict (``w_embedding.*``)."""
        if self.use_w:
            return copy.deepcopy(self)
        kw = self.conditioning()
        schedule = self._schedule_arg
        cls = type(self.unet)
        if "time_cond_proj_dim" in inspect.signature(cls.__init__).parameters:
            cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}  # drop bookkeeping
            unet = cls.from_config({**cfg, "time_cond_proj_dim": time_cond_proj_dim})
            missing, unexpected = unet.load_state_dict(self.unet.state_dict(), strict=False)
            if unexpected or any("cond_proj" not in k for k in missing):
                raise ValueError("cannot copy the UNet's weights into a guidance-conditioned one: "
                                 f"{unexpected or missing}")
            nn.init.zeros_(unet.time_embedding.cond_proj.weight)
            unet.to(next(self.unet.parameters()).device)
            return DiffusersNet(unet, schedule, **kw)
        new = DiffusersNet(copy.deepcopy(self.unet), schedule, **kw)
        new._add_w(time_cond_proj_dim)
        return new

    def conditioning(self) -> dict:
        """The keyword arguments that give a copy of this net (another module, the same schedule) its inputs:
        ``DiffusersNet(module, net._schedule_arg, **net.conditioning())``."""
        return dict(label_context=self.label_context, null_class=self.null_class, pooled_context=self.pooled_context,
                    time_ids=self.time_ids)

    def _add_w(self, features: int) -> None:
        module, width = _time_embedding(self.unet)
        p = next(self.unet.parameters())
        self.w_embedding = WEmbedding(width, features).to(device=p.device, dtype=p.dtype)
        module.register_forward_hook(self._add_w_embedding)
        self.use_w = True
