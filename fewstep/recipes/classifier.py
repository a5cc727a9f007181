"""The classifier recipe: the small CNN whose features define FID/KID/IS here.

``fewstep train mnist-classifier --out DIR`` reproduces the shipped ``mnist-classifier``: trained
on the train split with random shifts; the held-out accuracy is printed and stored in
``DIR/model/config.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.mnist import load_mnist
from ..losses import unpack_batch
from ..metrics import class_accuracy
from ..nets import CNNClassifier, ClassifierConfig
from ._stage import Hyper, Runner, Stage, provide


@dataclass
class ClassifierSettings:
    """Settings of the classifier recipe; the defaults are the shipped ``mnist-classifier``'s."""
    net: dict = field(default_factory=lambda: {"width": 32, "feature_dim": 128, "num_classes": 10, "dropout": 0.3})
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    steps: int = 1500
    max_shift: int = 2
    ckpt_every_minutes: float | None = 5.0
    sample_every_minutes: float | None = None  # a classifier has no previews
    seed: int = 0


MNIST_CLASSIFIER = ClassifierSettings()


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with background -1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b))
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


class ClassificationLoss:
    """Per-sample cross-entropy on randomly shifted images."""

    def __init__(self, max_shift: int = 2):
        self.max_shift = max_shift

    def __call__(self, net, batch) -> torch.Tensor:
        x, labels = unpack_batch(batch)
        return F.cross_entropy(net(random_shift(x, self.max_shift)), labels, reduction="none")


def run_classifier(out, settings: ClassifierSettings = MNIST_CLASSIFIER, *, name: str = "mnist-classifier",
                   data: Callable[[], tuple] | None = None, heldout: Callable[[], tuple] | None = None,
                   resume: bool = False, progress: bool = True) -> float:
    """Train the classifier in ``out`` and export its EMA to ``out/model``; returns the held-out accuracy.
    ``data()`` / ``heldout()`` -> (images in [-1, 1], labels); default: the MNIST train and held-out splits."""
    out = Path(out)
    x, y = provide(data, lambda: load_mnist("train"))
    xh, yh = provide(heldout, lambda: load_mnist("heldout"))
    split = "mnist heldout (1000, 100 per class)" if heldout is None else f"provided ({len(xh)} images)"
    scores = {}

    def config(ema, step, secs):
        scores.update(heldout_accuracy=class_accuracy(ema, xh, yh), train_accuracy=class_accuracy(ema, x, y))
        return {"kind": "classifier", "recipe": name, **scores, "heldout_split": split, "train_steps": step,
                "train_seconds": round(secs, 1), "input": "images in [-1, 1], shape (B, 1, 28, 28)",
                "features": "penultimate, features(x)"}

    net = CNNClassifier(ClassifierConfig(**settings.net))
    stage = Stage("model", ".", ClassificationLoss(settings.max_shift), net,
                  Hyper(settings.steps, settings.lr, settings.warmup, settings.ema_decay), config, reuse=False)
    folder = Runner(out, (x, y), settings, name, resume, progress).train(stage)[1]
    print(json.dumps({**scores, "model": str(folder)}))
    return scores["heldout_accuracy"]
