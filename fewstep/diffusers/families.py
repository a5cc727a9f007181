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
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import numpy as np
import torch

from ..schedules import (EDM, DiscreteVP, FlowMatching, NoiseSchedule, ZeroSNRDiscreteVP, betas_by_name,
                         rescale_zero_terminal_snr)

__all__ = ["FAMILIES", "FLOW_CLASSES", "VP_CLASSES", "EDM_CLASSES", "detect_family", "translate_config",
           "build_schedule", "flow_shift_sigmas", "flow_source_sigmas", "vp_source_timesteps", "edm_source_sigmas"]

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


def build_schedule(cfg) -> NoiseSchedule:
    """The fewstep schedule of a FewstepScheduler config (its ``family`` key)."""
    fam = _get(cfg, "family", "vp") or "vp"
    if fam == "flow":
        return FlowMatching()  # grid ends are set per set_timesteps (they depend on the shift and mu)
    if fam == "edm":
        return EDM(float(_get(cfg, "sigma_min", 0.002)), float(_get(cfg, "sigma_max", 80.0)))
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
