"""The solver benchmark: error against a reference ODE solution, by NFE, for every
fewstep ODE solver and grid and for diffusers' schedulers on the same model; plus each
solver's own time per step with the model excluded.

    fewstep bench solvers [--quick] [--json PATH] [--model NAME|PATH] [--w FLOAT]
                          [--nfe LIST] [--samples N] [--out-dir DIR]

What is measured
  * ``rmse``: root-mean-square difference of the final x0 (over all samples and values)
    from the reference solution started at the same x_T. The reference is
    ``fewstep.reference.reference_solution`` (RK4 in lambda, float64): the
    probability-flow ODE from t = 1 to t_min = 1/N, then one denoising step -- the
    limit of every grid that ends in 0, fewstep's and diffusers' alike.
  * ``nfe``: model calls actually made (counted for every run, never assumed). A
    classifier-free-guided call (conditional and unconditional halves in one batch)
    counts as one call, for fewstep and diffusers alike.
  * ``overhead_us_per_step``: solver time per model call on a (8, 4, 64, 64) tensor with a
    trivial cached model (fewstep: the whole sampler on a denoiser returning a cached
    tensor; diffusers: ``scheduler.step()`` alone), the median over repeats, measured on the
    rows of the measured (impl, solver) pairs and null elsewhere.

Stochastic samplers (ddpm, sde_dpmpp_2m/3m) are left out: their error against an ODE
solution does not measure solver accuracy. Adaptive DPM-Solver-12/23 choose their own NFE;
their rows sweep the tolerance (spacing ``adaptive_rtol=...``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..sampling import expected_nfe, sample, solver_grid
from ..schedules import DiscreteVP, NoiseSchedule, betas_by_name, time_grid
from ..solvers import SOLVERS

__all__ = ["BenchArgumentError", "BenchModel", "GMMEpsModel", "mnist_mixture", "load_bench_model",
           "parse_nfe_list", "fewstep_sample", "diffusers_sample", "measure_overhead", "check_targets",
           "run", "MODELS", "DEFAULT_NFES", "QUICK_NFES"]

MODELS = ("gmm-mnist", "mnist-teacher")
DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20, 50)
QUICK_NFES = (5, 10)
SPACINGS = ("logsnr", "time_uniform", "karras")
QUICK_SPACINGS = ("logsnr", "karras")
QUICK_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3")
NULL_LABEL = -1  # the unconditional "class" of the gmm-mnist model
GMM_DEFAULT_W = 1.0  # guidance_scale 2 (same as the MNIST teacher's previews)
ADAPTIVE_RTOLS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
MAIN_PLOT_SOLVERS = ("ddim", "dpmpp_2m", "unipc_bh2_2")  # always on the left panel, beside the 5 best

# fewstep solver -> the diffusers grids it also runs on: (spacing name, scheduler, scheduler kwargs)
DIFFUSERS_GRIDS = {
    "dpmpp_2m": (("diffusers_default", "DPMSolverMultistepScheduler", {}),
                 ("diffusers_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
                 ("diffusers_lu_lambdas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True})),
    "unipc_bh2_2": (("diffusers_default", "UniPCMultistepScheduler", {}),),
    "ddim": (("diffusers_default", "DDIMScheduler", {"clip_sample": False}),),
}
QUICK_DIFFUSERS_GRIDS = {"dpmpp_2m": DIFFUSERS_GRIDS["dpmpp_2m"][:1], "unipc_bh2_2": DIFFUSERS_GRIDS["unipc_bh2_2"],
                         "ddim": DIFFUSERS_GRIDS["ddim"]}

# (scheduler, spacing name, kwargs beyond the model's betas and prediction type)
DIFFUSERS_CONFIGS = (
    ("DPMSolverMultistepScheduler", "default", {}),
    ("DPMSolverMultistepScheduler", "karras", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", "lu_lambdas", {"use_lu_lambdas": True}),
    ("DPMSolverSinglestepScheduler", "default", {}),
    ("UniPCMultistepScheduler", "default", {}),
    ("DEISMultistepScheduler", "default", {}),
    ("EulerDiscreteScheduler", "default", {}),
    ("HeunDiscreteScheduler", "default", {}),
    ("DDIMScheduler", "default", {"clip_sample": False}),  # clip_sample=False: an ODE solver, not a clipper
    ("DDIMScheduler", "trailing", {"clip_sample": False, "timestep_spacing": "trailing"}),
)
QUICK_DIFFUSERS_CONFIGS = tuple(c for c in DIFFUSERS_CONFIGS if (c[0], c[1]) in {
    ("DPMSolverMultistepScheduler", "default"), ("DPMSolverMultistepScheduler", "karras"),
    ("UniPCMultistepScheduler", "default"), ("DDIMScheduler", "default"), ("EulerDiscreteScheduler", "default")})

# overhead: fewstep solver vs the diffusers scheduler running the same algorithm (None: no counterpart)
OVERHEAD_PAIRS = (("dpmpp_2m", "DPMSolverMultistepScheduler"), ("dpmpp_2s", "DPMSolverSinglestepScheduler"),
                  ("unipc_bh2_2", "UniPCMultistepScheduler"), ("ddim", "DDIMScheduler"),
                  ("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler"),
                  ("dpmpp_3m", None), ("unipc_bh2_3", None), (None, "DEISMultistepScheduler"))
QUICK_OVERHEAD_PAIRS = OVERHEAD_PAIRS[:1] + OVERHEAD_PAIRS[2:4]
OVERHEAD_SCHEDULER_KW = {"DDIMScheduler": {"clip_sample": False}}

# target 1 counts ties within float32 round-off as met: fewstep <= diffusers * (1 + rtol) + atol
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-6


class BenchArgumentError(ValueError):
    """A benchmark argument is wrong (unknown model, bad NFE list, ...): the CLI exits 2."""


# ---------------------------------------------------------------------------
# Models: a discrete-time model every diffusers scheduler can drive, plus its fewstep denoiser
# ---------------------------------------------------------------------------

@dataclass
class BenchModel:
    """A model as both sides of the benchmark see it.

    model(x, timestep, **cond) -> output of type ``prediction`` (eps, v or x0), with
    ``timestep`` the DiscreteVP index (a scalar or (B,) tensor, fractional allowed).
    Class-conditional models get labels ``i % num_classes``; guidance w uses the
    ``null_label`` rows as the unconditional model.
    """
    name: str
    schedule: DiscreteVP
    model: Callable
    prediction: str
    shape: tuple
    scheduler_kwargs: dict  # the betas and prediction type every diffusers scheduler is built with
    num_classes: int | None = None
    null_label: int | None = None
    w: float = 0.0
    info: dict = field(default_factory=dict)

    def conditioning(self, n: int) -> tuple[dict, dict | None]:
        """(cond, uncond) for n samples; uncond is None without guidance."""
        if self.num_classes is None:
            return {}, None
        cond = {"labels": torch.arange(n) % self.num_classes}
        if self.w == 0:
            return cond, None
        return cond, {"labels": torch.full((n,), self.null_label, dtype=torch.long)}

    def denoiser(self, uncond: dict | None) -> Callable:
        """The fewstep denoiser: the model through ModelDenoiser, with classifier-free guidance."""
        den = ModelDenoiser(self.model, self.schedule, self.prediction, time_input="discrete")
        return den if uncond is None else ClassifierFreeGuidance(den, self.w, uncond)

    def guided_output(self, cond: dict, uncond: dict | None) -> Callable:
        """model_output(x, timestep) for diffusers' loop, guided in one batched call:
        out_w = (1 + w) out_cond - w out_uncond (linear, so the same as guiding x0)."""
        if uncond is None:
            return lambda x, t: self.model(x, t, **cond)

        def guided(x, t):
            both = self.model(torch.cat([x, x]), t, **{k: torch.cat([v, uncond[k]]) for k, v in cond.items()})
            c, u = both.chunk(2)
            return c + self.w * (c - u)
        return guided


class GMMEpsModel:
    """An eps-prediction model with discrete timesteps whose x0 is a Gaussian mixture's exact
    denoiser E[x0 | x_t] (``GaussianMixture.denoiser``): a perfectly trained model.

    ``model(x, timestep, labels=None)``: timestep n (float allowed) is time t = (n + 1) / N;
    rows labelled ``NULL_LABEL`` use the unconditional mixture. The mixture runs on row
    chunks of about ``chunk_elements`` rows * components * dims, which keeps its temporaries
    cache-sized (about 10x faster than one big batch on this project's CPU).
    """

    def __init__(self, mixture, schedule: DiscreteVP, chunk_elements: int = 1 << 18):
        self.mixture, self.schedule = mixture, schedule
        self.exact = mixture.denoiser(schedule)
        self.rows = max(1, chunk_elements // (mixture.num_components * mixture.dim))

    def __call__(self, x: torch.Tensor, timestep, labels=None) -> torch.Tensor:
        ts = torch.as_tensor(timestep, dtype=torch.float64).flatten()
        ts = ts.expand(x.shape[0]) if ts.numel() == 1 else ts
        t = (ts + 1.0) / self.schedule.N
        xd = x.to(torch.float64)
        x0 = torch.cat([self._x0(xd[i:i + self.rows], t[i:i + self.rows],
                                 None if labels is None else labels[i:i + self.rows])
                        for i in range(0, x.shape[0], self.rows)])
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = self.schedule.alpha(t).reshape(shape), self.schedule.sigma(t).reshape(shape)
        return ((xd - a * x0) / s).to(x.dtype)

    def _x0(self, x, t, labels):
        if labels is None:
            return self.exact(x, t)
        free = labels == NULL_LABEL
        out = torch.empty_like(x)
        if free.any():
            out[free] = self.exact(x[free], t[free])
        if (~free).any():
            out[~free] = self.exact(x[~free], t[~free], labels=labels[~free])
        return out


def _kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Deterministic Lloyd's k-means; starts from k equal groups along the first principal axis."""
    if k == 1:
        return torch.zeros(len(x), dtype=torch.long)
    xc = x - x.mean(0)
    axis = torch.linalg.svd(xc, full_matrices=False).Vh[0]
    assign = torch.empty(len(x), dtype=torch.long)
    assign[(xc @ axis).argsort()] = torch.arange(len(x)) * k // len(x)
    for _ in range(iters):
        centers = torch.stack([x[assign == j].mean(0) for j in range(k)])
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, assign) or new.unique().numel() < k:
            break
        assign = new
    return assign


