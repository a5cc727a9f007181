"""The guided-distillation recipe (Meng et al. 2022): ``fewstep distill guided --out DIR [--resume]``.

Stage 1 (``DIR/stage1``) distills a classifier-free guided teacher (two calls per step) into one
w-conditioned student; progressive rounds (``DIR/round-<N>``) then halve its DDIM step count
from ``start_steps`` down to 1, and the encoder's rounds (``DIR/encoder-round-<N>``) distill the
guided DDIM inversion. Each stage is its own training run with checkpoints and exact resume; a
finished stage is reused, not retrained. Exports: ``DIR/<name>-stage1``, ``DIR/<name>-<N>`` and
``DIR/<name>-encoder-<N>`` (model.safetensors + config.json, loadable by ``fewstep.load``); with
the defaults they reproduce the shipped ``mnist-guided-*`` models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..distill import GuidedDistillLoss, ProgressiveLoss, with_w_input
from .dmd import PairSettings
from ._stage import (DistillOptions, Hyper, Rounds, Runner, Stage, check_halving, provide,
                     teacher_conventions)
from .previews import FID_PROBE_N, student_preview
from .teachers import (PipelineTeacher, announce_memory, check_guidance, pipeline_exporter, pipeline_preview_options,
                       teacher_from, trainable, training_inputs)


@dataclass
class GuidedSettings(DistillOptions):
    """Settings of the guided-distillation recipe; the defaults are the shipped ``mnist-guided-*``'s.

    Sized on this CPU (one thread, batch 64): stage 1 ~1.26 s/step, a progressive round ~1.14 s/step.
    The teacher's 32-step DDIM at w = 1 is 0.042 RMSE from its 512-step DDIM (16 steps: 0.079,
    64 steps: ~0.02), so the rounds start from 32 steps. The encoder's loss was flat from step 50
    to 600 of its round 16 (1e-5 .. 2e-5), so its later rounds are shorter.
    """
    teacher: str = "mnist-teacher"  # a shipped name or a model folder (when no teacher provider is given)
    w_range: tuple[float, float] = (0.0, 4.0)
    batch_size: int = 64
    stage1: Hyper = Hyper(steps=2000, lr=1e-4, warmup=100, ema_decay=0.999)
    start_steps: int = 32
    rounds: dict[int, int] = field(default_factory=lambda: {16: 600, 8: 600, 4: 1000, 2: 1000, 1: 1000})
    round_lr: float = 1e-4
    round_warmup: int = 50
    round_ema_decay: float = 0.995
    ship: tuple[int, ...] = (8, 4, 2, 1)  # the students fewstep ships
    # the distilled encoder (DDIM inversion under guidance): 32 -> 16 -> 8 -> 4 steps from stage 1
    encoder_rounds: dict[int, int] = field(default_factory=lambda: {16: 600, 8: 300, 4: 300})
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    ckpt_every_minutes: float | None = 4.0
    sample_every_minutes: float | None = 10.0
    fid_probe: int = FID_PROBE_N  # samples per point of the FID-against-training-steps curve at each preview (0: none)
    seed: int = 0
    samples: PairSettings = PairSettings()  # a pipeline teacher's own samples, the training inputs without --data

    def __post_init__(self):
        if not 0 <= self.w_range[0] <= self.w_range[1]:
            raise ValueError(f"w_range must satisfy 0 <= w_min <= w_max, got {self.w_range}")
        check_halving(self.start_steps, self.rounds)
        check_halving(self.start_steps, self.encoder_rounds, "encoder_rounds")


MNIST_GUIDED = GuidedSettings()
# the text-to-image test bed's guided students (teacher: the mnist-sd pipeline over the test bed's prompt suite,
# training inputs: its own samples): stage 1, then rounds 32 -> 16 -> 8 -> 4 (run with until=4)
MNIST_SD_GUIDED = GuidedSettings(teacher="mnist-sd", stage1=Hyper(steps=1500, lr=1e-4, warmup=100, ema_decay=0.999),
                                 rounds={16: 400, 8: 400, 4: 800, 2: 800, 1: 800}, ship=(4,))


def student_config(teacher_cfg: dict, settings, name: str, steps: int | None, train_steps: int, seconds: float,
                   encoder: bool = False) -> dict:
    """config.json of a guided-distilled student; steps None = the stage-1 student (any sampler)."""
    cfg = teacher_conventions(teacher_cfg)
    export = f"{name}-stage1" if steps is None else f"{name}-{'encoder-' if encoder else ''}{steps}"
    cfg.update({"kind": "diffusion" if steps is None else "student", "recipe": export, "pipeline": name,
                "teacher": settings.teacher, "w_input": True, "w_range": list(settings.w_range),
                "guidance": "w is an input of the net: one call per step gives the teacher's "
                            "x_w = (1 + w) x_cond - w x_uncond",
                "train_steps": train_steps, "train_seconds": round(seconds, 1)})
    if steps is not None and encoder:
        cfg.update({"kind": "encoder", "student_steps": steps,
                    "sampler": "DDIM inversion on t_min + (t_max - t_min) * i / N, i = 0..N (data -> noise)"})
    elif steps is not None:
        cfg.update({"student_steps": steps, "sampler": "DDIM on t_i = t_max * i / N (uniform in t) down to 0; "
                                                         "stochastic=True for the paper's stochastic sampler"})
    return cfg


def run_guided(out, settings: GuidedSettings = MNIST_GUIDED, *, name: str = "mnist-guided",
               teacher: Callable | None = None, data: Callable[[], tuple] | None = None, resume: bool = False,
               progress: bool = True, until: int | None = None, part: str = "all") -> dict[str, Path]:
    """Stage 1, then the progressive rounds down to 1 step (or to ``until`` steps), then the encoder's
    rounds; ``part="decoder"`` or ``"encoder"`` runs stage 1 and only the one kind of rounds (two
    processes can then share the work). ``teacher()`` -> a class-conditional fewstep model
    (default: ``load(settings.teacher)``); ``data()`` -> (images, labels) (default: MNIST train).
    Returns {export name: folder}."""
    if part not in ("all", "decoder", "encoder"):
        raise ValueError(f"part must be 'all', 'decoder' or 'encoder', got {part!r}")
    out = Path(out)
    t = provide(teacher, lambda: teacher_from(settings.teacher))
    check_guidance(t)
    pipeline = isinstance(t, PipelineTeacher)
    if pipeline:
        if part == "encoder":
            raise ValueError("the distilled encoder is made for fewstep teachers only; use part='decoder'")
        part = "decoder"  # a pipeline has no encoder sampler to export
    runner = Runner(out, provide(data, lambda: training_inputs(t, out, settings.samples, progress)), settings, name,
                    resume, progress)
    sch, pred, shape, classes = t.schedule, t.prediction, t.image_shape, t.num_classes
    export_dir = "export/" if pipeline else ""
    view = pipeline_preview_options(t) if pipeline else {}

    def preview(steps: int, run_dir: str):
        fid_n = settings.fid_probe if not pipeline or "digit_labels" in view else 0
        fid_log = out / run_dir / "fid.jsonl" if fid_n else None
        return student_preview(sch, pred, steps, shape, classes, fid_log=fid_log, fid_n=fid_n,
                               samples_dir=out / run_dir / "samples", **view)

    lora = settings.lora_rank
    if lora is not None:
        from .lora import lora_exporter, with_lora

    def exporter(steps):
        if lora is not None:
            run_dir = "stage1" if steps is None else f"round-{steps}"
            return lora_exporter(t, steps, guided=True, fid_log=out / run_dir / "fid.jsonl")
        return pipeline_exporter(t, steps) if pipeline else {}

    first = with_w_input(t.net) if lora is None else with_lora(t.net, lora, w_input=256, targets=settings.lora_targets)
    if pipeline:
        announce_memory(t, first, max_gib=settings.max_memory_gib)

    loss = GuidedDistillLoss(t.net, sch, pred, w_min=settings.w_range[0], w_max=settings.w_range[1],
                             null_class=t.null_class)
    stage1, folder = runner.train(Stage(
        f"{export_dir}{name}-stage1", "stage1", loss, trainable(first, settings), settings.stage1,
        lambda ema, step, secs: student_config(t.config, settings, name, None, step, secs),
        preview(settings.start_steps, "stage1"), {"stage": "stage1"}, **exporter(None)))
    exports = {f"{name}-stage1": folder}
    w_range = tuple(settings.w_range)
    opt = dict(lr=settings.round_lr, warmup=settings.round_warmup, ema_decay=settings.round_ema_decay)
    if part != "encoder":
        exports.update(Rounds(
            settings.rounds, lambda prev, n: ProgressiveLoss(prev, sch, n, pred, w_range=w_range), **opt,
            name=f"{export_dir}{name}-{{n}}", run_dir="round-{n}",
            config=lambda n, step, secs: student_config(t.config, settings, name, n, step, secs),
            preview=lambda n: preview(n, f"round-{n}"), exporter=exporter).run(runner, stage1, until)[1])
    if until is None and part != "decoder":
        exports.update(Rounds(
            settings.encoder_rounds,
            lambda prev, n: ProgressiveLoss(prev, sch, n, pred, w_range=w_range, direction="encode"), **opt,
            name=f"{name}-encoder-{{n}}", run_dir="encoder-round-{n}",
            config=lambda n, step, secs: student_config(t.config, settings, name, n, step, secs, encoder=True),
            ).run(runner, stage1)[1])
    return exports

