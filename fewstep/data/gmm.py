"""Gaussian mixtures with their exact denoiser: the test bed with closed-form answers.

Data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` noised as ``x_t = alpha x0 + sigma eps``
has the marginal ``x_t ~ sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``
(another mixture, see ``GaussianMixture.marginal``). The posterior mean
``E[x0 | x_t]`` is the responsibility-weighted sum of the per-component Wiener
estimates ``mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)``:
the ideal denoiser that a perfectly trained model would learn.

All math is float64; inputs of any float dtype are accepted and the denoiser
returns its result in the input's dtype.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture", "single_gaussian_flow"]

# rows x components x dims of float64 handled at once (~32 MB)
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------
# Helpers shared with ``empirical.py``: the denoiser contract's input handling
# ---------------------------------------------------------------------------

def _flatten_batch(x: torch.Tensor, dim: int, what: str = "x") -> torch.Tensor:
    """(B, ...) -> (B, dim) float64, checking that the trailing sizes multiply to ``dim``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor of shape (B, ...), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() < 2 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{what} must have shape (B, {dim}) or (B, ...) with {dim} values per sample; "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], dim).to(torch.float64)


def _batch_times(t, batch: int, schedule) -> torch.Tensor:
    """t as a float64 tensor of shape (batch,): a python float or 0-d / 1-element tensor broadcasts."""
    t = torch.as_tensor(t, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    elif t.numel() != batch:
        raise ValueError(f"t must be a float, a 0-d tensor or have shape ({batch},) to match the batch; "
                         f"got {t.numel()} values")
    return schedule.check_times(t, "t")


def _alpha_sigma(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha(t), sigma(t) with t = 0 pinned to clean data (alpha = 1, sigma = 0) exactly."""
    clean = t == 0
    alpha = torch.where(clean, torch.ones_like(t), schedule.alpha(t))
    sigma = torch.where(clean, torch.zeros_like(t), schedule.sigma(t))
    return alpha, sigma


def _batch_labels(labels, batch: int, known: torch.Tensor | None, owner: str) -> torch.Tensor | None:
    """labels as a long tensor of shape (batch,) or None; every label must be a known class."""
    if labels is None:
        return None
    if known is None:
        raise ValueError(f"labels were given but this {owner} has no class labels; "
                         "build it with labels=... to condition on a class")
    y = torch.as_tensor(labels).flatten()
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    y = y.to(torch.long)
    if y.numel() == 1:
        y = y.expand(batch)
    elif y.numel() != batch:
        raise ValueError(f"labels must be an int or have shape ({batch},) to match the batch; got {y.numel()} values")
    missing = sorted(set(y.unique().tolist()) - set(known.unique().tolist()))
    if missing:
        raise ValueError(f"labels {missing} are not classes of this {owner}; "
                         f"known classes: {sorted(known.unique().tolist())}")
    return y


def _class_mask_logits(y: torch.Tensor | None, member_labels: torch.Tensor | None, batch: int,
                       members: int) -> torch.Tensor:
    """(batch, members) additive mask: 0 where a member belongs to the row's class, -inf elsewhere."""
    if y is None:
        return torch.zeros(batch, members, dtype=torch.float64)
    same = member_labels[None, :] == y[:, None]
    return torch.where(same, 0.0, -math.inf).to(torch.float64)


def _log_normal(resid: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(resid; 0, diag(var)) summed over the last axis."""
    return -0.5 * (resid ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)


# ---------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------

class ExactDenoiser:
    """Mixin: the exact denoiser of a distribution that provides ``dim`` and
    ``posterior_mean(x (B, D) float64, alpha (B,), sigma (B,), labels) -> E[x0 | x_t]``."""

    def denoiser(self, schedule):
        """The exact denoiser ``D(x, t, labels=None) -> E[x0 | x_t = x]`` for this schedule.

        x: (B, D) or (B, ...) with D values per sample, any float dtype; t: float, 0-d
        tensor or (B,) tensor of times (0 = clean data); labels: None (unconditional),
        an int or (B,) ints (condition on the class). Returns x0_hat in x's dtype and shape.
        """
        def exact_denoiser(x: torch.Tensor, t, labels=None) -> torch.Tensor:
            flat = _flatten_batch(x, self.dim)
            alpha, sigma = _alpha_sigma(schedule, _batch_times(t, flat.shape[0], schedule))
            x0 = self.posterior_mean(flat, alpha, sigma, labels)
            return x0.reshape(x.shape).to(x.dtype)

        exact_denoiser.__qualname__ = f"{self!r}.denoiser({schedule!r})"
        return exact_denoiser


class GaussianMixture(ExactDenoiser):
    """``sum_k w_k N(means[k], diag(stds[k]^2))`` in D dimensions, optionally with a class per component.

    means:   (K, D).
    stds:    (K,) isotropic or (K, D) diagonal; all > 0.
    weights: (K,) non-negative, normalised here; uniform if omitted.
    labels:  (K,) integer class of each component; enables class-conditional
             sampling and denoising (``labels=`` arguments).
    """

    def __init__(self, means, stds, weights=None, labels=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1; got {tuple(means.shape)}")
        k, d = means.shape
        self.means = means
        self.stds = _check_stds(stds, k, d)
        self.weights = _check_weights(weights, k)
        self.labels = _check_component_labels(labels, k)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        cls = "" if self.labels is None else f", classes={len(self.labels.unique())}"
        return f"GaussianMixture(K={self.num_components}, D={self.dim}{cls})"

    def _log_weights(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(batch, K) log prior of each component; given the row's class y, log p(k | y) (renormalised)."""
        log_w = torch.log(self.weights)[None, :] + _class_mask_logits(y, self.labels, batch, self.num_components)
        return log_w - torch.logsumexp(log_w, dim=1, keepdim=True)

    # -- sampling ---------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, labels=None):
        """Draw n samples: returns (x (n, D) float32, y (n,) long).

        y is each sample's class when the mixture has labels, else its component index.
        With ``labels`` (an int or (n,) ints) every sample comes from its class's components.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        y = _batch_labels(labels, n, self.labels, "GaussianMixture")
        probs = self._log_weights(y, n).exp()
        comp = torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp] * eps
        out_y = comp if self.labels is None else self.labels[comp]
        return x.to(torch.float32), out_y

    # -- densities --------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """log p(x) of the data distribution (or log p(x | class) with labels), float64 of shape (B,).

        Differentiable in x (autograd), so ``marginal(...).log_prob`` gives the score.
        """
        x = _flatten_batch(x, self.dim)
        y = _batch_labels(labels, x.shape[0], self.labels, "GaussianMixture")
        log_w = self._log_weights(y, x.shape[0])
        log_pk = _log_normal(x[:, None, :] - self.means[None], self.stds[None] ** 2)
        return torch.logsumexp(log_w + log_pk, dim=1)

    def marginal(self, schedule, t: float) -> "GaussianMixture":
        """The distribution of x_t = alpha(t) x0 + sigma(t) eps: N(alpha mu_k, alpha^2 s_k^2 + sigma^2) per component."""
        t = _batch_times(t, 1, schedule)
        alpha, sigma = _alpha_sigma(schedule, t)
        stds = torch.sqrt(alpha ** 2 * self.stds ** 2 + sigma ** 2)
        return GaussianMixture(alpha * self.means, stds, self.weights, self.labels)

    # -- the exact denoiser -------------------------------------------------------
    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       labels=None) -> torch.Tensor:
        """E[x0 | x_t = x] for x (B, D) float64 and per-row alpha, sigma (B,); float64 (B, D)."""
        y = _batch_labels(labels, x.shape[0], self.labels, "GaussianMixture")
        log_w = self._log_weights(y, x.shape[0])
        rows = max(1, _CHUNK_ELEMENTS // (self.num_components * self.dim))
        parts = [self._posterior_mean_rows(x[i:i + rows], alpha[i:i + rows], sigma[i:i + rows], log_w[i:i + rows])
                 for i in range(0, x.shape[0], rows)]
        x0 = torch.cat(parts) if parts else x.clone()
        clean = (sigma == 0)[:, None]
        return torch.where(clean, x / alpha[:, None], x0)  # t = 0: x_t is the data itself

    def _posterior_mean_rows(self, x, alpha, sigma, log_w):
        a = alpha[:, None, None]
        var0 = self.stds[None] ** 2                       # (1, K, D) data variance s_k^2
        var_t = a ** 2 * var0 + sigma[:, None, None] ** 2  # (B, K, D) marginal variance of x_t
        resid = x[:, None, :] - a * self.means[None]      # x_t - alpha mu_k
        resp = torch.softmax(log_w + _log_normal(resid, var_t), dim=1)  # p(k | x_t)
        x0_k = self.means[None] + (a * var0 / var_t) * resid  # Wiener posterior mean per component
        return (resp[:, :, None] * x0_k).sum(1)


def _check_stds(stds, k: int, d: int) -> torch.Tensor:
    stds = torch.as_tensor(stds, dtype=torch.float64)
    if stds.shape == (k,):
        stds = stds[:, None].expand(k, d)
    elif stds.shape != (k, d):
        raise ValueError(f"stds must have shape ({k},) or ({k}, {d}) to match means; got {tuple(stds.shape)}")
    if not (torch.isfinite(stds).all() and (stds > 0).all()):
        raise ValueError("stds must be finite and > 0 (use EmpiricalDistribution for point masses)")
    return stds.contiguous()


def _check_weights(weights, k: int) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) to match means; got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _check_component_labels(labels, k: int) -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    if y.shape != (k,):
        raise ValueError(f"labels must have shape ({k},), one class per component; got {tuple(y.shape)}")
    return y.to(torch.long)


# ---------------------------------------------------------------------------
# Closed-form probability-flow ODE for one Gaussian
# ---------------------------------------------------------------------------

def single_gaussian_flow(mu, std, schedule, x_T: torch.Tensor, t_from, t_to) -> torch.Tensor:
    """Exact probability-flow ODE map from t_from to t_to for data N(mu, diag(std^2)).

    Derivation: with u = x - alpha mu and v = alpha^2 std^2 + sigma^2 (the variance
    of x_t), the PF-ODE dx/dt = (alpha'/alpha) x + (sigma sigma' - (alpha'/alpha) sigma^2) u / v
    gives du/dt = (alpha alpha' std^2 + sigma sigma') u / v = u v' / (2 v), so
    z = (x_t - alpha_t mu) / sqrt(alpha_t^2 std^2 + sigma_t^2) is constant along the ODE.

    mu, std: (D,) or scalars; x_T: (B, D) or (B, ...) with D values per sample;
    t_from, t_to: floats or (B,) tensors in [0, t_upper] (either may be 0).
    Returns x at t_to in x_T's dtype and shape (math in float64).
    """
    mu = torch.as_tensor(mu, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 2:
        raise ValueError("x_T must be a tensor of shape (B, D) or (B, ...)")
    dim = math.prod(x_T.shape[1:])
    if mu.numel() not in (1, dim) or std.numel() not in (1, dim):
        raise ValueError(f"mu and std must be scalars or have {dim} values to match x_T; "
                         f"got {mu.numel()} and {std.numel()}")
    if not (std > 0).all():
        raise ValueError("std must be > 0")
    x = _flatten_batch(x_T, dim, "x_T")
    a_s, s_s = _alpha_sigma(schedule, _batch_times(t_from, x.shape[0], schedule))
    a_t, s_t = _alpha_sigma(schedule, _batch_times(t_to, x.shape[0], schedule))
    a_s, s_s, a_t, s_t = (v[:, None] for v in (a_s, s_s, a_t, s_t))
    z = (x - a_s * mu) / torch.sqrt(a_s ** 2 * std ** 2 + s_s ** 2)  # invariant of the flow
    x_to = a_t * mu + torch.sqrt(a_t ** 2 * std ** 2 + s_t ** 2) * z
    return x_to.reshape(x_T.shape).to(x_T.dtype)