def mnist_mixture(components_per_class: int = 3, min_std: float = 0.05):
    """A class-conditional diagonal Gaussian mixture fitted to the MNIST train split.

    Per class, k-means splits the digits into ``components_per_class`` groups; each group
    gives one component: its mean image and per-pixel std (clamped below at ``min_std``),
    weighted by its share of the data. Pixels in [-1, 1].
    """
    from ..data.gmm import GaussianMixture
    from ..data.mnist import NUM_CLASSES, load_mnist
    x, y = load_mnist("train")
    flat = x.reshape(len(x), -1).to(torch.float64)
    means, stds, weights, labels = [], [], [], []
    for c in range(NUM_CLASSES):
        xc = flat[y == c]
        assign = _kmeans(xc, components_per_class)
        for j in range(components_per_class):
            member = xc[assign == j]
            means.append(member.mean(0))
            stds.append(member.std(0, unbiased=False).clamp_min(min_std))
            weights.append(len(member) / len(flat))
            labels.append(c)
    return GaussianMixture(torch.stack(means), torch.stack(stds), torch.tensor(weights), torch.tensor(labels))


def gmm_mnist_model(w: float | None) -> BenchModel:
    """The default model: ``mnist_mixture()`` on a DiscreteVP linear-beta 1000-step schedule."""
    w = GMM_DEFAULT_W if w is None else w
    schedule = DiscreteVP.from_name("linear", 1000, 1e-4, 0.02)
    mixture = mnist_mixture()
    kw = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon"}
    info = {"name": "gmm-mnist",
            "description": "class-conditional diagonal Gaussian mixture fitted to the MNIST train split "
                           "(3 k-means components per class: mean image, per-pixel std clamped at 0.05); "
                           "exact denoiser E[x0|x_t] exposed as an eps-prediction model with discrete timesteps",
            "components": mixture.num_components, "shape": [1, 28, 28],
            "schedule": "DiscreteVP, linear betas 1e-4..0.02, N = 1000", "prediction": "eps",
            "w": w, "guidance_scale": 1.0 + w, "labels": "sample i has class i mod 10",
            "guidance": "x_w = (1 + w) x_cond - w x_uncond, x_uncond = the unconditional mixture"}
    return BenchModel("gmm-mnist", schedule, GMMEpsModel(mixture, schedule), "eps", (1, 28, 28), kw,
                      num_classes=10, null_label=NULL_LABEL, w=w, info=info)


