"""Loading fewstep models and generating images with them: ``fewstep.load`` and ``fewstep.generate``.

A model folder holds ``model.safetensors`` + ``config.json``. Shipped models live in
``fewstep/assets/<name>/`` and load by name; a training run's folder loads through
its ``model/`` export.

Diffusers folders load too: a pipeline folder (``model_index.json``: the text-to-image test bed's
``mnist-sd`` / ``mnist-sd3``, or any diffusers pipeline) comes back as the diffusers pipeline itself, a
model folder (``config.json`` with ``_class_name``: ``mnist-vae``) as the diffusers model.
``generate(pipe, prompts=[...])`` samples a text-to-image pipeline with any fewstep solver.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .distributed import gather_batches, my_batches, process_group, sample_generators
from .denoisers import ClassifierFreeGuidance, ModelDenoiser
from .nets import load_net, read_config
from .sampling import DEFAULT_SOLVER, expected_nfe, sample, solver_grid
from .schedules import schedule_from_config
from .solvers import SamplerOutput

__all__ = ["SHIPPED", "CATALOGUE", "DIFFUSERS_CATALOGUE", "DIFFUSERS_SHIPPED", "ASSETS", "load", "generate",
           "is_pipeline", "generate_from_prompts", "check_prompts", "encode_prompts", "pipeline_calls", "NetworkModel",
           "DiffusionModel", "StudentModel", "GeneratorModel", "EncoderModel", "sample_generators"]

ASSETS = Path(__file__).parent / "assets"
CATALOGUE = {
    "mnist-teacher": "class-conditional MNIST diffusion model (v-prediction, cosine schedule, CFG)",
    "mnist-classifier": "MNIST classifier whose features define FID/KID/IS here",
    "mnist-guided-stage1": "guided-distillation stage 1: the teacher with w as an input (one call per step)",
    "mnist-guided-8": "guided + progressive distilled student, 8 steps",
    "mnist-guided-4": "guided + progressive distilled student, 4 steps",
    "mnist-guided-2": "guided + progressive distilled student, 2 steps",
    "mnist-guided-1": "guided + progressive distilled student, 1 step",
    "mnist-guided-encoder-4": "distilled 4-step encoder (guided DDIM inversion) for class-to-class translation",
    "mnist-dmd-1": "DMD one-step generator (guidance w = 1 baked in)",
    "mnist-dmd2-4": "DMD2 four-step generator (backward simulation, GAN, guidance w = 1 baked in)",
}
# diffusers folders shipped by name (the text-to-image test bed): load() returns the diffusers object itself
DIFFUSERS_CATALOGUE = {
    "mnist-vae": "AutoencoderKL for 32x32 digits -> 4x8x8 latents (the text-to-image test bed's VAE)",
    "mnist-sd": "text-to-image StableDiffusionPipeline on MNIST captions ('a thick seven slanted left')",
    "mnist-sd3": "text-to-image StableDiffusion3Pipeline (no T5) on MNIST captions",
    "mnist-sd-guided-4": "guided + progressive distilled mnist-sd, 4 steps, w an input (guidance_scale = 1 + w)",
    "mnist-sd-dmd-1": "one-step DMD generator of mnist-sd, a StableDiffusionPipeline (DDIM, 1 step, w = 1 baked in)",
    "mnist-sd-dmd-1-lora": "mnist-sd-dmd-1 as a rank-16 LoRA of mnist-sd (pytorch_lora_weights.safetensors + "
                           "merged pipeline)",
    "mnist-sd-dmd-1-cooldown": "mnist-sd-dmd-1 trained on at half the learning rate: its successor is "
                               "mnist-sd-dmd-1-ttur (DDIM, 1 step, w = 1 baked in)",
    "mnist-sd-dmd-1-ttur": "mnist-sd-dmd-1-cooldown trained on with 3 fake-score updates per generator update: its "
                           "successor is mnist-sd-dmd-1-anneal (DDIM, 1 step, w = 1 baked in)",
    "mnist-sd-dmd-1-anneal": "the mnist-sd-dmd-1-ttur run continued at 0.3x the generator's learning rate: the best "
                             "one-step generator of mnist-sd (DDIM, 1 step, w = 1 baked in)",
    "mnist-sd3-dmd-1": "one-step DMD generator of mnist-sd3, a StableDiffusion3Pipeline (1 Euler step, w = 1 baked in)",
}
STUDENT_RECIPES = {"mnist-sd-guided-4": "fewstep distill guided --teacher mnist-sd --until 4 --out DIR",
                   "mnist-sd-dmd-1": "fewstep distill dmd --teacher mnist-sd --out DIR",
                   "mnist-sd-dmd-1-lora": "fewstep distill dmd --preset mnist-sd-dmd-1-lora --out DIR",
                   "mnist-sd-dmd-1-cooldown": "fewstep distill dmd --preset mnist-sd-dmd-1-cooldown --out DIR",
                   "mnist-sd-dmd-1-ttur": "fewstep distill dmd --preset mnist-sd-dmd-1-ttur --out DIR",
                   "mnist-sd-dmd-1-anneal": "fewstep distill dmd --preset mnist-sd-dmd-1-anneal --out DIR",
                   "mnist-sd3-dmd-1": "fewstep distill dmd --teacher mnist-sd3 --out DIR"}
TEXT_BED_RECIPES = ("mnist-sd", "mnist-sd3")  # their prompts follow fewstep.data.captions' grammar


def _installed(folder: Path) -> bool:
    """Whether ``folder`` holds a model: fewstep's or diffusers' config.json, or a pipeline's model_index.json."""
    return (folder / "config.json").is_file() or (folder / "model_index.json").is_file()


