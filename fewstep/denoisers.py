"""Adapters that turn any model into the one contract ``D(x, t, **cond) -> x0_hat``.

``t`` is a float64 tensor of shape (B,) (a python float or 0-d tensor is
broadcast). Solvers only ever see a denoiser; prediction types, discrete
timesteps, learned variance and guidance live here, at the boundary.

Guidance convention (one for the whole project):
    x_w = (1 + w) * x_cond - w * x_uncond
w = 0 is the plain conditional model; diffusers' ``guidance_scale`` s = 1 + w.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Mapping

import torch

from .schedules import DiscreteVP, NoiseSchedule

__all__ = [
    "PREDICTIONS", "as_batch_times", "to_x0", "ModelDenoiser",
    "ClassifierFreeGuidance", "ClassifierGuidance", "dynamic_threshold", "Thresholded",
    "CountingDenoiser", "MemoDenoiser",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def as_batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time (float, 0-d or (B,) tensor) to a float64 (B,) tensor on x's device."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def to_x0(prediction: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
          sigma: torch.Tensor) -> torch.Tensor:
    """Convert a model output of type ``prediction`` to x0_hat, for x = alpha x0 + sigma eps.

    eps:   x0 = (x - sigma eps) / alpha
    x0:    identity
    v:     v = alpha eps - sigma x0 (Salimans & Ho 2022)  =>  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
    score: score = -eps / sigma                           =>  x0 = (x + sigma^2 score) / alpha
    flow:  u = eps - x0 (rectified-flow velocity)          =>  x0 = (x - sigma u) / (alpha + sigma)

    Each is x0 = a x + b out with per-sample a, b computed in float64; the combination runs
    in x's dtype (at least float32), so large tensors are not copied to float64.
    """
    if prediction == "x0":
        return out.to(x.dtype)
    a64, s64 = alpha.to(torch.float64), sigma.to(torch.float64)
    if prediction == "eps":
        ca, cb = 1.0 / a64, -s64 / a64
    elif prediction == "v":
        n = a64 * a64 + s64 * s64
        ca, cb = a64 / n, -s64 / n
    elif prediction == "score":
        ca, cb = 1.0 / a64, s64 * s64 / a64
    elif prediction == "flow":
        ca, cb = 1.0 / (a64 + s64), -s64 / (a64 + s64)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    ca, cb = _bcast(ca, x).to(dtype), _bcast(cb, x).to(dtype)
    return (x.to(dtype) * ca + out.to(dtype) * cb).to(x.dtype)


class ModelDenoiser:
    """Wrap ``model(x, time_input, **cond) -> output`` as a denoiser.

    prediction: what the model predicts (``eps``, ``x0``, ``v``, ``score``, ``flow``).
    time_input: how t reaches the model: ``"continuous"`` (t as is),
      ``"discrete"`` (a DiscreteVP's timestep index ``(t - 1/N) * N``, fractional
      between steps), ``"edm_sigma"`` (sigma / alpha), or a callable t -> input.
    learned_variance: the model returns 2C channels (mean, variance); keep the first C.
    model_dtype: dtype the model runs in (e.g. torch.float16 on a GPU); None = x's dtype.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction: str = "eps",
                 time_input: str | Callable = "continuous", learned_variance: bool = False,
                 model_dtype: torch.dtype | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if time_input == "discrete" and not isinstance(schedule, DiscreteVP):
            raise ValueError("time_input='discrete' needs a DiscreteVP schedule")
        if isinstance(time_input, str) and time_input not in ("continuous", "discrete", "edm_sigma"):
            raise ValueError(f"unknown time_input {time_input!r}; use continuous, discrete, edm_sigma or a callable")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.time_input, self.learned_variance, self.model_dtype = time_input, learned_variance, model_dtype

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        if callable(self.time_input):
            return self.time_input(t)
        if self.time_input == "discrete":
            return self.schedule.model_timestep(t)
        if self.time_input == "edm_sigma":
            return self.schedule.edm_sigma(t)
        return t

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = as_batch_times(t, x)
        dtype = self.model_dtype or x.dtype
        out = self.model(x.to(dtype), self.model_time(t).to(dtype), **cond)
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match the input {tuple(x.shape)}; "
                             "if the model also predicts a variance, pass learned_variance=True")
        return to_x0(self.prediction, out, x, self.schedule.alpha(t), self.schedule.sigma(t))


def _cat_cond(cond: Mapping, uncond: Mapping) -> dict:
    """Stack conditional and unconditional inputs along the batch (nested dicts too)."""
    both = {}
    for k in set(cond) | set(uncond):
        if k not in cond or k not in uncond:
            raise ValueError(f"conditioning {k!r} must be given for both the conditional and unconditional call")
        c, u = cond[k], uncond[k]
        if isinstance(c, torch.Tensor):
            both[k] = torch.cat([c, u])
        elif isinstance(c, Mapping):
            both[k] = _cat_cond(c, u)
        else:
            both[k] = c
    return both