_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def diffusers_folder_model(path: str, w: float | None) -> BenchModel:
    """A diffusers UNet2DModel folder (``from_pretrained``) with its scheduler config, which
    gives the betas and the prediction type. The folder is either a pipeline folder
    (``unet/``, ``scheduler/``) or one folder holding both configs."""
    p = Path(path)
    unet_dir = p / "unet" if (p / "unet" / "config.json").is_file() else p
    sched_files = [f for f in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json") if f.is_file()]
    if not (unet_dir / "config.json").is_file() or not sched_files:
        raise BenchArgumentError(f"{path} is not a diffusers model folder: it needs config.json (or unet/config.json) "
                                 "and scheduler_config.json (or scheduler/scheduler_config.json)")
    cfg = json.loads(sched_files[0].read_text())
    kw = {k: cfg.get(k, d) for k, d in _BETA_DEFAULTS.items()}
    kw["prediction_type"] = cfg.get("prediction_type", "epsilon")
    if kw["prediction_type"] not in _PREDICTIONS:
        raise BenchArgumentError(f"unsupported prediction_type {kw['prediction_type']!r} in {sched_files[0]}; "
                                 f"supported: {', '.join(_PREDICTIONS)}")
    if cfg.get("trained_betas") is not None:
        kw["trained_betas"] = cfg["trained_betas"]
        schedule = DiscreteVP(betas=torch.tensor(cfg["trained_betas"], dtype=torch.float64))
    else:
        schedule = DiscreteVP(betas=betas_by_name(kw["beta_schedule"], kw["num_train_timesteps"],
                                                  kw["beta_start"], kw["beta_end"]))
    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    classes = unet.config.num_class_embeds
    if w not in (None, 0, 0.0):
        raise BenchArgumentError(f"--w needs a model with an unconditional (null) class; the UNet in {path} has none")
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    info = {"name": str(path), "description": "diffusers UNet2DModel loaded with from_pretrained",
            "shape": list(shape), "prediction": kw["prediction_type"], "w": 0.0,
            "num_class_embeds": classes, "scheduler_config": {k: v for k, v in kw.items() if k != "trained_betas"}}
    return BenchModel(str(path), schedule, _unet_fn(unet, shape[0]), _PREDICTIONS[kw["prediction_type"]], shape, kw,
                      num_classes=classes, info=info)


def _unet_fn(unet, channels: int) -> Callable:
    def model(x, timestep, labels=None):
        with torch.no_grad():
            out = unet(x.float(), torch.as_tensor(timestep, dtype=torch.float32), class_labels=labels).sample
        return out[:, :channels].to(x.dtype)  # a learned-variance model returns 2C channels
    return model


def fewstep_model(name: str, w: float | None) -> BenchModel:
    """``mnist-teacher`` or a fewstep model folder, through ``fewstep.load``. Its continuous VP
    schedule is seen by diffusers as a 1000-step DiscreteVP with the same alphas at the knots;
    a discrete time runs the model at the continuous time with the same log-SNR."""
    import fewstep
    if not hasattr(fewstep, "load"):
        raise BenchArgumentError(f"{name} is not shipped yet (fewstep.load does not exist); "
                                 "use --model gmm-mnist or a diffusers model folder")
    try:
        loaded = fewstep.load(name)
    except FileNotFoundError as e:
        raise BenchArgumentError(f"{name} is not shipped yet ({e}); use --model gmm-mnist "
                                 "or a diffusers model folder") from None
    if not hasattr(loaded, "schedule") or not hasattr(loaded, "denoiser"):
        raise BenchArgumentError(f"{name} is a {type(loaded).__name__}, not a diffusion model")
    cont, n = loaded.schedule, 1000
    if getattr(cont, "kind", None) not in ("linear_vp", "cosine_vp", "discrete"):
        raise BenchArgumentError(f"the bench runs diffusers' VP schedulers; {name}'s schedule {cont!r} is not VP")
    knots = cont.t_min + (cont.t_max - cont.t_min) * torch.arange(n, dtype=torch.float64) / (n - 1)
    schedule = DiscreteVP(alphas_cumprod=cont.alpha(knots) ** 2)
    w = GMM_DEFAULT_W if w is None else w
    if w != 0 and loaded.null_class is None:
        raise BenchArgumentError(f"--w needs a class-conditional model with a null class; {name} has none")
    ac = schedule.alphas_cumprod
    betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    kw = {"trained_betas": betas.tolist(), "num_train_timesteps": n, "prediction_type": "epsilon"}
    info = {"name": name, "description": f"fewstep model {loaded!r} seen as an eps "
            f"model on a {n}-step DiscreteVP with its alphas at the knots", "shape": list(loaded.image_shape),
            "w": w, "guidance_scale": 1 + w, "labels": "sample i has class i mod num_classes"}
    return BenchModel(name, schedule, _discretized_eps(loaded.denoiser(0.0), cont, schedule), "eps",
                      tuple(loaded.image_shape), kw, num_classes=loaded.num_classes, null_label=loaded.null_class,
                      w=w, info=info)


def _discretized_eps(denoiser: Callable, cont: NoiseSchedule, schedule: DiscreteVP,
                     dtype: torch.dtype = torch.float32) -> Callable:
    @torch.no_grad()
    def model(x, timestep, **cond):
        ts = torch.as_tensor(timestep, dtype=torch.float64).flatten().expand(x.shape[0])
        t_d = (ts + 1.0) / schedule.N
        t_c = cont.t_of_lambda(schedule.lambda_(t_d)).clamp(cont.t_min, cont.t_max)  # same log-SNR
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = schedule.alpha(t_d).reshape(shape), schedule.sigma(t_d).reshape(shape)
        x0 = denoiser(x.to(dtype), t_c, **cond).to(torch.float64)  # the net runs in its own dtype
        return ((x.to(torch.float64) - a * x0) / s).to(x.dtype)
    return model


def load_bench_model(model: str, w: float | None = None) -> BenchModel:
    """``gmm-mnist``, ``mnist-teacher``, or a path to a diffusers or fewstep model folder."""
    if w is not None and not math.isfinite(w):
        raise BenchArgumentError(f"--w must be a finite number, got {w}")
    if model == "gmm-mnist":
        return gmm_mnist_model(w)
    if model == "mnist-teacher":
        return fewstep_model(model, w)
    if os.path.isdir(model):
        p = Path(model)
        if any((p / f).is_file() for f in ("scheduler_config.json", "scheduler/scheduler_config.json")):
            return diffusers_folder_model(model, w)
        if any((p / f).is_file() for f in ("config.json", "model/config.json")):
            return fewstep_model(model, w)
        raise BenchArgumentError(f"{model} is neither a diffusers model folder (scheduler_config.json or "
                                 "scheduler/scheduler_config.json) nor a fewstep model folder (config.json)")
    if os.path.exists(model):
        raise BenchArgumentError(f"--model {model!r} is a file; give a model folder or one of: "
                                 f"{', '.join(MODELS)}")
    raise BenchArgumentError(f"unknown model {model!r} (no such folder either); choose one of "
                             f"{', '.join(MODELS)} or a path to a diffusers model folder or a fewstep model folder")


def parse_nfe_list(text) -> tuple[int, ...]:
    """'5,10,20' (commas or spaces) -> (5, 10, 20): integers from 1 to 1000, sorted, unique."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        values = [int(v) for v in items]
    except (TypeError, ValueError):
        raise BenchArgumentError(f"--nfe must be a comma-separated list of integers, e.g. 5,10,20; "
                                 f"got {text!r}") from None
    if not values or any(v < 1 or v > 1000 for v in values):
        raise BenchArgumentError(f"--nfe needs at least one integer, each from 1 to 1000; got {text!r}")
    return tuple(sorted(set(values)))


# ---------------------------------------------------------------------------
# Sampling: fewstep on its grids, diffusers' loop, diffusers' grids in fewstep time
# ---------------------------------------------------------------------------

def _scheduler(bm: BenchModel, name: str, extra: dict):
    import diffusers
    return getattr(diffusers, name)(**bm.scheduler_kwargs, **extra)


def diffusers_grid(bm: BenchModel, name: str, extra: dict, steps: int) -> torch.Tensor:
    """A diffusers scheduler's grid in fewstep time, ending in 0: (timestep + 1) / N, or from
    its sigmas when they are not the sigmas of its integer timesteps (Karras, Lu lambdas)."""
    s = _scheduler(bm, name, extra)
    s.set_timesteps(steps)
    if extra.get("use_karras_sigmas") or extra.get("use_lu_lambdas"):
        sig = s.sigmas.to(torch.float64)
        t = bm.schedule.t_of_edm_sigma(sig[sig > 0]).clamp(bm.schedule.t_min, bm.schedule.t_max)
    else:
        t = (s.timesteps.to(torch.float64) + 1.0) / bm.schedule.N
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def _fewstep_steps(solver: str, nfe: int) -> int:
    # heun spends 2 * steps - 1 calls on a grid ending in 0: the most steps within the budget
    return max(1, (nfe + 1) // 2) if SOLVERS[solver].kind == "heun" else nfe


def fewstep_sample(bm: BenchModel, x_T: torch.Tensor, solver: str, spacing: str, nfe: int,
                   cond: dict, uncond: dict | None, **options):
    """Run a fewstep solver with a budget of ``nfe`` calls; returns (x0, model calls counted)."""
    steps = _fewstep_steps(solver, nfe)
    extra = {}
    if spacing.startswith("diffusers_"):
        _, name, kw = next(g for g in DIFFUSERS_GRIDS[solver] if g[0] == spacing)
        grid = diffusers_grid(bm, name, kw, steps)
    elif spacing.startswith("adaptive"):
        grid = time_grid(bm.schedule, 2, "logsnr")  # adaptive: the grid only fixes t_max, t_min, then 0
    else:
        grid, extra = solver_grid(bm.schedule, solver, steps, spacing)
    out = sample(bm.denoiser(uncond), x_T, bm.schedule, solver=solver, grid=grid, cond=cond, **extra, **options)
    want = expected_nfe(solver, grid, extra)
    if want is not None and out.nfe != want:
        raise RuntimeError(f"{solver} on {spacing} spent {out.nfe} model calls, expected {want}")
    return out.x, out.nfe


def _diffusers_steps(name: str, nfe: int) -> int:
    # HeunDiscreteScheduler calls the model 2 * steps - 1 times (counted below, not assumed)
    return max(1, (nfe + 1) // 2) if name == "HeunDiscreteScheduler" else nfe


def diffusers_sample(bm: BenchModel, x_T: torch.Tensor, name: str, extra: dict, nfe: int,
                     cond: dict, uncond: dict | None):
    """diffusers' own loop on the same model; returns (x0, model calls counted)."""
    s = _scheduler(bm, name, extra)
    s.set_timesteps(_diffusers_steps(name, nfe))
    model_output = bm.guided_output(cond, uncond)
    x, calls = x_T * s.init_noise_sigma, 0
    with torch.no_grad():
        for t in s.timesteps:
            out = model_output(s.scale_model_input(x, t), t)
            calls += 1
            x = s.step(out, t, x).prev_sample
    return x, calls


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(torch.float64) - ref).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------