# the catalogues' models whose weights are in this installation (the others are still training); fewstep's
# own models and the diffusers folders are kept apart: SHIPPED's folders are fewstep model folders
SHIPPED = {name: what for name, what in CATALOGUE.items() if _installed(ASSETS / name)}
DIFFUSERS_SHIPPED = {name: what for name, what in DIFFUSERS_CATALOGUE.items() if _installed(ASSETS / name)}
RECIPE_OF = {"mnist-guided": "fewstep distill guided --out DIR", "mnist-dmd": "fewstep distill dmd --out DIR",
             **{name: f"fewstep train {name} --out DIR" for name in DIFFUSERS_CATALOGUE}, **STUDENT_RECIPES}


class NetworkModel:
    """A trained diffusion-family network with its schedule and conventions, whatever it is for
    (a sampler: ``DiffusionModel`` and its subclasses; an encoder: ``EncoderModel``).

    ``denoiser(w)`` gives the fewstep denoiser ``D(x, t, labels=None)``; labels=None or the
    null class is the unconditional model; w > 0 applies classifier-free guidance
    x_w = (1 + w) x_cond - w x_uncond (or, for a net with w as an input, passes w to it).
    ``evaluations(...)`` says how many network evaluations per image its own use costs.
    """

    def __init__(self, net: torch.nn.Module, config: dict, source: str = ""):
        self.net, self.config, self.source = net.eval(), config, source
        self.schedule = schedule_from_config(config["schedule"])
        self.prediction = config["prediction"]
        self.num_classes = config.get("num_classes")
        self.null_class = config.get("null_class")
        self.image_shape = tuple(config.get("image_shape") or (net.config.in_channels, net.config.image_size,
                                                               net.config.image_size))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source or self.config.get('recipe', '?')}, {self.prediction}, "
                f"{self.schedule!r})")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "NetworkModel":
        self.net.to(device)
        return self

    @property
    def w_input(self) -> bool:
        """Whether guidance is an input of the net (a guided-distilled student) rather than CFG."""
        return bool(self.config.get("w_input"))

    def _net_call(self, x, t, labels=None):
        return self.net(x, t, labels)

    def denoiser(self, w: float = 0.0) -> Callable:
        if self.w_input:  # one call per step: the student was trained to output the guided x0 at w
            call = lambda x, t, labels=None: self.net(x, t, labels, w)  # noqa: E731
            return ModelDenoiser(call, self.schedule, self.prediction, time_input="continuous")
        den = ModelDenoiser(self._net_call, self.schedule, self.prediction, time_input="continuous")
        if w == 0:
            return den
        if self.num_classes is None:
            raise ValueError("guidance w needs a class-conditional model; this one has no classes")
        null = self.null_class
        return ClassifierFreeGuidance(den, w, lambda cond: {"labels": torch.full_like(cond["labels"], null)})

    def evaluations_per_call(self, w: float = 0.0) -> int:
        """Network evaluations in one model call at guidance ``w``: 2 under classifier-free guidance
        (conditional + unconditional, even when both run in one batched call), else 1."""
        return 2 if (w and not self.w_input) else 1

    def evaluations(self, solver: str | None = None, steps: int | None = None, w: float = 0.0,
                    spacing: str = "logsnr", *, calls: int | None = None) -> int | None:
        """Network evaluations per image that sampling with (solver, steps, w) costs this model: the
        sampler's model calls (``nfe``) times ``evaluations_per_call(w)``. For an adaptive solver the
        calls are not known ahead: pass the ``calls`` counted while sampling, else None comes back.
        The one place this count is made; the demo, app, benchmarks, eval and cli report it.
        (An encoder: the evaluations of one encoding.)"""
        n = self.nfe(solver, steps, spacing)
        n = calls if n is None else n
        return None if n is None else n * self.evaluations_per_call(w)

    def nfe(self, solver=None, steps=None, spacing=None) -> int | None:
        """Model calls per image of this model's use (each subclass says)."""
        raise NotImplementedError


