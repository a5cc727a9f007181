"""Preview grids for the training loop's ``sample_fn`` (one row per class) and the FID probe.

Every preview samples with the library's own samplers: the teacher through
``fewstep.sampling.sample`` under ``fewstep.denoisers.ClassifierFreeGuidance``, a distilled
student through its N-step sampler, a DMD generator through its rollout. The loop runs a
preview under ``torch.no_grad`` with the random state saved and restored, so previews do not
change training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..distill import NetX0, sample_student
from ..distill.dmd import generator_sample
from ..images import save_captioned_rows
from ..sampling import sample

FID_PROBE_N = 500  # samples per point of the FID-against-training-steps curve (biased at this n: a trend, not a score)


UNCONDITIONAL_PREVIEW = 16  # images in the preview grid of an unconditional model


def preview_rows(num_classes: int | None, per_class: int = 4) -> torch.Tensor | None:
    """The labels of a preview grid: ``per_class`` of each class, at most 10 classes spread over all of them
    (None for an unconditional model: :data:`UNCONDITIONAL_PREVIEW` images without labels)."""
    if not num_classes:
        return None
    return torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long().repeat_interleave(per_class)


def _count_and_labels(labels, device):
    """(number of images, labels on ``device`` or None) of a preview's labels (None: unconditional)."""
    return (UNCONDITIONAL_PREVIEW, None) if labels is None else (len(labels), labels.to(device))


