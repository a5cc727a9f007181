"""Components of the MNIST text-to-image test bed, as stock diffusers / transformers models.

Every builder takes a plain config dict (the keyword arguments of the diffusers or transformers
class, so that a recipe's settings record them and ``save_pretrained`` round-trips them) and a
seed: the weights of a fresh component depend on the seed only, not on the RNG state before the
call. The defaults are sized to train on a 2-core CPU (parameter counts from
:func:`param_count`, torch 2.13, diffusers 0.42, transformers 5.25):

* :func:`build_vae`: ``AutoencoderKL`` for 32x32 one-channel digits in [-1, 1] -> 4x8x8 latents
  (three blocks = two downsamplings, factor 4; 16 channels at full resolution, the costly part);
  0.68M parameters. ``out_channels = 1``: the
  pipelines' image processors map [-1, 1] to [0, 1] per channel and write one-channel PIL images
  as grayscale ("L"), so no channel replication is needed.
* :func:`build_text_encoder`: ``CLIPTextModel`` (SD) or ``CLIPTextModelWithProjection`` (SD3,
  pooled ``text_embeds``) over the tokenizer of :mod:`fewstep.data.text` (vocabulary size and
  special-token ids read from it, 16 positions); 0.11M parameters at width 64, 2 layers.
* :func:`build_unet`: ``UNet2DConditionModel`` on 4x8x8 latents, cross-attention at 8x8, 4x4 and
  in the 4x4 middle block, ``cross_attention_dim`` = the text encoder's width; 2.38M parameters.
* :func:`build_sd3_transformer`: ``SD3Transformer2DModel`` on 4x8x8 latents, patch size 2 (16
  image tokens), width 128 (4 heads of 32), 4 joint blocks; ``joint_attention_dim`` = the two
  CLIP widths side by side, ``pooled_projection_dim`` = their two projections side by side, as
  StableDiffusion3Pipeline concatenates them; 2.30M parameters.
"""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["VAE_CONFIG", "TEXT_CONFIG", "UNET_CONFIG", "SD3_CONFIG", "build_vae", "build_text_encoder",
           "build_unet", "build_sd3_transformer", "param_count", "vae_downsampling",
           "RepeatedTokenJointAttnProcessor"]

VAE_CONFIG = {"in_channels": 1, "out_channels": 1, "latent_channels": 4, "sample_size": 32,
              "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 64}
UNET_CONFIG = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [48, 96],
               "layers_per_block": 1, "norm_num_groups": 16, "attention_head_dim": 4,
               "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD3_CONFIG = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 4,
              "attention_head_dim": 32, "num_attention_heads": 4}


def param_count(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _seeded(seed: int, build):
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _merge(default: Mapping, config: Mapping | None, what: str) -> dict:
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"the {what} config must be a dict of keyword arguments, got {type(config).__name__}")
    return {**default, **(config or {})}


def vae_downsampling(config: Mapping) -> int:
    """Spatial factor of an AutoencoderKL config (2 per block after the first), as the pipelines compute it."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def build_vae(config: Mapping | None = None, seed: int = 0):
    """A fresh ``AutoencoderKL`` (:data:`VAE_CONFIG` updated by ``config``)."""
    from diffusers import AutoencoderKL

    cfg = _merge(VAE_CONFIG, config, "VAE")
    for key in ("down_block_types", "up_block_types"):
        if len(cfg[key]) != len(cfg["block_out_channels"]):
            raise ValueError(f"VAE {key} needs one entry per block_out_channels ({len(cfg['block_out_channels'])}), "
                             f"got {len(cfg[key])}")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return _seeded(seed, lambda: AutoencoderKL(**cfg))


def build_text_encoder(tokenizer, config: Mapping | None = None, seed: int = 0, *, projection: bool = False):
    """A fresh ``CLIPTextModel`` (``projection=True``: ``CLIPTextModelWithProjection``, pooled output
    ``text_embeds`` of width ``projection_dim``) whose vocabulary, positions and special tokens are those of
    ``tokenizer`` (:data:`TEXT_CONFIG` updated by ``config``); in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _merge(TEXT_CONFIG, config, "text encoder")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"text encoder hidden_size {cfg['hidden_size']} is not a multiple of "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    clip = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **cfg)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(clip)).eval()


def build_unet(config: Mapping | None = None, cross_attention_dim: int = TEXT_CONFIG["hidden_size"], seed: int = 0):
    """A fresh ``UNet2DConditionModel`` (:data:`UNET_CONFIG` updated by ``config``) attending to text of
    width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    cfg = _merge(UNET_CONFIG, config, "UNet")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return _seeded(seed, lambda: UNet2DConditionModel(cross_attention_dim=cross_attention_dim, **cfg))


def build_sd3_transformer(config: Mapping | None = None, joint_attention_dim: int = 128,
                          pooled_projection_dim: int = 128, seed: int = 0):
    """A fresh ``SD3Transformer2DModel`` (:data:`SD3_CONFIG` updated by ``config``) for text of width
    ``joint_attention_dim`` and pooled text of width ``pooled_projection_dim``; its caption projection is
    its own width (heads x head dim) and its position table covers exactly ``sample_size / patch_size``."""
    from diffusers import SD3Transformer2DModel

    cfg = _merge(SD3_CONFIG, config, "SD3 transformer")
    if cfg["sample_size"] % cfg["patch_size"]:
        raise ValueError(f"SD3 sample_size {cfg['sample_size']} is not a multiple of patch_size {cfg['patch_size']}")
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    cfg = {"caption_projection_dim": width, "pos_embed_max_size": cfg["sample_size"] // cfg["patch_size"], **cfg}
    return _seeded(seed, lambda: SD3Transformer2DModel(joint_attention_dim=joint_attention_dim,
                                                       pooled_projection_dim=pooled_projection_dim, **cfg))


class RepeatedTokenJointAttnProcessor:
    """SD3 joint attention in which the last context token stands for ``copies`` identical tokens.

    StableDiffusion3Pipeline without its T5 encoder appends ``max_sequence_length`` (256) zero rows to the
    16 CLIP tokens. Identical context tokens stay identical through every block (each block acts on a
    token alone except in attention, where identical queries get identical outputs), and in softmax
    attention ``n`` copies of one key and value weigh exactly as one copy whose logit is raised by
    ``log n``. So a transformer given the CLIP tokens plus ONE zero row, with this processor on every
    block, computes what it computes on the pipeline's full sequence (up to rounding), in a fraction of
    the time. Training only: the saved transformer carries diffusers' own processor.
    """

    def __init__(self, copies: int):
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive integer, got {copies!r}")
        self.copies = copies

    def _heads(self, attn, x, norm):
        x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        return norm(x) if norm is not None else x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import math
        import torch.nn.functional as F

        if encoder_hidden_states is None:
            raise ValueError("RepeatedTokenJointAttnProcessor needs context tokens (encoder_hidden_states)")
        b, n_img = hidden_states.shape[:2]
        q = torch.cat([self._heads(attn, attn.to_q(hidden_states), attn.norm_q),
                       self._heads(attn, attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([self._heads(attn, attn.to_k(hidden_states), attn.norm_k),
                       self._heads(attn, attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([self._heads(attn, attn.to_v(hidden_states), None),
                       self._heads(attn, attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(self.copies)  # the last key counts `copies` times in the softmax
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, :])
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        image, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context