def reference(bm: BenchModel, x_T: torch.Tensor, cond: dict, uncond: dict | None, steps: int):
    """The reference x0 (float64) and its JSON record, with its own convergence."""
    from ..reference import reference_solution
    start = time.perf_counter()
    x_ref, err = reference_solution(bm.denoiser(uncond), bm.schedule, x_T.to(torch.float64), bm.schedule.t_max, 0.0,
                                    steps=steps, cond=cond)
    info = {"method": "fewstep.reference.reference_solution: classic RK4 uniform in lambda, float64",
            "t_from": bm.schedule.t_max, "t_to": 0.0,
            "end": f"ODE to t_min = {bm.schedule.t_min:g}, then one denoising step (the limit of grids ending in 0)",
            "steps": 2 * steps, "model_calls": 12 * steps,
            "max_abs_diff_vs_half_steps": err,
            "convergence": f"max |x({2 * steps} steps) - x({steps} steps)| = {err:.3g}; for a 4th-order method "
                           f"the {2 * steps}-step answer's own error is about 1/15 of that",
            "samples": x_T.shape[0], "rms_of_reference": float(x_ref.pow(2).mean().sqrt()),
            "seconds": round(time.perf_counter() - start, 1)}
    return x_ref.to(torch.float64), info


# ---------------------------------------------------------------------------
# Solver overhead (model excluded)
# ---------------------------------------------------------------------------

