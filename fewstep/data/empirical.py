"""The uniform distribution on a finite data set and its exact denoiser.

For data uniform on points p_1..p_M and x_t = alpha x0 + sigma eps, the posterior
over points is ``softmax_m(-||x_t - alpha p_m||^2 / (2 sigma^2))`` and
``E[x0 | x_t]`` is the posterior-weighted average of the points: the denoiser
that a perfectly trained (fully memorising) model converges to. At t = 0 it
returns the nearest point.
"""
from __future__ import annotations

import math

import torch

from .gmm import ExactDenoiser, _batch_labels, _class_mask_logits

__all__ = ["EmpiricalDistribution"]


class EmpiricalDistribution(ExactDenoiser):
    """Uniform distribution on ``points`` (M, ...); optional ``labels`` (M,) give each point a class.

    chunk_size: points handled at once by the denoiser, which bounds memory to
    about ``batch * chunk_size`` floats whatever M is.
    """

    def __init__(self, points, labels=None, chunk_size: int = 1024):
        points = torch.as_tensor(points)
        if points.dim() < 2 or points.shape[0] < 1 or not points.is_floating_point():
            raise ValueError(f"points must be a float tensor of shape (M, ...) with M >= 1; "
                             f"got {tuple(points.shape)} of dtype {points.dtype}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.shape = tuple(points.shape[1:])
        self.points = points.reshape(points.shape[0], -1).to(torch.float64).contiguous()
        if not torch.isfinite(self.points).all():
            raise ValueError("points must be finite")
        self.half_sq_norms = 0.5 * (self.points ** 2).sum(1)
        self.labels = _check_point_labels(labels, self.points.shape[0])
        self.chunk_size = chunk_size

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def __len__(self) -> int:
        return self.points.shape[0]

    def __repr__(self) -> str:
        return f"EmpiricalDistribution(M={len(self)}, shape={self.shape})"

    def sample(self, n: int, generator: torch.Generator | None = None, labels=None):
        """n points drawn uniformly (from the given class with ``labels``): (x (n, ...) float32, y (n,) long).

        y is each point's class when the set has labels, else its index.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        y = _batch_labels(labels, n, self.labels, "EmpiricalDistribution")
        probs = _class_mask_logits(y, self.labels, n, len(self)).exp()
        idx = torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
        out_y = idx if self.labels is None else self.labels[idx]
        return self.points[idx].reshape(n, *self.shape).to(torch.float32), out_y

    # -- the exact denoiser -------------------------------------------------------
    def _scores(self, x, alpha, start, stop):
        """alpha x.p_m - alpha^2 ||p_m||^2 / 2 = -||x - alpha p_m||^2 / 2 up to a per-row constant."""
        p = self.points[start:stop]
        return alpha[:, None] * (x @ p.T) - alpha[:, None] ** 2 * self.half_sq_norms[None, start:stop]

    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       labels=None) -> torch.Tensor:
        """E[x0 | x_t = x] for x (B, D) float64 and per-row alpha, sigma (B,); float64 (B, D).

        Streams over chunks of points with an online softmax (running max, sum and
        weighted sum), so memory stays O(B * chunk_size) for any number of points.
        Rows with sigma = 0 get the nearest point (the limit of the softmax).
        """
        y = _batch_labels(labels, x.shape[0], self.labels, "EmpiricalDistribution")
        b = x.shape[0]
        run_max = torch.full((b,), -math.inf, dtype=torch.float64)
        run_sum = torch.zeros(b, dtype=torch.float64)
        run_mean = torch.zeros_like(x)
        best_score = torch.full((b,), -math.inf, dtype=torch.float64)
        best_idx = torch.zeros(b, dtype=torch.long)
        clean = sigma == 0
        inv_var = torch.where(clean, 0.0, 1.0 / sigma.clamp_min(1e-300) ** 2)
        for start in range(0, len(self), self.chunk_size):
            stop = min(start + self.chunk_size, len(self))
            scores = self._scores(x, alpha, start, stop)
            if y is not None:
                scores = scores + _class_mask_logits(y, self.labels[start:stop], b, stop - start)
            chunk_best, chunk_arg = scores.max(1)  # nearest point so far, for sigma = 0
            better = chunk_best > best_score
            best_score = torch.where(better, chunk_best, best_score)
            best_idx = torch.where(better, chunk_arg + start, best_idx)
            logits = scores * inv_var[:, None]  # -||x - alpha p||^2 / (2 sigma^2) + const
            new_max = torch.maximum(run_max, logits.max(1).values)
            rescale = torch.exp(run_max - new_max).nan_to_num(0.0)  # -inf - -inf -> 0
            w = torch.exp(logits - new_max[:, None]).nan_to_num(0.0)
            run_sum = run_sum * rescale + w.sum(1)
            run_mean = run_mean * rescale[:, None] + w @ self.points[start:stop]
            run_max = new_max
        x0 = run_mean / run_sum[:, None]
        return torch.where(clean[:, None], self.points[best_idx], x0)


def _check_point_labels(labels, m: int) -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    if y.shape != (m,):
        raise ValueError(f"labels must have shape ({m},), one class per point; got {tuple(y.shape)}")
    return y.to(torch.long)