class DiffusionModel(NetworkModel):
    """A diffusion model sampled by any fewstep solver (``fewstep.generate``); distilled students
    and generators narrow this to their own sampler."""

    default_steps = 20
    fixed_steps = False  # True for students and generators: they sample with their own steps, not a solver

    def nfe(self, solver: str, steps: int, spacing: str = "logsnr") -> int | None:
        """Model calls per image (a guided call counts once: it is one batched cond + uncond call; see
        ``evaluations`` for the network evaluations)."""
        solver, steps = DiffusionModel.check_sampling(self, solver, steps, 0.0)
        grid, extra = solver_grid(self.schedule, solver, steps, "logsnr" if spacing in (None, "tuned") else spacing)
        return expected_nfe(solver, grid, extra)

    def check_sampling(self, solver: str | None, steps: int | None, w: float) -> tuple[str, int]:
        """The (solver, steps) to use; distilled models refuse settings they were not trained for."""
        return ("dpmpp_2m" if solver is None else solver), (self.default_steps if steps is None else steps)

    @torch.no_grad()
    def sample_batch(self, x_T: torch.Tensor, labels: torch.Tensor | None, *, w: float, solver: str, steps: int,
                     spacing: str, generator, progress: bool, **options) -> SamplerOutput:
        cond = None if labels is None else {"labels": labels}
        return sample(self.denoiser(w), x_T, self.schedule, solver=solver, steps=steps, spacing=spacing,
                      cond=cond, generator=generator, progress=progress, **options)


class _FixedSteps:
    """Models that sample with their own number of network calls (students, generators)."""

    fixed_steps = True

    def nfe(self, solver=None, steps=None, spacing=None) -> int:
        return self.default_steps

    def _check_steps(self, steps, what: str) -> None:
        if steps is not None and steps != self.default_steps:
            raise ValueError(f"{self.source or 'this model'} is {what}; sample it with steps={self.default_steps} "
                             "(or leave steps out)")


class StudentModel(_FixedSteps, DiffusionModel):
    """A guided/progressive distilled N-step student: DDIM on its own grid (deterministic) or the
    paper's stochastic sampler (``stochastic=True``); w is an input of the net when it was guided-distilled
    (``w_input``), else w > 0 applies classifier-free guidance (two network evaluations per call)."""

    @property
    def student_steps(self) -> int:
        return int(self.config["student_steps"])

    @property
    def default_steps(self) -> int:
        return self.student_steps

    def check_sampling(self, solver, steps, w):
        self._check_steps(steps, f"a {self.student_steps}-step student")
        if solver not in (None, "ddim"):
            raise ValueError(f"a distilled student samples with its own DDIM grid, not solver {solver!r}; leave "
                             "solver out (stochastic=True for the stochastic sampler)")
        return "ddim", self.student_steps

    @torch.no_grad()
    def sample_batch(self, x_T, labels, *, w: float, solver=None, steps=None, spacing=None, generator=None,
                     progress: bool = False, stochastic: bool | float = False, **options) -> SamplerOutput:
        from .distill.samplers import sample_student
        if options:
            raise ValueError(f"a distilled student takes no solver options ({', '.join(options)})")
        cond = None if labels is None else {"labels": labels}
        return sample_student(self.denoiser(w), x_T, self.schedule, self.student_steps, stochastic=stochastic,
                              cond=cond, generator=generator, progress=progress)


class EncoderModel(NetworkModel):
    """A distilled N-step encoder (guided DDIM inversion): ``encode(x0, labels, w)`` -> latent at t_max.
    It has no sampler (it maps data to noise); pair it with a decoder student (``fewstep.distill.translate``)."""

    @property
    def student_steps(self) -> int:
        return int(self.config["student_steps"])

    def nfe(self, solver=None, steps=None, spacing=None) -> int:
        """Model calls of one encoding: its own step count."""
        return self.student_steps

    @torch.no_grad()
    def encode(self, x0: torch.Tensor, labels: torch.Tensor, w: float = 0.0) -> torch.Tensor:
        from .distill.samplers import encode_student
        return encode_student(self.denoiser(w), x0, self.schedule, self.student_steps, cond={"labels": labels}).x


class GeneratorModel(_FixedSteps, DiffusionModel):
    """A DMD / DMD2 generator: x0 = G(sigma(t_0) z, t_0) in one step, or DMD2's multi-step
    rollout over its fixed times (re-noising with fresh per-sample noise between steps).
    The guidance weight it was distilled with (``real_w``) is baked in."""

    @property
    def times(self) -> torch.Tensor:
        return torch.tensor(self.config["generator_times"], dtype=torch.float64)

    @property
    def default_steps(self) -> int:
        return len(self.config["generator_times"])

    def evaluations_per_call(self, w: float = 0.0) -> int:
        return 1  # its guidance is baked into the weights: one evaluation per call at any w

    def check_sampling(self, solver, steps, w):
        self._check_steps(steps, f"a {self.default_steps}-step generator at fixed times")
        if solver is not None:
            raise ValueError("a DMD generator has its own sampler; leave solver out")
        if w not in (0.0, float(self.config.get("real_w", 0.0))):
            raise ValueError(f"{self.source or 'this generator'} has guidance w={self.config.get('real_w')} baked "
                             f"in; leave w out")
        return None, self.default_steps

    @torch.no_grad()
    def sample_batch(self, x_T, labels, *, w=0.0, solver=None, steps=None, spacing=None, generator=None,
                     progress: bool = False, **options) -> SamplerOutput:
        from .distill.dmd import generator_sample
        from .solvers._common import randn_like
        if options:
            raise ValueError(f"a DMD generator takes no sampler options ({', '.join(options)})")
        x0_fn = self.denoiser(0.0)  # guidance is baked into the generator's weights
        gen = lambda x, t, labels: x0_fn(x, t, labels=labels)  # noqa: E731
        x0 = generator_sample(gen, x_T, labels, self.schedule, self.times.to(x_T.device),
                              noise=lambda like: randn_like(like, generator))[1]
        return SamplerOutput(x0, self.default_steps, self.times)


