"""Which model a diffusers scheduler config describes: its family, read key by key.

A scheduler config mixes two kinds of keys. Keys about the *model* (how it was trained: betas,
prediction type, zero terminal SNR, flow shift, EDM's sigma_data, ...) are honoured or the
config is refused with an error naming the key. Keys about the *source's sampler* (solver
order, algorithm, clipping, its sigma grid) are replaced by fewstep's solver and spacing; they
are listed once in a debug message. Three families are known:

* ``flow``: flow matching (SD3, Flux, Sana, Wan, CogView4, Lumina, HunyuanVideo, LTX):
  x_t = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0 and takes the timestep
  sigma * num_train_timesteps (a float). The shift is a translation in log-SNR:
  sigma' / (1 - sigma') = shift * sigma / (1 - sigma).
* ``vp``: discrete-time VP (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, LCM, TCD, ...): betas,
  prediction type, ``rescale_betas_zero_snr``, CogVideoX's ``snr_shift_scale``.
* ``edm``: EDM (EDMEulerScheduler, EDMDPMSolverMultistepScheduler): alpha = 1, sigma in
  [sigma_min, sigma_max] with Karras et al.'s preconditioning (c_in, c_noise, c_skip, c_out).

Each family is one object (:class:`VPFamily`, :class:`FlowFamily`, :class:`EDMFamily`, from
:func:`family_of`): fewstep's time t <-> the model's timestep, the model input scaling, the model
output -> x0, alpha / sigma at model timesteps, the initial noise and the grid ends. FewstepScheduler,
DiffusersDenoiser and DiffusersNet all ask it; :data:`PREDICTION_OF` is the one map from diffusers'
prediction types to fewstep's names.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import numpy as np
import torch

from ..denoisers import to_x0
from ..schedules import (EDM, DiscreteVP, FlowMatching, NoiseSchedule, ZeroSNRDiscreteVP, betas_by_name,
                         rescale_zero_terminal_snr)

__all__ = ["FAMILIES", "FLOW_CLASSES", "VP_CLASSES", "EDM_CLASSES", "detect_family", "translate_config",
           "build_schedule", "PREDICTION_OF", "Family", "VPFamily", "FlowFamily", "EDMFamily", "family_of",
           "flow_shift_sigmas", "flow_source_sigmas", "vp_source_timesteps", "edm_source_sigmas"]

logger = logging.getLogger("fewstep.diffusers")

FAMILIES = ("vp", "flow", "edm")
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# VP classes whose flow mode (use_flow_sigmas / flow_prediction) is a flow-matching model
FLOW_CAPABLE = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                "DEISMultistepScheduler", "SASolverScheduler", "DPMSolverMultistepInverseScheduler")
VP_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
              "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverSDEScheduler",
              "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
              "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", "DDIMInverseScheduler") + FLOW_CAPABLE
EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
SELF = "FewstepScheduler"

# the source's own timestep recipe for spacing="source" (diffusers differs between classes)
_VP_RECIPE = {"DPMSolverMultistepScheduler": "multistep", "DPMSolverSinglestepScheduler": "multistep",
              "UniPCMultistepScheduler": "multistep", "DEISMultistepScheduler": "multistep",
              "SASolverScheduler": "multistep", "CogVideoXDPMScheduler": "ddim",
              "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler",
              "HeunDiscreteScheduler": "euler", "KDPM2DiscreteScheduler": "euler",
              "KDPM2AncestralDiscreteScheduler": "euler", "LMSDiscreteScheduler": "euler",
              "DPMSolverSDEScheduler": "euler"}
_FLOW_RECIPE = {"FlowMatchEulerDiscreteScheduler": "flow_match", "FlowMatchHeunDiscreteScheduler": "flow_match",
                "UniPCMultistepScheduler": "unipc"}  # other flow-capable classes: "dpmsolver"

# FewstepScheduler config keys each family reads from a source config (source key -> our key)
_COMMON = {"num_train_timesteps": "num_train_timesteps", "prediction_type": "prediction_type",
           "thresholding": "thresholding", "dynamic_thresholding_ratio": "dynamic_thresholding_ratio",
           "sample_max_value": "sample_max_value"}
_VP_KEYS = {**_COMMON, "beta_start": "beta_start", "beta_end": "beta_end", "beta_schedule": "beta_schedule",
            "trained_betas": "trained_betas", "rescale_betas_zero_snr": "rescale_betas_zero_snr",
            "snr_shift_scale": "snr_shift_scale", "timestep_spacing": "timestep_spacing",
            "steps_offset": "steps_offset", "variance_type": None}
_FLOW_KEYS = {**_COMMON, "shift": "shift", "flow_shift": "shift", "use_dynamic_shifting": "use_dynamic_shifting",
              "base_shift": "base_shift", "max_shift": "max_shift", "base_image_seq_len": "base_image_seq_len",
              "max_image_seq_len": "max_image_seq_len", "time_shift_type": "time_shift_type",
              "shift_terminal": "shift_terminal"}
_EDM_KEYS = {**_COMMON, "sigma_min": "sigma_min", "sigma_max": "sigma_max", "sigma_data": "sigma_data",
             "rho": "rho", "sigma_schedule": "sigma_schedule"}
# source keys that change the *grid* only: honoured by spacing="source", else replaced by fewstep's spacing
_GRID_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
# the source keys that would change the math and that fewstep cannot honour: key -> (bad value test, why)
_REFUSE_FLOW = {
    "invert_sigmas": (bool, "inverted sigmas (Mochi) are not supported"),
    "stochastic_sampling": (bool, "stochastic flow sampling re-noises every step; fewstep's flow solvers are ODE "
                                  "solvers (use solver='sde_dpmpp_2m' for a stochastic sampler)"),
}
_OURS = ("solver", "spacing", "final", "lower_order_final", "solver_options", "family", "source_grid")


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


_SIGNATURES: dict | None = None


def _signatures() -> dict:
    """{class name: set of its __init__ keys} for diffusers' schedulers (a config in memory,
    ``pipe.scheduler.config``, holds exactly those keys but not the class name)."""
    global _SIGNATURES
    if _SIGNATURES is None:
        import inspect

        import diffusers.schedulers as ds
        sigs = {}
        for name in dict.fromkeys(FLOW_CLASSES + EDM_CLASSES + VP_CLASSES + tuple(
                n for n in dir(ds) if n.endswith("Scheduler"))):
            try:
                cls = getattr(ds, name)
                sigs[name] = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            except Exception:  # optional dependencies (scipy, torchsde, flax) missing
                continue
        _SIGNATURES = sigs
    return _SIGNATURES


def source_class(config: Mapping) -> str | None:
    """The scheduler class a config comes from: its ``_class_name``, else the diffusers scheduler
    whose __init__ keys are exactly the config's (or, for configs from other diffusers versions,
    contain them with the fewest extra keys); None if no class fits."""
    name = config.get("_class_name")
    if name:
        return name
    keys = {k for k in config if not k.startswith("_")}
    if "solver" in keys:  # a FewstepScheduler config
        return SELF
    sigs = _signatures()
    exact = [n for n, p in sigs.items() if p == keys]
    if exact:
        return exact[0]
    fits = sorted((len(p - keys), n) for n, p in sigs.items() if keys <= p and len(keys) >= 2)
    return fits[0][1] if fits else None


def detect_family(config: Mapping) -> str:
    """'vp', 'flow' or 'edm' for a diffusers scheduler config; raises for an unknown class."""
    name = source_class(config)
    if name is None and not config.get("_class_name"):  # a partial dict of keys: read them as they are
        keys = set(config)
        name = SELF
        config = {"family": "edm" if "sigma_data" in keys else "flow" if keys & {"shift", "flow_shift",
                  "use_flow_sigmas", "use_dynamic_shifting"} else "vp", **config}
    if name == SELF:
        fam = config.get("family") or "vp"
        if fam not in FAMILIES:
            raise ValueError(f"family {fam!r} is not one of {', '.join(FAMILIES)}")
        return fam
    if name in FLOW_CLASSES:
        return "flow"
    if name in EDM_CLASSES:
        return "edm"
    if name in VP_CLASSES:  # only the multistep solvers have a flow mode; others refuse flow_prediction later
        flow = bool(config.get("use_flow_sigmas")) or config.get("prediction_type") == "flow_prediction"
        return "flow" if flow and name in FLOW_CAPABLE else "vp"
    what = name or f"scheduler with keys {sorted(k for k in config if not k.startswith('_'))}"
    raise ValueError(f"FewstepScheduler cannot read a {what} config: it knows flow matching "
                     f"({', '.join(FLOW_CLASSES)}, or DPMSolverMultistep/UniPC/DEIS/DPMSolverSinglestep with "
                     f"use_flow_sigmas), discrete VP (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, DEIS, LCM, TCD, "
                     f"CogVideoX, ...) and EDM ({', '.join(EDM_CLASSES)})")


def translate_config(config: Mapping) -> tuple[dict, list[str]]:
    """A diffusers scheduler config -> (FewstepScheduler config keys, source keys not used).

    Raises ValueError, naming the key, for what fewstep cannot honour."""
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    name = source_class(config)
    family = detect_family(config)
    if name in (SELF, None):  # our own config, or a partial dict of keys: taken as is
        return {"family": family, **{k: v for k, v in config.items() if not k.startswith("_")}}, []
    keys = {"flow": _FLOW_KEYS, "vp": _VP_KEYS, "edm": _EDM_KEYS}[family]
    out, unused, grid_flag = {"family": family}, [], None
    for k, v in config.items():
        if k.startswith("_"):
            continue
        if k in keys:
            if keys[k] is not None:
                out[keys[k]] = v
        elif family == "flow" and k in _REFUSE_FLOW:
            if v:
                raise ValueError(f"{name} config has {k}={v!r}, which FewstepScheduler cannot honour: "
                                 f"{_REFUSE_FLOW[k][1]}")
        elif k == "timestep_type" and v not in (None, "discrete"):
            raise ValueError(f"{name} config has timestep_type={v!r}: a model fed 0.25 log(sigma) "
                             "(continuous timesteps) is not supported; only 'discrete' is")
        elif k in _GRID_FLAGS:
            if v:
                grid_flag = k  # the source's sigma grid: spacing="source" cannot follow it (refused there)
        elif k != "use_flow_sigmas":
            unused.append(k)
    if family == "flow":
        recipe = _FLOW_RECIPE.get(name, "dpmsolver")
        if name in FLOW_CLASSES:
            out["prediction_type"] = "flow_prediction"
        elif out.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{name} config has use_flow_sigmas=True with prediction_type="
                             f"{out.get('prediction_type')!r}: on a flow-matching schedule only "
                             "'flow_prediction' is supported")
    elif family == "vp":
        recipe = _VP_RECIPE.get(name, "ddim")
        if name in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
            out.setdefault("snr_shift_scale", 3.0)
    else:
        recipe = "edm"
    out["source_grid"] = f"unsupported:{grid_flag}" if grid_flag else recipe
    return out, unused


def log_unused(name: str, unused: list[str]) -> None:
    if unused:
        logger.debug("FewstepScheduler from a %s config: %s describe the source's own sampler and are replaced "
                     "by fewstep's solver and spacing", name, ", ".join(sorted(unused)))


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

def vp_alphas_cumprod(cfg) -> torch.Tensor:
    """alphas_cumprod (float64) of a VP config: betas by name or trained betas, CogVideoX's SNR
    shift, zero terminal SNR (diffusers' order: DDIM rescales the betas; CogVideoX shifts the SNR
    of alphas_cumprod first, then rescales sqrt(alphas_cumprod) to end at 0)."""
    tb = _get(cfg, "trained_betas")
    n = int(_get(cfg, "num_train_timesteps", 1000))
    betas = (torch.as_tensor(tb, dtype=torch.float64) if tb is not None else
             betas_by_name(_get(cfg, "beta_schedule", "linear"), n, float(_get(cfg, "beta_start", 1e-4)),
                           float(_get(cfg, "beta_end", 0.02))))
    scale = float(_get(cfg, "snr_shift_scale", 1.0) or 1.0)
    zero = bool(_get(cfg, "rescale_betas_zero_snr", False))
    if scale == 1.0:
        if zero:
            betas = rescale_zero_terminal_snr(betas)
        return torch.cumprod(1.0 - betas, 0)
    ac = torch.cumprod(1.0 - betas, 0)
    ac = ac / (scale + (1.0 - scale) * ac)  # SNR / scale (CogVideoX, "SNR shift following SD3")
    if zero:  # rescale sqrt(abar): shift to end at 0, scale to keep the first value (Lin et al. 2024)
        ab = ac.sqrt()
        ab = (ab - ab[-1]) * (ab[0] / (ab[0] - ab[-1]))
        ac = ab ** 2
    return ac


def _vp_schedule(cfg) -> NoiseSchedule:
    ac = vp_alphas_cumprod(cfg)
    if _get(cfg, "rescale_betas_zero_snr", False):
        if PREDICTION_OF.get(_get(cfg, "prediction_type", "epsilon")) == "eps":
            # an eps model cannot give x0 where alpha = 0; diffusers' Euler / DPM-Solver / UniPC move
            # the last alphas_cumprod to 2**-24 ("close to 0 without being 0"), and so do we
            if float(ac[-2]) <= 2.0 ** -24:
                raise ValueError("rescale_betas_zero_snr=True with prediction_type='epsilon' is not supported for "
                                 "these betas: an epsilon model gives no x0 at alpha = 0, and diffusers' stand-in "
                                 f"alphas_cumprod[-1] = 2**-24 exceeds alphas_cumprod[-2] = {float(ac[-2]):.3g}")
            ac = ac.clone()
            ac[-1] = 2.0 ** -24
            return DiscreteVP(alphas_cumprod=ac)
        return ZeroSNRDiscreteVP(alphas_cumprod=ac)
    return DiscreteVP(alphas_cumprod=ac)


def build_schedule(cfg) -> NoiseSchedule:
    """The fewstep schedule of a FewstepScheduler config (its ``family`` key)."""
    return FAMILY_CLASSES[_get(cfg, "family", "vp") or "vp"].build_schedule(cfg)


# diffusers' prediction_type -> fewstep's prediction name (the one map; each family allows a subset)
PREDICTION_OF = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


# ---------------------------------------------------------------------------
# Flow matching: shift and the source's sigmas
# ---------------------------------------------------------------------------

def flow_shift_sigmas(sigmas, cfg, mu: float | None) -> np.ndarray:
    """Apply the config's shift to base sigmas (float64 numpy), as diffusers' flow schedulers do.

    static: s' = shift s / (1 + (shift - 1) s); dynamic (mu from the pipeline): exponential
    s' = e^mu / (e^mu + 1/s - 1), linear s' = mu / (mu + 1/s - 1). All three multiply the
    noise-to-signal ratio s / (1 - s) by a constant: a translation in log-SNR. Then
    ``shift_terminal`` stretches 1 - s so that the last sigma equals it (LTX-Video)."""
    s = np.asarray(sigmas, dtype=np.float64)
    if _get(cfg, "use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("this flow-matching config has use_dynamic_shifting=True: pass mu to set_timesteps "
                             "(the pipeline computes it from the image size)")
        factor = math.exp(mu) if _get(cfg, "time_shift_type", "exponential") == "exponential" else float(mu)
    else:
        factor = float(_get(cfg, "shift", 1.0))
        if mu is not None:
            factor = math.exp(mu)  # diffusers' multistep schedulers: flow_shift = exp(mu)
    with np.errstate(divide="ignore"):
        out = np.where(s >= 1.0, 1.0, factor * s / (1.0 + (factor - 1.0) * s))
    term = _get(cfg, "shift_terminal", None)
    if term:
        one_minus = 1.0 - out
        out = 1.0 - one_minus / (one_minus[-1] / (1.0 - term))
    return out


def flow_source_sigmas(cfg, n: int, mu: float | None) -> np.ndarray:
    """The n sigmas (no trailing 0) the source flow scheduler would use: its own recipe."""
    N = int(_get(cfg, "num_train_timesteps", 1000))
    recipe = _get(cfg, "source_grid", "flow_match") or "flow_match"
    if recipe == "flow_match":
        # FlowMatchEulerDiscreteScheduler: linspace(sigma_max, sigma_min, n) of its training sigmas
        # (already shifted when the shift is static), then shifted (again)
        smin = 1.0 / N
        if not _get(cfg, "use_dynamic_shifting", False):
            smin = float(flow_shift_sigmas([smin], {**dict(cfg), "shift_terminal": None}, None)[0])
        base = np.linspace(N * 1.0, smin * N, n) / N
        return flow_shift_sigmas(base, cfg, mu)
    if recipe == "unipc":
        base = np.linspace(1.0, 1.0 / N, n + 1)[:-1]
        s = flow_shift_sigmas(base, cfg, mu)
        if abs(s[0] - 1.0) < 1e-6:
            s[0] -= 1e-6  # as UniPCMultistepScheduler: keeps log(alpha) finite at the first point
        return s
    # DPMSolverMultistep / Singlestep / DEIS: 1 - linspace(1, 1/N, n + 1), shifted, reversed, last dropped
    base = 1.0 - np.linspace(1.0, 1.0 / N, n + 1)
    return np.flip(flow_shift_sigmas(base, {**dict(cfg), "shift_terminal": None}, mu))[:-1].copy()


# ---------------------------------------------------------------------------
# VP and EDM: the source's timesteps / sigmas (spacing="source")
# ---------------------------------------------------------------------------

def vp_source_timesteps(cfg, n: int, N: int) -> np.ndarray:
    """The source VP scheduler's n timesteps for its ``timestep_spacing`` and ``steps_offset``
    (Lin et al. 2024, Table 2), with the recipe of its class (diffusers' classes differ)."""
    spacing = _get(cfg, "timestep_spacing", "linspace") or "linspace"
    offset = int(_get(cfg, "steps_offset", 0) or 0)
    recipe = _get(cfg, "source_grid", "ddim") or "ddim"
    if spacing == "trailing":
        return np.round(np.arange(N, 0, -N / n)).astype(np.float64) - 1
    if recipe == "multistep":  # DPM-Solver, UniPC, DEIS: n + 1 points, the last dropped
        if spacing == "linspace":
            return np.linspace(0, N - 1, n + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            return (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1].astype(np.float64) + offset
    else:
        if spacing == "linspace":
            ts = np.linspace(0, N - 1, n)[::-1].copy()
            return ts if recipe == "euler" else ts.round()
        if spacing == "leading":
            return (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float64) + offset
    raise ValueError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")


def edm_source_sigmas(cfg, n: int) -> np.ndarray:
    """EDMEuler / EDMDPMSolverMultistep's n sigmas: Karras (EDM eq. 5) or exponential between
    sigma_min and sigma_max."""
    smin, smax = float(_get(cfg, "sigma_min", 0.002)), float(_get(cfg, "sigma_max", 80.0))
    ramp = np.linspace(0, 1, n)
    if (_get(cfg, "sigma_schedule", "karras") or "karras") == "exponential":
        return np.exp(np.linspace(math.log(smax), math.log(smin), n))
    rho = float(_get(cfg, "rho", 7.0))
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


# ---------------------------------------------------------------------------
# The three families: one object each, used alike by FewstepScheduler and the model adapters
# ---------------------------------------------------------------------------

def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) on ``like``'s device, to scale a batch of samples."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device)


class Family:
    """What one family of diffusers models means in fewstep's time t of its schedule.

    Built from a FewstepScheduler config (:func:`family_of`). The scheduler and the model
    adapters (``DiffusersDenoiser``, ``DiffusersNet``) ask it, and nothing else branches on the
    family: the model's timestep input for t and back, the model input scaling, the model
    output as x0, the noise at the top of the grid, and which grids the source describes.

    cfg: the config (a dict or a FrozenDict); schedule: the schedule to use instead of the
    config's (``DiffusersNet(unet, DiscreteVP(...))``).
    """
    name = ""
    predictions: tuple = ()  # the diffusers prediction types a model of this family may have
    default_prediction = "epsilon"
    default_spacing = "logsnr"  # FewstepScheduler.from_config's spacing when none is asked for
    spacings: tuple = ("linspace", "source")  # the diffusers-style spacings it builds itself
    tuned_grids = True  # whether a tuned grid (fewstep.grids) can drive it
    starts_from_pure_noise = False  # whether sampling starts at t_upper, pure noise (tuned grids, fd.sample)
    scales_model_input = False  # whether scale_model_input changes x_t (then it needs the step's sigma)
    scale_noise = False  # whether img2img noises with scale_noise (flow matching) besides add_noise

    def __init__(self, cfg, schedule: NoiseSchedule | None = None):
        self.cfg = cfg
        p = _get(cfg, "prediction_type", None) or self.default_prediction
        if p not in self.predictions:
            raise ValueError(f"prediction_type {p!r} is not supported for the {self.name} family; supported: "
                             f"{', '.join(self.predictions)}")
        self.prediction_type, self.prediction = p, PREDICTION_OF[p]
        self.schedule = schedule if schedule is not None else self.build_schedule(cfg)
        self.n_train = int(_get(cfg, "num_train_timesteps", None) or getattr(self.schedule, "N", None) or 1000)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction_type={self.prediction_type!r}, schedule={self.schedule!r})"

    @staticmethod
    def build_schedule(cfg) -> NoiseSchedule:
        raise NotImplementedError

    # -- time: fewstep's t <-> the model's timestep input -------------------------------------------
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timestep input at fewstep time t (float64)."""
        raise NotImplementedError

    def time(self, timestep) -> torch.Tensor:
        """fewstep's time t (float64, on the CPU) of model timesteps: the inverse of :meth:`timestep`."""
        raise NotImplementedError

    def alpha_sigma(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma), float64 (B,), of x_t = alpha x0 + sigma noise at model timesteps."""
        t = self.time(timestep)
        return self.schedule.alpha(t), self.schedule.sigma(t)

    # -- the model's input and output -----------------------------------------------------------
    def scale_model_input(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """What the model sees of x_t at noise level sigma (a float or (B,)): x_t itself."""
        return x

    def x0(self, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's output at x_t = alpha x0 + sigma noise ((B,) float64 each) as x0_hat."""
        return to_x0(self.prediction, out, x, alpha, sigma)

    # -- the grid and its noise ---------------------------------------------------------------------
    def init_noise_sigma(self, top_sigma: float | None) -> float:
        """diffusers' ``init_noise_sigma``: the std a pipeline gives its initial latents."""
        return 1.0

    def initial_sigma(self, t_top) -> float:
        """The std of x_T that fewstep's sampling helper draws at the grid's top time: 1 (VP, flow)."""
        return 1.0

    def diffusers_sigmas(self, grid: torch.Tensor) -> torch.Tensor:
        """A grid of times as diffusers' ``scheduler.sigmas``."""
        return grid

    def grid_ends(self, mu: float | None = None) -> dict:
        """t_max / t_min of fewstep's spacings, where they are not the schedule's own."""
        return {}

    def check_mu(self, mu) -> None:
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is only meaningful for a flow-matching config")

    def stock_steps(self, sigmas) -> int | None:
        """A step count n if ``sigmas`` are a pipeline's stock grid that means 'n steps' (None here)."""
        return None

    def grid_from_sigmas(self, sigmas, mu) -> tuple[torch.Tensor, bool]:
        """(times, whether they end at 0) of diffusers-style sigmas."""
        raise NotImplementedError

    def source_times(self, spacing: str, n: int, mu) -> torch.Tensor:
        """The n times of a diffusers-style spacing (one of ``spacings``), no final point."""
        raise NotImplementedError


