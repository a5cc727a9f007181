"""Embeddings shared by the UNet and the MLP."""
from __future__ import annotations

import math

import torch
from torch import nn

# The continuous time t in [0, 1] is scaled by this before the sinusoidal
# embedding, so that its frequencies match a 1000-step discrete model.
TIME_SCALE = 1000.0


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of a batch of scalars x (B,) -> (B, dim) (cos | sin halves)."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def batch_scalar(v, batch: int, device, what: str) -> torch.Tensor:
    """Broadcast a float / 0-d / (B,) input to a float tensor of shape (B,)."""
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{what} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v


def class_indices(labels, batch: int, null_class: int, device) -> torch.Tensor:
    """labels -> int64 (B,); None means the null class (unconditional)."""
    if labels is None:
        return torch.full((batch,), null_class, dtype=torch.long, device=device)
    labels = batch_scalar(labels, batch, device, "labels").long()
    if labels.numel() and (labels.min() < 0 or labels.max() > null_class):
        raise ValueError(f"labels must lie in [0, {null_class}] ({null_class} = null class), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels


class ScalarEmbedding(nn.Module):
    """scale * s -> sinusoidal features -> 2-layer MLP. ``zero_out`` zero-inits the last layer."""

    def __init__(self, dim: int, out_dim: int, scale: float, zero_out: bool = False):
        super().__init__()
        self.dim, self.scale = dim, scale
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        if zero_out:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(s.to(torch.float32) * self.scale, self.dim))