def _shipped_names() -> list[str]:
    """Every catalogue name whose folder is in this installation now (a folder added later counts)."""
    return [name for name in (*CATALOGUE, *DIFFUSERS_CATALOGUE) if _installed(ASSETS / name)]


def _resolve(name_or_path) -> Path:
    name = str(name_or_path)
    if name in CATALOGUE or name in DIFFUSERS_CATALOGUE:
        folder = ASSETS / name
        if _installed(folder):
            return folder
        if name in SHIPPED or name in DIFFUSERS_SHIPPED:
            raise FileNotFoundError(f"shipped model {name!r} is not in this installation ({folder} is missing)")
        if not Path(name).exists():
            recipe = RECIPE_OF.get(name) or next((cmd for prefix, cmd in RECIPE_OF.items() if name.startswith(prefix)),
                                                 "its recipe")
            raise FileNotFoundError(f"{name!r} is not shipped in this version yet (its training is in progress); "
                                    f"make it with `{recipe}` and load DIR/{'export/' if name in STUDENT_RECIPES else ''}"
                                    f"{name}")
    folder = Path(name_or_path)
    if not folder.exists():
        raise FileNotFoundError(f"no model named {name!r}: not a shipped model ({', '.join(_shipped_names())}) "
                                "and no such folder")
    if not _installed(folder) and (folder / "model" / "config.json").is_file():
        folder = folder / "model"  # a training run's export
    return folder


# config.json keys: what each kind of model needs, what it may use, and what only records its history
_REQUIRED = {"diffusion": {"arch", "net_config", "kind", "prediction", "schedule", "image_shape"},
             "classifier": {"arch", "net_config", "kind"}}
_REQUIRED.update(student=_REQUIRED["diffusion"] | {"student_steps"}, encoder=_REQUIRED["diffusion"] | {"student_steps"},
                 generator=_REQUIRED["diffusion"] | {"generator_times"})
_OPTIONAL = {"num_classes", "null_class", "w_input", "real_w", "time_input", "sampler", "data_range", "guidance",
             "w_range", "label_dropout"}
_RECORDS = {"recipe", "train_seconds", "train_steps", "train_split", "train_accuracy", "heldout_accuracy",
            "heldout_split", "teacher", "pipeline", "preset", "snapshot", "time_input_note", "features", "input"}


def check_config(cfg: dict, folder) -> None:
    """Refuse a model config.json with a missing or an unknown key (a typo would otherwise be ignored)."""
    kind = cfg.get("kind", "classifier" if cfg.get("arch") == "cnn_classifier" else None)
    if kind not in _REQUIRED:
        raise ValueError(f"{folder}/config.json: unknown model kind {cfg.get('kind')!r}; expected one of "
                         f"{', '.join(sorted(_REQUIRED))}")
    missing = sorted(_REQUIRED[kind] - set(cfg))
    if missing:
        raise ValueError(f"{folder}/config.json lacks {', '.join(map(repr, missing))} (a {kind} model needs them)")
    unknown = sorted(set(cfg) - _REQUIRED[kind] - _OPTIONAL - _RECORDS)
    if unknown:
        raise ValueError(f"{folder}/config.json has unknown key(s) {', '.join(map(repr, unknown))}; "
                         "fix the name or remove it")


def diffusers_class(folder: Path) -> str | None:
    """The diffusers class a folder holds (a pipeline's model_index.json or a model's config.json
    ``_class_name``), or None for a fewstep model folder."""
    for name in ("model_index.json", "config.json"):
        try:
            cfg = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and "_class_name" in cfg:
            return cfg["_class_name"]
    return None


def _absent_components(folder: Path) -> dict:
    """``name=None`` for every component model_index.json lists as [null, null] (e.g. SD3 saved without its
    T5 encoder: text_encoder_3, tokenizer_3), so from_pretrained does not look for them."""
    index = json.loads((folder / "model_index.json").read_text())
    return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[-1] is None}


