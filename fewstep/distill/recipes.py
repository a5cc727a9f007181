"""Presets that reproduce fewstep's guided-distilled MNIST students, one command:

    fewstep distill guided --out runs/mnist-guided [--resume]

Stage 1 (``<out>/stage1``) distills the shipped ``mnist-teacher`` (classifier-free
guidance, two calls per step) into one w-conditioned student; progressive rounds
(``<out>/round-<N>``) then halve its DDIM step count from ``start_steps`` down to 1.
Each stage is its own training run with checkpoints and exact resume; a finished stage
is reused, not retrained. Exports: ``<out>/mnist-guided-stage1`` and ``<out>/mnist-guided-<N>``
(model.safetensors + config.json, loadable by ``fewstep.load``).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ..api import load
from ..data.mnist import NUM_CLASSES, load_mnist
from ..distributed import on_main
from ..train import train
from ._common import NetX0, with_w_input
from .guided import GuidedDistillLoss
from .progressive import ProgressiveLoss
from .samplers import sample_student

# Sized on this CPU (one thread, batch 64): stage 1 ~1.26 s/step, a progressive round
# ~1.14 s/step. The teacher's 32-step DDIM at w = 1 is 0.042 RMSE from its 512-step DDIM
# (16 steps: 0.079, 64 steps: ~0.02), so the rounds start from 32 steps.
MNIST_GUIDED = {
    "teacher": "mnist-teacher",
    "w_range": [0.0, 4.0],
    "batch_size": 64,
    "stage1": {"steps": 2000, "lr": 1e-4, "warmup": 100, "ema_decay": 0.999},
    "start_steps": 32,
    "rounds": {"16": 600, "8": 600, "4": 1000, "2": 1000, "1": 1000},
    "round_lr": 1e-4, "round_warmup": 50, "round_ema_decay": 0.995,
    "ship": [8, 4, 2, 1],
    # the distilled encoder (DDIM inversion under guidance): 32 -> 16 -> 8 -> 4 steps from stage 1
    # the encoder's rounds: its loss was flat from step 50 to 600 of round 16 (1e-5 .. 2e-5), so the
    # later rounds are shorter
    "encoder_rounds": {"16": 600, "8": 300, "4": 300},
    "grad_clip": 1.0,
    "ckpt_every_minutes": 4.0,
    "sample_every_minutes": 10.0,
    "seed": 0,
}


def student_config(teacher_cfg: dict, preset: dict, steps: int | None, train_steps: int, seconds: float,
                   encoder: bool = False) -> dict:
    """config.json of a distilled student; steps None = the stage-1 student (any sampler)."""
    cfg = {k: teacher_cfg[k] for k in ("schedule", "prediction", "num_classes", "null_class", "image_shape",
                                        "data_range", "time_input") if k in teacher_cfg}
    name = "mnist-guided-stage1" if steps is None else f"mnist-guided-{'encoder-' if encoder else ''}{steps}"
    cfg.update({"kind": "diffusion" if steps is None else "student", "recipe": name, "pipeline": "mnist-guided",
                "teacher": preset["teacher"], "w_input": True, "w_range": preset["w_range"],
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


FID_PROBE_N = 500  # samples per point of the FID-against-training-steps curve (biased at this n: a trend, not a score)


def fid_probe(make_images, log_path: Path, n: int = FID_PROBE_N):
    """Append {step, fid, class_accuracy} of ``make_images(labels) -> images`` (n class-balanced
    samples against n real training digits, classifier features) to ``log_path`` (JSON lines)."""
    from ..metrics import image_metrics
    labels = torch.arange(n) % NUM_CLASSES
    state = {}

    def probe(step: int) -> None:
        if "real" not in state:  # class-balanced real digits, as fewstep eval uses
            from ..evaluate import reference_sets
            state["real"], state["clf"] = reference_sets(n)[0], load("mnist-classifier")
        fake = make_images(labels).clamp(-1, 1)
        m = image_metrics(fake, state["real"], state["clf"], labels=labels, kid_subset=min(n, 500))
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "n": n, "fid": m["fid"], "class_accuracy": m["class_accuracy"]}) + "\n")
    return probe


def _student_images(ema, schedule, prediction, steps, labels, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(labels), 1, 28, 28, generator=g) * float(schedule.sigma(torch.tensor(schedule.t_max)))
    x0_fn = NetX0(ema, schedule, prediction)
    den = lambda x, t, labels: x0_fn(x, t, labels, torch.full((x.shape[0],), w))  # noqa: E731
    return sample_student(den, x_T, schedule, steps, cond={"labels": labels}).x


def preview_fn(schedule, prediction: str, steps: int | None, per_class: int = 4, w: float = 1.0,
               fid_log: Path | None = None):
    """sample_fn for the loop: one row per class at guidance w, with the student's own sampler; with
    ``fid_log``, also a point of the FID-against-training-steps curve at that w."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)

    def sample(ema, step):
        if fid_log is not None:
            fid_probe(lambda lab: _student_images(ema, schedule, prediction, steps or 32, lab, w, seed=1),
                      fid_log)(step)
        return _student_images(ema, schedule, prediction, steps or 32, labels, w).clamp(-1, 1), per_class
    return sample