def _fewstep_overhead(solver: str, schedule, x_T, x0, steps: int):
    spec = SOLVERS[solver]
    grid, opts = solver_grid(schedule, solver, _fewstep_steps(solver, steps), "logsnr")

    def once():
        start = time.perf_counter()
        out = spec(lambda x, t, **c: x0, x_T, grid, schedule, **opts)
        return (time.perf_counter() - start) / out.nfe
    return once


def _diffusers_overhead(name: str, kw: dict, x_T, eps, steps: int):
    import diffusers
    s = getattr(diffusers, name)(**kw, **OVERHEAD_SCHEDULER_KW.get(name, {}))

    def once():
        s.set_timesteps(_diffusers_steps(name, steps))
        x, spent = x_T.clone(), 0.0
        for t in s.timesteps:
            s.scale_model_input(x, t)  # not timed (step() alone is); Euler/Heun expect the call
            start = time.perf_counter()
            x = s.step(eps, t, x).prev_sample
            spent += time.perf_counter() - start
        return spent / len(s.timesteps)
    return once


def measure_overhead(pairs=OVERHEAD_PAIRS, shape=(8, 4, 64, 64), steps: int = 20, repeats: int = 7,
                     seed: int = 0) -> dict:
    """Median microseconds per model call of each solver with a trivial cached model.

    fewstep: the whole sampler (validation, grid points, updates, the NFE counter's
    finiteness check) on a denoiser that returns a cached x0. diffusers: ``step()`` alone
    with a cached eps. Repeats alternate between the two sides so machine noise hits both.
    Returns {("fewstep", solver) | ("diffusers", scheduler): microseconds}.
    """
    g = torch.Generator().manual_seed(seed)
    x_T, x0, eps = (torch.randn(shape, generator=g) for _ in range(3))
    schedule = DiscreteVP.from_name("linear")
    kw = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon"}
    timers = {}
    for solver, name in pairs:
        if solver is not None and ("fewstep", solver) not in timers:
            timers[("fewstep", solver)] = _fewstep_overhead(solver, schedule, x_T, x0, steps)
        if name is not None and ("diffusers", name) not in timers:
            timers[("diffusers", name)] = _diffusers_overhead(name, kw, x_T, eps, steps)
    times = {k: [] for k in timers}
    for f in timers.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in timers.items():
            times[k].append(f())
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def adapter_overhead(shape=(8, 4, 64, 64), steps: int = 20, repeats: int = 7, seed: int = 0) -> float:
    """dpmpp_2m's time per call through the eps adapter (ModelDenoiser on a cached eps
    model): the path a user of an eps model takes; reported next to the bare number."""
    g = torch.Generator().manual_seed(seed)
    x_T, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    schedule = DiscreteVP.from_name("linear")
    den = ModelDenoiser(lambda x, t: eps, schedule, "eps", time_input="discrete")
    grid, _ = solver_grid(schedule, "dpmpp_2m", steps, "logsnr")
    spec, times = SOLVERS["dpmpp_2m"], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = spec(den, x_T, grid, schedule)
        times.append((time.perf_counter() - start) / out.nfe)
    return 1e6 * statistics.median(times[1:])


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

@dataclass
class Plan:
    nfes: tuple
    samples: int
    solvers: tuple
    spacings: tuple
    diffusers_grids: dict
    diffusers_configs: tuple
    adaptive: tuple
    ref_steps: int
    overhead_pairs: tuple
    overhead_steps: int
    overhead_repeats: int


def make_plan(quick: bool, nfes, samples) -> Plan:
    if quick:
        return Plan(nfes or QUICK_NFES, samples or 16, QUICK_SOLVERS, QUICK_SPACINGS, QUICK_DIFFUSERS_GRIDS,
                    QUICK_DIFFUSERS_CONFIGS, (), 32, QUICK_OVERHEAD_PAIRS, 10, 5)
    ode = tuple(n for n, s in SOLVERS.items() if not s.stochastic and s.kind != "adaptive")
    adaptive = tuple(n for n, s in SOLVERS.items() if s.kind == "adaptive")
    return Plan(nfes or DEFAULT_NFES, samples or 64, ode, SPACINGS, DIFFUSERS_GRIDS, DIFFUSERS_CONFIGS,
                adaptive, 128, OVERHEAD_PAIRS, 20, 9)


def _row(impl, solver, spacing, nfe, rmse):
    return {"impl": impl, "solver": solver, "spacing": spacing, "nfe": int(nfe), "rmse": rmse,
            "overhead_us_per_step": None}


