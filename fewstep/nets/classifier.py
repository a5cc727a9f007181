"""A small CNN classifier for 28x28 grey images (MNIST); its features define FID/KID here.

``forward(x) -> logits`` (B, num_classes); ``features(x) -> (B, feature_dim)``, the
penultimate activations. Inputs are images in [-1, 1], shape (B, 1, 28, 28).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._io import Savable

ARCH = "cnn_classifier"


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    width: int = 32
    feature_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.MaxPool2d(2))


class CNNClassifier(Savable, nn.Module):
    arch = ARCH
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(config, dict):
            config = ClassifierConfig(**config)
        cfg = self.config = config or ClassifierConfig(**kwargs)
        if cfg.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {cfg.image_size}")
        side = cfg.image_size // 4
        self.body = nn.Sequential(_conv_block(cfg.in_channels, cfg.width), _conv_block(cfg.width, 2 * cfg.width),
                                  nn.Flatten(), nn.Linear(2 * cfg.width * side * side, cfg.feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


