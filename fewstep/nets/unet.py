"""A small UNet for 28x28-ish images, fast on CPU.

``net(x, t, labels=None, w=None)``:
  x       (B, C, H, W) noisy images
  t       (B,) continuous time in [0, 1] (any float dtype); embedded as 1000 * t
  labels  (B,) int class ids in [0, num_classes]; ``num_classes`` is the null
          class (classifier-free guidance); None means all null
  w       optional guidance-weight input (B,) or scalar, used only when the
          config has ``use_w=True``; its embedding's last layer starts at zero so
          a student built from a teacher's weights starts as the teacher.
The output has the shape of x; what it predicts (eps, v, x0) is recorded by the trainer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ._io import Savable
from ._layers import TIME_SCALE, ScalarEmbedding, batch_scalar, class_indices

ARCH = "unet"


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    image_size: int = 28
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (7,)
    num_classes: int = 10
    use_w: bool = False
    w_scale: float = 100.0
    dropout: float = 0.0
    groups: int = 8
    attention_head_dim: int = 32

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        widths = [self.base_channels * m for m in self.channel_mults]
        if any(c % self.groups for c in widths):
            raise ValueError(f"every width {widths} must be divisible by groups={self.groups}")
        if self.num_classes < 0 or self.num_res_blocks < 1 or not self.channel_mults:
            raise ValueError("UNetConfig needs num_classes >= 0, num_res_blocks >= 1 and >= 1 channel mult")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by "
                             f"2^{len(self.channel_mults) - 1} for {len(self.channel_mults)} levels")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, with a scale/shift from the embedding before the second conv."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over pixels with a zero-initialised output projection."""

    def __init__(self, ch: int, groups: int, head_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Block(nn.Module):
    """A ResBlock optionally followed by attention."""

    def __init__(self, cin, cout, emb_dim, cfg: UNetConfig, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg.groups, cfg.dropout)
        self.attn = Attention(cout, cfg.groups, cfg.attention_head_dim) if attn else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(Savable, nn.Module):
    arch = ARCH
    config_class = UNetConfig

    def __init__(self, config: UNetConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(config, dict):
            config = UNetConfig(**config)
        cfg = self.config = config or UNetConfig(**kwargs)
        c0, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.null_class = cfg.num_classes
        self.time_embed = ScalarEmbedding(c0, emb_dim, TIME_SCALE)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.w_embed = ScalarEmbedding(c0, emb_dim, cfg.w_scale, zero_out=True) if cfg.use_w else None
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.down, self.up, skips = self._build_down(cfg, emb_dim)
        ch = skips[-1]
        self.mid = nn.ModuleList([Block(ch, ch, emb_dim, cfg, True), Block(ch, ch, emb_dim, cfg, False)])
        self._build_up(cfg, emb_dim, skips)
        c_top = cfg.base_channels * cfg.channel_mults[0]
        self.norm_out = _norm(c_top, cfg.groups)
        self.conv_out = nn.Conv2d(c_top, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _build_down(self, cfg, emb_dim):
        down, skips, ch, res = nn.ModuleList(), [cfg.base_channels], cfg.base_channels, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                down.append(Block(ch, cfg.base_channels * mult, emb_dim, cfg, res in cfg.attention_resolutions))
                ch = cfg.base_channels * mult
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        return down, nn.ModuleList(), skips

    def _build_up(self, cfg, emb_dim, skips):
        skips, ch = list(skips), skips[-1]
        res = cfg.image_size // 2 ** (len(cfg.channel_mults) - 1)
        for level in reversed(range(len(cfg.channel_mults))):
            cout = cfg.base_channels * cfg.channel_mults[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Block(ch + skips.pop(), cout, emb_dim, cfg, res in cfg.attention_resolutions))
                ch = cout
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2

    def embed(self, t, labels, w, batch: int, device) -> torch.Tensor:
        """Sum of the time, class and (optional) guidance-weight embeddings."""
        t = batch_scalar(t, batch, device, "t")
        emb = self.time_embed(t) + self.class_embed(class_indices(labels, batch, self.null_class, device))
        if self.w_embed is not None:
            if w is None:
                raise ValueError("this UNet was built with use_w=True: pass the guidance weight w")
            emb = emb + self.w_embed(batch_scalar(w, batch, device, "w"))
        elif w is not None:
            raise ValueError("this UNet has no w input (use_w=False); do not pass w")
        return emb

    def forward(self, x: torch.Tensor, t, labels=None, w=None, return_features: bool = False):
        """The prediction; with ``return_features=True`` also the bottleneck features (B, C, h, w)
        after the middle blocks (DMD2's GAN head reads them)."""
        emb = self.embed(t, labels, w, x.shape[0], x.device)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        features = h
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, Block) else layer(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, features) if return_features else out

    @property
    def feature_channels(self) -> int:
        """Channels of the bottleneck features (``return_features=True``)."""
        return self.config.base_channels * self.config.channel_mults[-1]
