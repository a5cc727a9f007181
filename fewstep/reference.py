"""A high-accuracy probability-flow ODE solve that judges the project's solvers.

Independent of ``fewstep.solvers`` on purpose: classic fourth-order Runge-Kutta on
the data-prediction ODE written in the half log-SNR lambda = log(alpha / sigma).

Derivation (DPM-Solver++, arXiv 2211.01095, eq. 9): the exact solution in
variation-of-constants form is
    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,
so y = x / sigma satisfies
    dy/dlambda = e^lambda * x0_hat(sigma(lambda) * y, t(lambda)),
a plain ODE whose right-hand side has Lipschitz constant alpha^2 Var[x0 | x_t] / sigma^2
(<= 1 for a single Gaussian): no stiff linear term is left for RK4 to fight.

Ending at t = 0 (lambda = +inf) is not an ODE step. The reference for a grid
ending at 0 is "ODE to the schedule's t_min, then one denoiser evaluation
x0_hat(x(t_min), t_min)": exactly what a solver whose grid is
[t_max, ..., t_min, 0] converges to as its steps grow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["reference_solution", "reference_path", "ReferencePath", "rmse"]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all values, in float64: how every sample is judged against
    the reference (the solvers' bench, grid tuning). a and b must have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"rmse compares tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


@dataclass
class ReferencePath:
    """One RK4 solve recorded along the way (``reference_path``); all float64."""
    x: torch.Tensor  # the answer: x(t_to), or x0_hat(x(t_end), t_end) when the solve ends by denoising
    times: torch.Tensor  # (M + 1,) recorded times, t_from first, the ODE's end t_end last
    xs: list  # x at each recorded time
    x0s: list  # the denoiser's x0_hat(x, t) at each (the last is the answer when denoising)


def reference_solution(denoiser, schedule, x_T: torch.Tensor, t_from: float, t_to: float = 0.0, *,
                       steps: int = 64, tol: float | None = None, max_steps: int = 8192,
                       denoise: bool | None = None, cond: dict | None = None):
    """Solve the probability-flow ODE from t_from to t_to and estimate the error.

    Runs RK4 uniform in lambda with ``steps`` and ``2 * steps`` steps and reports
    the max absolute difference of the two answers as the error estimate (for a
    fourth-order method the finer answer's true error is about 1/15 of it). With
    ``tol`` the step count keeps doubling until the estimate is <= tol (error if
    that needs more than ``max_steps``).

    denoiser: ``D(x, t, **cond) -> x0_hat``, called with x in x_T's dtype and t a
        float64 tensor of shape (B,). Pass a float64 x_T for a float64 reference.
    t_from, t_to: floats in (0, t_upper]; t_to may be smaller (sampling) or larger
        (encoding) than t_from. ``t_to = 0`` means "ODE to schedule.t_min, then
        denoise" (see the module docstring).
    denoise: after the ODE, return x0_hat(x(t_to), t_to) instead of x(t_to).
        Default: True exactly when t_to = 0. ``reference_solution(..., t_to=s.t_min,
        denoise=True)`` equals ``t_to=0``.
    cond: keyword arguments passed to every denoiser call (e.g. ``{"labels": y}``).
    Returns (x, estimated_error): x in x_T's dtype and shape, the error a float.
    Costs 12 * steps denoiser calls (without ``tol``).
    """
    _check_steps(steps, tol, max_steps)
    coarse = reference_path(denoiser, schedule, x_T, t_from, t_to, steps=steps, denoise=denoise, cond=cond).x
    while True:
        steps *= 2
        fine = reference_path(denoiser, schedule, x_T, t_from, t_to, steps=steps, denoise=denoise, cond=cond).x
        error = float((fine - coarse).abs().max()) if fine.numel() else 0.0
        if tol is None or error <= tol:
            return fine.to(x_T.dtype), error
        if 2 * steps > max_steps:
            raise RuntimeError(f"reference ODE solve did not converge: estimated error {error:.3g} > tol {tol:.3g} "
                               f"at {steps} RK4 steps; raise max_steps (now {max_steps}) or loosen tol")
        coarse = fine


def reference_path(denoiser, schedule, x_T: torch.Tensor, t_from: float, t_to: float = 0.0, *, steps: int = 64,
                   every: int | None = None, denoise: bool | None = None, cond: dict | None = None) -> ReferencePath:
    """One RK4 solve of ``steps`` steps (arguments as ``reference_solution``), recording
    (t, x, x0_hat) at the start of every ``every``-th step and at the ODE's end t_end (t_min when
    t_to = 0). Recorded times are uniform in lambda. Costs 4 * steps denoiser calls, plus one at
    the end when denoising or recording. The denoiser sees x in x_T's dtype; the state is float64."""
    cond = {} if cond is None else dict(cond)
    t_from, t_end, denoise = _check_ends(schedule, t_from, t_to, denoise)
    _check_steps(steps, None, 2 * steps)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"every must be an integer >= 1 or None, got {every!r}")
    x, recorded = _rk4_in_lambda(denoiser, schedule, x_T.to(torch.float64), t_from, t_end, steps, x_T.dtype, cond,
                                 every)
    x0_end = _call(denoiser, x, t_end, x_T.dtype, cond) if denoise or every else None
    if every:
        recorded.append((t_end, x, x0_end))
    times = torch.tensor([r[0] for r in recorded], dtype=torch.float64)
    return ReferencePath(x0_end if denoise else x, times, [r[1] for r in recorded], [r[2] for r in recorded])


