"""Distribution Matching Distillation (Yin et al. 2023) and DMD2: ``fewstep distill dmd --out DIR``.

Builds (or reuses) the regression set ``DIR/regression-set.safetensors`` (teacher ODE pairs),
trains the generator and the fake score together in ``DIR/run`` and exports the generator's
EMA to ``DIR/<name>``. ``MNIST_DMD`` reproduces the shipped ``mnist-dmd-1``; ``MNIST_DMD2_4``
is DMD2's four-step variant (not shipped, see BENCHMARKS.md).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..data.mnist import load_mnist
from ..distill import generator_times
from ..distill.dmd import DMDLoss, FakeScore
from ..distill.pairs import DMDData, regression_pairs
from ..nets import load_net
from ..schedules import schedule_from_config
from ._stage import DistillOptions, Hyper, Runner, Stage, provide, teacher_conventions
from .previews import FID_PROBE_N, generator_preview
from .textbed import INFO
from .teachers import (PipelineTeacher, announce_memory, check_guidance, load_student, pipeline_exporter,
                       pipeline_preview_options, teacher_from, trainable, trained_on_test_bed)


@dataclass(frozen=True)
class PairSettings:
    """The regression set: ``n`` teacher ODE solutions with ``solver`` in ``steps`` model calls."""
    n: int = 2000
    solver: str = "dpmpp_2m"
    steps: int = 25
    seed: int = 1234


@dataclass
class DMDSettings(DistillOptions):
    """Settings of the DMD recipe; the defaults are the shipped ``mnist-dmd-1``'s.

    Per step: one generator update (DM + regression) and one fake update; ~3.3 s at batch 64 on one
    thread beside another run, so batch 32.
    """
    teacher: str = "mnist-teacher"  # a shipped name or a model folder (when no teacher provider is given)
    real_w: float = 1.0
    pairs: PairSettings = PairSettings()
    batch_size: int = 32
    steps: int = 4000
    lr: dict = field(default_factory=lambda: {"generator": 2e-5, "fake": 1e-4})
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float | None = 10.0
    ema_decay: dict = field(default_factory=lambda: {"generator": 0.999, "fake": 0.0})
    lambda_reg: float = 0.25
    distance: str = "pseudo_huber"  # FID 78.1 vs 88.6 for l2 at 4,000 steps (BENCHMARKS.md, DMD on MNIST)
    fake_updates: int = 1
    gan_weight_g: float = 0.0
    gan_weight_d: float = 0.0
    gen_steps: int = 1
    gen_prediction: str | None = None  # the generator's output type (None: the teacher's; see DMDLoss)
    init: str | None = None  # a trained generator of the same teacher to start from (None: the teacher's weights)
    fake_warmup: int = 0  # first steps train the fake score alone (for an init generator; see DMDLoss)
    lr_drops: dict | None = None  # {after step S: lr factor, once or per network} (train()'s lr_drops)
    dm_t: tuple[float, float] = (0.02, 0.98)
    ckpt_every_minutes: float | None = 4.0
    sample_every_minutes: float | None = 10.0
    fid_probe: int = FID_PROBE_N  # samples per point of the FID-against-training-steps curve at each preview (0: none)
    seed: int = 0


MNIST_DMD = DMDSettings()
# DMD2: no regression, 5 fake updates per generator update, GAN head, 4-step generator.
MNIST_DMD2_4 = replace(MNIST_DMD, lambda_reg=0.0, fake_updates=5, gan_weight_g=3e-3, gan_weight_d=1e-2, gen_steps=4,
                       steps=6000)
# the text-to-image test bed's one-step generators (teachers: diffusers pipelines, prompts: the test bed's suite),
# sized to train in about an hour on this 2-core CPU beside other jobs (~1-2.5 s per step at batch 32).
# mnist-sd's generator keeps the teacher's eps output: an x0 output (gen_prediction="x0", no 1/alpha = 14.7x
# error amplification at t = 999) restarts from a net whose output means something else and was still blobs
# after 575 steps (FID probe 1678 against the eps generator's 270 at 435), so it trains longer at a 4x higher
# learning rate instead (FID probe at 3,000 steps: 129 against 161 at 5e-5 / 1e-4; 121 at 5,000), with an EMA decay
# of 0.999 (the loop caps it at (1 + s) / (10 + s): 0.998 at step 5,000): at 2e-4 the raw weights are noisy (in a
# 0.995-EMA run, the raw generator of step 5,000 scored FID 148.8 against its EMA's 95.7, n = 990; the 0.999 EMA
# of the same trajectory 92.6).
MNIST_SD3_DMD = replace(MNIST_DMD, teacher="mnist-sd3", batch_size=32, steps=1500,
                        lr={"generator": 5e-5, "fake": 1e-4}, ema_decay={"generator": 0.995, "fake": 0.0})
MNIST_SD_DMD = replace(MNIST_SD3_DMD, teacher="mnist-sd", steps=5000, lr={"generator": 2e-4, "fake": 4e-4},
                       ema_decay={"generator": 0.999, "fake": 0.0})
# its LoRA form: rank-16 adapters on every linear / conv layer of generator and fake score over the teacher's
# shared frozen weights, 5,000 steps at 2e-3 / 4e-3 (40x the full generator's former 5e-5; LoRA factors start at
# zero and learn slowly: at 2e-4 / 4e-4, FID probe 434 at step 634 and 319 at 2,000 against the former full
# generator's 270 at 435 and 192 at 2,069; at 6e-4, 407 at 539)
MNIST_SD_DMD_LORA = replace(MNIST_SD_DMD, lora_rank=16, lora_targets="all", steps=5000,
                            lr={"generator": 2e-3, "fake": 4e-3})
# a cooldown of mnist-sd-dmd-1: its generator trained on at half the learning rate, 2,600 generator updates after
# 400 steps that train the fake score alone (a fake score that starts as the teacher drags the trained generator
# off: its regression error 0.29 -> 1.02 in the first 100 steps without them); the generator's EMA keeps its full
# 0.999 decay from the first update (with the loop's EMA warm-up the EMA tracked the noisy raw weights at once:
# FID probe 119 -> 128 within 50 updates). DMD2's GAN term on top (3e-3 / 1e-2, the test bed's captioned digits
# as real images) did not help: FID 87.3 after 1,411 updates against 86.4 after 1,000 without it (BENCHMARKS.md).
INIT_FAKE_WARMUP = 400  # fake-score steps alone before an init generator moves (the cooldown's; --init's default)
MNIST_SD_DMD_COOLDOWN = replace(MNIST_SD_DMD, init="mnist-sd-dmd-1", steps=3000, fake_warmup=INIT_FAKE_WARMUP,
                                lr={"generator": 1e-4, "fake": 2e-4})
# then DMD2's two time-scale rule on the cooldown: 3 fake-score updates per generator update (the fake score tracks
# the generator's samples more closely; the 3e-5 stage above, whose fake score had only its 400 warm-up steps, did
# worse than its start), 600 fake-only steps first, the same learning rates (BENCHMARKS.md)
MNIST_SD_DMD_TTUR = replace(MNIST_SD_DMD_COOLDOWN, init="mnist-sd-dmd-1-cooldown", fake_updates=3, fake_warmup=600,
                            steps=6067)
# then the same run on past its last step at 0.3x the generator's learning rate (3e-5; the fake score keeps 2e-4 and
# its 6,067 steps of tracking the generator: the 3e-5 stage above, with a fresh fake score, did worse than its start)
MNIST_SD_DMD_ANNEAL = replace(MNIST_SD_DMD_TTUR, steps=10000, lr_drops={6067: {"generator": 0.3, "fake": 1.0}})
DMD_PRESETS = {"mnist-dmd-1": MNIST_DMD, "mnist-dmd2-4": MNIST_DMD2_4, "mnist-sd-dmd-1": MNIST_SD_DMD,
               "mnist-sd-dmd-1-lora": MNIST_SD_DMD_LORA,
               "mnist-sd-dmd-1-cooldown": MNIST_SD_DMD_COOLDOWN, "mnist-sd-dmd-1-ttur": MNIST_SD_DMD_TTUR,
               "mnist-sd-dmd-1-anneal": MNIST_SD_DMD_ANNEAL,
               "mnist-sd3-dmd-1": MNIST_SD3_DMD}


MONITORING = ("ckpt_every_minutes", "sample_every_minutes", "fid_probe")  # not recorded as hyper-parameters
RUNTIME_DEFAULTS = {"mixed_precision": "no", "gradient_checkpointing": False, "lora_rank": None,
                    "lora_targets": "attention", "max_memory_gib": None, "sharding": None, "gen_prediction": None,
                    "init": None, "fake_warmup": 0, "lr_drops": None}  # recorded when set


def generator_config(teacher_cfg: dict, settings: DMDSettings, name: str, train_steps: int, seconds: float,
                     times=None) -> dict:
    """config.json of a DMD generator: the teacher's conventions plus its fixed input times (default: the
    schedule's generator_times)."""
    cfg = teacher_conventions(teacher_cfg)
    if times is None:
        times = generator_times(schedule_from_config(teacher_cfg["schedule"]), settings.gen_steps)
    if settings.gen_prediction is not None:
        cfg["prediction"] = settings.gen_prediction  # the generator's own output type
    record = {k: v for k, v in asdict(settings).items()
              if k not in MONITORING and RUNTIME_DEFAULTS.get(k, object()) != v}
    cfg.update({"kind": "generator", "recipe": name, "teacher": settings.teacher,
                "generator_times": [float(t) for t in times], "real_w": settings.real_w,
                "sampler": "x = sigma(t_0) z; x0 = G(x, t_i); re-noise x0 to t_(i+1) with fresh noise (DMD2)",
                "train_steps": train_steps, "train_seconds": round(seconds, 1), "preset": record})
    return cfg


