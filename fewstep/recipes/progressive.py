"""Plain progressive distillation (Salimans & Ho 2022): ``fewstep distill progressive --out DIR``.

The same rounds as the guided recipe, from the teacher's conditional model (w = 0) instead of a
stage-1 student: rounds 32 -> 16 -> 8 -> 4 steps, exported as ``DIR/<name>-<N>`` students with no
w input (guidance at sampling time is classifier-free guidance on the student, two calls per step).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..distill import ProgressiveLoss
from .dmd import PairSettings
from ._stage import DistillOptions, Rounds, Runner, check_halving, provide, teacher_conventions
from .previews import student_preview
from .teachers import (PipelineTeacher, announce_memory, pipeline_exporter, pipeline_preview_options, teacher_from, trainable,
                       training_inputs)


@dataclass
class ProgressiveSettings(DistillOptions):
    """Settings of the progressive recipe: the guided recipe's round settings, fewer rounds."""
    teacher: str = "mnist-teacher"  # a shipped name or a model folder (when no teacher provider is given)
    batch_size: int = 64
    start_steps: int = 32
    rounds: dict[int, int] = field(default_factory=lambda: {16: 600, 8: 600, 4: 1000})
    round_lr: float = 1e-4
    round_warmup: int = 50
    round_ema_decay: float = 0.995
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    ckpt_every_minutes: float | None = 4.0
    sample_every_minutes: float | None = 10.0
    seed: int = 0
    samples: PairSettings = PairSettings()  # a pipeline teacher's own samples, the training inputs without --data

    def __post_init__(self):
        check_halving(self.start_steps, self.rounds)


MNIST_PROGRESSIVE = ProgressiveSettings()


def progressive_config(teacher_cfg: dict, settings, name: str, steps: int, train_steps: int, seconds: float) -> dict:
    cfg = teacher_conventions(teacher_cfg)
    cfg.update({"kind": "student", "recipe": f"{name}-{steps}", "pipeline": name,
                "teacher": settings.teacher, "w_input": False, "student_steps": steps,
                "sampler": "DDIM on t_i = t_max * i / N (uniform in t) down to 0",
                "guidance": "distilled at w = 0; w > 0 applies classifier-free guidance to the student (two calls "
                            "per step)", "train_steps": train_steps, "train_seconds": round(seconds, 1)})
    return cfg


def run_progressive(out, settings: ProgressiveSettings = MNIST_PROGRESSIVE, *, name: str = "mnist-progressive",
                    teacher: Callable | None = None, data: Callable[[], tuple] | None = None, resume: bool = False,
                    progress: bool = True, until: int | None = None) -> dict[str, Path]:
    """The rounds of plain progressive distillation of the teacher's conditional model, down to the last
    round (or to ``until`` steps). ``teacher()`` -> a fewstep diffusion model (default:
    ``load(settings.teacher)``); ``data()`` -> (images, labels) (default: MNIST train). Returns
    {export name: folder}."""
    out = Path(out)
    t = provide(teacher, lambda: teacher_from(settings.teacher))
    pipeline = isinstance(t, PipelineTeacher)
    runner = Runner(out, provide(data, lambda: training_inputs(t, out, settings.samples, progress)), settings, name,
                    resume, progress)
    sch, pred = t.schedule, t.prediction
    view = pipeline_preview_options(t) if pipeline else {}
    rounds = Rounds(settings.rounds, lambda prev, n: ProgressiveLoss(prev, sch, n, pred, w_range=None),
                    lr=settings.round_lr, warmup=settings.round_warmup, ema_decay=settings.round_ema_decay,
                    name=("export/" if pipeline else "") + f"{name}-{{n}}", run_dir="round-{n}",
                    config=lambda n, step, secs: progressive_config(t.config, settings, name, n, step, secs),
                    preview=lambda n: student_preview(sch, pred, n, t.image_shape, t.num_classes, w=0.0, fid_n=0,
                                                      samples_dir=out / f"round-{n}" / "samples", **view),
                    exporter=lambda n: (pipeline_exporter(t, n) if settings.lora_rank is None else
                                        lora_exporter(t, n)) if pipeline else {})
    if settings.lora_rank is not None:
        from .lora import lora_exporter, with_lora
    first = t.net if settings.lora_rank is None else with_lora(t.net, settings.lora_rank, targets=settings.lora_targets)
    if pipeline:
        announce_memory(t, first if settings.lora_rank else copy.deepcopy(first).requires_grad_(True),
                        max_gib=settings.max_memory_gib)
    return rounds.run(runner, trainable(first, settings, requires_grad=False), until)[1]  # each round copies it
