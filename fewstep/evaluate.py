"""Evaluate a model + sampler: FID / KID / IS / class accuracy against real MNIST digits,
NFE and seconds per image, with the real-vs-real baseline beside every number.

Class-conditional fewstep models: :func:`evaluate`, :func:`evaluate_grid` (``fewstep eval --model
mnist-teacher``). Text-to-image diffusers pipelines (the test bed's ``mnist-sd`` / ``mnist-sd3``, or any
pipeline folder over the caption grammar of :mod:`fewstep.data.captions`): :func:`evaluate_prompts`,
:func:`evaluate_prompts_grid` (``fewstep eval --model mnist-sd``): a fixed suite of 90 prompts through
the stock pipeline call with a chosen scheduler, scored for the prompted digit, the thickness and
slant words (attribute adherence), FID / KID against held-out digits, network evaluations and time.
"""
from __future__ import annotations

import inspect
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import ASSETS, generate, load
from .data.captions import (SLANT, THICKNESS, caption, ink_mass, load_mnist32, parse_caption,
                            slant_angle)
from .data.mnist import NUM_CLASSES, load_mnist
from .metrics import class_accuracy, image_metrics, real_vs_real

__all__ = ["evaluate", "evaluate_grid", "grid_markdown", "plot_grid", "reference_sets", "balanced_labels",
           "TEXT_PIPELINES", "SCHEDULERS", "Prompts", "suite_size", "prompt_suite", "parse_prompts", "centre_crop",
           "thickness_adherence", "slant_adherence", "attribute_adherence", "prompted_class_accuracy",
           "heldout_reference", "text_pipeline_folder", "load_text_pipeline", "check_scheduler_name",
           "flow_settings", "make_scheduler", "generate_prompted", "evaluate_prompts", "evaluate_prompts_grid",
           "prompts_markdown", "plot_prompts", "evaluate_heldout", "TEXT_TEACHER", "TEXT_STUDENTS", "TextMethod",
           "text_methods"]


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... : n labels with classes as equal as n allows."""
    return torch.arange(n) % num_classes


def reference_sets(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint real sets of n images from the MNIST train split (even / odd indices),
    class-balanced: generated images are compared with the first; the second gives the
    real-vs-real baseline."""
    x, y = load_mnist("train")
    if 2 * n > len(x):
        raise ValueError(f"n={n} is too large: the train split has {len(x)} images, so at most {len(x) // 2} "
                         "per reference set")
    order = torch.argsort(y * len(y) + torch.arange(len(y)))  # by class, stable
    a, b = order[0::2], order[1::2]
    pick = lambda idx: idx[_balanced_take(y[idx], n)]  # noqa: E731
    return x[pick(a)], x[pick(b)]