def _train_stage(objective, net, data, out: Path, hp: dict, preset: dict, sample_fn, resume: bool,
                 progress: bool, info: dict, export: Path, config_fn):
    """Train one stage (its own run folder ``out``) and export its EMA to ``export`` with
    ``config_fn(train_steps, seconds)``; a stage already exported with the same number of steps
    is loaded instead of retrained (so the exports alone let a pipeline continue)."""
    from ..nets import load_net, read_config
    if (export / "config.json").is_file() and read_config(export).get("train_steps") == hp["steps"]:
        print(f"{export.name}: already trained ({hp['steps']} steps), reusing {export}")
        return load_net(export), export
    t0 = time.time()
    result = train(objective, net, data, steps=hp["steps"], out_dir=out, lr=hp["lr"],
                   batch_size=preset["batch_size"], warmup=hp["warmup"], grad_clip=preset["grad_clip"],
                   ema_decay=hp["ema_decay"], ckpt_every_minutes=preset["ckpt_every_minutes"], sample_fn=sample_fn,
                   sample_every_minutes=preset["sample_every_minutes"], resume=resume, seed=preset["seed"],
                   progress=progress, run_info=info)
    secs = _stage_seconds(out, t0)
    folder = on_main(result.ema.save, export, extra=config_fn(result.step, secs)) or export
    print(f"{export.name}: {result.step} steps, {secs / 60:.1f} min -> {folder}")
    return result.ema, folder


def _stage_seconds(out: Path, t0: float) -> float:
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


