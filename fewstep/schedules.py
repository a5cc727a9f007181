"""Noise schedules and time grids.

A schedule says how data is noised: ``x_t = alpha(t) * x0 + sigma(t) * eps``.
Every schedule exposes ``alpha``, ``sigma``, ``lambda_`` (half log-SNR,
``log(alpha / sigma)``) and its inverse ``t_of_lambda``. Math is done in
float64; callers cast at the edge.

At ``t = 0`` every schedule is clean data (``sigma = 0``, ``lambda = +inf``):
a time grid that ends in 0 asks the sampler for a final denoising step.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "NoiseSchedule", "DiscreteVP", "ZeroSNRDiscreteVP", "LinearVP", "CosineVP", "EDM", "RectifiedFlow",
    "FlowMatching", "betas_by_name", "rescale_zero_terminal_snr", "time_grid", "default_end", "custom_grid",
    "SPACINGS",
]


def _f64(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


def _log_alpha_from_lambda(lam: torch.Tensor) -> torch.Tensor:
    # VP: alpha^2 + sigma^2 = 1  =>  log alpha = -0.5 * log(1 + exp(-2 lambda))
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule:
    """Base class: subclasses define ``log_alpha`` / ``sigma`` and ``t_of_lambda``.

    ``t_min`` / ``t_max`` are the default ends of a sampling grid; ``t = 0``
    (clean data) is always allowed as a final grid point.
    """

    t_min: float
    t_max: float
    kind: str = "base"

    # -- to be provided by subclasses ------------------------------------
    def log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:  # VP default
        la = self.log_alpha(t).clamp(max=0.0)  # round-off can give +1e-20 at t = 0
        return torch.sqrt(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR, log(alpha / sigma); +inf at t = 0."""
        t = _f64(t)
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def edm_sigma(self, t) -> torch.Tensor:
        """sigma / alpha = exp(-lambda): the noise level of x / alpha (EDM's sigma)."""
        return torch.exp(-self.lambda_(t))

    def t_of_edm_sigma(self, s) -> torch.Tensor:
        return self.t_of_lambda(-torch.log(_f64(s)))

    def check_times(self, t, what: str = "t") -> torch.Tensor:
        """Raise if any time lies outside [0, t_upper] (0 means clean data)."""
        t = _f64(t)
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} contains NaN or inf; times must be finite numbers in [0, {self.t_upper}]")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0 or hi > self.t_upper * (1 + 1e-12):
            raise ValueError(
                f"{what} must lie in [0, {self.t_upper}] for {self!r}; got values in [{lo}, {hi}]")
        return t

    @property
    def t_upper(self) -> float:
        """Largest time the schedule is defined at."""
        return self.t_max

    def config(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind" and not isinstance(v, list))
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------
# Discrete-time VP (DDPM / Stable Diffusion style)
# ---------------------------------------------------------------------------

def betas_by_name(name: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                  beta_end: float = 0.02) -> torch.Tensor:
    """The diffusers beta schedules by name: linear, scaled_linear, squaredcos_cap_v2."""
    n = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of linear, scaled_linear, squaredcos_cap_v2")


class DiscreteVP(NoiseSchedule):
    """Discrete-time VP schedule from ``betas`` or ``alphas_cumprod``.

    Step n (0-based) sits at continuous time t_n = (n + 1) / N and log alpha is
    interpolated piecewise-linearly in t (DPM-Solver, arXiv 2206.00927, App. D);
    an extra knot at t = 0 has alpha = 1, sigma = 0 (clean data). The model's
    timestep input for time t is ``(t - 1/N) * N`` (see ``model_timestep``).
    """

    kind = "discrete"

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP needs exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            betas = _f64(betas).flatten()
            if (betas <= 0).any() or (betas >= 1).any():
                raise ValueError("betas must lie strictly between 0 and 1")
            alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        ac = _f64(alphas_cumprod).flatten()
        if ac.numel() < 2 or (ac <= 0).any() or (ac >= 1).any() or (ac[1:] >= ac[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing values in (0, 1) with at least 2 entries")
        self.alphas_cumprod = ac
        self.N = ac.numel()
        # knots: t = 0 (clean) then t_n = (n + 1) / N
        self._t = torch.cat([torch.zeros(1, dtype=torch.float64),
                             torch.arange(1, self.N + 1, dtype=torch.float64) / self.N])
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])
        self.t_min = 1.0 / self.N
        self.t_max = 1.0

    @classmethod
    def from_name(cls, name: str = "linear", num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001, beta_end: float = 0.02) -> "DiscreteVP":
        return cls(betas=betas_by_name(name, num_train_timesteps, beta_start, beta_end))

    def log_alpha(self, t) -> torch.Tensor:
        return _interp(_f64(t), self._t, self._log_alpha)

    def t_of_lambda(self, lam) -> torch.Tensor:
        la = _log_alpha_from_lambda(_f64(lam))
        # log alpha decreases with t: interpolate on the flipped knots
        return _interp(la, self._log_alpha.flip(0), self._t.flip(0))

    def model_timestep(self, t) -> torch.Tensor:
        """Continuous t -> the discrete model's timestep input (may be fractional)."""
        return (_f64(t) - 1.0 / self.N) * self.N

    def config(self) -> dict:
        return {"kind": self.kind, "alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.N})"


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Alg. 1): sqrt(abar) is shifted so its last value is 0 and scaled so its
    first value is unchanged. The last beta becomes 1 (alpha_T = 0: pure noise)."""
    ab = torch.cumprod(1.0 - _f64(betas).flatten(), 0).sqrt()
    first, last = ab[0].clone(), ab[-1].clone()
    ab = (ab - last) * (first / (first - last))
    abar = ab ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


class ZeroSNRDiscreteVP(DiscreteVP):
    """A discrete VP schedule whose last training step is pure noise (alphas_cumprod[-1] = 0).

    Steps 0 .. N-2 behave as in ``DiscreteVP``. On the last interval, where log alpha falls to
    -inf, alpha (not log alpha) is interpolated linearly down to 0 at t = 1. ``t_max`` is the
    last step with finite log-SNR, (N-1)/N, the default top of log-SNR and Karras grids; t = 1
    (``t_upper``) is allowed as a grid's first point, the pure-noise start of zero-SNR models.
    """

    kind = "discrete_zero_snr"

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("ZeroSNRDiscreteVP needs exactly one of betas= or alphas_cumprod=")
        ac = torch.cumprod(1.0 - _f64(betas).flatten(), 0) if betas is not None else _f64(alphas_cumprod).flatten()
        ac = ac.clone()
        if ac.numel() < 3 or abs(float(ac[-1])) > 1e-12:
            raise ValueError("ZeroSNRDiscreteVP needs at least 3 steps and alphas_cumprod[-1] = 0")
        ac[-1] = 0.0
        head = ac[:-1]
        if (head <= 0).any() or (head >= 1).any() or (head[1:] >= head[:-1]).any():
            raise ValueError("alphas_cumprod[:-1] must be strictly decreasing values in (0, 1)")
        self.alphas_cumprod = ac
        self.N = ac.numel()
        self._t = torch.cat([torch.zeros(1, dtype=torch.float64),
                             torch.arange(1, self.N, dtype=torch.float64) / self.N])  # knots up to t_{N-2}
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(head)])
        self._a_last = float(head[-1].sqrt())  # alpha at the last finite knot t = (N-1)/N
        self.t_min = 1.0 / self.N
        self.t_max = (self.N - 1.0) / self.N

    t_upper = 1.0

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        inner = _interp(t.clamp(max=self.t_max), self._t, self._log_alpha)
        # last interval: alpha linear from a_last at t_max to 0 at t = 1
        frac = ((1.0 - t) / (1.0 - self.t_max)).clamp(min=0.0)
        outer = math.log(self._a_last) + torch.log(frac)
        return torch.where(t > self.t_max, outer, inner)

    def t_of_lambda(self, lam) -> torch.Tensor:
        la = _log_alpha_from_lambda(_f64(lam))
        inner = _interp(la, self._log_alpha.flip(0), self._t.flip(0))
        outer = 1.0 - torch.exp(la - math.log(self._a_last)) * (1.0 - self.t_max)
        return torch.where(la < math.log(self._a_last), outer, inner)

    def __repr__(self) -> str:
        return f"ZeroSNRDiscreteVP(N={self.N})"


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation at both ends (xp increasing)."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


# ---------------------------------------------------------------------------
# Continuous VP schedules
# ---------------------------------------------------------------------------

class LinearVP(NoiseSchedule):
    """Continuous linear VP (Song et al. 2021): beta(t) = beta_min + t (beta_max - beta_min)."""

    kind = "linear_vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 < beta_min < beta_max:
            raise ValueError("LinearVP needs 0 < beta_min < beta_max")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_lambda(self, lam) -> torch.Tensor:
        # solve the quadratic log_alpha(t) = la for t >= 0 (DPM-Solver, App. D)
        b0, b1 = self.beta_min, self.beta_max
        tmp = 2.0 * (b1 - b0) * torch.logaddexp(-2.0 * _f64(lam), torch.zeros((), dtype=torch.float64))
        return tmp / (torch.sqrt(b0 ** 2 + tmp) + b0) / (b1 - b0)

    def config(self) -> dict:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min, "t_max": self.t_max}


class CosineVP(NoiseSchedule):
    """Continuous cosine VP (Nichol & Dhariwal 2021): alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    t_max defaults to 0.9946, where log alpha is still well away from its singularity.
    """

    kind = "cosine_vp"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._la0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def log_alpha(self, t) -> torch.Tensor:
        t = _f64(t)
        return torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._la0

    def t_of_lambda(self, lam) -> torch.Tensor:
        la = _log_alpha_from_lambda(_f64(lam))
        t = 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(la + self._la0).clamp(max=1.0)) - self.s
        return t.clamp(min=0.0)  # round-off near lambda = +inf

    def config(self) -> dict:
        return {"kind": self.kind, "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


# ---------------------------------------------------------------------------
# VE / EDM and rectified flow
# ---------------------------------------------------------------------------

class EDM(NoiseSchedule):
    """Variance-exploding / EDM schedule: alpha = 1, sigma = t, t in [0.002, 80] (Karras et al. 2022)."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("EDM needs 0 < sigma_min < sigma_max")
        self.t_min, self.t_max = sigma_min, sigma_max

    def log_alpha(self, t) -> torch.Tensor:
        return torch.zeros_like(_f64(t))

    def sigma(self, t) -> torch.Tensor:
        return _f64(t).clone()

    def t_of_lambda(self, lam) -> torch.Tensor:
        return torch.exp(-_f64(lam))

    def config(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.t_min, "sigma_max": self.t_max}


class RectifiedFlow(NoiseSchedule):
    """Rectified flow: alpha = 1 - t, sigma = t. t_max < 1 keeps lambda finite (alpha(1) = 0)."""

    kind = "rectified_flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999):
        if not 0 < t_min < t_max < 1:
            raise ValueError("RectifiedFlow needs 0 < t_min < t_max < 1 (alpha(1) = 0 has no finite log-SNR)")
        self.t_min, self.t_max = t_min, t_max

    def log_alpha(self, t) -> torch.Tensor:
        return torch.log1p(-_f64(t))

    def sigma(self, t) -> torch.Tensor:
        return _f64(t).clone()

    def t_of_lambda(self, lam) -> torch.Tensor:
        return torch.sigmoid(-_f64(lam))

    def config(self) -> dict:
        return {"kind": self.kind, "t_min": self.t_min, "t_max": self.t_max}


class FlowMatching(RectifiedFlow):
    """Rectified flow as diffusers' flow-matching pipelines (SD3, Flux, ...) sample it: t = sigma,
    x_t = (1 - sigma) x0 + sigma noise, and t = 1 (alpha = 0, pure noise) is allowed as a
    grid's first point (``t_upper`` = 1).

    ``t_min`` / ``t_max`` are the default ends of fewstep's spacings, which need a finite
    log-SNR at both ends; the diffusers scheduler adapter sets them from the source's
    training sigmas and shift.
    """

    kind = "flow_matching"
    t_upper = 1.0

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999):
        super().__init__(t_min, t_max)