def _balanced_take(y: torch.Tensor, n: int) -> torch.Tensor:
    per = [torch.nonzero(y == c).flatten() for c in range(NUM_CLASSES)]
    take = [p[: (n // NUM_CLASSES) + (1 if c < n % NUM_CLASSES else 0)] for c, p in enumerate(per)]
    return torch.cat(take)


def evaluate(model, *, solver: str | None = None, steps: int | None = None, w: float = 0.0, n: int = 2000, seed: int = 0,
             batch_size: int = 250, classifier=None, spacing: str = "logsnr", progress: bool = False,
             **options) -> dict:
    """Generate ``n`` class-balanced samples and score them.

    Returns a dict with fid, kid, is, class_accuracy, nfe (model calls per image; with
    guidance each call is one batched conditional + unconditional evaluation), network_evals
    (network evaluations per image, ``model.evaluations``: a classifier-free guided call counts two),
    seconds_per_image, and ``baseline`` (the same metrics between two disjoint real sets
    of n images).
    """
    model = load(model) if isinstance(model, str) else model
    solver, steps = model.check_sampling(solver, steps, w)
    classifier = classifier or load("mnist-classifier")
    real, real_b = reference_sets(n)
    labels = balanced_labels(n, model.num_classes or NUM_CLASSES) if model.num_classes else None
    t0 = time.perf_counter()
    fake = generate(model, labels, n=n, w=w, solver=solver, steps=steps, spacing=spacing, seed=seed,
                    batch_size=batch_size, progress=progress, **options)
    seconds = time.perf_counter() - t0
    scores = image_metrics(fake, real, classifier, labels=labels)
    base = real_vs_real(real_b, real, classifier)
    nfe = model.nfe(solver, steps, spacing)
    evals = model.evaluations(solver, steps, w, spacing)
    return {"model": getattr(model, "source", str(model)), "solver": solver, "steps": steps,
            "spacing": "given grid" if options.get("grid") is not None else spacing, "w": w, "n": n, "seed": seed, **scores, "nfe": nfe, "network_evals": evals, "seconds_per_image": seconds / n,
            "baseline": {k: base[k] for k in ("fid", "kid", "kid_std", "is", "is_std")}}


def evaluate_grid(model, *, steps_list: list[int | None], w_list: list[float], log=None, **kw) -> dict:
    """:func:`evaluate` for every (steps, w); returns {"rows": [...]} (one evaluate() dict per cell).
    A distilled model's own step count is used where ``steps_list`` is [None]."""
    model = load(model) if isinstance(model, str) else model
    rows = []
    for w in w_list:
        for steps in steps_list:
            rows.append(evaluate(model, steps=steps, w=w, **kw))
            if log:
                r = rows[-1]
                log(f"w {w:g}, {r['steps']} steps ({r['nfe']} NFE): FID {r['fid']:.2f}, "
                    f"accuracy {100 * r['class_accuracy']:.1f}%")
    return {"model": getattr(model, "source", str(model)), "rows": rows}


def grid_markdown(doc: dict) -> str:
    """A markdown table of an :func:`evaluate_grid` result."""
    base = doc["rows"][0]["baseline"]["fid"] if doc["rows"] else float("nan")
    lines = [f"# {doc['model']}: quality against model calls (n = {doc['rows'][0]['n'] if doc['rows'] else 0})", "",
             "| w | solver | steps | NFE | FID | KID | IS | class acc. | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['w']:g} | {r['solver']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {r['kid']:.4f} | "
                     f"{r['is']:.2f} | {100 * r['class_accuracy']:.1f}% | {r['seconds_per_image']:.4f} |")
    lines.append(f"\nReal-vs-real FID at this n: {base:.2f}. NFE counts model calls (a guided call is one batched "
                 "conditional + unconditional evaluation).")
    return "\n".join(lines) + "\n"


def plot_grid(doc: dict, path) -> None:
    """FID against NFE, one line per w, with the real-vs-real floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for w in sorted({r["w"] for r in doc["rows"]}):
        pts = sorted((r["nfe"], r["fid"]) for r in doc["rows"] if r["w"] == w)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"w = {w:g}")
    if doc["rows"]:
        ax.axhline(doc["rows"][0]["baseline"]["fid"], color="k", ls="--", lw=1, label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(doc["model"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Text-to-image test bed (issue 21): a fixed prompt suite through the stock diffusers pipeline call
# ---------------------------------------------------------------------------

TEXT_PIPELINES = ("mnist-sd", "mnist-sd3")
SCHEDULERS = ("stock", "dpmsolver", "unipc", "fewstep")  # and "fewstep:<solver>", "tuned:<grid.json>"
SUITE = tuple((d, t, s) for d in range(NUM_CLASSES) for t in THICKNESS for s in SLANT)  # 90 prompts
DEFAULT_GUIDANCE_SCALE = 3.0  # what the test bed's previews and bench_prompt_accuracy use (100% prompted digits)


@dataclass(frozen=True)
class Prompts:
    """Prompts and what each asks for: the digit (int64 labels) and the thickness / slant words
    (``None``: unspecified), in the order of ``texts``."""
    texts: list
    labels: torch.Tensor
    thickness: tuple
    slant: tuple


def suite_size(n: int) -> int:
    """``n`` rounded up to a multiple of the suite's 90 prompts, so that every prompt has as many images."""
    if isinstance(n, bool) or not isinstance(n, int) or n < len(SUITE):
        raise ValueError(f"n={n!r} is too small: the prompt suite has {len(SUITE)} prompts (10 digits x 3 thicknesses "
                         f"x 3 slants); ask for n >= {len(SUITE)} (rounded up to a multiple of {len(SUITE)})")
    return -(-n // len(SUITE)) * len(SUITE)


def prompt_suite(n: int = 2070) -> Prompts:
    """Every digit x thickness (thin / unspecified / thick) x slant (left / unspecified / right), written by
    :func:`fewstep.data.captions.caption`, tiled to :func:`suite_size` (n) images: image i has prompt i mod 90,
    so every batch of 90 holds each prompt once."""
    entries = [SUITE[i % len(SUITE)] for i in range(suite_size(n))]
    return Prompts([caption(*e) for e in entries], torch.tensor([e[0] for e in entries], dtype=torch.int64),
                   tuple(e[1] for e in entries), tuple(e[2] for e in entries))


def parse_prompts(texts) -> Prompts:
    """:class:`Prompts` of captions in the grammar of :mod:`fewstep.data.captions` (e.g. ``caption_images``'s)."""
    parsed = [parse_caption(t) for t in texts]
    if any(p is None for p in parsed):
        raise ValueError("the empty (unconditional) prompt names no digit; give every image a caption")
    return Prompts(list(texts), torch.tensor([p[0] for p in parsed], dtype=torch.int64),
                   tuple(p[1] for p in parsed), tuple(p[2] for p in parsed))


def centre_crop(images: torch.Tensor) -> torch.Tensor:
    """The 28x28 centre of 32x32 test-bed images (the digits are MNIST's 28x28 padded by 2 pixels,
    :func:`fewstep.data.captions.pad32`); 28x28 images are returned as they are."""
    size = tuple(images.shape[-2:])
    if size == (28, 28):
        return images
    if size != (32, 32):
        raise ValueError(f"test-bed images are 32x32 (or their 28x28 centre), got {size[0]}x{size[1]}")
    return images[..., 2:30, 2:30]


def _share_above_median(values: torch.Tensor, asked: torch.Tensor, against: torch.Tensor) -> tuple[int, int]:
    """(how many of ``values[asked]`` lie above the median of ``values[against]``, how many were asked);
    (0, 0) when either group is empty. The median of an even count is the mean of the two middle values
    (``quantile(0.5)``; torch's ``median`` would take the lower one)."""
    if not asked.any() or not against.any():
        return 0, 0
    return int((values[asked] > values[against].quantile(0.5)).sum()), int(asked.sum())


def _words_mask(words, word: str) -> torch.Tensor:
    return torch.tensor([w == word for w in words], dtype=torch.bool)


def thickness_adherence(images: torch.Tensor, prompts: Prompts) -> float:
    """Share of the images from "thick" prompts whose ink mass is above the median ink mass of the images
    from "thin" prompts **of the same digit**, pooled over digits (digits lacking either group are left
    out; NaN when none is left). Images (N, 1, H, W) in [-1, 1].

    Why ink mass within a digit: the captions call a digit thick or thin by its ink mass
    (:func:`fewstep.data.captions.ink_mass`) against its own class's terciles
    (``THICKNESS_TERCILES``: a "one" carries half the ink of an "eight"). Within one class those
    terciles are fixed numbers, so ranking ink mass within a digit ranks by the captions' own measure,
    with no tercile fitted on real digits entering the score: a pipeline that draws every digit bolder
    than MNIST is still judged on whether its "thick" is thicker than its "thin". Pooled over classes,
    ink mass would instead reward prompting the right digit (eights are "thicker" than ones)."""
    mass = ink_mass(images)
    thick, thin = _words_mask(prompts.thickness, "thick"), _words_mask(prompts.thickness, "thin")
    counts = [_share_above_median(mass, thick & (prompts.labels == c), thin & (prompts.labels == c))
              for c in range(NUM_CLASSES)]
    return _ratio(*map(sum, zip(*counts)))


def slant_adherence(images: torch.Tensor, prompts: Prompts) -> float:
    """Share of the images from "slanted right" prompts whose :func:`fewstep.data.captions.slant_angle`
    is above the median angle of the images from "slanted left" prompts, pooled over digits (NaN without
    either group). The captions use one fixed threshold (+-``SLANT_DEGREES``) for every class, so the
    angle is compared across digits as the captions compare it."""
    return _ratio(*_share_above_median(slant_angle(images), _words_mask(prompts.slant, "right"),
                                       _words_mask(prompts.slant, "left")))


def _ratio(above: int, total: int) -> float:
    return above / total if total else float("nan")


def attribute_adherence(images: torch.Tensor, prompts: Prompts) -> dict:
    """thickness_adherence, slant_adherence and their mean (0.5: the attribute words are ignored; 1: every
    "thick" / "slanted right" image beats the median "thin" / "slanted left" one)."""
    thick, slant = thickness_adherence(images, prompts), slant_adherence(images, prompts)
    return {"thickness_adherence": thick, "slant_adherence": slant, "mean_adherence": (thick + slant) / 2}


def prompted_class_accuracy(images: torch.Tensor, prompts: Prompts, classifier) -> float:
    """Share of images the shipped classifier reads (on the 28x28 centre) as the digit their prompt names."""
    return class_accuracy(classifier, centre_crop(images), prompts.labels)


def heldout_reference(n: int, classifier) -> dict:
    """The test bed's FID / KID reference and its real-vs-real baseline, for n generated images.

    Reference: all 1,000 held-out digits (split ``"heldout"`` of :mod:`fewstep.data.mnist`, 100 per class;
    no test-bed model trains on them) padded to 32x32 (``load_mnist32``) and centre-cropped back to 28x28,
    the same crop every generated image goes through. Baseline: min(n, 4,000) class-balanced training
    digits (what the pipelines learned from), padded and cropped alike and scored against the reference
    as the n generated images are: the numbers of a sampler that reproduces the training distribution
    at this n. FID's bias grows as n shrinks, so read a row against the baseline of its own n."""
    real, _ = load_mnist32("heldout")
    train, y = load_mnist32("train")
    keep = _balanced_take(y, min(n, len(y)))
    reference = centre_crop(real)
    base = image_metrics(centre_crop(train[keep]), reference, classifier, labels=y[keep])
    return {"images": reference, "n": n, "split": "heldout", "n_reference": len(reference), "n_baseline": len(keep),
            "baseline": {k: base[k] for k in ("fid", "kid", "kid_std", "is", "is_std", "class_accuracy")}}


def _check_reference(reference: dict, n: int) -> None:
    if reference["n"] != n:
        raise ValueError(f"the reference's baseline was made for n={reference['n']} images, this run makes {n}: "
                         f"pass heldout_reference({n}, classifier)")


def _reference_record(reference: dict) -> dict:
    return {k: v for k, v in reference.items() if k != "images"}


# -- pipelines and schedulers ------------------------------------------------

def text_pipeline_folder(name_or_path) -> Path | None:
    """The diffusers pipeline folder that ``name_or_path`` names (a shipped name of :data:`TEXT_PIPELINES`,
    or a folder with ``model_index.json``), or None when it names none."""
    name = str(name_or_path)
    folder = ASSETS / name if name in TEXT_PIPELINES else Path(name)
    if name in TEXT_PIPELINES and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{name!r} is not shipped in this version yet; train it with `fewstep train {name} "
                                f"--out DIR` and pass DIR/{name}")
    return folder if (folder / "model_index.json").is_file() else None


def load_text_pipeline(name_or_path, device: str | torch.device = "cpu"):
    """The stock diffusers text-to-image pipeline of a folder or shipped name (``fewstep.load``: float32, the
    shipped weights being fp16; StableDiffusion3Pipeline without T5, as the test bed ships it), progress bars off."""
    folder = text_pipeline_folder(name_or_path)
    if folder is None:
        raise ValueError(f"{name_or_path} is not a diffusers pipeline folder (no model_index.json); pass "
                         f"{' or '.join(TEXT_PIPELINES)} or a pipeline folder")
    index = json.loads((folder / "model_index.json").read_text())
    if not index.get("text_encoder") or None in index["text_encoder"] or not index.get("tokenizer"):
        raise ValueError(f"{name_or_path} is a {index.get('_class_name', '?')} without a text encoder: the prompt "
                         "suite needs a text-to-image pipeline (StableDiffusionPipeline or StableDiffusion3Pipeline)")
    pipe = load(folder, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_scheduler_name(name: str) -> str:
    """Return ``name`` if :func:`make_scheduler` knows it, else a one-line ValueError."""
    from .diffusers.scheduler import STEPPABLE  # the diffusers edge (and diffusers) only when asked
    kind, _, solver = str(name).partition(":")
    if kind == "tuned":
        if not solver or not Path(solver).is_file():
            raise ValueError(f"scheduler {name!r}: write tuned:<path of a tuned solver JSON> (from `fewstep tune`)")
        return name
    if kind not in SCHEDULERS or (solver and kind != "fewstep") or (":" in str(name) and not solver):
        raise ValueError(f"unknown scheduler {name!r}; choose {', '.join(SCHEDULERS)}, fewstep:<solver> or "
                         "tuned:<grid.json>")
    if solver and solver not in STEPPABLE:
        raise ValueError(f"fewstep:{solver}: a diffusers pipeline runs one model call per step; choose one of "
                         f"{', '.join(STEPPABLE)}")
    return name


def flow_settings(config) -> dict:
    """Keyword arguments that put diffusers' DPMSolverMultistep / UniPC schedulers in flow-matching mode for a
    flow-matching source config (SD3's FlowMatchEulerDiscreteScheduler): ``use_flow_sigmas``,
    ``prediction_type="flow_prediction"`` and ``flow_shift`` = the source's shift (the settings of diffusers'
    docs for flow models); {} for a VP source."""
    from .diffusers.families import translate_config
    ours, _ = translate_config(config)
    if ours.get("family") != "flow":
        return {}
    return {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(ours.get("shift", 1.0))}


def make_scheduler(name: str, source):
    """A scheduler built from a pipeline's scheduler ``source`` (its config): ``stock`` (a fresh one of the
    source's own class), ``dpmsolver`` (DPMSolverMultistepScheduler), ``unipc`` (UniPCMultistepScheduler),
    both in flow mode for a flow-matching source (:func:`flow_settings`), ``fewstep`` (FewstepScheduler,
    its default solver), ``fewstep:<solver>`` or ``tuned:<path>`` (FewstepScheduler with a tuned solver from
    `fewstep tune`: its solver, times and learned coefficients)."""
    import diffusers

    from .diffusers import FewstepScheduler
    kind, _, solver = check_scheduler_name(name).partition(":")
    config = source.config
    if kind == "stock":
        return type(source).from_config(config)
    if kind == "fewstep":
        return FewstepScheduler.from_config(config, **({"solver": solver} if solver else {}))
    if kind == "tuned":
        return FewstepScheduler.from_config(config, grid=solver)
    cls = diffusers.DPMSolverMultistepScheduler if kind == "dpmsolver" else diffusers.UniPCMultistepScheduler
    accepted = inspect.signature(cls.__init__).parameters  # drop the source's own keys (e.g. shift), not warn
    return cls.from_config({k: v for k, v in config.items() if k in accepted}, **flow_settings(config))


def _denoiser_module(pipe) -> torch.nn.Module:
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer to count network evaluations of")
    return net


@torch.no_grad()
def generate_prompted(pipe, prompts: list[str], *, steps: int, guidance_scale: float, seed: int = 0,
                      batch_size: int = 90) -> tuple[torch.Tensor, float, float]:
    """The stock pipeline call on ``prompts`` in batches: (images (N, 1, H, W) in [-1, 1] (channels averaged),
    seconds spent in the calls, network evaluations per image). Batch b draws its noise from
    ``torch.Generator().manual_seed(seed * 2**20 + b)`` (CPU), so a run repeats exactly for the same
    batch size. Evaluations are counted as the rows the denoiser sees (a guided step runs the
    conditional and unconditional rows in one call: two per image)."""
    rows = [0]
    hook = _denoiser_module(pipe).register_forward_pre_hook(
        lambda m, args, kw: rows.__setitem__(0, rows[0] + len(args[0] if args else kw.get("sample", kw.get(
            "hidden_states")))), with_kwargs=True)
    out, seconds = [], 0.0
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            gen = torch.Generator().manual_seed(seed * 2**20 + b)
            t0 = time.perf_counter()
            x = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=gen, output_type="pt").images
            seconds += time.perf_counter() - t0
            out.append(x.float().cpu().mean(1, keepdim=True) * 2 - 1)  # [0, 1] -> [-1, 1]
    finally:
        hook.remove()
    return torch.cat(out), seconds, rows[0] / len(prompts)


def _pipeline_name(pipe) -> str:
    return str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)


def evaluate_prompts(pipe, *, scheduler: str = "stock", steps: int = 25,
                     guidance_scale: float = DEFAULT_GUIDANCE_SCALE, n: int = 2070, seed: int = 0,
                     batch_size: int = 90, classifier=None, reference: dict | None = None) -> dict:
    """The prompt suite (:func:`prompt_suite`, n rounded up to a multiple of 90) through the stock call of a
    text-to-image pipeline (a pipeline, or a name / folder for :func:`load_text_pipeline`) with the named
    scheduler (:func:`make_scheduler`; the pipeline's own scheduler is put back afterwards), scored on the
    28x28 centre of every image.

    Returns class_accuracy (the prompted digit, shipped classifier), thickness / slant / mean adherence
    (:func:`attribute_adherence`), fid, kid, is against the held-out reference, nfe (network evaluations per
    image, counted: classifier-free guidance doubles them), seconds_per_image (pipeline calls only), the
    settings, ``reference`` (what the reference is) and ``baseline`` (:func:`heldout_reference`'s real-vs-real
    numbers at this n). ``reference``: a :func:`heldout_reference` of the same n, to share between runs."""
    model = str(pipe) if isinstance(pipe, (str, Path)) else None
    pipe = load_text_pipeline(pipe) if model else pipe
    suite = prompt_suite(n)
    check_scheduler_name(scheduler)
    classifier = classifier or load("mnist-classifier")
    reference = reference or heldout_reference(len(suite.texts), classifier)
    _check_reference(reference, len(suite.texts))
    stock = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, stock)
    try:
        images, seconds, evals = generate_prompted(pipe, suite.texts, steps=steps, guidance_scale=guidance_scale,
                                                   seed=seed, batch_size=batch_size)
        used = type(pipe.scheduler).__name__
    finally:
        pipe.scheduler = stock
    crops = centre_crop(images)
    scores = image_metrics(crops, reference["images"], classifier, labels=suite.labels)
    return {"model": model or _pipeline_name(pipe), "pipeline": type(pipe).__name__, "scheduler": scheduler,
            "scheduler_class": used, "steps": steps, "guidance_scale": guidance_scale, "n": len(suite.texts),
            "seed": seed, "batch_size": batch_size, **scores, **attribute_adherence(crops, suite), "nfe": evals,
            "seconds_per_image": seconds / len(suite.texts), "reference": _reference_record(reference)["split"],
            "n_reference": reference["n_reference"], "baseline": reference["baseline"]}


def evaluate_prompts_grid(pipe, *, schedulers: list[str], steps_list: list[int], guidance_scales: list[float],
                          n: int = 2070, log=None, **kw) -> dict:
    """:func:`evaluate_prompts` for every (guidance scale, scheduler, steps), one reference shared by all;
    returns {"model", "pipeline", "reference", "rows"}."""
    model = str(pipe) if isinstance(pipe, (str, Path)) else None
    pipe = load_text_pipeline(pipe) if model else pipe
    for name in schedulers:
        check_scheduler_name(name)
    classifier = kw.pop("classifier", None) or load("mnist-classifier")
    reference = heldout_reference(suite_size(n), classifier)
    rows = []
    for g in guidance_scales:
        for name in schedulers:
            for steps in steps_list:
                rows.append(evaluate_prompts(pipe, scheduler=name, steps=steps, guidance_scale=g, n=n,
                                             classifier=classifier, reference=reference, **kw))
                if log:
                    log(_row_line(rows[-1]))
    return {"model": model or _pipeline_name(pipe), "pipeline": type(pipe).__name__,
            "reference": _reference_record(reference), "rows": rows}


def _row_line(r: dict) -> str:
    return (f"{r['scheduler']} ({r['scheduler_class']}), {r['steps']} steps, guidance_scale {r['guidance_scale']:g}: "
            f"FID {r['fid']:.2f}, accuracy {100 * r['class_accuracy']:.1f}%, adherence {r['mean_adherence']:.3f}, "
            f"{r['seconds_per_image']:.4f} s/image")


def prompts_markdown(doc: dict) -> str:
    """A markdown table of an :func:`evaluate_prompts_grid` result."""
    ref, rows = doc["reference"], doc["rows"]
    lines = [f"# {doc['model']} ({doc['pipeline']}): the prompt suite (n = {rows[0]['n'] if rows else 0})", "",
             "| scheduler | steps | guidance_scale | NFE | FID | KID | class acc. | thickness adh. | slant adh. | "
             "mean adh. | s / image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} ({r['scheduler_class']}) | {r['steps']} | {r['guidance_scale']:g} | "
                     f"{r['nfe']:g} | {r['fid']:.2f} | {r['kid']:.4f} | {100 * r['class_accuracy']:.1f}% | "
                     f"{r['thickness_adherence']:.3f} | {r['slant_adherence']:.3f} | {r['mean_adherence']:.3f} | "
                     f"{r['seconds_per_image']:.4f} |")
    base = ref["baseline"]
    lines.append(f"\nReference: the {ref['n_reference']} held-out digits (padded to 32x32, 28x28 centre). "
                 f"Real-vs-real ({ref['n_baseline']} training digits against it): FID {base['fid']:.2f}, "
                 f"KID {base['kid']:.4f}, class accuracy {100 * base['class_accuracy']:.1f}%. NFE counts network "
                 "evaluations per image (classifier-free guidance: two per step). Adherence 0.5 = attribute "
                 "words ignored, 1 = always followed.")
    return "\n".join(lines) + "\n"


def plot_prompts(doc: dict, path) -> None:
    """FID and class accuracy against steps, one line per (scheduler, guidance scale), with the real-vs-real FID."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.8))
    for key in dict.fromkeys((r["scheduler"], r["guidance_scale"]) for r in doc["rows"]):
        pts = sorted((r["steps"], r["fid"], r["class_accuracy"]) for r in doc["rows"]
                     if (r["scheduler"], r["guidance_scale"]) == key)
        label = f"{key[0]}, g = {key[1]:g}"
        ax_fid.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax_acc.plot([p[0] for p in pts], [100 * p[2] for p in pts], "o-", label=label)
    ax_fid.axhline(doc["reference"]["baseline"]["fid"], color="k", ls="--", lw=1, label="real vs real")
    steps = sorted({r["steps"] for r in doc["rows"]})
    for ax, what in ((ax_fid, "FID (classifier features)"), (ax_acc, "prompted digit accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.set_xlabel("steps (num_inference_steps)")
        ax.set_ylabel(what)
    ax_fid.legend(fontsize=7)
    fig.suptitle(f"{doc['model']} ({doc['pipeline']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_heldout(model, *, n: int = 2070, w: float = 1.0, solver: str | None = "dpmpp_2m", steps: int | None = 25,
                     seed: int = 0, batch_size: int = 250, classifier=None, reference: dict | None = None) -> dict:
    """A class-conditional fewstep model (e.g. ``mnist-teacher``, default: its converged setting, DPM-Solver++(2M)
    at 25 guided steps, w = 1) scored like :func:`evaluate_prompts`: n class-balanced images against the
    held-out reference (:func:`heldout_reference`), so its FID sits on the same scale as the pipelines'."""
    model = load(model) if isinstance(model, str) else model
    solver, steps = model.check_sampling(solver, steps, w)
    classifier = classifier or load("mnist-classifier")
    reference = reference or heldout_reference(n, classifier)
    _check_reference(reference, n)
    labels = balanced_labels(n)
    t0 = time.perf_counter()
    fake = generate(model, labels, n=n, w=w, solver=solver, steps=steps, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    scores = image_metrics(centre_crop(fake), reference["images"], classifier, labels=labels)
    return {"model": getattr(model, "source", str(model)), "solver": solver, "steps": steps, "w": w, "n": n,
            "seed": seed, **scores, "network_evals": model.evaluations(solver, steps, w, "logsnr"),
            "seconds_per_image": seconds / n, "reference": "heldout", "n_reference": reference["n_reference"],
            "baseline": reference["baseline"]}


# -- the text-to-image methods of fewstep demo and fewstep app ----------------------------------------------------

TEXT_TEACHER = "mnist-sd"
TEXT_STUDENTS = {"mnist-sd-guided-4": "guided-distilled student", "mnist-sd-dmd-1-anneal": "DMD generator"}


@dataclass(frozen=True)
class TextMethod:
    """One text-to-image method: the stock call of the pipeline in ``folder`` at ``steps`` with ``scheduler``
    (``"stock"`` / ``"fewstep:<solver>"``: :func:`make_scheduler`; ``"own"``: the folder's scheduler as exported).
    ``guided``: guidance_scale is 1 + w (the teacher's CFG, or a guided student's w input); else 1 (a DMD
    generator, w baked in). ``folder`` None: a student that is not shipped yet."""
    label: str
    model: str
    steps: int
    scheduler: str = "own"
    guided: bool = False
    folder: Path | None = None

    def guidance_scale(self, w: float) -> float:
        return 1.0 + w if self.guided else 1.0


def _steps_label(steps: int) -> str:
    return f"{steps} step{'s' if steps != 1 else ''}"


def _student_method(name: str, folder: Path, what: str) -> TextMethod:
    """An exported student pipeline folder as a method (labelled ``what``): its own scheduler, steps from its
    fewstep.json (``student_steps``, read as :func:`fewstep.api.pipeline_student` does), w through its UNet when
    it records ``w_input``; a one-line ValueError when it is not an exported student."""
    from types import SimpleNamespace
    from .api import pipeline_student
    record = pipeline_student(SimpleNamespace(name_or_path=str(folder))) or {}
    steps = record.get("student_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{folder} is not an exported student: its fewstep.json gives no student_steps")
    guided = bool(record.get("w_input"))
    baked = "" if guided or record.get("real_w") is None else f", w = {record['real_w']:g} baked in"
    return TextMethod(f"{what}, {_steps_label(steps)}{baked}", name, steps, "own", guided, folder)


def _scheduler_class(folder: Path) -> str:
    """The class name of a pipeline folder's own scheduler (from its config)."""
    config = Path(folder) / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()).get("_class_name", "scheduler") if config.is_file() else "scheduler"


def text_methods(*, teacher: str = TEXT_TEACHER, teacher_steps: int = 50, solver_steps: int = 5, students=None,
                 students_names: dict[str, str] | None = None,
                 labels: tuple[str, str] = ("{teacher}, stock {stock}, {steps} steps",
                                            "{teacher}, fewstep {solver}, {steps} steps")) -> list[TextMethod]:
    """The text-to-image methods: ``teacher`` (a shipped pipeline) with its stock scheduler at ``teacher_steps``
    (the speed-up's baseline) and with fewstep's default solver (``fewstep.sampling.DEFAULT_SOLVER``) at
    ``solver_steps``, both guided; then each student of ``students_names`` (default :data:`TEXT_STUDENTS`, name ->
    description; a pipeline folder of that name under ``students``, default the shipped assets), with ``folder``
    None when it is not there (steps then from the name's last ``-<k>`` part). ``labels``: the two teacher methods'
    labels, formatted with ``teacher``, ``stock`` (its scheduler class less "Scheduler"), ``solver`` and ``steps``.
    [] when ``teacher`` is not shipped."""
    from .sampling import DEFAULT_SOLVER
    folder = ASSETS / teacher
    if not (folder / "model_index.json").is_file():
        return []
    where = ASSETS if students is None else Path(students)
    stock = _scheduler_class(folder).removesuffix("Scheduler")
    names = TEXT_STUDENTS if students_names is None else students_names
    fields = {"teacher": teacher, "stock": stock, "solver": DEFAULT_SOLVER}
    methods = [TextMethod(labels[0].format(**fields, steps=teacher_steps), teacher, teacher_steps, "stock", True,
                          folder),
               TextMethod(labels[1].format(**fields, steps=solver_steps), teacher, solver_steps,
                          f"fewstep:{DEFAULT_SOLVER}", True, folder)]
    for name, what in names.items():
        if (where / name / "model_index.json").is_file():
            methods.append(_student_method(name, where / name, what))
        else:
            steps = int(re.findall(r"-(\d+)(?=-|$)", name)[-1])  # mnist-sd-guided-4: 4, mnist-sd-dmd-1-anneal: 1
            methods.append(TextMethod(f"{what}, {_steps_label(steps)}", name, steps))
    return methods