def run_mnist_guided(out: Path, resume: bool, preset: dict = MNIST_GUIDED, progress: bool = True,
                     until: int | None = None, part: str = "all") -> dict[str, Path]:
    """Stage 1, then the progressive rounds down to 1 step (or to ``until`` steps), then the encoder's
    rounds; ``part="decoder"`` or ``"encoder"`` runs stage 1 and only the one kind of rounds (two
    processes can then share the work); returns the exports."""
    if part not in ("all", "decoder", "encoder"):
        raise ValueError(f"part must be 'all', 'decoder' or 'encoder', got {part!r}")
    out = Path(out)
    teacher = load(preset["teacher"])
    x, y = load_mnist("train")
    sch, pred = teacher.schedule, teacher.prediction
    exports = {}
    hp = preset["stage1"]
    loss = GuidedDistillLoss(teacher.net, sch, pred, w_min=preset["w_range"][0], w_max=preset["w_range"][1])
    previous, exports["mnist-guided-stage1"] = _train_stage(
        loss, with_w_input(teacher.net), (x, y), out / "stage1", hp, preset,
        preview_fn(sch, pred, preset["start_steps"], fid_log=out / "stage1" / "fid.jsonl"),
        resume, progress, {"recipe": "mnist-guided", "stage": "stage1", "preset": preset},
        out / "mnist-guided-stage1", lambda step, secs: student_config(teacher.config, preset, None, step, secs))
    stage1 = previous
    for n_str, steps in (preset["rounds"] if part != "encoder" else {}).items():
        n = int(n_str)
        if until is not None and n < until:
            break
        loss = ProgressiveLoss(previous, sch, n, pred, w_range=tuple(preset["w_range"]))
        hp = {"steps": steps, "lr": preset["round_lr"], "warmup": preset["round_warmup"],
              "ema_decay": preset["round_ema_decay"]}
        student = copy.deepcopy(previous).requires_grad_(True).train()  # initialised from the previous round
        name = f"mnist-guided-{n}"
        previous, exports[name] = _train_stage(
            loss, student, (x, y), out / f"round-{n}", hp, preset,
            preview_fn(sch, pred, n, fid_log=out / f"round-{n}" / "fid.jsonl"), resume, progress,
            {"recipe": "mnist-guided", "stage": f"round-{n}", "teacher_steps": 2 * n, "preset": preset}, out / name,
            lambda step, secs, n=n: student_config(teacher.config, preset, n, step, secs))
    if until is None and part != "decoder":
        exports.update(_encoder_rounds(stage1, x, y, sch, pred, out, preset, resume, progress, teacher.config))
    return exports


def _encoder_rounds(stage1, x, y, sch, pred, out: Path, preset: dict, resume: bool, progress: bool,
                    teacher_cfg: dict) -> dict:
    """Progressive distillation of the guided DDIM inversion (the encoder), starting from stage 1."""
    exports, previous = {}, stage1
    for n_str, steps in preset.get("encoder_rounds", {}).items():
        n = int(n_str)
        loss = ProgressiveLoss(previous, sch, n, pred, w_range=tuple(preset["w_range"]), direction="encode")
        hp = {"steps": steps, "lr": preset["round_lr"], "warmup": preset["round_warmup"],
              "ema_decay": preset["round_ema_decay"]}
        student = copy.deepcopy(previous).requires_grad_(True).train()
        name = f"mnist-guided-encoder-{n}"
        previous, exports[name] = _train_stage(
            loss, student, (x, y), out / f"encoder-round-{n}", hp, preset, None, resume, progress,
            {"recipe": "mnist-guided", "stage": f"encoder-round-{n}", "teacher_steps": 2 * n, "preset": preset},
            out / name, lambda step, secs, n=n: student_config(teacher_cfg, preset, n, step, secs, encoder=True))
    return exports



# ---------------------------------------------------------------------------
# Plain progressive distillation (Salimans & Ho 2022) of the unguided teacher
# ---------------------------------------------------------------------------

# the same rounds as the guided pipeline, from the teacher's conditional model (w = 0) instead of stage 1
MNIST_PROGRESSIVE = {k: MNIST_GUIDED[k] for k in ("teacher", "batch_size", "start_steps", "round_lr", "round_warmup",
                                                   "round_ema_decay", "grad_clip", "ckpt_every_minutes",
                                                   "sample_every_minutes", "seed")}
MNIST_PROGRESSIVE["rounds"] = {"16": 600, "8": 600, "4": 1000}


def run_mnist_progressive(out: Path, resume: bool, preset: dict = MNIST_PROGRESSIVE, progress: bool = True,
                          until: int | None = None) -> dict[str, Path]:
    """Rounds 32 -> 16 -> 8 -> 4 of plain progressive distillation (no w input) of the shipped teacher's
    conditional model; exports mnist-progressive-<N> students (guidance at sampling time: CFG on the
    student, two calls per step)."""
    out = Path(out)
    teacher = load(preset["teacher"])
    x, y = load_mnist("train")
    sch, pred = teacher.schedule, teacher.prediction
    previous, exports = teacher.net, {}
    for n_str, steps in preset["rounds"].items():
        n = int(n_str)
        if until is not None and n < until:
            break
        loss = ProgressiveLoss(previous, sch, n, pred, w_range=None)
        hp = {"steps": steps, "lr": preset["round_lr"], "warmup": preset["round_warmup"],
              "ema_decay": preset["round_ema_decay"]}
        student = copy.deepcopy(previous).requires_grad_(True).train()
        name = f"mnist-progressive-{n}"
        previous, exports[name] = _train_stage(
            loss, student, (x, y), out / f"round-{n}", hp, preset,
            preview_fn(sch, pred, n, w=0.0), resume, progress,
            {"recipe": "mnist-progressive", "stage": f"round-{n}", "teacher_steps": 2 * n, "preset": preset},
            out / name, lambda step, secs, n=n: _progressive_config(teacher.config, preset, n, step, secs))
    return exports


