"""Exact-answer metrics for 2-D toy distributions (Gaussian mixtures with known modes)."""
from __future__ import annotations

import torch

__all__ = ["mode_stats", "sliced_wasserstein"]


def mode_stats(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, *, min_share: float = 0.2) -> dict:
    """Mode coverage and quality of samples ``x`` (N, D) from a mixture with ``means`` (K, D)
    and isotropic ``stds`` (K,).

    within_3sigma: share of samples within 3 std of their nearest mode.
    coverage: share of modes that receive at least ``min_share`` of the samples a uniform
    split would give them (counting only samples within 3 std).
    """
    x, means = x.double(), means.double()
    stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
    d = torch.cdist(x, means)
    nearest = d.argmin(1)
    close = d.gather(1, nearest[:, None]).squeeze(1) <= 3 * stds[nearest]
    counts = torch.bincount(nearest[close], minlength=len(means)).double()
    expected = len(x) / len(means)
    return {"within_3sigma": float(close.double().mean()),
            "coverage": float((counts >= min_share * expected).double().mean()),
            "counts": counts.long().tolist()}


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size samples (N, D): the root mean
    squared difference of sorted 1-D projections over random directions."""
    if x.shape != y.shape:
        raise ValueError(f"samples must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ dirs).sort(0)
    py, _ = (y.double() @ dirs).sort(0)
    return float((px - py).pow(2).mean().sqrt())
