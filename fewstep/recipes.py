"""Presets that reproduce fewstep's shipped MNIST models, one command each.

    python -m fewstep.recipes mnist-teacher --out /work/runs/mnist-teacher [--resume]
    python -m fewstep.recipes mnist-classifier --out /work/runs/mnist-classifier

``mnist-teacher``: class-conditional UNet on the MNIST train split, CosineVP schedule
(continuous t), v-prediction, label dropout 0.15 for classifier-free guidance, EMA.
The final export ``<out>/model/`` holds the EMA weights and a config.json recording the
net config, the schedule config, prediction type, classes, null class and time input.

``mnist-classifier``: small CNN trained on the train split; held-out accuracy is
printed and stored in ``<out>/model/config.json``.

Both runs use one CPU thread (``torch.set_num_threads(1)``) unless ``--threads`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data.mnist import NUM_CLASSES, load_mnist
from .distributed import on_main
from .losses import DenoisingLoss, unpack_batch
from .nets import CNNClassifier, ClassifierConfig, UNet, UNetConfig
from .schedules import CosineVP, schedule_from_config
from .train import train

# Sized from measurements on this machine: ~0.68 s per step at batch 64 on one
# thread (1.0M params), so 6,000 steps take about 75 minutes with previews and checkpoints.
MNIST_TEACHER = {
    "net": {"base_channels": 16, "channel_mults": [1, 4, 4], "num_res_blocks": 1,
            "attention_resolutions": [7], "num_classes": NUM_CLASSES},
    "schedule": CosineVP().config(),
    "prediction": "v",
    "label_dropout": 0.15,
    "batch_size": 64,
    "lr": 2e-4,
    "warmup": 500,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "steps": 6000,
    "ckpt_every_minutes": 5.0,
    "sample_every_minutes": 10.0,
    "seed": 0,
}

MNIST_CLASSIFIER = {
    "net": {"width": 32, "feature_dim": 128, "num_classes": NUM_CLASSES, "dropout": 0.3},
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 100,
    "ema_decay": 0.995,
    "steps": 1500,
    "max_shift": 2,
    "seed": 0,
}


# ---------------------------------------------------------------------------
# Preview sampler for the teacher (DDIM, v-prediction, classifier-free guidance)
# ---------------------------------------------------------------------------

@torch.no_grad()
def guided_v(net, x, t, labels, w: float) -> torch.Tensor:
    """v_w = (1 + w) v(x, t, label) - w v(x, t, null); w = 0 is the plain conditional model."""
    b = x.shape[0]
    tt = torch.full((2 * b,), float(t), dtype=torch.float64)
    both = net(torch.cat([x, x]), tt, torch.cat([labels, torch.full_like(labels, net.null_class)]))
    v_cond, v_uncond = both[:b], both[b:]
    return (1 + w) * v_cond - w * v_uncond


@torch.no_grad()
def ddim_preview(net, schedule, labels: torch.Tensor, w: float = 1.0, steps: int = 50, seed: int = 0):
    """Deterministic DDIM (eta = 0) from t_max to 0, uniform in t; returns x0 in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(labels.shape[0], *net_image_shape(net), generator=g)
    ts = torch.linspace(schedule.t_max, 0.0, steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = guided_v(net, x, t_cur, labels, w)
        a, s = float(schedule.alpha(t_cur)), float(schedule.sigma(t_cur))
        x0 = (a * x - s * v).clamp(-1, 1)  # x0 = alpha x_t - sigma v
        eps = (x - a * x0) / s
        # DDIM step: x_next = alpha_next x0 + sigma_next eps
        x = float(schedule.alpha(t_next)) * x0 + float(schedule.sigma(t_next)) * eps
    return x.clamp(-1, 1)


def net_image_shape(net) -> tuple:
    c = net.config
    return (c.in_channels, c.image_size, c.image_size)


def teacher_preview_fn(schedule, per_class: int = 4, w: float = 1.0, steps: int = 50):
    """sample_fn for the loop: a grid with one row per class (w = 1 guidance, 50 DDIM steps)."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)

    def sample(ema, step):
        return ddim_preview(ema, schedule, labels, w=w, steps=steps, seed=0), per_class
    return sample


# ---------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------

def teacher_export_config(preset: dict, step: int) -> dict:
    """Everything a loader needs besides the weights (goes into model/config.json)."""
    return {"kind": "diffusion", "recipe": "mnist-teacher", "prediction": preset["prediction"],
            "schedule": preset["schedule"], "num_classes": NUM_CLASSES, "null_class": NUM_CLASSES,
            "time_input": "continuous",
            "time_input_note": "the net takes continuous t in [0, 1] (float64 (B,)); it embeds 1000 * t",
            "guidance": "x_w = (1 + w) * x_cond - w * x_uncond; labels=None or null_class = unconditional",
            "image_shape": [1, 28, 28], "data_range": [-1.0, 1.0], "train_split": "mnist train (4000)",
            "label_dropout": preset["label_dropout"], "train_steps": step}


def run_mnist_teacher(out: Path, resume: bool, preset: dict = MNIST_TEACHER, progress: bool = True,
                      steps: int | None = None) -> Path:
    x, y = load_mnist("train")
    schedule = schedule_from_config(preset["schedule"])
    net = UNet(UNetConfig(**preset["net"])).to(memory_format=torch.channels_last)
    loss = DenoisingLoss(schedule, prediction=preset["prediction"], label_dropout=preset["label_dropout"])
    result = train(loss, net, (x, y), steps=steps or preset["steps"], out_dir=out, lr=preset["lr"],
                   batch_size=preset["batch_size"], warmup=preset["warmup"], grad_clip=preset["grad_clip"],
                   ema_decay=preset["ema_decay"], ckpt_every_minutes=preset["ckpt_every_minutes"],
                   sample_fn=teacher_preview_fn(schedule), sample_every_minutes=preset["sample_every_minutes"],
                   resume=resume, seed=preset["seed"], progress=progress,
                   run_info={"recipe": "mnist-teacher", "preset": preset})
    folder = on_main(result.ema.save, out / "model", extra=teacher_export_config(preset, result.step)) or out / "model"
    print(f"exported EMA teacher after {result.step} steps -> {folder}")
    return folder


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


@torch.no_grad()
def accuracy(classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    classifier.eval()
    hits = sum((classifier(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def run_mnist_classifier(out: Path, resume: bool, preset: dict = MNIST_CLASSIFIER, progress: bool = True) -> float:
    x, y = load_mnist("train")
    xh, yh = load_mnist("heldout")
    net = CNNClassifier(ClassifierConfig(**preset["net"]))
    t0 = time.time()
    result = train(ClassificationLoss(preset["max_shift"]), net, (x, y), steps=preset["steps"], out_dir=out,
                   lr=preset["lr"], batch_size=preset["batch_size"], warmup=preset["warmup"],
                   ema_decay=preset["ema_decay"], weight_decay=1e-4, ckpt_every_minutes=5.0, resume=resume,
                   seed=preset["seed"], progress=progress, run_info={"recipe": "mnist-classifier", "preset": preset})
    acc = accuracy(result.ema, xh, yh)
    train_acc = accuracy(result.ema, x, y)
    extra = {"kind": "classifier", "recipe": "mnist-classifier", "heldout_accuracy": acc,
             "train_accuracy": train_acc, "heldout_split": "mnist heldout (1000, 100 per class)",
             "train_steps": result.step, "train_seconds": round(time.time() - t0, 1),
             "input": "images in [-1, 1], shape (B, 1, 28, 28)", "features": "penultimate, features(x)"}
    folder = on_main(result.ema.save, out / "model", extra=extra) or out / "model"
    print(json.dumps({"heldout_accuracy": acc, "train_accuracy": train_acc, "model": str(folder)}))
    return acc


RECIPES = {"mnist-teacher": run_mnist_teacher, "mnist-classifier": run_mnist_classifier}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log.jsonl, samples, model/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        RECIPES[args.recipe](args.out, resume=args.resume, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