def _progressive_config(teacher_cfg: dict, preset: dict, steps: int, train_steps: int, seconds: float) -> dict:
    cfg = {k: teacher_cfg[k] for k in ("schedule", "prediction", "num_classes", "null_class", "image_shape",
                                        "data_range", "time_input") if k in teacher_cfg}
    cfg.update({"kind": "student", "recipe": f"mnist-progressive-{steps}", "pipeline": "mnist-progressive",
                "teacher": preset["teacher"], "w_input": False, "student_steps": steps,
                "sampler": "DDIM on t_i = t_max * i / N (uniform in t) down to 0",
                "guidance": "distilled at w = 0; w > 0 applies classifier-free guidance to the student (two calls "
                            "per step)", "train_steps": train_steps, "train_seconds": round(seconds, 1)})
    return cfg


# ---------------------------------------------------------------------------
# DMD: a one-step generator (and DMD2's 4-step variant)
# ---------------------------------------------------------------------------

# Per step: one generator update (DM + regression) and one fake update; ~3.3 s at batch 64 on one
# thread beside another run, so batch 32.
MNIST_DMD = {
    "teacher": "mnist-teacher",
    "real_w": 1.0,
    "pairs": {"n": 2000, "solver": "dpmpp_2m", "steps": 25, "seed": 1234},
    "batch_size": 32,
    "steps": 4000,
    "lr": {"generator": 2e-5, "fake": 1e-4},
    "weight_decay": 0.01,
    "warmup": 100,
    "grad_clip": 10.0,
    "ema_decay": {"generator": 0.999, "fake": 0.0},
    "lambda_reg": 0.25,
    "distance": "pseudo_huber",  # FID 78.1 vs 88.6 for l2 at 4,000 steps (BENCHMARKS.md, DMD on MNIST)
    "fake_updates": 1,
    "gan_weight_g": 0.0,
    "gan_weight_d": 0.0,
    "gen_steps": 1,
    "dm_t": [0.02, 0.98],
    "ckpt_every_minutes": 4.0,
    "sample_every_minutes": 10.0,
    "seed": 0,
}

# DMD2: no regression, 5 fake updates per generator update, GAN head, 4-step generator.
MNIST_DMD2_4 = {**MNIST_DMD, "lambda_reg": 0.0, "fake_updates": 5, "gan_weight_g": 3e-3, "gan_weight_d": 1e-2,
                "gen_steps": 4, "steps": 6000}

DMD_PRESETS = {"mnist-dmd-1": MNIST_DMD, "mnist-dmd2-4": MNIST_DMD2_4}


def generator_config(teacher_cfg: dict, preset: dict, name: str, train_steps: int, seconds: float) -> dict:
    """config.json of a DMD generator: the teacher's conventions plus its fixed input times."""
    from .dmd import generator_times
    from ..schedules import schedule_from_config
    cfg = {k: teacher_cfg[k] for k in ("schedule", "prediction", "num_classes", "null_class", "image_shape",
                                        "data_range", "time_input") if k in teacher_cfg}
    times = generator_times(schedule_from_config(teacher_cfg["schedule"]), preset["gen_steps"])
    cfg.update({"kind": "generator", "recipe": name, "teacher": preset["teacher"],
                "generator_times": [float(t) for t in times], "real_w": preset["real_w"],
                "sampler": "x = sigma(t_0) z; x0 = G(x, t_i); re-noise x0 to t_(i+1) with fresh noise (DMD2)",
                "train_steps": train_steps, "train_seconds": round(seconds, 1),
                "preset": {k: v for k, v in preset.items() if k not in ("ckpt_every_minutes", "sample_every_minutes")}})
    return cfg


def _generator_images(loss, ema, labels, seed=0):
    from .dmd import generator_sample
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(labels), 1, 28, 28, generator=g) * loss.schedule.sigma(loss.times[0]).float()
    return generator_sample(loss.gen_x0(ema), x_T, labels, loss.schedule, loss.times,
                            noise=lambda like: torch.randn(like.shape, generator=g))[1]


def generator_preview_fn(loss, per_class: int = 4, fid_log: Path | None = None):
    """sample_fn for the loop: one row per class; with ``fid_log`` a point of the FID curve."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)

    def sample(ema, step):
        if fid_log is not None:
            fid_probe(lambda lab: _generator_images(loss, ema, lab, seed=1), fid_log)(step)
        return _generator_images(loss, ema, labels).clamp(-1, 1), per_class
    return sample


def run_mnist_dmd(out: Path, resume: bool, preset: dict = MNIST_DMD, name: str = "mnist-dmd-1",
                  progress: bool = True, steps: int | None = None) -> Path:
    """Build (or reuse) the regression set, train generator + fake score, export the generator's EMA."""
    from .dmd import DMDLoss, FakeScore
    from .pairs import DMDData, regression_pairs
    out = Path(out)
    teacher = load(preset["teacher"])
    pairs = None
    if preset["lambda_reg"] > 0:
        p = preset["pairs"]
        pairs = regression_pairs(teacher, out / "regression-set.safetensors", n=p["n"], solver=p["solver"],
                                 steps=p["steps"], w=preset["real_w"], seed=p["seed"], progress=progress)
    else:  # no regression: only the classes (balanced) and noise shapes are used
        n = preset["pairs"]["n"]
        pairs = {"z": torch.zeros(n, *teacher.image_shape), "labels": torch.arange(n) % NUM_CLASSES,
                 "x_ref": torch.zeros(n, *teacher.image_shape)}
    real = load_mnist("train") if preset["gan_weight_d"] > 0 else None
    loss = DMDLoss(teacher.net, teacher.schedule, teacher.prediction, real_w=preset["real_w"],
                   dm_t=tuple(preset["dm_t"]), lambda_reg=preset["lambda_reg"], distance=preset["distance"],
                   fake_updates=preset["fake_updates"], gan_weight_g=preset["gan_weight_g"],
                   gan_weight_d=preset["gan_weight_d"], gen_steps=preset["gen_steps"])
    generator = copy.deepcopy(teacher.net).requires_grad_(True).train()
    fake = FakeScore(copy.deepcopy(teacher.net).requires_grad_(True).train(), gan_head=preset["gan_weight_d"] > 0)
    t0 = time.time()
    result = train(loss, {"generator": generator, "fake": fake}, DMDData(pairs, real), steps=steps or preset["steps"],
                   out_dir=out / "run", lr=preset["lr"], batch_size=preset["batch_size"], warmup=preset["warmup"],
                   grad_clip=preset["grad_clip"], ema_decay=preset["ema_decay"], weight_decay=preset["weight_decay"],
                   ckpt_every_minutes=preset["ckpt_every_minutes"],
                   sample_fn=generator_preview_fn(loss, fid_log=out / "run" / "fid.jsonl"),
                   sample_every_minutes=preset["sample_every_minutes"], resume=resume, seed=preset["seed"],
                   progress=progress, run_info={"recipe": name, "preset": preset})
    secs = _stage_seconds(out / "run", t0)
    folder = on_main(result.ema.save, out / name,
                     extra=generator_config(teacher.config, preset, name, result.step, secs)) or out / name
    print(f"{name}: {result.step} steps, {secs / 60:.1f} min -> {folder}")
    return folder
