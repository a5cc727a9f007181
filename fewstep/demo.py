"""``fewstep demo``: the shipped models side by side, on the same classes and seeds.

Rows: the teacher with DDIM at 50 steps (what a user of a guided model runs today), DDIM and
DPM-Solver++(2M) at 10 steps, DPM-Solver++ at 5 steps (on the teacher's tuned grid when one
is shipped, else its log-SNR grid), the guided-distilled students at 4 and 1 steps and the
DMD generator at 1 step; rows whose model is not shipped are listed as skipped. Writes a
comparison image, a table (markdown and JSON) with network evaluations, seconds per image and
the speed-up over the 50-step teacher, and FID/KID against held-out real digits for the rows
that fit a time budget.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DemoRow", "demo_rows", "run_demo"]


def _meta() -> dict:
    """The date and machine line of the demo's table (``fewstep.bench.machine``)."""
    from .bench.machine import machine_info, machine_line
    info = machine_info()
    return {"date": info["day"], "machine": machine_line(info), "torch": info["torch"], "machine_info": info}


@dataclass
class DemoRow:
    label: str
    model: str
    options: dict = field(default_factory=dict)


def demo_rows() -> list[DemoRow]:
    from .api import SHIPPED
    five = {"solver": "dpmpp_2m", "steps": 5}
    tuned = "mnist-teacher" in SHIPPED and _has_tuned_grid("mnist-teacher")
    rows = [DemoRow("teacher DDIM 50 steps", "mnist-teacher", {"solver": "ddim", "steps": 50}),
            DemoRow("teacher DDIM 10 steps", "mnist-teacher", {"solver": "ddim", "steps": 10}),
            DemoRow("teacher DPM-Solver++(2M) 10 steps", "mnist-teacher", {"solver": "dpmpp_2m", "steps": 10}),
            DemoRow("teacher DPM-Solver++(2M) 5 steps" + (", tuned grid" if tuned else ", log-SNR grid"),
                    "mnist-teacher", {**five, "spacing": "tuned"} if tuned else five),
            DemoRow("guided-distilled student, 4 steps", "mnist-guided-4"),
            DemoRow("guided-distilled student, 1 step", "mnist-guided-1"),
            DemoRow("DMD generator, 1 step", "mnist-dmd-1")]
    return rows


def _has_tuned_grid(name: str) -> bool:
    from .api import ASSETS
    return any((ASSETS / name).glob("grids/*.json"))


def _comparison_image(rows: list[dict], images: list[torch.Tensor], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = images[0].shape[0]
    fig, axes = plt.subplots(len(images), cols, figsize=(0.62 * cols + 3.4, 0.72 * len(images) + 0.3), squeeze=False)
    for r, (row, imgs) in enumerate(zip(rows, images)):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(((imgs[c, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        speed = f"{row['speedup']:.0f}x" if row["speedup"] >= 10 else f"{row['speedup']:.1f}x"
        evals = f"{row['network_evals']} eval{'s' if row['network_evals'] != 1 else ''}"
        axes[r][0].set_ylabel(f"{row['label']}\n{evals}, {speed}", rotation=0, ha="right",
                              va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, right=0.99, top=0.99, bottom=0.01, wspace=0.04, hspace=0.06)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown(doc: dict) -> str:
    lines = [f"# fewstep demo ({doc['meta']['date']}, {doc['meta']['machine']})", "",
             f"w = {doc['w']:g}, classes 0-9, seeds {doc['seed']}..; seconds per image from a batch of "
             f"{doc['timing_batch']}; FID/KID against {doc['fid_n']} held-out digits (classifier features; "
             f"real-vs-real FID at this n: {_fmt(doc.get('real_vs_real_fid'))}).", "",
             "| sampler | network evals | s / image | speed-up vs teacher DDIM 50 | FID | KID |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['label']} | {r['network_evals']} | {r['seconds_per_image']:.4f} | {r['speedup']:.1f}x | "
                     f"{_fmt(r.get('fid'))} | {_fmt(r.get('kid'), 4)} |")
    for s in doc["skipped"]:
        lines.append(f"\nSkipped: {s}")
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def run_demo(out: Path, *, w: float = 1.0, seed: int = 0, fid_n: int = 200, budget_seconds: float = 100.0,
             progress: bool = True, rows: list[DemoRow] | None = None) -> dict:
    """Run the demo into folder ``out``; returns the table as a dict (also written as JSON).
    ``rows`` replaces :func:`demo_rows` (the first row is the speed-up's baseline)."""
    from .api import SHIPPED, generate, load
    from .evaluate import balanced_labels, reference_sets
    from .metrics.image import image_metrics, real_vs_real
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(10)
    plan = demo_rows() if rows is None else rows
    rows, images, skipped, loaded = [], [], [], {}
    say = print if progress else (lambda *a, **k: None)
    for row in plan:
        if row.model not in SHIPPED:
            skipped.append(f"{row.label}: {row.model} is not shipped in this version")
            continue
        model = loaded.setdefault(row.model, load(row.model))
        t0 = time.perf_counter()
        grid = generate(model, labels, w=w, seed=seed, **row.options)  # timed: one batch of the ten images
        secs = (time.perf_counter() - t0) / len(labels)
        solver, steps = model.check_sampling(row.options.get("solver"), row.options.get("steps"), w)
        evals = model.evaluations(solver, steps, w, row.options.get("spacing", "logsnr"))
        rows.append({"label": row.label, "model": row.model, **row.options, "network_evals": evals,
                     "seconds_per_image": secs})
        images.append(grid)
        say(f"{row.label}: {evals} network evaluations, {secs:.4f} s/image")
    base = rows[0]["seconds_per_image"] if rows else 1.0
    for r in rows:
        r["speedup"] = base / r["seconds_per_image"]
    rvr = None
    if fid_n:
        clf = load("mnist-classifier")
        real, real_b = reference_sets(fid_n)
        rvr = real_vs_real(real_b, real, clf)["fid"]
        spent, fid_labels = 0.0, balanced_labels(fid_n)
        pairs = list(zip(rows, [p for p in plan if p.model in SHIPPED]))
        # the baseline row first (every other row is compared with it), then the cheapest: the most rows in budget
        for r, row in pairs[:1] + sorted(pairs[1:], key=lambda pr: pr[0]["seconds_per_image"]):
            cost = r["seconds_per_image"] * fid_n
            if spent + cost > budget_seconds:
                say(f"{r['label']}: FID skipped (~{cost:.0f} s would exceed the {budget_seconds:.0f} s budget)")
                continue
            t0 = time.perf_counter()
            fake = generate(loaded[row.model], fid_labels, w=w, seed=seed + 2, batch_size=100, **row.options)
            torch.manual_seed(seed)  # KID's random subsets: the same table on every run
            scores = image_metrics(fake, real, clf, labels=fid_labels, kid_subset=min(1000, fid_n))
            r.update(fid=scores["fid"], kid=scores["kid"], class_accuracy=scores["class_accuracy"])
            spent += time.perf_counter() - t0
    doc = {"w": w, "seed": seed, "fid_n": fid_n, "timing_batch": len(labels), "real_vs_real_fid": rvr,
           "rows": rows, "skipped": skipped,
           "meta": _meta()}
    doc["files"] = {"image": str(_comparison_image(rows, images, out / "comparison.png")),
                    "markdown": str(out / "table.md"), "json": str(out / "table.json")}
    (out / "table.md").write_text(_markdown(doc))
    (out / "table.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc
