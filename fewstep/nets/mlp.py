"""A small MLP denoiser for low-dimensional (e.g. 2-D toy) data.

``net(x, t, labels=None, w=None)`` with x (B, dim), t (B,) continuous in [0, 1]
(embedded as 1000 * t), labels in [0, num_classes] (num_classes = null class;
None = null) and an optional guidance-weight input w (``use_w=True``; its
embedding's last layer is zero-initialised). Output has the shape of x.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._io import Savable
from ._layers import TIME_SCALE, ScalarEmbedding, batch_scalar, class_indices

ARCH = "mlp"


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 128
    depth: int = 3
    emb_dim: int = 64
    num_classes: int = 0
    use_w: bool = False
    w_scale: float = 100.0

    def __post_init__(self):
        if self.dim < 1 or self.hidden < 1 or self.depth < 1 or self.num_classes < 0 or self.emb_dim % 2:
            raise ValueError(f"invalid MLPConfig {self}: need dim, hidden, depth >= 1, num_classes >= 0, "
                             "even emb_dim")

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(Savable, nn.Module):
    arch = ARCH
    config_class = MLPConfig

    def __init__(self, config: MLPConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(config, dict):
            config = MLPConfig(**config)
        cfg = self.config = config or MLPConfig(**kwargs)
        self.null_class = cfg.num_classes
        self.time_embed = ScalarEmbedding(cfg.emb_dim, cfg.hidden, TIME_SCALE)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.hidden)
        self.w_embed = ScalarEmbedding(cfg.emb_dim, cfg.hidden, cfg.w_scale, zero_out=True) if cfg.use_w else None
        self.inp = nn.Linear(cfg.dim, cfg.hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
                                    for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, x: torch.Tensor, t, labels=None, w=None) -> torch.Tensor:
        b = x.shape[0]
        emb = self.time_embed(batch_scalar(t, b, x.device, "t"))
        emb = emb + self.class_embed(class_indices(labels, b, self.null_class, x.device))
        if self.w_embed is not None:
            if w is None:
                raise ValueError("this MLP was built with use_w=True: pass the guidance weight w")
            emb = emb + self.w_embed(batch_scalar(w, b, x.device, "w"))
        elif w is not None:
            raise ValueError("this MLP has no w input (use_w=False); do not pass w")
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


