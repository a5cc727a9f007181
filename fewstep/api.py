"""Loading fewstep models and generating images with them: ``fewstep.load`` and ``fewstep.generate``.

A model folder holds ``model.safetensors`` + ``config.json``. Shipped models live in
``fewstep/assets/<name>/`` and load by name; a training run's folder loads through
its ``model/`` export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .denoisers import ClassifierFreeGuidance, ModelDenoiser
from .nets import load_net, read_config
from .sampling import sample
from .schedules import schedule_from_config
from .solvers import SamplerOutput

__all__ = ["SHIPPED", "ASSETS", "load", "generate", "DiffusionModel", "sample_generators"]

ASSETS = Path(__file__).parent / "assets"
SHIPPED = {
    "mnist-teacher": "class-conditional MNIST diffusion model (v-prediction, cosine schedule, CFG)",
    "mnist-classifier": "MNIST classifier whose features define FID/KID/IS here",
}


class DiffusionModel:
    """A trained diffusion network with its schedule and conventions.

    ``denoiser(w)`` gives the fewstep denoiser ``D(x, t, labels=None)``; labels=None or the
    null class is the unconditional model; w > 0 applies classifier-free guidance
    x_w = (1 + w) x_cond - w x_uncond.
    """

    def __init__(self, net: torch.nn.Module, config: dict, source: str = ""):
        self.net, self.config, self.source = net.eval(), config, source
        self.schedule = schedule_from_config(config["schedule"])
        self.prediction = config["prediction"]
        self.num_classes = config.get("num_classes")
        self.null_class = config.get("null_class")
        self.image_shape = tuple(config.get("image_shape") or (net.config.in_channels, net.config.image_size,
                                                               net.config.image_size))

    def __repr__(self) -> str:
        return f"DiffusionModel({self.source or self.config.get('recipe', '?')}, {self.prediction}, {self.schedule!r})"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "DiffusionModel":
        self.net.to(device)
        return self

    def _net_call(self, x, t, labels=None):
        return self.net(x, t, labels)

    def denoiser(self, w: float = 0.0) -> Callable:
        den = ModelDenoiser(self._net_call, self.schedule, self.prediction, time_input="continuous")
        if w == 0:
            return den
        if self.num_classes is None:
            raise ValueError("guidance w needs a class-conditional model; this one has no classes")
        null = self.null_class
        return ClassifierFreeGuidance(den, w, lambda cond: {"labels": torch.full_like(cond["labels"], null)})

    @torch.no_grad()
    def sample_batch(self, x_T: torch.Tensor, labels: torch.Tensor | None, *, w: float, solver: str, steps: int,
                     spacing: str, generator, progress: bool, **options) -> SamplerOutput:
        cond = None if labels is None else {"labels": labels}
        return sample(self.denoiser(w), x_T, self.schedule, solver=solver, steps=steps, spacing=spacing,
                      cond=cond, generator=generator, progress=progress, **options)


def _resolve(name_or_path) -> Path:
    name = str(name_or_path)
    if name in SHIPPED:
        folder = ASSETS / name
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"shipped model {name!r} is not in this installation ({folder} is missing)")
        return folder
    folder = Path(name_or_path)
    if not folder.exists():
        raise FileNotFoundError(f"no model named {name!r}: not a shipped model ({', '.join(SHIPPED)}) "
                                "and no such folder")
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        folder = folder / "model"  # a training run's export
    return folder


def load(name_or_path, device: str | torch.device = "cpu"):
    """Load a shipped model by name (``mnist-teacher``, ``mnist-classifier``) or a fewstep
    model folder. Diffusion models come back as ``DiffusionModel``; classifiers as the network."""
    folder = _resolve(name_or_path)
    cfg = read_config(folder)
    net = load_net(folder).to(device)
    if cfg.get("kind") == "diffusion":
        return DiffusionModel(net, cfg, str(name_or_path))
    return net.eval()


def sample_generators(seed: int, start: int, count: int, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded from (seed, image index) alone."""
    out = []
    for i in range(start, start + count):
        state = int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, dtype=np.uint64)[0])
        out.append(torch.Generator(device=device).manual_seed(state & (2 ** 63 - 1)))
    return out


@torch.no_grad()
def generate(model, labels=None, *, n: int | None = None, w: float = 0.0, solver: str = "dpmpp_2m",
             steps: int = 20, spacing: str = "logsnr", seed: int = 0, batch_size: int = 256,
             progress: bool = False, **options) -> torch.Tensor:
    """Generate images in [-1, 1], shape (N, C, H, W).

    labels: class ids (N,) for a conditional model, or None with ``n`` for unconditional
      samples. Image i depends only on (seed, i): not on the batch size.
    w: classifier-free guidance weight (x_w = (1 + w) x_cond - w x_uncond).
    solver / steps / spacing: any fewstep solver and its budget of model calls.
    """
    if isinstance(model, (str, Path)):
        model = load(model)
    if not hasattr(model, "sample_batch"):
        raise TypeError(f"cannot generate with a {type(model).__name__}; load a diffusion model or student")
    w = float(w)
    if not np.isfinite(w):
        raise ValueError(f"guidance w must be finite, got {w}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if model.num_classes is None:
            raise ValueError("labels given but the model is unconditional")
        if (labels < 0).any() or (labels > model.num_classes).any():
            raise ValueError(f"labels must lie in [0, {model.num_classes}] ({model.num_classes} = unconditional)")
        n = len(labels)
    elif w != 0:
        raise ValueError("guidance w needs labels")
    if not n or n < 1:
        raise ValueError("give labels, or n >= 1 for unconditional samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    sigma_max = float(model.schedule.sigma(torch.tensor(model.schedule.t_max, dtype=torch.float64)))
    outs = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        gens = sample_generators(seed, start, count)
        x_T = torch.cat([torch.randn((1, *model.image_shape), generator=g) for g in gens]).to(device)
        lab = None if labels is None else labels[start:start + count].to(device)
        out = model.sample_batch(x_T * sigma_max, lab,
                                 w=w, solver=solver, steps=steps, spacing=spacing, generator=gens,
                                 progress=progress, **options)
        outs.append(out.x.float().clamp(-1, 1).cpu())
    return torch.cat(outs)
