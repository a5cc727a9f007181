"""What every recipe shares: one training stage (train, export, reuse) and progressive rounds.

A recipe builds :class:`Stage` objects (an objective, the networks, their optimiser settings
and how to write the export's config.json) and hands them to one :class:`Runner`, which holds
what the stages of a run share: the run folder, the training data, the loop settings of the
recipe's settings dataclass and the resume/progress flags.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..distributed import on_main
from ..nets import load_net, read_config
from ..train import train

# the keys of a teacher's config.json that its students inherit (its conventions, not its history)
TEACHER_CONVENTIONS = ("schedule", "prediction", "num_classes", "null_class", "image_shape", "data_range",
                       "time_input")


def teacher_conventions(teacher_cfg: dict) -> dict:
    """The part of a teacher's config.json that a student's config.json repeats."""
    return {k: teacher_cfg[k] for k in TEACHER_CONVENTIONS if k in teacher_cfg}


def provide(provider: Callable[[], Any] | None, default: Callable[[], Any]) -> Any:
    """``provider()`` if a provider is given, else ``default()`` (the shipped MNIST teacher or data)."""
    return default() if provider is None else provider()


@dataclass
class LoopSettings:
    """The training-loop settings a recipe's settings dataclass shares with the others (their common
    defaults; a recipe changes them in its presets): batch, EMA, clipping, weight decay, the checkpoint and
    preview intervals, the seed."""
    batch_size: int = 64
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    ckpt_every_minutes: float | None = 5.0
    sample_every_minutes: float | None = 10.0
    seed: int = 0


@dataclass
class DistillOptions:
    """How a distillation recipe runs, shared by its settings dataclasses (the base of DMDSettings,
    GuidedSettings, ProgressiveSettings); the ``fewstep distill`` options of the same names."""
    mixed_precision: str = "no"  # "bf16" (CPU or GPU) or "fp16" (GPU, loss scaling): the loop's autocast
    gradient_checkpointing: bool = False  # diffusers networks: recompute activations in the backward pass
    lora_rank: int | None = None  # LoRA adapters over the teacher's shared weights (pipeline teachers)
    lora_targets: str = "attention"  # which layers get adapters: "attention", "attention+ff" or "all" (+ convs)
    max_memory_gib: float | None = None  # refuse up front a run whose weight memory exceeds it
    sharding: str | None = None  # "fsdp": shard the trained networks (FSDP2); None: as accelerate launch says


@dataclass(frozen=True)
class Hyper:
    """Optimiser settings of one training run (a stage or a round); the ``train()`` arguments of the same names.
    ``lr``, ``ema_decay`` and ``ema_warmup`` may be ``{network: value}`` when a stage trains several networks."""
    steps: int
    lr: float | dict
    warmup: int
    ema_decay: float | dict
    ema_warmup: bool | dict = True
    lr_drops: dict | None = None  # {after step S: lr factor} (train()'s lr_drops)


@dataclass
class Stage:
    """One training run of a recipe: trained in ``out/<run_dir>`` (checkpoints, log.jsonl, samples/), its EMA
    exported to ``out/<name>`` with ``config(ema, train_steps, seconds)`` as the extra config.json keys.

    reuse: an export already holding ``hyper.steps`` training steps is loaded instead of retrained (so
    the exports alone let a multi-stage pipeline continue).
    """
    name: str
    run_dir: str
    objective: Callable
    net: Any  # an nn.Module, or {name: nn.Module} for an objective with phases (DMD)
    hyper: Hyper
    config: Callable[[torch.nn.Module, int, float], dict]
    sample_fn: Callable | None = None
    info: dict = field(default_factory=dict)
    reuse: bool = True
    save: Callable[[torch.nn.Module, Path, dict], Path] | None = None  # default: the net's own save(folder, extra=)
    load: Callable[[Path], torch.nn.Module] | None = None  # default: fewstep.nets.load_net


@dataclass
class Runner:
    """What the stages of one recipe run share. ``settings`` is the recipe's settings dataclass; the loop
    reads its ``batch_size``, ``grad_clip``, ``weight_decay``, ``ckpt_every_minutes``, ``sample_every_minutes``
    and ``seed``, and records all of it in each stage's run.json."""
    out: Path
    data: Any
    settings: Any
    recipe: str
    resume: bool = False
    progress: bool = True

    def train(self, stage: Stage) -> tuple[torch.nn.Module, Path]:
        """Train ``stage`` (or reuse its export) and return (its EMA network, its export folder)."""
        export, run_dir = self.out / stage.name, self.out / stage.run_dir
        if stage.reuse and _finished(export, stage.hyper.steps):
            print(f"{export.name}: already trained ({stage.hyper.steps} steps), reusing {export}")
            return (stage.load or load_net)(export), export
        s, h = self.settings, stage.hyper
        t0 = time.time()
        result = train(stage.objective, stage.net, self.data, steps=h.steps, out_dir=run_dir, lr=h.lr,
                       batch_size=s.batch_size, warmup=h.warmup, grad_clip=s.grad_clip, ema_decay=h.ema_decay,
                       weight_decay=s.weight_decay, mixed_precision=getattr(s, "mixed_precision", "no"),
                       ckpt_every_minutes=s.ckpt_every_minutes,
                       sample_fn=stage.sample_fn, sample_every_minutes=s.sample_every_minutes, resume=self.resume,
                       seed=s.seed, progress=self.progress, sharding=getattr(s, "sharding", None),
                       run_info={"recipe": self.recipe, **stage.info, "preset": asdict(s)}, ema_warmup=h.ema_warmup,
                       lr_drops=h.lr_drops)
        secs = stage_seconds(run_dir, t0)
        extra = stage.config(result.ema, result.step, secs)
        save = stage.save or (lambda net, folder, extra: net.save(folder, extra=extra))
        folder = on_main(save, result.ema, export, extra) or export
        print(f"{export.name}: {result.step} steps, {secs / 60:.1f} min -> {folder}")
        return result.ema, folder