class VPFamily(Family):
    """Discrete-time VP (DDPM, DDIM, Euler, DPM-Solver, UniPC, ...): the model takes the training
    timestep k = (t - 1/N) N (fractional between steps) and predicts eps, v or x0."""
    name = "vp"
    predictions = ("epsilon", "v_prediction", "sample")

    build_schedule = staticmethod(_vp_schedule)

    def timestep(self, t):
        return self.schedule.model_timestep(t)

    def time(self, timestep):
        return (torch.as_tensor(timestep, dtype=torch.float64).flatten().cpu() + 1.0) / self.n_train

    def diffusers_sigmas(self, grid):
        return self.schedule.edm_sigma(grid)  # sigma / alpha, as diffusers' Euler-type schedulers

    def grid_from_sigmas(self, sigmas, mu):
        sch = self.schedule
        sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if (sig < 0).any():
            raise ValueError("sigmas must be >= 0")
        pos = sch.t_of_edm_sigma(sig[sig > 0])
        if (pos <= sch.t_upper * (1 + 1e-6)).all():  # float32 sigmas overshoot t_max by round-off
            pos = pos.clamp(max=sch.t_upper)
        if (sig == 0).any():
            return torch.cat([pos, torch.zeros(1, dtype=torch.float64)]), True
        return pos, False

    def source_times(self, spacing, n, mu):
        N = self.n_train
        if spacing == "source":
            ts = torch.as_tensor(vp_source_timesteps(self.cfg, n, N), dtype=torch.float64)
        else:  # diffusers' default integer timesteps
            ts = torch.linspace(0, N - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
            if n >= N:  # rounding would repeat timesteps: use fractional ones instead
                ts = torch.linspace(N - 1, 0, n, dtype=torch.float64)
        return (ts + 1.0) / N


class FlowFamily(Family):
    """Flow matching: x_t = (1 - sigma) x0 + sigma noise with t = sigma; the model takes
    sigma * num_train_timesteps and predicts the velocity noise - x0."""
    name = "flow"
    predictions = ("flow_prediction",)
    default_prediction = "flow_prediction"
    default_spacing = "shifted_uniform"  # measured: benchmarks/results/flow_solvers.md
    spacings = ("linspace", "source", "shifted_uniform")
    starts_from_pure_noise = True  # sigma = 1: the pipeline's latents are pure noise
    scale_noise = True

    @staticmethod
    def build_schedule(cfg):
        return FlowMatching()  # grid ends are set per set_timesteps (they depend on the shift and mu)

    def timestep(self, t):
        return t * self.n_train  # diffusers' flow models take sigma * N

    def time(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float64).flatten().cpu() / self.n_train

    def alpha_sigma(self, timestep):
        s = self.time(timestep)
        return 1.0 - s, s

    def grid_ends(self, mu=None):
        # the model's training sigmas are shift(k / N), k = 1..N: fewstep's spacing runs between the
        # lowest and the highest one below 1 (the shift translates both in log-SNR)
        N = self.n_train
        lo, hi = flow_shift_sigmas([1.0 / N, (N - 1.0) / N], {**dict(self.cfg), "shift_terminal": None}, mu)
        return {"t_max": float(hi), "t_min": float(lo)}

    def check_mu(self, mu):
        if _get(self.cfg, "use_dynamic_shifting", False) and mu is None:
            raise ValueError("this flow-matching config has use_dynamic_shifting=True: pass mu, the log-shift "
                             "that the pipeline computes from the image size (its calculate_shift)")

    def stock_steps(self, sigmas):
        base = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu(), dtype=np.float64)
        n = len(base)
        return n if n > 0 and np.allclose(base, np.linspace(1.0, 1.0 / n, n), atol=1e-6) else None

    def grid_from_sigmas(self, sigmas, mu):
        base = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if (base < 0).any() or (base > 1).any():
            raise ValueError("flow-matching sigmas must lie in [0, 1]")
        if base[-1] == 0:  # a trailing 0: the final denoising point
            return torch.cat([torch.as_tensor(flow_shift_sigmas(base[:-1].numpy(), self.cfg, mu)),
                              torch.zeros(1, dtype=torch.float64)]), True
        return torch.as_tensor(flow_shift_sigmas(base.numpy(), self.cfg, mu)).to(torch.float64), False

    def source_times(self, spacing, n, mu):
        # shifted_uniform: uniform in the unshifted time, then shifted (DPM-Solver's flow grid)
        cfg = {**dict(self.cfg), "source_grid": "dpmsolver"} if spacing == "shifted_uniform" else self.cfg
        return torch.as_tensor(flow_source_sigmas(cfg, n, mu), dtype=torch.float64)