def _fewstep_rows(bm, plan, x_T, x_ref, cond, uncond, log):
    rows, seen = [], set()
    for solver in plan.solvers:
        spacings = plan.spacings + tuple(g[0] for g in plan.diffusers_grids.get(solver, ()))
        for spacing in spacings:
            for nfe in plan.nfes:
                x, spent = fewstep_sample(bm, x_T, solver, spacing, nfe, cond, uncond)
                if (solver, spacing, spent) not in seen:
                    seen.add((solver, spacing, spent))
                    rows.append(_row("fewstep", solver, spacing, spent, _rmse(x, x_ref)))
        log(f"fewstep {solver}: done")
    for solver in plan.adaptive:
        for rtol in ADAPTIVE_RTOLS:
            x, spent = fewstep_sample(bm, x_T, solver, "adaptive", 0, cond, uncond,
                                      rtol=rtol, atol=0.0078 * rtol / 0.05)
            rows.append(_row("fewstep", solver, f"adaptive_rtol={rtol:g}", spent, _rmse(x, x_ref)))
        log(f"fewstep {solver}: done")
    return rows


def _diffusers_rows(bm, plan, x_T, x_ref, cond, uncond, log):
    rows, seen = [], set()
    for name, spacing, extra in plan.diffusers_configs:
        for nfe in plan.nfes:
            x, spent = diffusers_sample(bm, x_T, name, extra, nfe, cond, uncond)
            if (name, spacing, spent) not in seen:
                seen.add((name, spacing, spent))
                rows.append(_row("diffusers", name, spacing, spent, _rmse(x, x_ref)))
        log(f"diffusers {name} ({spacing}): done")
    return rows


