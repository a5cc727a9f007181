"""The teacher recipe: a class-conditional diffusion model trained from scratch.

``fewstep train mnist --out DIR`` reproduces the shipped ``mnist-teacher``: a UNet on the MNIST
train split, CosineVP schedule (continuous t), v-prediction, label dropout 0.15 for
classifier-free guidance, EMA. The export ``DIR/model/`` holds the EMA weights and a
config.json recording the net config, the schedule config, prediction type, classes, null
class and time input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.mnist import load_mnist
from ..losses import DenoisingLoss
from ..nets import UNet, UNetConfig
from ..schedules import CosineVP, schedule_from_config
from ._stage import Hyper, LoopSettings, Runner, Stage, provide
from .previews import teacher_preview


@dataclass
class TeacherSettings(LoopSettings):
    """Settings of the teacher recipe; the defaults are the shipped ``mnist-teacher``'s.

    Sized from measurements on this machine: ~0.68 s per step at batch 64 on one thread (1.0M
    params), so 6,000 steps take about 75 minutes with previews and checkpoints.
    """
    net: dict = field(default_factory=lambda: {"base_channels": 16, "channel_mults": [1, 4, 4], "num_res_blocks": 1,
                                               "attention_resolutions": [7], "num_classes": 10})
    schedule: dict = field(default_factory=lambda: CosineVP().config())
    prediction: str = "v"
    label_dropout: float = 0.15
    lr: float = 2e-4
    warmup: int = 500
    steps: int = 6000


MNIST_TEACHER = TeacherSettings()


def teacher_config(settings: TeacherSettings, name: str, image_shape, train_split: str, train_steps: int) -> dict:
    """Everything a loader needs besides the weights (goes into model/config.json)."""
    classes = settings.net["num_classes"]
    return {"kind": "diffusion", "recipe": name, "prediction": settings.prediction, "schedule": settings.schedule,
            "num_classes": classes, "null_class": classes, "time_input": "continuous",
            "time_input_note": "the net takes continuous t in [0, 1] (float64 (B,)); it embeds 1000 * t",
            "guidance": "x_w = (1 + w) * x_cond - w * x_uncond; labels=None or null_class = unconditional",
            "image_shape": list(image_shape), "data_range": [-1.0, 1.0], "train_split": train_split,
            "label_dropout": settings.label_dropout, "train_steps": train_steps}


def run_teacher(out, settings: TeacherSettings = MNIST_TEACHER, *, name: str = "mnist-teacher",
                data: Callable[[], tuple] | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train the teacher in run folder ``out`` (checkpoints, log.jsonl, samples/) and export its EMA to
    ``out/model``; returns that folder. ``data() -> (images in [-1, 1], labels)`` (default: the MNIST
    train split); the net's ``num_classes`` is also its null class."""
    out = Path(out)
    x, y = provide(data, lambda: load_mnist("train"))
    split = f"mnist train ({len(x)})" if data is None else f"provided ({len(x)} images)"
    schedule = schedule_from_config(settings.schedule)
    net = UNet(UNetConfig(**settings.net)).to(memory_format=torch.channels_last)
    c = net.config
    shape = (c.in_channels, c.image_size, c.image_size)
    loss = DenoisingLoss(schedule, prediction=settings.prediction, label_dropout=settings.label_dropout)
    preview = teacher_preview(schedule, settings.prediction, shape, c.num_classes, net.null_class)
    stage = Stage("model", ".", loss, net, Hyper(settings.steps, settings.lr, settings.warmup, settings.ema_decay),
                  lambda ema, step, secs: teacher_config(settings, name, shape, split, step), preview, reuse=False)
    return Runner(out, (x, y), settings, name, resume, progress).train(stage)[1]