class EDMFamily(Family):
    """EDM (Karras et al. 2022): alpha = 1, t = sigma; the model sees c_in x and c_noise = log(sigma) / 4
    and its output F gives D = c_skip x + c_out F (Table 1)."""
    name = "edm"
    predictions = ("epsilon", "v_prediction")
    tuned_grids = False
    scales_model_input = True

    @staticmethod
    def build_schedule(cfg):
        return EDM(float(_get(cfg, "sigma_min", 0.002)), float(_get(cfg, "sigma_max", 80.0)))

    @property
    def sigma_data(self) -> float:
        return float(_get(self.cfg, "sigma_data", 0.5))

    def timestep(self, t):
        return 0.25 * torch.log(t)  # EDM's c_noise (Karras et al. 2022, Table 1)

    def time(self, timestep):
        return torch.exp(4.0 * torch.as_tensor(timestep, dtype=torch.float64).flatten().cpu())

    def alpha_sigma(self, timestep):
        s = self.time(timestep)
        return torch.ones_like(s), s

    def scale_model_input(self, x, sigma):
        sd = self.sigma_data  # c_in = 1 / sqrt(sigma^2 + sigma_data^2) (Karras et al. 2022, Table 1)
        if isinstance(sigma, torch.Tensor):
            sig = _col(sigma.to(torch.float64), x)
            return x * (1.0 / torch.sqrt(sig ** 2 + sd ** 2)).to(x.dtype)
        return x / math.sqrt(sigma * sigma + sd * sd)

    def x0(self, out, x, alpha, sigma):
        # D = c_skip x + c_out F (Karras et al. 2022, eq. 7 and Table 1; diffusers' sign for v_prediction)
        sig, sd = sigma.to(torch.float64), self.sigma_data
        c_skip = sd * sd / (sig * sig + sd * sd)
        c_out = sig * sd / torch.sqrt(sig * sig + sd * sd) * (-1.0 if self.prediction_type == "v_prediction" else 1.0)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(dtype) * _col(c_skip, x).to(dtype) + out.to(dtype) * _col(c_out, x).to(dtype)

    def init_noise_sigma(self, top_sigma):
        top = float(_get(self.cfg, "sigma_max", 80.0)) if top_sigma is None else top_sigma
        return (top ** 2 + 1.0) ** 0.5  # as diffusers' EDM schedulers

    def initial_sigma(self, t_top):
        return float(t_top)  # VE: x_T = sigma_max noise

    def grid_from_sigmas(self, sigmas, mu):
        sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        top = self.schedule.t_max
        if float(sig.max()) <= top * (1 + 1e-6):  # float32 sigmas overshoot sigma_max by round-off
            sig = sig.clamp(max=top)
        return sig, bool(sig[-1] == 0)

    def source_times(self, spacing, n, mu):
        return torch.as_tensor(edm_source_sigmas(self.cfg, n), dtype=torch.float64)


FAMILY_CLASSES = {"vp": VPFamily, "flow": FlowFamily, "edm": EDMFamily}


def family_of(cfg, schedule: NoiseSchedule | None = None) -> Family:
    """The family object of a FewstepScheduler config (its ``family`` key; see :func:`translate_config`
    for a diffusers scheduler config)."""
    name = _get(cfg, "family", "vp") or "vp"
    if name not in FAMILY_CLASSES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILY_CLASSES[name](cfg, schedule)