def initial_generator(t, settings: DMDSettings):
    """The generator ``settings.init`` names (a shipped name or an exported folder), checked to be a one-line
    refusal unless it is a full generator of this teacher with the run's output type and input times."""
    from ..api import _resolve
    if settings.lora_rank is not None:
        raise ValueError("init starts a full generator from trained weights; a LoRA run starts its adapters at zero "
                         "over the teacher: leave init (--init) out or --lora-rank out")
    try:
        folder = _resolve(settings.init)
    except FileNotFoundError as e:
        raise ValueError(f"init: {e}") from None
    pipeline = isinstance(t, PipelineTeacher)
    if pipeline != (folder / "model_index.json").is_file():
        raise ValueError(f"{settings.init} is not a generator of this teacher's kind (a "
                         f"{'pipeline folder' if pipeline else 'fewstep model folder'}): pass a generator "
                         "that distilling this teacher exported")
    cfg = json.loads((folder / (INFO if pipeline else "config.json")).read_text())
    prediction = settings.gen_prediction or t.prediction
    want = [round(float(v), 6) for v in (t.generator_times(settings.gen_steps) if pipeline
                                         else generator_times(t.schedule, settings.gen_steps))]
    got = [round(float(v), 6) for v in cfg.get("generator_times", [])]
    if cfg.get("kind") != "generator" or got != want or cfg.get("prediction", t.prediction) != prediction:
        raise ValueError(f"{settings.init} is not a {settings.gen_steps}-step {prediction} generator at times {want} "
                         f"(it records kind {cfg.get('kind')!r}, times {got}, prediction {cfg.get('prediction')!r}): "
                         "pass a generator of this recipe's kind")
    return load_student(t, folder) if pipeline else load_net(folder)