def _noise(n: int, image_shape, schedule, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sigma_max = float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    return (torch.randn(n, *image_shape, generator=g) * sigma_max).to(device)


def _device(net) -> torch.device:
    return next(net.parameters()).device


def teacher_preview(schedule, prediction: str, image_shape, num_classes: int, null_class: int, *,
                    per_class: int = 4, w: float = 1.0, steps: int = 50) -> Callable:
    """sample_fn of a class-conditional diffusion model in training: its EMA under classifier-free guidance
    w (x_w = (1 + w) x_cond - w x_uncond), DDIM (eta = 0) on ``steps`` steps uniform in t from t_max to 0,
    x0_hat clipped to [-1, 1] at each step."""
    labels = preview_rows(num_classes, per_class)
    grid = torch.linspace(schedule.t_max, 0.0, steps + 1, dtype=torch.float64)

    def sample_fn(ema, step):
        dev = _device(ema)
        den = ClassifierFreeGuidance(ModelDenoiser(ema, schedule, prediction), w,
                                     lambda cond: {"labels": torch.full_like(cond["labels"], null_class)})
        out = sample(den, _noise(len(labels), image_shape, schedule, 0, dev), schedule, solver="ddim", grid=grid,
                     cond={"labels": labels.to(dev)}, thresholding={"max_value": 1.0})  # max_value 1: a plain clip
        return out.x.clamp(-1, 1).cpu(), per_class
    return sample_fn


def student_images(ema, schedule, prediction: str, steps: int, labels: torch.Tensor, w: float, image_shape,
                   seed: int = 0) -> torch.Tensor:
    """Images of a student in training (w as an input where it has one) with its own ``steps``-step sampler."""
    dev = _device(ema)
    n, labels = _count_and_labels(labels, dev)
    x0_fn = NetX0(ema, schedule, prediction)
    den = lambda x, t, labels=None: x0_fn(x, t, labels, torch.full((x.shape[0],), w, device=x.device))  # noqa: E731
    return sample_student(den, _noise(n, image_shape, schedule, seed, dev), schedule, steps,
                          cond=None if labels is None else {"labels": labels}).x.cpu()


def prompt_grid(prompts: list[str], labels: torch.Tensor, images: torch.Tensor, per_class: int, path: Path) -> Path:
    """The preview grid again with each row's prompt written beside it (a text teacher's previews)."""
    rows = images.split(per_class)
    return save_captioned_rows([prompts[int(lab)] for lab in labels[::per_class]], list(rows), path)


def _with_prompts(sample_fn: Callable, labels, per_class: int, prompts, samples_dir) -> Callable:
    """``sample_fn`` that also writes ``samples_dir/step-<step>-prompts.png`` (:func:`prompt_grid`) when given
    the prompts of a text teacher."""
    if prompts is None or samples_dir is None or labels is None:
        return sample_fn

    def with_prompts(ema, step):
        images, nrow = sample_fn(ema, step)
        prompt_grid(prompts, labels, images, per_class, Path(samples_dir) / f"step-{step:08d}-prompts.png")
        return images, nrow
    return with_prompts


def student_preview(schedule, prediction: str, steps: int, image_shape, num_classes: int, *, per_class: int = 4,
                    w: float = 1.0, fid_log: Path | None = None, fid_n: int = FID_PROBE_N,
                    decode: Callable | None = None, digit_labels: Callable | None = None,
                    prompts: list[str] | None = None, samples_dir: Path | None = None) -> Callable:
    """sample_fn of a distilled student: one row per class (see :func:`preview_rows`) at guidance w with the
    student's own sampler; with ``fid_log``, also a point of the FID-against-training-steps curve at that w
    (``fid_n`` samples). ``decode``, ``digit_labels``, ``prompts`` and ``samples_dir``: as for
    :func:`generator_preview`."""
    labels = preview_rows(num_classes, per_class)
    decode = decode or (lambda x: x)
    ask = digit_labels or (lambda digits: digits)

    def sample_fn(ema, step):
        def images(lab, seed=0):
            return decode(student_images(ema, schedule, prediction, steps, lab, w, image_shape, seed=seed))
        if fid_log is not None:
            fid_probe(lambda lab: images(ask(lab), seed=1), fid_log, 10 if digit_labels else num_classes, fid_n)(step)
        return images(labels).clamp(-1, 1), per_class
    return _with_prompts(sample_fn, labels, per_class, prompts, samples_dir)


def generator_images(loss, ema, labels: torch.Tensor, image_shape, seed: int = 0) -> torch.Tensor:
    """Images of a DMD generator in training: its rollout over ``loss.times`` with fresh noise between steps."""
    g = torch.Generator().manual_seed(seed)
    dev = _device(ema)
    n, labels = _count_and_labels(labels, dev)
    x_T = torch.randn(n, *image_shape, generator=g) * loss.schedule.sigma(loss.times[0]).float()
    return generator_sample(loss.gen_x0(ema), x_T.to(dev), labels, loss.schedule, loss.times.to(dev),
                            noise=lambda like: torch.randn(like.shape, generator=g).to(like.device))[1].cpu()


def generator_preview(loss, image_shape, num_classes: int, *, per_class: int = 4,
                      fid_log: Path | None = None, fid_n: int = FID_PROBE_N, decode: Callable | None = None,
                      digit_labels: Callable | None = None, prompts: list[str] | None = None,
                      samples_dir: Path | None = None) -> Callable:
    """sample_fn of a DMD generator: one row per class (see :func:`preview_rows`); with
    ``fid_log`` a point of the FID curve (``fid_n`` samples).

    decode: latents -> images in [-1, 1] (a latent teacher's VAE; default: the samples are images).
    digit_labels: digit labels (B,) -> the generator's labels that ask for those digits (a text teacher's
      prompts); without it the generator's labels are the digits themselves.
    prompts, samples_dir: a text teacher's prompts (class k = prompts[k]): each preview is also written
      with its rows' prompts beside them to ``samples_dir/step-<step>-prompts.png``."""
    labels = preview_rows(num_classes, per_class)
    decode = decode or (lambda x: x)
    ask = digit_labels or (lambda digits: digits)

    def sample_fn(ema, step):
        if fid_log is not None:
            fid_probe(lambda lab: decode(generator_images(loss, ema, ask(lab), image_shape, seed=1)), fid_log,
                      10 if digit_labels else num_classes, fid_n)(step)
        return decode(generator_images(loss, ema, labels, image_shape)).clamp(-1, 1), per_class
    return _with_prompts(sample_fn, labels, per_class, prompts, samples_dir)


def fid_probe(make_images: Callable, log_path: Path, num_classes: int = 10, n: int = FID_PROBE_N) -> Callable:
    """``probe(step)`` appends {step, n, fid, class_accuracy} of ``make_images(labels) -> images`` (n
    class-balanced samples against n real MNIST training digits, the shipped classifier's features) to
    ``log_path`` (JSON lines). The text test bed's 32x32 images are scored on their 28x28 centre."""
    labels = torch.arange(n) % num_classes
    state = {}

    def probe(step: int) -> None:
        from ..api import load
        from ..evaluate import centre_crop, reference_sets
        from ..metrics import image_metrics
        if "real" not in state:  # class-balanced real digits, as fewstep eval uses
            state["real"], state["clf"] = reference_sets(n)[0], load("mnist-classifier")
        fake = centre_crop(make_images(labels).clamp(-1, 1))
        m = image_metrics(fake, state["real"], state["clf"], labels=labels, kid_subset=min(n, 500))
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "n": n, "fid": m["fid"], "class_accuracy": m["class_accuracy"]}) + "\n")
    return probe