def _dtype_keyword() -> str:
    """from_pretrained's precision keyword: ``dtype`` in recent diffusers (``torch_dtype`` there warns)."""
    from diffusers.utils import deprecation_utils
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' loading progress bars and import-time warnings off while a folder loads
    (a load takes well under a second; the command line keeps stderr for errors)."""
    from diffusers.utils import logging as diffusers_logging
    loggers = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging
        loggers.append(transformers_logging)
    except ImportError:  # a pipeline without text encoders, or a VAE, loads without transformers
        pass
    bars = [(m, m.is_progress_bar_enabled()) for m in loggers]
    levels = [(m, m.get_verbosity()) for m in loggers]
    for m, _ in bars:
        m.disable_progress_bar()
    for m, _ in levels:
        m.set_verbosity_error()
    try:
        yield
    finally:
        for m, enabled in bars:
            if enabled:
                m.enable_progress_bar()
        for m, level in levels:
            m.set_verbosity(level)


def _load_diffusers(folder: Path, cls_name: str, device, dtype):
    """The diffusers pipeline or model of ``folder`` (``from_pretrained``, offline) on ``device``."""
    import diffusers
    dtype = torch.float32 if dtype is None else dtype
    pipeline = (folder / "model_index.json").is_file()
    cls = diffusers.DiffusionPipeline if pipeline else getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{folder}/config.json names {cls_name!r}, which is not a diffusers model class")
    extra = {**(_absent_components(folder) if pipeline else {}), _dtype_keyword(): dtype}
    try:
        with _quiet_loading():
            obj = cls.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"cannot load the diffusers {cls_name} in {folder}: {reason}") from None
    return obj.to(device)


def load(name_or_path, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None):
    """Load a shipped model by name (``mnist-teacher``, ``mnist-classifier``, ``mnist-sd``, ...) or a model folder.

    fewstep model folders: diffusion models come back as ``DiffusionModel`` (students, generators and
    encoders as their subclasses); classifiers as the network. Diffusers folders come back as the diffusers
    object itself: a pipeline folder (``model_index.json``; ``mnist-sd``, ``mnist-sd3``) as the pipeline
    (``DiffusionPipeline.from_pretrained``; components saved as absent, such as SD3's T5, stay None; its
    ``name_or_path`` is the folder), a model folder (``mnist-vae``) as the model. They load in float32 unless
    ``dtype`` is given (the shipped ones are stored in float16); ``dtype`` is for diffusers folders only."""
    folder = _resolve(name_or_path)
    cls_name = diffusers_class(folder)
    if cls_name is not None:
        return _load_diffusers(folder, cls_name, device, dtype)
    if dtype is not None:
        raise ValueError(f"dtype= is for diffusers folders; {name_or_path} is a fewstep model (float32): leave dtype "
                         "out, or use torch.autocast")
    cfg = read_config(folder)
    check_config(cfg, folder)
    net = load_net(folder).to(device)
    kinds = {"diffusion": DiffusionModel, "student": StudentModel, "generator": GeneratorModel,
             "encoder": EncoderModel}
    if cfg.get("kind") in kinds:
        return kinds[cfg["kind"]](net, cfg, str(name_or_path))
    return net.eval()


def shipped_solver(model, steps: int, *, solver: str | None = None, w: float | None = None):
    """The tuned solver (``fewstep.grids.TunedGrid``: times and learned coefficients) shipped in a model's
    ``grids/`` folder for ``steps`` model calls: ``model`` a shipped name (``mnist-teacher``, ``mnist-sd``,
    ``mnist-sd3``) or a folder; ``solver`` / ``w`` narrow the choice when several match (default: the one with
    the lowest recorded held-out error, those without one last). For a pipeline: ``pipe.scheduler =
    FewstepScheduler.from_config(pipe.scheduler.config, grid=fewstep.shipped_solver("mnist-sd", 5))`` then
    ``pipe(prompt, num_inference_steps=5)``."""
    from .grids import find_grid, shipped_grids
    folder = _resolve(model)
    if solver is None:
        found = [g for g in shipped_grids(folder) if g.nfe == steps and (w is None or g.w is None
                                                                       or float(g.w) == float(w))]
        if found:  # several solvers fitted for this budget: the best on held-out noises
            return min(found, key=lambda g: g.heldout.get("rmse", float("inf")))
        solver = "dpmpp_2m"  # for find_grid's error, which lists what is there
    return find_grid(folder, solver, steps, w)


def _tuned_grid(model, grid, solver: str, steps: int, w: float):
    """The grid times for ``spacing="tuned"`` (the model's shipped grid) or a given ``grid=``."""
    from .grids import TunedGrid
    if isinstance(model, _FixedSteps):
        raise ValueError(f"{model.source or 'this model'} samples with its own fixed steps; it takes no grid")
    if grid is None:
        if not model.source:
            raise ValueError("spacing='tuned' needs a shipped model or a model folder with grids/*.json")
        grid = shipped_solver(model.source, steps, solver=solver, w=w)
    if isinstance(grid, TunedGrid) and grid.learned:  # checked here; its coefficients go on to the sampler
        return grid.for_use(model.schedule, solver=solver, model=model, w=w)
    if isinstance(grid, TunedGrid):
        return grid.grid_for(model.schedule, solver=solver, model=model, w=w)
    return grid


def _check_generates(model) -> None:
    """Refuse what has no sampler: an encoder (data -> noise), a classifier."""
    if isinstance(model, EncoderModel):
        raise TypeError(f"{model.source or 'this model'} is an encoder (data -> noise); generate with a decoder "
                        "student, or translate with `fewstep translate`")
    if not hasattr(model, "sample_batch"):
        raise TypeError(f"cannot generate with a {type(model).__name__}; load a diffusion model or student")


def is_pipeline(model) -> bool:
    """Whether ``model`` is a diffusers pipeline (what ``load`` returns for a pipeline folder)."""
    return hasattr(model, "components") and hasattr(model, "scheduler") and not isinstance(model, NetworkModel)


@torch.no_grad()
def generate(model, labels=None, *, prompts=None, n: int | None = None, w: float = 0.0, solver: str | None = None,
             steps: int | None = None, spacing: str = "logsnr", seed: int = 0, batch_size: int = 256,
             progress: bool = False, **options) -> torch.Tensor:
    """Generate images in [-1, 1], shape (N, C, H, W).

    labels: class ids (N,) for a conditional model, or None with ``n`` for unconditional
      samples. Image i depends only on (seed, i), not on the batch size (equal up to float round-off,
      ~1e-6, since batched kernels may sum in another order).
    prompts: for a text-to-image diffusers pipeline (``mnist-sd``, ``mnist-sd3``, a loaded pipeline or its
      folder) instead of labels: a prompt or a list of them; image i gets ``prompts[i % len(prompts)]``
      (``n`` defaults to ``len(prompts)``). See ``generate_from_prompts``.
    w: classifier-free guidance weight (x_w = (1 + w) x_cond - w x_uncond; diffusers' guidance_scale is 1 + w).
    solver / steps / spacing: any fewstep solver and its budget of model calls (default
      dpmpp_2m, 20; for a pipeline ``fewstep.sampling.DEFAULT_SOLVER``, unipc_bh2_3, and 20); distilled
      students and DMD generators use their own sampler and step count.
      ``spacing="tuned"``: the model's shipped tuned grid for (solver, steps, w) (``<model>/grids/``;
      an error names the grids there when none matches); ``grid=`` a ``fewstep.grids.TunedGrid`` (warns
      when fitted to another model, w, solver or schedule) or a tensor of times.
    options: solver options; ``stochastic=True`` for a distilled student's stochastic sampler.
    Under several processes (an initialised torch.distributed group) each process makes every
    world-th batch and all of them return the whole set, the same images as one process makes.
    """
    if isinstance(model, (str, Path)):
        model = load(model)
    if is_pipeline(model):
        if labels is not None:
            raise ValueError(f"{_pipeline_name(model)} is a text-to-image pipeline: pass prompts=[...] (e.g. "
                             "prompts=['a handwritten seven']), not labels")
        return generate_from_prompts(model, prompts, n=n, w=w, solver=solver, steps=steps, spacing=spacing,
                                     seed=seed, batch_size=batch_size, progress=progress, **options)
    _check_generates(model)
    if prompts is not None:
        what = "class-conditional: pass labels= (class ids)" if model.num_classes else "unconditional: pass n="
        raise ValueError(f"prompts= is for text-to-image pipelines (mnist-sd, mnist-sd3, a diffusers pipeline folder); "
                         f"{model.source or 'this model'} is {what}")
    w = float(w)
    if not np.isfinite(w):
        raise ValueError(f"guidance w must be finite, got {w}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if model.num_classes is None:
            raise ValueError("labels given but the model is unconditional")
        if (labels < 0).any() or (labels > model.num_classes).any():
            raise ValueError(f"labels must lie in [0, {model.num_classes}] ({model.num_classes} = unconditional)")
        n = len(labels)
    elif w != 0:
        raise ValueError("guidance w needs labels")
    if not n or n < 1:
        raise ValueError("give labels, or n >= 1 for unconditional samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    solver, steps = model.check_sampling(solver, steps, w)
    if spacing == "tuned" or options.get("grid") is not None:
        options["grid"], spacing = _tuned_grid(model, options.get("grid"), solver, steps, w), "logsnr"
    device = model.device
    sigma_max = float(model.schedule.sigma(torch.tensor(model.schedule.t_max, dtype=torch.float64)))
    world, rank = process_group()  # several processes: each makes every world-th batch, then all gather
    outs = []
    for start in my_batches(range(0, n, batch_size), world, rank):
        count = min(batch_size, n - start)
        gens = sample_generators(seed, start, count)
        x_T = torch.cat([torch.randn((1, *model.image_shape), generator=g) for g in gens]).to(device)
        lab = None if labels is None else labels[start:start + count].to(device)
        out = model.sample_batch(x_T * sigma_max, lab,
                                 w=w, solver=solver, steps=steps, spacing=spacing, generator=gens,
                                 progress=progress, **options)
        outs.append(out.x.float().clamp(-1, 1).cpu())
    return torch.cat(gather_batches(outs, world))


# ---------------------------------------------------------------------------
# Text-to-image pipelines
# ---------------------------------------------------------------------------

def _pipeline_folder(pipe) -> str:
    return str(getattr(pipe, "name_or_path", "") or "")


def _pipeline_name(pipe) -> str:
    return Path(_pipeline_folder(pipe)).name or type(pipe).__name__


def _pipeline_record(pipe) -> dict:
    """The ``fewstep.json`` a fewstep recipe wrote beside its exported pipeline ({} for other pipelines)."""
    folder = _pipeline_folder(pipe)
    if not folder:
        return {}
    try:
        return json.loads((Path(folder) / "fewstep.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_prompt_words(prompts: list[str], words: list[str], tokenizer) -> None:
    """Refuse a prompt with a word the pipeline never saw in its training captions (one line)."""
    from .data.text import split_words
    known = set(words)
    for prompt in prompts:
        unknown = [w for w in split_words(prompt, tokenizer) if w not in known]
        if unknown:
            shown = " ".join(sorted(known)[:40]) + (" ..." if len(known) > 40 else "")
            raise ValueError(f"unknown word {unknown[0]!r} in prompt {prompt!r}: this pipeline was trained on captions "
                             f"with the words: {shown}")


def check_prompts(pipe, prompts) -> list[str]:
    """``prompts`` as a list of strings, checked against what the pipeline was trained on: the test bed's
    pipelines (recipe mnist-sd / mnist-sd3 on the MNIST captions) by the caption grammar
    (``fewstep.data.captions.check_prompt``), a test-bed pipeline trained on your own captions by their words;
    other pipelines' prompts are not checked. The empty prompt is the unconditional one."""
    from .data.captions import check_prompt
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts:
        raise ValueError("give prompts=[...] with at least one prompt, e.g. prompts=['a handwritten seven']")
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"a prompt is a string, got {type(bad).__name__} {bad!r}")
    record = _pipeline_record(pipe)
    if "caption_words" in record:
        _check_prompt_words(prompts, record["caption_words"], getattr(pipe, "tokenizer", None))
    elif record.get("recipe") in TEXT_BED_RECIPES or record.get("teacher") in TEXT_BED_RECIPES:
        for prompt in prompts:
            check_prompt(prompt)
    return prompts


def encode_prompts(pipe, prompts: list[str], device, guided: bool) -> dict:
    """The pipeline's own ``encode_prompt`` of ``prompts`` (and, when ``guided``, of the empty negative prompt)
    as ``fewstep.diffusers.sample`` keywords: prompt_embeds / negative_prompt_embeds, plus SD3's pooled ones
    (its T5 part at the pipeline's default max_sequence_length, zero rows without T5)."""
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{type(pipe).__name__} has no text encoder (encode_prompt); sample it with "
                         "fewstep.diffusers.sample(pipe, ...)")
    params = inspect.signature(pipe.encode_prompt).parameters
    negative = [""] * len(prompts)
    if "prompt_3" in params:  # SD3: two CLIP encoders and T5
        e, ne, pooled, npooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                    do_classifier_free_guidance=guided, negative_prompt=negative)
        return {"prompt_embeds": e, "negative_prompt_embeds": ne, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": npooled}
    if "prompt_2" in params or getattr(getattr(pipe, "unet", None), "config", {}).get("addition_embed_type"):
        raise ValueError(f"generate(prompts=) runs Stable Diffusion 1.x/2.x-style and SD3 pipelines, not "
                         f"{type(pipe).__name__}; use pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler"
                         ".config, solver=...) and call the pipeline")
    e, ne = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=negative)
    return {"prompt_embeds": e, "negative_prompt_embeds": ne}


def _pipeline_tuned(pipe, grid, solver, steps, w: float):
    """(tuned grid on the pipeline's schedule, its solver, its steps) for ``spacing="tuned"`` (the solver shipped in
    the pipeline folder's grids/ for ``steps``) or ``grid=`` (a TunedGrid, its JSON path); warns where it was fitted
    to another model, schedule, solver or w."""
    from .diffusers import pipeline_denoiser
    from .grids import TunedGrid, load_grid
    if grid is None:
        if steps is None:
            raise ValueError("spacing='tuned' needs steps=K: the budget whose shipped tuned solver to use")
        grid = shipped_solver(str(getattr(pipe, "name_or_path", "") or ""), steps, solver=solver, w=w)
    elif not isinstance(grid, TunedGrid):
        grid = load_grid(grid)
    if steps is not None and steps != grid.nfe:
        raise ValueError(f"the tuned solver was fitted for {grid.nfe} model calls; pass steps={grid.nfe} or leave "
                         "steps out")
    schedule = pipeline_denoiser(pipe).schedule
    return grid.for_use(schedule, solver=solver or grid.solver, w=w), solver or grid.solver, grid.nfe


def _check_pipeline_sampling(solver, steps, spacing, batch_size, options) -> tuple[str, int]:
    """The (solver, steps) for a pipeline (defaults: DEFAULT_SOLVER, 20); refuses what only fewstep models take."""
    if "stochastic" in options:
        raise ValueError("stochastic= is for distilled students; pick a stochastic solver (e.g. sde_dpmpp_2m) instead")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (DEFAULT_SOLVER if solver is None else solver), (DiffusionModel.default_steps if steps is None else steps)


@torch.no_grad()
def generate_from_prompts(pipe, prompts, *, n: int | None = None, w: float = 0.0, solver: str | None = None,
                          steps: int | None = None, spacing: str = "logsnr", seed: int = 0, batch_size: int = 256,
                          progress: bool = False, **options) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] from a text-to-image diffusers pipeline (a UNet pipeline such as
    StableDiffusionPipeline, or StableDiffusion3Pipeline) sampled by a fewstep solver.

    Prompts are checked first (``check_prompts``), then encoded by the pipeline's own ``encode_prompt``, with
    the empty prompt as the negative one; the pipeline's model is sampled with ``fewstep.diffusers.sample``
    and decoded by its VAE. Image i gets ``prompts[i % len(prompts)]`` (``n`` defaults to ``len(prompts)``)
    and its own noise seeded by (seed, i), so the images do not depend on ``batch_size`` or the number of
    processes.
    w: guidance weight, x_w = (1 + w) x_cond - w x_uncond: ``w`` here is diffusers' ``guidance_scale - 1``
      (w = 2 is ``pipe(..., guidance_scale=3)``); w = 0 (the default) is the conditional model alone, one
      network evaluation per call.
    solver / steps: default ``fewstep.sampling.DEFAULT_SOLVER`` (unipc_bh2_3, also FewstepScheduler's) and 20
      model calls; ``spacing`` and solver options as for ``fewstep.diffusers.sample``.
    """
    prompts = check_prompts(pipe, prompts)
    w = float(w)
    if not np.isfinite(w):
        raise ValueError(f"guidance w must be finite, got {w}")
    n = len(prompts) if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (images; prompts repeat in turn), got {n!r}")
    student = pipeline_student(pipe)
    if student is not None:
        steps, guidance_scale = _check_student_sampling(student, solver, steps, w, options)
    elif spacing == "tuned" or options.get("grid") is not None:
        options["grid"], solver, steps = _pipeline_tuned(pipe, options.get("grid"), solver, steps, w)
        spacing = "logsnr"
        _check_pipeline_sampling(solver, steps, spacing, batch_size, {k: v for k, v in options.items() if k != "grid"})
    else:
        solver, steps = _check_pipeline_sampling(solver, steps, spacing, batch_size, options)
    from .diffusers import sample as pipeline_sample
    device = pipe.device
    world, rank = process_group()
    outs = []
    for start in my_batches(range(0, n, batch_size), world, rank):
        count = min(batch_size, n - start)
        batch = [prompts[i % len(prompts)] for i in range(start, start + count)]
        generators = sample_generators(seed, start, count, device=device)
        if student is not None:  # a distilled student: its own stock call on its own grid
            x = _stock_call(pipe, batch, steps, guidance_scale, generators)
        else:
            cond = encode_prompts(pipe, batch, device, guided=w != 0)
            x = pipeline_sample(pipe, solver=solver, steps=steps, guidance=w, spacing=spacing, progress=progress,
                                generator=generators, **cond, **options)
        outs.append(x.float().cpu())
    return torch.cat(gather_batches(outs, world))


def pipeline_student(pipe) -> dict | None:
    """What a distilled student's pipeline folder records in its fewstep.json (``student_steps``; ``w_input`` for a
    guided student), or None for any other pipeline."""
    folder = Path(str(getattr(pipe, "name_or_path", "") or ""))
    try:
        info = json.loads((folder / "fewstep.json").read_text())
    except (OSError, ValueError):
        return None
    return info if "student_steps" in info else None


def _check_student_sampling(info: dict, solver, steps, w: float, options) -> tuple[int, float]:
    """(steps, guidance_scale) of a student's stock call; one-line refusals of what it was not trained for."""
    k = int(info["student_steps"])
    if solver is not None or options:
        raise ValueError(f"this pipeline is a distilled {k}-step student: it samples with its own scheduler; leave "
                         "solver= (and solver options) out")
    if steps not in (None, k):
        raise ValueError(f"this pipeline is a distilled {k}-step student; pass steps={k} or leave steps out")
    if info.get("w_input"):
        return k, 1.0 + w  # w is an input of the UNet (the stock pipeline feeds guidance_scale - 1)
    if w != 0:
        raise ValueError(f"this student has guidance w = {info.get('real_w', '?')} baked in; pass w=0")
    return k, 1.0


def _stock_call(pipe, prompts: list[str], steps: int, guidance_scale: float, generators) -> torch.Tensor:
    """Images in [-1, 1] of the pipeline's own call from per-sample seeded initial latents."""
    net = getattr(pipe, "unet", None) or pipe.transformer
    size = net.config.sample_size
    shape = (net.config.in_channels, *((size, size) if isinstance(size, int) else size))
    dtype = next(net.parameters()).dtype
    latents = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generators]).to(dtype)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                  output_type="pt").images
    return images.float() * 2 - 1


def pipeline_calls(pipe, solver: str | None = None, steps: int | None = None, spacing: str = "logsnr") -> int | None:
    """Model calls per image that ``generate_from_prompts`` spends with (solver, steps) (None for adaptive
    solvers); a guided call (w > 0) is one batched cond + uncond call. Flow pipelines (SD3) spend the first
    call on their exact first step from pure noise, as ``fewstep.diffusers.sample`` does."""
    from .diffusers import pipeline_denoiser
    student = pipeline_student(pipe)
    if student is not None:  # its own stock call: one model call per step
        return int(student["student_steps"])
    solver, steps = _check_pipeline_sampling(solver, steps, spacing, 1, {})
    den = pipeline_denoiser(pipe)
    first = 1 if den.family.starts_from_pure_noise else 0
    if first and steps == 1:
        return 1
    grid, extra = solver_grid(den.schedule, solver, steps - first, spacing)
    calls = expected_nfe(solver, grid, extra)
    return None if calls is None else first + calls