def _pairs(t, settings: DMDSettings, out: Path, progress: bool) -> dict:
    """The regression set (built once and cached in ``out``), or without regression only balanced classes."""
    p = settings.pairs
    if settings.lambda_reg > 0:
        return regression_pairs(t, out / "regression-set.safetensors", n=p.n, solver=p.solver, steps=p.steps,
                                w=settings.real_w, seed=p.seed, progress=progress)
    return {"z": torch.zeros(p.n, *t.image_shape), "labels": torch.arange(p.n) % t.num_classes,
            "x_ref": torch.zeros(p.n, *t.image_shape)}


def run_dmd(out, settings: DMDSettings = MNIST_DMD, *, name: str = "mnist-dmd-1", teacher: Callable | None = None,
            data: Callable[[], tuple] | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Build (or reuse) the regression set, train generator + fake score, export the generator's EMA to
    ``out/<name>`` (a pipeline teacher's: ``out/export/<name>``, a pipeline folder stock diffusers runs);
    returns that folder. ``teacher()`` -> a class-conditional fewstep model or a
    :class:`fewstep.recipes.teachers.PipelineTeacher` (default: ``teacher_from(settings.teacher)``);
    ``data()`` -> real (images, labels) for the GAN head (default: MNIST train; a pipeline teacher's: its
    VAE latents and caption ids, ``fewstep.recipes.latents.encoded_data``, required; used only when
    ``gan_weight_d > 0``; the head reads the fake score's mid-network features, ``return_features``).
    Every setting is checked before the regression set is made."""
    out = Path(out)
    t = provide(teacher, lambda: teacher_from(settings.teacher))
    check_guidance(t, settings.real_w)
    pipeline = isinstance(t, PipelineTeacher)
    if pipeline and settings.gan_weight_d > 0 and data is None and trained_on_test_bed(t.folder):
        from .latents import test_bed_data
        data = lambda: test_bed_data(t, out)  # noqa: E731  the test bed's own captioned MNIST digits
    if pipeline and settings.gan_weight_d > 0 and data is None:
        raise ValueError("DMD2's GAN term needs real images of the teacher's kind: give data= (the CLI's --data DIR "
                         "of captioned images, encoded once by the teacher's VAE), or set gan_weight_g = "
                         "gan_weight_d = 0")
    lora = settings.lora_rank
    if lora is not None:
        from .lora import lora_exporter, with_lora
    fid_n = settings.fid_probe if not pipeline or t.prompt_digits() is not None else 0
    if lora is not None:  # the exporters refuse an unexportable student before any work
        exporter = lora_exporter(t, settings.gen_steps, fid_log=out / "run" / "fid.jsonl" if fid_n else None,
                                 prediction=settings.gen_prediction, renoise=True)
    else:
        exporter = pipeline_exporter(t, settings.gen_steps, settings.gen_prediction, renoise=True) if pipeline else {}

    def student(seed):
        if lora is None:
            return copy.deepcopy(t.net)
        return with_lora(t.net, lora, seed=seed, targets=settings.lora_targets)
    # refuses unusable settings (and an unusable init) before the pairs are made
    generator = trainable(student(0) if settings.init is None else initial_generator(t, settings), settings)
    fake = FakeScore(trainable(student(1), settings), gan_head=settings.gan_weight_d > 0)
    if pipeline:
        announce_memory(t, generator, fake, settings.max_memory_gib)
    loss = DMDLoss(t.net, t.schedule, t.prediction, real_w=settings.real_w, dm_t=tuple(settings.dm_t),
                   lambda_reg=settings.lambda_reg, distance=settings.distance, fake_updates=settings.fake_updates,
                   gan_weight_g=settings.gan_weight_g, gan_weight_d=settings.gan_weight_d,
                   gen_steps=settings.gen_steps, null_class=t.null_class,
                   times=t.generator_times(settings.gen_steps) if pipeline else None,
                   gen_prediction=settings.gen_prediction, fake_warmup=settings.fake_warmup)
    pairs = _pairs(t, settings, out, progress)
    real = provide(data, lambda: load_mnist("train")) if settings.gan_weight_d > 0 else None
    preview = generator_preview(loss, t.image_shape, t.num_classes, fid_n=fid_n,
                                fid_log=out / "run" / "fid.jsonl" if fid_n else None,
                                samples_dir=out / "run" / "samples",
                                **(pipeline_preview_options(t) if pipeline else {}))
    stage = Stage(f"export/{name}" if pipeline else name, "run", loss, {"generator": generator, "fake": fake},
                  Hyper(settings.steps, settings.lr, settings.warmup, settings.ema_decay,
                        # a generator that starts trained is already an average: its EMA keeps the full decay
                        {"generator": settings.init is None, "fake": True}, settings.lr_drops),
                  lambda ema, step, secs: generator_config(t.config, settings, name, step, secs, loss.times), preview,
                  reuse=False, **exporter)
    data = DMDData(pairs, real, conditional=t.num_classes is not None)
    return Runner(out, data, settings, name, resume, progress).train(stage)[1]