def _finished(export: Path, steps: int) -> bool:
    """Whether ``export`` holds a finished export of ``steps`` training steps: a fewstep model's config.json,
    or a diffusers pipeline folder's fewstep.json (recipes.teachers)."""
    if (export / "fewstep.json").is_file():
        try:
            return json.loads((export / "fewstep.json").read_text()).get("train_steps") == steps
        except ValueError:
            return False
    return (export / "config.json").is_file() and read_config(export).get("train_steps") == steps


def stage_seconds(out: Path, t0: float) -> float:
    """Training seconds of a run across restarts (sum of the last 'elapsed' of each restart in its log)."""
    total, last = 0.0, 0.0
    log = out / "log.jsonl"
    for line in (log.read_text().splitlines() if log.is_file() else []):
        try:
            e = json.loads(line).get("elapsed", 0.0)
        except ValueError:
            continue
        if e < last:
            total += last
        last = e
    return total + last if total + last > 0 else time.time() - t0


def capped_steps(settings, k: int) -> dict:
    """The changes that cap every training run of a distillation recipe's settings at ``k`` steps (stage 1, each
    round, each encoder round; warm-ups shortened to fit): ``dataclasses.replace(settings, **capped_steps(...))``."""
    changes = {}
    if isinstance(getattr(settings, "stage1", None), Hyper):
        h = settings.stage1
        changes["stage1"] = Hyper(min(h.steps, k), h.lr, min(h.warmup, k // 2), h.ema_decay)
    for field_name in ("rounds", "encoder_rounds"):
        if isinstance(getattr(settings, field_name, None), dict):
            changes[field_name] = {n: min(s, k) for n, s in getattr(settings, field_name).items()}
    for field_name in ("round_warmup", "warmup"):
        if isinstance(getattr(settings, field_name, None), int):
            changes[field_name] = min(getattr(settings, field_name), k // 2)
    if isinstance(getattr(settings, "steps", None), int):
        changes["steps"] = min(settings.steps, k)
    return changes


def check_halving(start_steps: int, rounds: Mapping[int, int], what: str = "rounds") -> None:
    """Refuse rounds that do not halve the sampler's steps one after another from ``start_steps``."""
    expected, n = [], start_steps
    for _ in rounds:
        n //= 2
        expected.append(n)
    if list(rounds) != expected or min(rounds.values(), default=1) < 1 or any(n < 1 for n in expected):
        raise ValueError(f"{what} must halve the steps from {start_steps} ({' -> '.join(map(str, expected))}) "
                         f"with >= 1 training steps each, got {dict(rounds)}")


@dataclass
class Rounds:
    """Progressive rounds (Salimans & Ho 2022): round N's student starts as a copy of the previous
    network and learns to match two of its sampler steps with one. Round N trains in
    ``run_dir.format(n=N)`` and is exported as ``name.format(n=N)``."""
    steps: Mapping[int, int]  # N -> training steps, in order, each N half the previous
    loss: Callable[[torch.nn.Module, int], Callable]  # (previous network, N) -> objective
    lr: float
    warmup: int
    ema_decay: float
    name: str
    run_dir: str
    config: Callable[[int, int, float], dict]  # (N, training steps, seconds) -> config.json keys
    preview: Callable[[int], Callable | None] = lambda n: None  # N -> the loop's sample_fn
    exporter: Callable[[int], dict] = lambda n: {}  # N -> the Stage's save / load (pipeline teachers' students)

    def run(self, runner: Runner, first: torch.nn.Module, until: int | None = None):
        """Train the rounds from network ``first`` (stopping after the round that reaches ``until`` steps);
        returns (the last round's network, {export name: folder})."""
        previous, exports = first, {}
        for n, steps in self.steps.items():
            if until is not None and n < until:
                break
            objective = self.loss(previous, n)
            student = copy.deepcopy(previous).requires_grad_(True).train()  # initialised from the previous round
            run_dir = self.run_dir.format(n=n)
            stage = Stage(self.name.format(n=n), run_dir, objective, student,
                          Hyper(steps, self.lr, self.warmup, self.ema_decay),
                          lambda ema, k, secs, n=n: self.config(n, k, secs), self.preview(n),
                          {"stage": run_dir, "teacher_steps": 2 * n}, **self.exporter(n))
            previous, exports[Path(stage.name).name] = runner.train(stage)
        return previous, exports
