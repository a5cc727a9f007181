"""diffusers UNets in fewstep's network contract ``net(x, t, labels=None, w=None)``, so that every
distillation objective (guided stage 1, progressive rounds, DMD) trains them unchanged.

* time: fewstep's continuous t in [1/N, 1] of the model's :class:`DiscreteVP` schedule is fed
  as the model's (fractional) timestep ``(t - 1/N) N``;
* labels: class ids. A model with a class embedding (``num_class_embeds``) gets them as
  ``class_labels`` (its last class is the null / unconditional one); a cross-attention model
  (UNet2DConditionModel) gets ``encoder_hidden_states = label_context[labels]``, a bank of one
  context per class with the null (empty-prompt) context last;
* guidance weight w (guided distillation): the model's own guidance-embedding input,
  ``timestep_cond`` with ``time_cond_proj_dim`` set, fed the sinusoidal embedding of 1000 w as
  latent-consistency models do. fewstep's w is diffusers' ``guidance_scale - 1``.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..schedules import DiscreteVP

__all__ = ["DiffusersNet", "guidance_embedding"]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance weights -> (B, dim) sinusoidal features of 1000 w (sin | cos halves, the LCM convention)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class DiffusersNet(nn.Module):
    """A diffusers UNet2DModel / UNet2DConditionModel as a fewstep net (see the module docstring)."""

    def __init__(self, unet: nn.Module, schedule: DiscreteVP, label_context: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(schedule, DiscreteVP):
            raise TypeError("a diffusers UNet takes discrete timesteps: pass its DiscreteVP schedule "
                            "(fewstep.diffusers.schedule_from_config(pipe.scheduler.config))")
        self.unet, self.schedule = unet, schedule
        cfg = unet.config
        self.cross_attention = getattr(cfg, "cross_attention_dim", None) is not None
        if self.cross_attention and label_context is None:
            raise ValueError("this UNet attends to encoder_hidden_states: pass label_context, a (num_classes + 1, "
                             "seq, dim) bank of contexts (the last one unconditional, e.g. the empty prompt)")
        self.register_buffer("label_context", label_context, persistent=False)
        if label_context is not None:
            self.null_class = label_context.shape[0] - 1
        elif getattr(cfg, "num_class_embeds", None):
            self.null_class = cfg.num_class_embeds - 1
        else:
            self.null_class = None
        self.use_w = getattr(cfg, "time_cond_proj_dim", None) is not None

    def forward(self, x, t, labels=None, w=None):
        b = x.shape[0]
        timestep = self.schedule.model_timestep(torch.as_tensor(t, dtype=torch.float64).expand(b)).to(x.device)
        kwargs = {}
        if self.null_class is not None:
            labels = torch.full((b,), self.null_class, device=x.device) if labels is None else labels.long()
            if self.label_context is not None:
                kwargs["encoder_hidden_states"] = self.label_context[labels].to(x.dtype)
            else:
                kwargs["class_labels"] = labels
        if self.use_w:
            if w is None:
                raise ValueError("this UNet has a guidance input (time_cond_proj_dim): pass w")
            w = torch.as_tensor(w, device=x.device).expand(b)
            kwargs["timestep_cond"] = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(x.dtype)
        elif w is not None:
            raise ValueError("this UNet has no guidance input (time_cond_proj_dim is None); do not pass w")
        return self.unet(x, timestep.to(torch.float32), **kwargs).sample

    def with_w_input(self, time_cond_proj_dim: int = 256) -> "DiffusersNet":
        """A copy whose UNet has a guidance-embedding input (``time_cond_proj_dim``) with a zero-initialised
        projection, so it equals this model for every w (guided distillation, stage 1)."""
        if self.use_w:
            return copy.deepcopy(self)
        cls = type(self.unet)
        cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}  # drop diffusers' bookkeeping
        unet = cls.from_config({**cfg, "time_cond_proj_dim": time_cond_proj_dim})
        missing, unexpected = unet.load_state_dict(self.unet.state_dict(), strict=False)
        if unexpected or any("cond_proj" not in k for k in missing):
            raise ValueError(f"cannot copy the UNet's weights into a guidance-conditioned one: {unexpected or missing}")
        nn.init.zeros_(unet.time_embedding.cond_proj.weight)
        unet.to(next(self.unet.parameters()).device)
        return DiffusersNet(unet, self.schedule, self.label_context)