def _check_ends(schedule, t_from, t_to, denoise):
    """Validate the interval; map t_to = 0 to (t_min, denoise=True)."""
    for name, v in (("t_from", t_from), ("t_to", t_to)):
        if isinstance(v, torch.Tensor) and v.numel() != 1:
            raise ValueError(f"{name} must be a single time (a float or 0-d tensor), got shape {tuple(v.shape)}")
    t_from, t_to = float(t_from), float(t_to)
    schedule.check_times(torch.tensor([t_from, t_to], dtype=torch.float64), "t_from/t_to")
    if t_from == 0:
        raise ValueError("t_from must be > 0: the ODE cannot start at t = 0 (lambda = +inf); "
                         "start an encoding at schedule.t_min")
    if t_to == 0:
        if denoise is False:
            raise ValueError("t_to = 0 (lambda = +inf) is reached only by a final denoising step; "
                             "pass denoise=True or None, or a t_to > 0")
        t_to, denoise = schedule.t_min, True
        if not t_to < t_from:
            raise ValueError(f"t_to = 0 means ODE to schedule.t_min = {t_to} then denoise; "
                             f"t_from ({t_from}) must be larger than t_min")
    if t_from == t_to:
        raise ValueError(f"t_from and t_to are equal ({t_from}); nothing to solve")
    return t_from, t_to, bool(denoise)


def _check_steps(steps, tol, max_steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}")
    if 2 * steps > max_steps:
        raise ValueError(f"max_steps ({max_steps}) must be at least 2 * steps ({2 * steps})")


def _call(denoiser, x, t, dtype, cond):
    """x0_hat = D(x, t) in float64, with t broadcast to the batch; refuse NaN/inf."""
    t_vec = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    x0 = denoiser(x.to(dtype), t_vec, **cond)
    if not isinstance(x0, torch.Tensor) or x0.shape != x.shape:
        raise ValueError(f"denoiser must return a tensor of x's shape {tuple(x.shape)}, got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    x0 = x0.to(torch.float64)
    if not torch.isfinite(x0).all():
        raise FloatingPointError(f"denoiser returned NaN or inf at t = {float(t)!r}")
    return x0


def _rk4_in_lambda(denoiser, schedule, x, t_from, t_to, steps, dtype, cond, every=None):
    """Classic RK4 on dy/dlambda = e^lambda x0_hat(sigma y, t(lambda)), y = x / sigma, uniform in lambda.

    Returns x(t_to) in float64, and with ``every`` the list of (t, x, x0_hat(x, t)) at every
    ``every``-th step's start (float64; x0_hat is the step's first stage, so recording is free)."""
    ends = schedule.lambda_(torch.tensor([t_from, t_to], dtype=torch.float64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), 2 * steps + 1, dtype=torch.float64)  # steps and midpoints
    t = schedule.t_of_lambda(lam)
    t[0], t[-1] = t_from, t_to  # exact ends despite round-off in t(lambda)
    sigma = schedule.sigma(t)
    h = float(lam[2] - lam[0])

    def f(i, y):  # (dy/dlambda, x0_hat) at grid point i
        x0 = _call(denoiser, float(sigma[i]) * y, t[i], dtype, cond)
        return math.exp(float(lam[i])) * x0, x0

    y, recorded = x / float(sigma[0]), []
    for n in range(steps):
        i = 2 * n
        k1, x0 = f(i, y)
        if every and n % every == 0:
            recorded.append((float(t[i]), float(sigma[i]) * y, x0))
        k2 = f(i + 1, y + 0.5 * h * k1)[0]
        k3 = f(i + 1, y + 0.5 * h * k2)[0]
        k4 = f(i + 2, y + h * k3)[0]
        y = y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return float(sigma[-1]) * y, recorded