def machine_info() -> dict:
    import diffusers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def run(*, quick: bool = False, json_path=None, model: str = "gmm-mnist", w: float | None = None,
        nfe=None, samples: int | None = None, out_dir="benchmarks/results", seed: int = 0,
        threads: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; return the JSON document.

    Outputs: ``json_path`` (default ``<out_dir>/solvers.json``, ``solvers_quick.json`` with
    ``quick``) and, beside it in ``out_dir``, ``.md`` and ``.png`` of the same stem.
    threads: torch threads for the run (restored afterwards); None keeps the current setting.
    Raises BenchArgumentError for bad arguments before any work is done.
    """
    log = log or (lambda msg: None)
    nfes = parse_nfe_list(nfe) if nfe is not None else None
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise BenchArgumentError(f"--samples must be an integer >= 1, got {samples!r}")
    plan = make_plan(quick, nfes, samples)
    stem = "solvers_quick" if quick else "solvers"
    out_dir = Path(out_dir)
    json_path = Path(json_path) if json_path is not None else out_dir / f"{stem}.json"
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BenchArgumentError(f"--threads must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        with _quiet_diffusers():
            doc, extras = _run(plan, model, w, seed, quick, log)
    finally:
        torch.set_num_threads(previous)
    extras["command"] = " ".join(["fewstep bench solvers"] + (["--quick"] if quick else [])
                                 + ([f"--model {model}"] if model != "gmm-mnist" else [])
                                 + ([f"--w {w:g}"] if w is not None else [])
                                 + ([f"--nfe {','.join(map(str, nfes))}"] if nfes else [])
                                 + ([f"--samples {samples}"] if samples else []))
    _write_outputs(doc, extras, json_path, out_dir / f"{json_path.stem}.md", out_dir / f"{json_path.stem}.png")
    return doc


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' deprecation warnings and config notices off for the run (BENCHMARKS.md lists
    the notices that matter, e.g. DPMSolverSinglestep switching lower_order_final on)."""
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(level)


def _run(plan: Plan, model: str, w, seed: int, quick: bool, log) -> tuple[dict, dict]:
    start = time.perf_counter()
    bm = load_bench_model(model, w)
    machine = machine_info()
    log(f"model {bm.name} loaded ({time.perf_counter() - start:.0f} s)")
    x_T = torch.randn((plan.samples, *bm.shape), generator=torch.Generator().manual_seed(seed))
    cond, uncond = bm.conditioning(plan.samples)
    x_ref, ref_info = reference(bm, x_T, cond, uncond, plan.ref_steps)
    log(f"reference: {ref_info['convergence']} ({ref_info['seconds']} s)")
    rows = _fewstep_rows(bm, plan, x_T, x_ref, cond, uncond, log)
    rows += _diffusers_rows(bm, plan, x_T, x_ref, cond, uncond, log)
    overhead = measure_overhead(plan.overhead_pairs, steps=plan.overhead_steps, repeats=plan.overhead_repeats)
    adapter = adapter_overhead(steps=plan.overhead_steps, repeats=plan.overhead_repeats)
    log("overhead measured")
    for r in rows:
        r["overhead_us_per_step"] = overhead.get((r["impl"], r["solver"]))
    machine["wall_time_s"] = round(time.perf_counter() - start, 1)
    bm.info.update(samples=plan.samples, seed=seed)
    doc = {"model": bm.info, "reference": ref_info, "machine": machine, "results": rows}
    extras = {"adapter_overhead_us": adapter, "overhead_steps": plan.overhead_steps,
              "overhead_repeats": plan.overhead_repeats, "quick": quick, "nfes": plan.nfes}
    return doc, extras


def _write_outputs(doc, extras, json_path: Path, md_path: Path, png_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, png_path, extras["nfes"])
    md_path.write_text(markdown(doc, extras, png_path.name))


# ---------------------------------------------------------------------------
# Report: targets, markdown, plot
# ---------------------------------------------------------------------------

def _index(rows) -> dict:
    return {(r["impl"], r["solver"], r["spacing"], r["nfe"]): r["rmse"] for r in rows}


def check_targets(doc: dict, nfes) -> list[dict]:
    """The three targets of the issue, each {"target", "met" (True/False/None), "summary", "header", "lines"}."""
    rows = doc["results"]
    return [_target_parity(_index(rows), nfes), _target_best(rows, _index(rows)), _target_overhead(rows)]


def _target_parity(idx, nfes) -> dict:
    """fewstep dpmpp_2m vs DPMSolverMultistepScheduler on diffusers' grids. Only the default grid is
    identical on both sides: with Karras / Lu-lambda sigmas diffusers evaluates the model at the
    timesteps rounded to integers but steps with the unrounded sigmas, while fewstep evaluates the
    model at the grid's own times; those rows are listed but left out of the verdict."""
    comps = []
    for fs, ds in (("diffusers_default", "default"), ("diffusers_karras", "karras"),
                   ("diffusers_lu_lambdas", "lu_lambdas")):
        for n in nfes:
            f, d = idx.get(("fewstep", "dpmpp_2m", fs, n)), idx.get(("diffusers", "DPMSolverMultistepScheduler", ds, n))
            if f is not None and d is not None:
                comps.append((ds, n, f, d))
    exact = [c for c in comps if c[0] == "default"]
    near = [c[2] / c[3] for c in comps if c[0] != "default"]
    met = all(f <= d * (1 + PARITY_RTOL) + PARITY_ATOL for _, _, f, d in exact) if exact else None
    summary = "not measured"
    if exact:
        summary = (f"identical grid (diffusers' default timesteps): worst ratio "
                   f"{max(f / d for _, _, f, d in exact):.4f} over {len(exact)} NFEs; ties within float32 round-off "
                   f"(ratio <= {1 + PARITY_RTOL:g} or +{PARITY_ATOL:g}) count as met.")
    if near:
        summary += (f" Karras / Lu-lambda grids (not identical: diffusers evaluates the model at rounded integer "
                    f"timesteps, fewstep at the grid's own times; not in the verdict): ratio {min(near):.3f} to "
                    f"{max(near):.3f}, fewstep lower in {sum(r < 1 for r in near)} of {len(near)}.")
    return {"target": "fewstep dpmpp_2m <= diffusers DPMSolverMultistepScheduler on the same grid", "met": met,
            "summary": summary, "header": "| diffusers grid | identical | NFE | fewstep dpmpp_2m | diffusers | ratio |",
            "lines": [f"| {ds} | {'yes' if ds == 'default' else 'no (rounded model timesteps)'} | {n} | {f:.3e} | "
                      f"{d:.3e} | {f / d:.4f} |" for ds, n, f, d in comps]}


def _target_best(rows, idx) -> dict:
    lines, met = [], []
    for n in (5, 10):
        d = idx.get(("diffusers", "DPMSolverMultistepScheduler", "default", n))
        cands = [r for r in rows
                 if r["impl"] == "fewstep" and r["nfe"] == n and not r["spacing"].startswith("adaptive")]
        if d is None or not cands:
            lines.append(f"| {n} | not measured | | | |")
            continue
        best = min(cands, key=lambda r: r["rmse"])
        met.append(best["rmse"] <= 0.5 * d)
        lines.append(f"| {n} | {best['solver']} ({best['spacing']}) | {best['rmse']:.3e} | {d:.3e} | "
                     f"{best['rmse'] / d:.3f} |")
    return {"target": "best fewstep solver at NFE 5 and 10 <= 0.5 x diffusers' default DPMSolverMultistepScheduler",
            "met": all(met) if len(met) == 2 else None, "lines": lines,
            "header": "| NFE | best fewstep (spacing) | its RMSE | diffusers default | ratio |",
            "summary": "ratio = best fewstep RMSE (any ODE solver and spacing at exactly that NFE) / diffusers "
                       "default RMSE; target <= 0.5" + ("" if len(met) == 2 else "; measured only partly")}


def _target_overhead(rows) -> dict:
    us = {(r["impl"], r["solver"]): r["overhead_us_per_step"] for r in rows if r["overhead_us_per_step"] is not None}
    lines, head = [], None
    for solver, name in OVERHEAD_PAIRS:
        f, d = us.get(("fewstep", solver)), us.get(("diffusers", name))
        if f is None and d is None:
            continue
        ratio = f"{f / d:.3f}" if f is not None and d is not None else "n/a"
        lines.append(f"| {solver or '-'} | {name or '-'} | {_us(f)} | {_us(d)} | {ratio} |")
        if solver == "dpmpp_2m" and f is not None and d is not None:
            head = f / d
    return {"target": "solver overhead per step: fewstep dpmpp_2m <= 0.5 x diffusers "
                      "DPMSolverMultistepScheduler.step()",
            "met": None if head is None else head <= 0.5, "lines": lines,
            "header": "| fewstep solver | diffusers scheduler | fewstep us/step | diffusers us/step | ratio |",
            "summary": f"headline ratio (dpmpp_2m / DPMSolverMultistepScheduler) = {head:.3f}"
                       if head else "not measured"}


def _us(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _verdict(met) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def best_spacings(rows) -> dict:
    """(impl, solver) -> the spacing with the lowest geometric-mean RMSE over the NFEs it ran
    (adaptive rows excluded; diffusers rows keep every configuration)."""
    groups: dict = {}
    for r in rows:
        if not r["spacing"].startswith("adaptive"):
            groups.setdefault((r["impl"], r["solver"], r["spacing"]), []).append(max(r["rmse"], 1e-300))
    best: dict = {}
    for (impl, solver, spacing), errs in groups.items():
        score = sum(math.log(e) for e in errs) / len(errs)
        if (impl, solver) not in best or score < best[(impl, solver)][1]:
            best[(impl, solver)] = (spacing, score)
    return {k: v[0] for k, v in best.items()}


def _cell(series: dict, col: int) -> str:
    """The row's RMSE with at most ``col`` calls: exact NFE, or the largest below, marked (nfe)."""
    under = [n for n in series if n <= col]
    if not under:
        return "-"
    n = max(under)
    return f"{series[n]:.2e}" if n == col else f"{series[n]:.2e} ({n})"


def _table(rows, keys, nfes) -> list[str]:
    lines = ["| impl | solver | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|" + "---|" * len(nfes)]
    for impl, solver, spacing in keys:
        series = {r["nfe"]: r["rmse"] for r in rows
                  if (r["impl"], r["solver"], r["spacing"]) == (impl, solver, spacing)}
        lines.append(f"| {impl} | {solver} | {spacing} | " + " | ".join(_cell(series, n) for n in nfes) + " |")
    return lines


def summary_keys(rows) -> list[tuple]:
    """fewstep solvers at their best spacing (sorted by error at the median NFE) and every diffusers configuration."""
    best = best_spacings(rows)
    fkeys = [("fewstep", s, sp) for (impl, s), sp in best.items() if impl == "fewstep"]
    dkeys = list(dict.fromkeys((r["impl"], r["solver"], r["spacing"]) for r in rows if r["impl"] == "diffusers"))
    gm = {k: statistics.fmean(math.log(max(r["rmse"], 1e-300)) for r in rows
                              if (r["impl"], r["solver"], r["spacing"]) == k) for k in fkeys}
    return sorted(fkeys, key=gm.get) + dkeys


def markdown(doc: dict, extras: dict, png_name: str) -> str:
    rows, nfes, m, ref = doc["results"], extras["nfes"], doc["machine"], doc["reference"]
    out = [f"# Solver benchmark ({'quick' if extras['quick'] else 'full'})", "",
           f"Generated by `{extras['command']}` (fewstep.bench.solvers) on {m['date']}.", "",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
           f"diffusers {m['diffusers']}, Python {m['python']}; load average at start {m['load_average_at_start']} "
           f"(shared machine); wall time {m['wall_time_s']} s.",
           f"- Model: {doc['model'].get('name')} - {doc['model'].get('description', '')}; w = {doc['model'].get('w')}; "
           f"{doc['model'].get('samples')} samples, seed {doc['model'].get('seed')}.",
           f"- Reference: {ref['method']}, {ref['steps']} steps, {ref['end']}. Convergence: {ref['convergence']}.",
           "- RMSE over all samples and pixels (data in [-1, 1]) against the reference from the same x_T. "
           "NFE = model calls counted.", "", "## Targets", ""]
    for t in check_targets(doc, nfes):
        out += [f"### {t['target']}: {_verdict(t['met'])}", "", t["summary"], "", t["header"],
                "|" + "---|" * (t["header"].count(" | ") + 1), *t["lines"], ""]
    out += [f"fewstep dpmpp_2m through the eps adapter (ModelDenoiser on a cached eps model, the path of an "
            f"eps-prediction model): {extras['adapter_overhead_us']:.0f} us/step. Overhead: tensor (8, 4, 64, 64) "
            f"float32, {extras['overhead_steps']} steps, median of {extras['overhead_repeats']} alternating repeats; "
            "fewstep = the whole sampler on a cached denoiser, diffusers = step() alone.", "",
            "## RMSE by NFE", "", "fewstep solvers at their best spacing (lowest geometric-mean RMSE), then every "
            "diffusers configuration. A value marked (n) spent n < NFE calls (Heun's 2 steps - 1).", ""]
    out += _table(rows, summary_keys(rows), nfes) + ["", f"![error vs NFE]({png_name})", ""]
    adaptive = [r for r in rows if r["spacing"].startswith("adaptive")]
    if adaptive:
        out += ["## Adaptive solvers (NFE chosen by the error control)", "", "| solver | tolerance | NFE | RMSE |",
                "|---|---|---|---|"] + [f"| {r['solver']} | {r['spacing']} | {r['nfe']} | {r['rmse']:.2e} |"
                                        for r in adaptive] + [""]
    keys = list(dict.fromkeys((r["impl"], r["solver"], r["spacing"])
                              for r in rows if not r["spacing"].startswith("adaptive")))
    out += ["## All rows", ""] + _table(rows, keys, nfes) + [""]
    return "\n".join(out)


def plot(doc: dict, path: Path, nfes=None) -> None:
    """Log-log RMSE vs NFE: left, the main fewstep solvers and every diffusers scheduler;
    right, every fewstep ODE solver at its best spacing. fewstep solid, diffusers dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    rows = doc["results"]
    keys = summary_keys(rows)
    fkeys = [k for k in keys if k[0] == "fewstep"]
    dkeys = [k for k in keys if k[0] == "diffusers"]
    main = list(dict.fromkeys(fkeys[:5] + [k for k in fkeys if k[1] in MAIN_PLOT_SOLVERS]))  # 5 best + references
    default = [k for k in dkeys if k[1:] == ("DPMSolverMultistepScheduler", "default")]
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5), sharey=True)
    dcolors = plt.cm.Dark2.colors + ("black", "dimgray")
    panels = (("fewstep (solid) vs diffusers (dashed)", main, dkeys, plt.cm.tab10.colors, dcolors),
              ("all fewstep ODE solvers at their best spacing", fkeys, default, plt.cm.tab20.colors, ("black",)))
    for ax, (title, fk, dk, fcolors, dcolors) in zip(axes, panels):
        for keys_, colors, style in ((fk, fcolors, ("-", "o")), (dk, dcolors, ("--", "s"))):
            for i, key in enumerate(keys_):
                pts = sorted((r["nfe"], r["rmse"]) for r in rows if (r["impl"], r["solver"], r["spacing"]) == key)
                ax.plot(*zip(*pts), ls=style[0], marker=style[1], ms=3.5, lw=1.5, color=colors[i % len(colors)],
                        label=f"{key[0]} {key[1]} [{key[2]}]")
        ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)", title=title)
        ax.set_xticks(sorted(nfes or {r["nfe"] for r in rows}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    top = max(r["rmse"] for r in rows)
    if top > 1.0:  # diverged runs (RMSE > 1 on data in [-1, 1]) would squash the informative range
        axes[0].set_ylim(top=1.0)
    axes[0].set_ylabel("RMSE of x0 vs reference ODE solution" + (" (clipped at 1)" if top > 1.0 else ""))
    fig.suptitle(f"Solver error vs NFE on {doc['model'].get('name')} (w = {doc['model'].get('w')}, "
                 f"{doc['model'].get('samples')} samples)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
