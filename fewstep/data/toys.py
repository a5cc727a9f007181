"""2-D toy distributions as plain Gaussian-mixture specs (no import of ``gmm``).

Each function returns a dict ``{"means": (K, 2), "stds": (K,), "weights": (K,),
"labels": (K,)}`` of float64 / int64 tensors, so ``GaussianMixture(**spec)`` from
``fewstep.data.gmm`` wraps it with its exact denoiser. ``sample_toy`` draws
points and labels directly; ``toy_sampler`` adapts a spec to the training loop's
``sample(generator, batch_size)`` data protocol.
"""
from __future__ import annotations

import math

import torch

LABELLINGS = ("component", "coarse")


def _spec(means: torch.Tensor, std: float, labels: torch.Tensor) -> dict:
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    k = means.shape[0]
    return {"means": means.to(torch.float64), "stds": torch.full((k,), float(std), dtype=torch.float64),
            "weights": torch.full((k,), 1.0 / k, dtype=torch.float64), "labels": labels.to(torch.int64)}


def _check_labelling(labelling: str) -> None:
    if labelling not in LABELLINGS:
        raise ValueError(f"unknown labelling {labelling!r}; choose one of {', '.join(LABELLINGS)}")


def ring8(radius: float = 2.0, std: float = 0.1, labelling: str = "component") -> dict:
    """8 equal Gaussians at angles 2 pi k / 8 on a circle of ``radius``.

    labelling "component": class k = mode k (8 classes); "coarse": class k mod 2
    (2 classes of 4 modes each, for guidance that must pick among several modes).
    """
    _check_labelling(labelling)
    k = torch.arange(8, dtype=torch.float64)
    angles = 2 * math.pi * k / 8
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.arange(8) if labelling == "component" else torch.arange(8) % 2
    return _spec(means, std, labels)


def grid25(spacing: float = 1.0, std: float = 0.05, labelling: str = "component") -> dict:
    """A 5x5 grid of equal Gaussians centred at the origin, ``spacing`` apart.

    labelling "component": class = mode index (25 classes, row-major from the
    bottom-left); "coarse": class = row index (5 classes of 5 modes each).
    """
    _check_labelling(labelling)
    coords = (torch.arange(5, dtype=torch.float64) - 2) * spacing
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    labels = torch.arange(25) if labelling == "component" else torch.arange(25) // 5
    return _spec(means, std, labels)


TOYS = {"ring8": ring8, "grid25": grid25}


def num_classes(spec: dict) -> int:
    return int(spec["labels"].max()) + 1


def sample_toy(spec: dict, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points (n, 2) and their class labels (n,) from a toy spec."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    comp = torch.multinomial(spec["weights"], n, replacement=True, generator=generator)
    noise = torch.randn(n, spec["means"].shape[1], dtype=torch.float64, generator=generator)
    x = spec["means"][comp] + spec["stds"][comp, None] * noise
    return x.to(dtype), spec["labels"][comp]


def toy_sampler(spec: dict, labelled: bool = True):
    """A ``sample(generator, batch_size)`` callable for :func:`fewstep.train.train`."""
    def sample(generator: torch.Generator, batch_size: int):
        x, y = sample_toy(spec, batch_size, generator)
        return (x, y) if labelled else x
    return sample