_KINDS = {c.kind: c for c in (DiscreteVP, LinearVP, CosineVP, EDM, RectifiedFlow, FlowMatching,
                                     ZeroSNRDiscreteVP)}


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    """Rebuild a schedule from ``schedule.config()``."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; known: {sorted(_KINDS)}")
    if kind == "edm":
        return EDM(cfg["sigma_min"], cfg["sigma_max"])
    if kind == "discrete_zero_snr":
        return ZeroSNRDiscreteVP(alphas_cumprod=cfg["alphas_cumprod"])
    return _KINDS[kind](**cfg)


# ---------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------

SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras")


def time_grid(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr", *,
              t_max: float | None = None, t_min: float | None = None, rho: float = 7.0,
              final: str = "zero") -> torch.Tensor:
    """A decreasing float64 grid of times for ``steps`` solver steps.

    spacing: ``logsnr`` (uniform in lambda), ``time_uniform``, ``time_quadratic``
    (uniform in sqrt(t), DPM-Solver's "time_quadratic"), ``karras`` (uniform in
    edm_sigma^(1/rho), EDM eq. 5).
    final:
      ``"zero"``    – ``steps`` intervals, the last from a real point straight to 0 (clean data), so
                      every step (every model call of a multistep solver) moves the sample, as
                      diffusers' ``final_sigmas_type="zero"``. The ``steps`` real points run from
                      t_max to ``t_min`` when ``t_min`` is given; otherwise the spacing's last point
                      is ``default_end`` (the point 0 takes the place of the schedule's t_min, see there).
      ``"tmin"``    – ``steps + 1`` points span [t_max, t_min]; sampling stops at t_min.
      ``"denoise"`` – as "tmin", then 0 appended (official DPM-Solver's denoise_to_zero):
                      one extra step and model call. ``time_grid(s, n - 1, final="denoise")`` is the
                      former ``final="zero"`` grid of n calls, whose last call stepped from t_min to 0.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if final not in ("zero", "tmin", "denoise"):
        raise ValueError(f"final must be 'zero', 'tmin' or 'denoise', got {final!r}")
    t_hi = schedule.t_max if t_max is None else float(t_max)
    t_lo = schedule.t_min if t_min is None else float(t_min)
    schedule.check_times(torch.tensor([t_lo, t_hi], dtype=torch.float64), "t_min/t_max")
    if t_lo <= 0:
        raise ValueError("t_min must be > 0; use final='zero' to end the grid at clean data (t = 0)")
    if not t_lo < t_hi:
        raise ValueError(f"t_min ({t_lo}) must be smaller than t_max ({t_hi})")
    if final == "zero" and t_min is None:
        return _check_decreasing(_zero_grid(schedule, steps, spacing, t_hi, rho))
    n = steps + 1 if final != "zero" else steps
    if n == 1:  # a single step straight to clean data
        t = torch.tensor([t_hi], dtype=torch.float64)
    else:
        u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        t = _spaced(schedule, spacing, t_hi, t_lo, u, rho)
        t[0], t[-1] = t_hi, t_lo  # exact ends despite round-off in t(lambda)
    if final in ("zero", "denoise"):
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return _check_decreasing(t)


# The default grid ending in 0 (``final="zero"`` without t_min), chosen by a scan on three exact models of
# different character (``python benchmarks/bench_default_grid.py``; gmm-mnist: linear betas, eps, guided;
# gmm-sd-v: scaled-linear, v; gmm-cosine: cosine betas, eps; BENCHMARKS.md) and checked by ``fewstep bench
# solvers`` on each. The log-SNR grid is uniform in lambda between two ends:
#   top: EDM sigma TOP_SIGMA at most (data of unit scale: above it x is E[x0] plus noise and the ODE is nearly
#        linear; a cosine schedule's sigma_max is 2e4). The top point itself is replaced by t_max.
#   end: the lower (in sigma) of (a) where the log-SNR grid from the top with steps of at most MAX_H stops, and
#        (b) where the schedule's own uniform-time grid of K steps stops, t_min + (t_max - t_min) / K (diffusers'
#        default's last point). (a) keeps few-call grids from one long final jump on a linear schedule; (b) makes
#        the final jump to 0 never longer than the schedule's own grid's: a cosine schedule puts its end at a
#        lower sigma (0.43 at 4 calls against 0.96 for linear betas), and so does this grid now.
# Scanned (RMSE ratio to diffusers' default at 4-20 calls): TOP_SIGMA 10, 15, 20, 25, 30 with and without (b);
# MAX_H 0.8, 1, 1.2; the schedule's uniform-time grid; geometric blends of the two. Without (b), cosine lost at
# 4-5 calls (2.4x, 1.45x); TOP_SIGMA 15 or less loses the guided gmm-mnist's 0.5x at 10 calls, 25-30 lose on
# cosine at 4 calls (1.02-1.07x) and 20 calls (1.04-1.27x, 1024 samples).
# The cap costs the first step's accuracy (one long step from t_max to the top, whatever the budget): with
# uniform steps of FULL_RANGE_H or less over the whole range (~100 steps or more on linear and cosine betas)
# the grid runs uniformly from t_max instead, so that many-step grids converge.
TOP_SIGMA = 20.0
MAX_H = 1.0
FULL_RANGE_H = 0.1


def default_end(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr", t_max: float | None = None,
                rho: float = 7.0) -> float:
    """The last real time of the default grid of ``steps`` intervals ending in 0 (``time_grid(final="zero")``).

    Every spacing: ``steps + 1`` points from t_max to the schedule's t_min, the last replaced by 0 (so
    no call is spent between t_min and 0). ``logsnr`` instead runs from a top at EDM sigma ``TOP_SIGMA`` to
    an end no later than the log-SNR grid with steps of ``MAX_H`` and no earlier than the schedule's own
    uniform-time grid of ``steps`` steps (see above).
    """
    return float(_zero_grid(schedule, steps, spacing, schedule.t_max if t_max is None else float(t_max), rho)[-2])


def _zero_grid(schedule, steps, spacing, t_hi, rho) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.float64)
    if steps == 1:
        return torch.cat([torch.tensor([t_hi], dtype=torch.float64), zero])
    if spacing != "logsnr":
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)[:-1]
        t = _spaced(schedule, spacing, t_hi, schedule.t_min, u, rho)
        t[0] = t_hi
        return torch.cat([t, zero])
    t_lo = schedule.t_min
    lam_hi, lam_lo, lam_uniform_t = schedule.lambda_(
        torch.tensor([t_hi, t_lo, t_lo + (t_hi - t_lo) / steps], dtype=torch.float64)).tolist()
    capped = lam_lo > -math.log(TOP_SIGMA) and (lam_lo - lam_hi) / steps > FULL_RANGE_H
    lam_a = max(lam_hi, -math.log(TOP_SIGMA)) if capped else lam_hi
    lam_end = lam_a + (steps - 1) * min((lam_lo - lam_a) / steps, MAX_H)  # (a): steps of at most MAX_H
    lam_end = max(lam_end, min(lam_uniform_t, lam_lo))  # (b): no higher than the uniform-time grid's end
    lam = lam_a + (lam_end - lam_a) / (steps - 1) * torch.arange(steps, dtype=torch.float64)
    t = schedule.t_of_lambda(lam)
    t[0] = t_hi  # the first step starts at t_max (a longer first step when the top is capped)
    return torch.cat([t, zero])