class ClassifierFreeGuidance:
    """Classifier-free guidance in one batched call: x_w = (1 + w) x_cond - w x_uncond.

    ``uncond`` maps each conditioning keyword to its unconditional value with
    the batch dimension (e.g. the null class, empty-prompt embeddings), or is a
    callable ``cond -> uncond``. w = 0 skips the unconditional half (1 call). ``w`` may also
    be a (B,) tensor: one weight per sample.
    Guidance is applied to x0_hat, which equals applying it to eps at the same x.
    """

    def __init__(self, denoiser: Callable, w: float | torch.Tensor, uncond: Mapping | Callable):
        if isinstance(w, torch.Tensor) and w.ndim == 1:  # one weight per sample (B,), e.g. guided distillation
            if not torch.isfinite(w).all():
                raise ValueError("guidance weights w must be finite")
        else:
            w = float(w)
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"guidance weight w must be finite, got {w}")
        self.denoiser, self.w, self.uncond = denoiser, w, uncond

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        if not isinstance(self.w, torch.Tensor) and self.w == 0:
            return self.denoiser(x, t, **cond)
        uncond = self.uncond(cond) if callable(self.uncond) else self.uncond
        t = as_batch_times(t, x)
        x0 = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), **_cat_cond(cond, uncond))
        x0_c, x0_u = x0.chunk(2)
        w = _bcast(self.w.to(x0_c.device, x0_c.dtype), x0_c) if isinstance(self.w, torch.Tensor) else self.w
        return x0_c + w * (x0_c - x0_u)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021): eps_hat <- eps_hat - scale * sigma * grad log p(y | x_t).

    In the x0 form: x0_hat <- x0_hat + scale * sigma^2 / alpha * grad log p(y | x_t).
    ``classifier(x, t, **cond) -> logits`` is a noisy classifier; the label is ``cond[label_key]``.
    """

    def __init__(self, denoiser: Callable, classifier: Callable, schedule: NoiseSchedule,
                 scale: float = 1.0, label_key: str = "labels"):
        self.denoiser, self.classifier, self.schedule = denoiser, classifier, schedule
        self.scale, self.label_key = float(scale), label_key

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = as_batch_times(t, x)
        x0 = self.denoiser(x, t, **cond)
        y = cond[self.label_key]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t, **cond).float(), -1)
            grad, = torch.autograd.grad(logp.gather(1, y.view(-1, 1)).sum(), xg)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        return x0 + (self.scale * _bcast(s * s / a, x)).to(x.dtype) * grad


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float | None = None) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, Sec. 2.3; DPM-Solver++ Sec. 5), per sample.

    s = quantile(|x0|, ratio), clamped to [1, max_value]; x0 <- clamp(x0, -s, s) / s.
    (diffusers' thresholding with sample_max_value = max_value.) The quantile runs in
    float32: torch.quantile has no half-precision kernel.
    """
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp_min(1.0)
    if max_value is not None:
        s = s.clamp_max(max(float(max_value), 1.0))
    s = _bcast(s, x0)
    return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(x0.dtype)


class Thresholded:
    """A denoiser whose x0_hat is corrected by dynamic thresholding."""

    def __init__(self, denoiser: Callable, ratio: float = 0.995, max_value: float | None = None):
        self.denoiser, self.ratio, self.max_value = denoiser, ratio, max_value

    def __call__(self, x, t, **cond):
        return dynamic_threshold(self.denoiser(x, t, **cond), self.ratio, self.max_value)


class CountingDenoiser:
    """Counts model evaluations (NFE, one per call whatever the batch) and rejects bad outputs.

    Each output's shape is checked, and a strided probe of at most ~512 of its values is
    checked for NaN/inf, which names the failing call at little cost per step; samplers
    check their final sample in full (``SamplerOutput``), so no NaN image gets out.
    """

    def __init__(self, denoiser: Callable):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x, t, **cond):
        self.nfe += 1
        out = self.denoiser(x, t, **cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {got} for an input of shape {tuple(x.shape)}; "
                             "it must return x0_hat with the input's shape")
        flat = out.reshape(-1)
        if not torch.isfinite(flat[:: max(1, flat.numel() // 512)]).all():
            raise FloatingPointError(
                f"the model returned NaN or inf at model call {self.nfe} (t = {float(torch.as_tensor(t).flatten()[0]):.6g}); "
                "check the model, its prediction type and dtype (float16 overflow?)")
        return out


class MemoDenoiser:
    """Remembers the outputs of the last ``size`` calls by their exact inputs (x, t and the conditions, bit for
    bit) and answers a repeated call with a copy instead of calling the model again.

    Fitting a solver reruns the sampler from the same noises with small changes: every run's first call (the
    noise at t_max) repeats, and in a forward-difference Jacobian every call before the step whose parameter
    moved repeats too. ``hits`` counts the calls answered from memory."""

    def __init__(self, denoiser: Callable, size: int = 64):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.denoiser, self.size, self.hits, self._memory = denoiser, size, 0, OrderedDict()

    def __call__(self, x, t, **cond):
        key = _fingerprint(x, t, cond)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key].clone()
        out = self.denoiser(x, t, **cond)
        self._memory[key] = out.detach().clone()
        if len(self._memory) > self.size:
            self._memory.popitem(last=False)
        return out


def _fingerprint(*values) -> bytes:
    """A digest of tensors (dtype, shape, device and bytes), numbers, strings and nested dicts / sequences."""
    h = hashlib.blake2b(digest_size=20)

    def feed(v):
        if isinstance(v, torch.Tensor):
            v = v.detach()
            h.update(f"T{v.dtype}{tuple(v.shape)}{v.device}".encode())
            h.update(v.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):
            h.update(b"D")
            for k in sorted(v, key=str):
                feed(str(k))
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        else:
            h.update(f"V{type(v).__name__}:{v!r}".encode())
    for value in values:
        feed(value)
    return h.digest()
