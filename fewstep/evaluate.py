"""Evaluate a model + sampler: FID / KID / IS / class accuracy against real MNIST digits,
NFE and seconds per image, with the real-vs-real baseline beside every number."""
from __future__ import annotations

import time

import torch

from .api import generate, load
from .data.mnist import NUM_CLASSES, load_mnist
from .metrics import image_metrics, real_vs_real

__all__ = ["evaluate", "reference_sets", "balanced_labels"]


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