def _spaced(schedule, spacing, t_hi, t_lo, u, rho):
    if spacing == "time_uniform":
        return t_hi + u * (t_lo - t_hi)
    if spacing == "time_quadratic":
        return (t_hi ** 0.5 + u * (t_lo ** 0.5 - t_hi ** 0.5)) ** 2
    ends = torch.tensor([t_hi, t_lo], dtype=torch.float64)
    if spacing == "logsnr":
        lam = schedule.lambda_(ends)
        return schedule.t_of_lambda(lam[0] + u * (lam[1] - lam[0]))
    s = schedule.edm_sigma(ends) ** (1.0 / rho)  # karras
    return schedule.t_of_edm_sigma((s[0] + u * (s[1] - s[0])) ** rho)


def custom_grid(schedule: NoiseSchedule, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate a user grid: strictly decreasing times inside the schedule (0 allowed last)."""
    t = schedule.check_times(_f64(times).flatten(), "grid")
    return _check_decreasing(t)


def _check_decreasing(t: torch.Tensor) -> torch.Tensor:
    if t.numel() < 2:
        raise ValueError("a time grid needs at least two points (one step)")
    if not (t[1:] < t[:-1]).all():
        bad = int(torch.nonzero(t[1:] >= t[:-1])[0]) + 1
        raise ValueError(f"time grid must be strictly decreasing with no repeated time; "
                         f"t[{bad - 1}]={float(t[bad - 1])!r} then t[{bad}]={float(t[bad])!r}")
    if (t[:-1] == 0).any():
        raise ValueError("t = 0 (clean data) may only be the last grid point")
    return t
