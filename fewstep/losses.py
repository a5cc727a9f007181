"""Training objectives: ``objective(model, batch) -> per-sample loss`` (the loop takes the mean).

A batch is ``x0`` alone, ``(x0, labels)`` or a dict with keys ``"x"`` and optionally ``"labels"``.
"""
from __future__ import annotations

import torch

from .schedules import DiscreteVP, NoiseSchedule

PREDICTIONS = ("eps", "v", "x0", "flow")
T_SAMPLERS = ("uniform",)


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x0`` / ``(x0, labels)`` / ``{"x": ..., "labels": ...}`` -> (x0, labels or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "x" not in batch:
            raise ValueError(f"a dict batch needs an 'x' entry; got keys {sorted(batch)}")
        return batch["x"], batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise ValueError("a batch must be a tensor x0, a pair (x0, labels) or a dict with 'x' (and 'labels')")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 coefficient -> broadcastable against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def prediction_target(prediction: str, x0, eps, alpha, sigma) -> torch.Tensor:
    """The regression target: eps, x0, v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4) or the
    rectified-flow velocity u = eps - x0 (Liu et al. 2022; fewstep.denoisers.to_x0's 'flow')."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def sample_times(schedule: NoiseSchedule, batch: int, device, t_min: float, t_max: float) -> torch.Tensor:
    """Training times, float64 (B,): U(t_min, t_max) for continuous schedules; for a
    :class:`DiscreteVP`, t = (n + 1) / N with n ~ U{0..N-1} (its N training knots)."""
    if isinstance(schedule, DiscreteVP):
        n = torch.randint(0, schedule.N, (batch,), device=device)
        return (n + 1).to(torch.float64) / schedule.N
    u = torch.rand(batch, dtype=torch.float64, device=device)
    return t_min + u * (t_max - t_min)


def noised(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    """(x_t, alpha, sigma) with x_t = alpha(t) x0 + sigma(t) eps; alpha, sigma broadcast against x0."""
    alpha, sigma = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    return alpha * x0 + sigma * eps, alpha, sigma


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) = max(alpha^2 / sigma^2, 1) (Salimans & Ho 2022, Sec. 4 "truncated SNR" weighting), (B,)."""
    a, s = alpha.flatten(), sigma.flatten()
    if a.numel() != s.numel():
        raise ValueError("alpha and sigma must have one value per sample")
    return (a.float() ** 2 / (s.float() ** 2).clamp_min(1e-20)).clamp_min(1.0)


def drop_labels(labels: torch.Tensor, null_class: int, p: float) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability p (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def null_class_of(net, given: int | None = None) -> int:
    """The null (unconditional) class index: ``given``, else the net's (or a DDP-wrapped net's) attribute."""
    null = given if given is not None else getattr(net, "null_class", None)
    if null is None:  # e.g. a DDP-wrapped net: look one level down
        null = getattr(getattr(net, "module", None), "null_class", None)
    if null is None:
        raise ValueError("labelled batch but no null class: pass null_class= or use a net with .null_class")
    return null


class DenoisingLoss:
    """Diffusion training loss: noise x0 to x_t = alpha x0 + sigma eps, regress the chosen target.

    Continuous schedules: t ~ U(t_min, t_max) per sample (the schedule's own range
    unless ``t_min`` / ``t_max`` are given). A :class:`DiscreteVP` schedule trains in
    discrete time: n ~ U{0..N-1} and t = (n + 1) / N (the schedule's knot for step n),
    so the net sees exactly the N training times.

    The net is called as ``net(x_t, t, labels)`` with t float64 (B,). Labels (if the
    batch has them) are replaced by the null class with probability ``label_dropout``;
    the null class index is ``null_class`` or else the net's ``null_class`` attribute.
    Returns the per-sample mean squared error (B,).
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", label_dropout: float = 0.1,
                 t_sampler: str = "uniform", t_min: float | None = None, t_max: float | None = None,
                 null_class: int | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if t_sampler not in T_SAMPLERS:
            raise ValueError(f"unknown t_sampler {t_sampler!r}; choose one of {', '.join(T_SAMPLERS)}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.schedule, self.prediction, self.label_dropout = schedule, prediction, label_dropout
        self.t_sampler, self.null_class = t_sampler, null_class
        self.discrete = isinstance(schedule, DiscreteVP)
        self.t_min = schedule.t_min if t_min is None else float(t_min)
        self.t_max = schedule.t_max if t_max is None else float(t_max)
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def sample_t(self, batch: int, device) -> torch.Tensor:
        """Training times, float64 (B,)."""
        return sample_times(self.schedule, batch, device, self.t_min, self.t_max)

    def __call__(self, net, batch) -> torch.Tensor:
        x0, labels = unpack_batch(batch)
        t = self.sample_t(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        x_t, alpha, sigma = noised(self.schedule, x0, t, eps)
        if labels is not None:
            labels = drop_labels(labels, null_class_of(net, self.null_class), self.label_dropout)
        out = net(x_t, t, labels)
        target = prediction_target(self.prediction, x0, eps, alpha, sigma)
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)
