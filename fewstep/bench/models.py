"""The benchmark's models: one discrete-time model that every diffusers scheduler can drive, plus
its fewstep denoiser.

``gmm-mnist`` is exact (a Gaussian mixture fitted to MNIST, its denoiser E[x0 | x_t] in closed
form, linear betas, eps prediction, guided); ``gmm-sd-v`` and ``gmm-cosine`` are exact too, mixtures
of a few narrow modes on other beta schedules (scaled-linear with v prediction, cosine with eps), so
that no default is tuned to one model; ``mnist-teacher`` and fewstep model folders go through ``fewstep.load``; a diffusers
UNet2DModel folder through ``from_pretrained``. ``load_bench_model`` picks by name or path.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..schedules import DiscreteVP, NoiseSchedule, betas_by_name

__all__ = ["BenchArgumentError", "BenchModel", "GMMModel", "GMMEpsModel", "mnist_mixture", "gmm_mnist_model",
           "narrow_mixture", "synthetic_model", "SYNTHETIC", "diffusers_folder_model", "fewstep_model",
           "load_bench_model", "MODELS", "NULL_LABEL", "GMM_DEFAULT_W"]

MODELS = ("gmm-mnist", "gmm-sd-v", "gmm-cosine", "mnist-teacher", "flow-mixture")  # flow-mixture: fewstep.bench.flow
NULL_LABEL = -1  # the unconditional "class" of the gmm-mnist model
GMM_DEFAULT_W = 1.0  # guidance_scale 2 (same as the MNIST teacher's previews)


class BenchArgumentError(ValueError):
    """A benchmark argument is wrong (unknown model, bad NFE list, ...): the CLI exits 2."""



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
    grids: Path | None = None  # the model's folder of tuned grids (``fewstep.grids``), if it ships any

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


class GMMModel:
    """A model with discrete timesteps whose x0 is a Gaussian mixture's exact denoiser E[x0 | x_t]
    (``GaussianMixture.denoiser``): a perfectly trained model, giving ``prediction`` ("eps" or "v").

    ``model(x, timestep, labels=None)``: timestep n (float allowed) is time t = (n + 1) / N;
    rows labelled ``NULL_LABEL`` use the unconditional mixture. The mixture runs on row
    chunks of about ``chunk_elements`` rows * components * dims, which keeps its temporaries
    cache-sized (about 10x faster than one big batch on this project's CPU).
    """

    def __init__(self, mixture, schedule: DiscreteVP, prediction: str = "eps", chunk_elements: int = 1 << 18):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.mixture, self.schedule, self.prediction = mixture, schedule, prediction
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
        eps = (xd - a * x0) / s
        out = eps if self.prediction == "eps" else a * eps - s * x0  # v = alpha eps - sigma x0
        return out.to(x.dtype)

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


class GMMEpsModel(GMMModel):
    """``GMMModel`` giving eps (the gmm-mnist model)."""

    def __init__(self, mixture, schedule: DiscreteVP, chunk_elements: int = 1 << 18):
        super().__init__(mixture, schedule, "eps", chunk_elements)


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


def narrow_mixture(dim: int, components: int, std_range: tuple, spread: float, seed: int):
    """A mixture of ``components`` narrow diagonal Gaussians in ``dim`` dimensions, made from ``seed``:
    means N(0, spread^2) per value, per-value stds log-uniform in ``std_range``, weights from a flat
    Dirichlet (so modes of unequal mass and width, as latents of real data have)."""
    from ..data.gmm import GaussianMixture
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64))
    weights = -torch.log(torch.rand(components, generator=g, dtype=torch.float64))
    return GaussianMixture(means, stds, weights / weights.sum())


# name -> (dims as a latent shape, components, std range, spread, seed, beta schedule, betas, prediction)
SYNTHETIC = {
    "gmm-sd-v": ((2, 4, 4), 8, (0.02, 0.2), 0.7, 1, "scaled_linear", (0.00085, 0.012), "v"),
    "gmm-cosine": ((16,), 6, (0.01, 0.3), 0.5, 2, "squaredcos_cap_v2", (0.0001, 0.02), "eps"),
}


def synthetic_model(name: str, w: float | None) -> BenchModel:
    """An exact unconditional mixture of narrow modes on another beta schedule and prediction type
    (``SYNTHETIC``): ``gmm-sd-v`` (32 values shaped like a latent, Stable Diffusion's scaled-linear
    betas, v prediction) and ``gmm-cosine`` (16 values, cosine betas, eps prediction)."""
    if w not in (None, 0, 0.0):
        raise BenchArgumentError(f"{name} is unconditional: leave out --w")
    shape, k, stds, spread, seed, betas, (b0, b1), pred = SYNTHETIC[name]
    mixture = narrow_mixture(math.prod(shape), k, stds, spread, seed)
    schedule = DiscreteVP(betas=betas_by_name(betas, 1000, b0, b1))
    kw = {"num_train_timesteps": 1000, "beta_schedule": betas, "beta_start": b0, "beta_end": b1,
          "prediction_type": "epsilon" if pred == "eps" else "v_prediction"}
    info = {"name": name, "description": f"unconditional mixture of {k} narrow diagonal Gaussians in "
            f"{math.prod(shape)} dims (stds {stds[0]:g}-{stds[1]:g}, seed {seed}); exact denoiser as a "
            f"{pred}-prediction model, {betas} betas", "components": k, "shape": list(shape),
            "schedule": f"DiscreteVP, {betas} betas {b0:g}..{b1:g}, N = 1000", "prediction": pred, "w": 0.0}
    return BenchModel(name, schedule, GMMModel(mixture, schedule, pred), pred, shape, kw, info=info)


_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def diffusers_folder_model(path: str, w: float | None) -> BenchModel:
    """A diffusers UNet2DModel folder (``from_pretrained``) with its scheduler config, which
    gives the betas and the prediction type. The folder is either a pipeline folder
    (``unet/``, ``scheduler/``) or one folder holding both configs."""
    p = Path(path)
    unet_dir = p / "unet" if (p / "unet" / "config.json").is_file() else p
    _check_unet2d(p, unet_dir)
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


def _check_unet2d(folder: Path, unet_dir: Path) -> None:
    """The solver bench samples unconditional / class-conditional ``UNet2DModel`` folders; say so in one
    line for a text-to-image pipeline (its denoiser needs prompts) or any other model class."""
    index = folder / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name", "a pipeline") if index.is_file() else None
    config = unet_dir / "config.json"
    cls = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if cls in (None, "UNet2DModel") and not (pipeline and cls is None):
        return
    what = f"{pipeline} (its {cls or 'denoiser'} needs prompts)" if pipeline else f"a {cls} folder"
    raise BenchArgumentError(f"{folder} is {what}; `fewstep bench solvers` runs UNet2DModel folders (unconditional "
                             "or class-conditional): run a text-to-image pipeline with "
                             "FewstepScheduler.from_config(pipe.scheduler.config) in the pipeline call")


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
    from ..api import _resolve
    grids = _resolve(name)
    return BenchModel(name, schedule, _discretized_eps(loaded.denoiser(0.0), cont, schedule), "eps",
                      tuple(loaded.image_shape), kw, num_classes=loaded.num_classes, null_label=loaded.null_class,
                      w=w, info=info, grids=grids if any(grids.glob("grids/*.json")) else None)


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
    if model in SYNTHETIC:
        return synthetic_model(model, w)
    if model == "mnist-teacher":
        return fewstep_model(model, w)
    if os.path.isdir(model):
        p = Path(model)
        if any((p / f).is_file() for f in ("scheduler_config.json", "scheduler/scheduler_config.json")):
            return diffusers_folder_model(model, w)
        if (p / "model_index.json").is_file():
            return diffusers_folder_model(model, w)  # a pipeline folder without a scheduler: refused there
        diffusers_cls = json.loads((p / "config.json").read_text()).get("_class_name") if (
            p / "config.json").is_file() else None
        if diffusers_cls:
            raise BenchArgumentError(f"{model} holds a diffusers {diffusers_cls} without its scheduler: put the "
                                     "scheduler_config.json it was trained with beside config.json, or give the "
                                     "pipeline folder (unet/ and scheduler/)")
        if any((p / f).is_file() for f in ("config.json", "model/config.json")):
            return fewstep_model(model, w)
        raise BenchArgumentError(f"{model} is neither a diffusers model folder (scheduler_config.json or "
                                 "scheduler/scheduler_config.json) nor a fewstep model folder (config.json)")
    if os.path.exists(model):
        raise BenchArgumentError(f"--model {model!r} is a file; give a model folder or one of: "
                                 f"{', '.join(MODELS)}")
    raise BenchArgumentError(f"unknown model {model!r} (no such folder either); choose one of "
                             f"{', '.join(MODELS)} or a path to a diffusers model folder or a fewstep model folder")

