"""Pieces shared by the distillation objectives: networks seen as x0-predictors, guidance,
the per-sample DDIM jump, and the w-conditioned copy of a teacher network.

Every distillation objective compares x0 predictions. A *net* is called as
``net(x_t, t, labels[, w])`` and outputs eps, v or x0 (its ``prediction``);
:class:`NetX0` turns it into ``x0_hat(x_t, t, labels, w)`` for a schedule.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import replace

import torch

from ..denoisers import to_x0
from ..losses import PREDICTIONS, _bcast
from ..schedules import NoiseSchedule

__all__ = ["NetX0", "ddim_jump", "with_w_input", "sample_w", "uses_w", "null_labels", "guidance_null_class",
           "teacher_mode", "check_prediction", "TRAINED_PREDICTIONS"]


TRAINED_PREDICTIONS = PREDICTIONS  # output types a trained network can regress (losses.prediction_target)


def check_prediction(prediction: str, what: str = "prediction") -> str:
    """Refuse an output type the distillation objectives cannot train or convert."""
    if prediction not in TRAINED_PREDICTIONS:
        raise ValueError(f"unknown {what} {prediction!r}; choose one of {', '.join(TRAINED_PREDICTIONS)}")
    return prediction


def uses_w(net) -> bool:
    """Whether ``net`` takes a guidance-weight input ``w`` (fewstep nets: config.use_w)."""
    inner = getattr(net, "module", net)
    if hasattr(inner, "use_w"):  # adapters (fewstep.diffusers.DiffusersNet)
        return bool(inner.use_w)
    return bool(getattr(getattr(inner, "config", None), "use_w", False))


class NetX0:
    """``x0_hat(x, t, labels, w)`` from a net of output type ``prediction`` ('eps', 'v', 'x0', 'flow').

    ``w`` is passed to the net only when it has a w input; a net without one ignores it
    (:class:`fewstep.denoisers.ClassifierFreeGuidance` adds guidance around such a net).
    """

    def __init__(self, net, schedule: NoiseSchedule, prediction: str):
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.takes_w = uses_w(net)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels=None, w=None) -> torch.Tensor:
        out = self.net(x, t, labels, w) if self.takes_w else self.net(x, t, labels)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return to_x0(self.prediction, out, x, _bcast(alpha, x), _bcast(sigma, x))


def null_labels(null_class: int):
    """``uncond`` for :class:`fewstep.denoisers.ClassifierFreeGuidance`: every label replaced by the
    null class (the class index the teacher was trained with for "no condition")."""
    if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
        raise ValueError(f"null_class must be the teacher's unconditional class index (an int >= 0), "
                         f"got {null_class!r}")
    return lambda cond: {"labels": torch.full_like(cond["labels"], null_class)}


def guidance_null_class(teacher, null_class: int | None, what: str) -> int:
    """The explicit null class of a guided objective. Without one, the teacher's declared ``null_class``
    attribute is used with a warning saying so (pass null_class= to silence it); neither: an error."""
    if null_class is not None:
        null_labels(null_class)  # validates
        return null_class
    declared = getattr(getattr(teacher, "module", teacher), "null_class", None)
    if declared is None:
        raise ValueError(f"{what} uses classifier-free guidance and needs the teacher's null class: pass null_class=")
    warnings.warn(f"{what}: null_class not given, using the teacher's declared null_class={declared}; "
                  "pass null_class= explicitly", FutureWarning, stacklevel=3)
    return int(declared)


@contextlib.contextmanager
def teacher_mode(teacher):
    """Run a frozen teacher: no autograd graph and eval mode for the call, the caller's module left as
    it was afterwards (its requires_grad flags are never touched, its train/eval flags are restored)."""
    module = teacher if isinstance(teacher, torch.nn.Module) else None
    flags = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def ddim_jump(x: torch.Tensor, x0: torch.Tensor, schedule: NoiseSchedule, t_from: torch.Tensor,
              t_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step, per sample (Song et al. 2021, eq. 12 with eta = 0):
    x_to = alpha_to x0 + sigma_to (x - alpha_from x0) / sigma_from."""
    a_s, s_s = _bcast(schedule.alpha(t_from), x), _bcast(schedule.sigma(t_from), x)
    a_t, s_t = _bcast(schedule.alpha(t_to), x), _bcast(schedule.sigma(t_to), x)
    ratio = (s_t / s_s).to(x.dtype)
    return ratio * x + (a_t - ratio * a_s).to(x.dtype) * x0


def sample_w(batch: int, w_min: float, w_max: float, device) -> torch.Tensor:
    """Guidance weights w ~ U[w_min, w_max], float32 (B,)."""
    return w_min + (w_max - w_min) * torch.rand(batch, device=device)


def with_w_input(net):
    """A copy of a fewstep net (UNet, MLP) with a guidance-weight input whose output equals the
    original's for every w: the w embedding (sinusoidal features of w_scale * w through a
    2-layer MLP, added to the time embedding) has a zero-initialised last layer."""
    if hasattr(net, "with_w_input"):  # adapters bring their own (fewstep.diffusers.DiffusersNet)
        return net.with_w_input()
    cfg = getattr(net, "config", None)
    if cfg is None or not hasattr(cfg, "use_w"):
        raise TypeError(f"{type(net).__name__} is not a fewstep network with a w input option; wrap a diffusers "
                        "UNet in fewstep.diffusers.DiffusersNet")
    if cfg.use_w:
        return copy.deepcopy(net)
    student = type(net)(replace(cfg, use_w=True)).to(next(net.parameters()).device)
    missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("w_embed.") for k in missing):
        raise ValueError(f"cannot copy weights into a w-conditioned net: {unexpected or missing}")
    return student
