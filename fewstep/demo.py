"""``fewstep demo``: the shipped models side by side, on the same classes and seeds.

Rows: the teacher with DDIM at 50 steps (what a user of a guided model runs today), DDIM and
DPM-Solver++(2M) at 10 steps, DPM-Solver++ at 5 steps (on the teacher's tuned grid when one
is shipped, else its log-SNR grid), the guided-distilled students at 4 and 1 steps and the
DMD generator at 1 step; rows whose model is not shipped are listed as skipped. Writes a
comparison image, a table (markdown and JSON) with network evaluations, seconds per image and
the speed-up over the 50-step teacher, and FID/KID against held-out real digits for the rows
that fit a time budget.

Text-to-image section (:func:`text_plan`): ten prompts of the test bed's grammar, one per digit with
thickness and slant mixed (:func:`demo_prompts`), through the shipped ``mnist-sd`` pipeline's stock call:
the teacher with its own scheduler (PNDM) at 50 steps, with fewstep's default solver in the pipeline
(``FewstepScheduler``, ``unipc_bh2_3``) at 5 steps, and each distilled student pipeline that is shipped
(``mnist-sd-guided-4``, ``mnist-sd-dmd-1-anneal``) with its own scheduler and steps; the same prompts and seeds in
every row. Writes a second image (one row per method) and a second table: network evaluations per image
(counted; a guided step counts two), seconds per image, the speed-up over the 50-step teacher and the
prompted-digit accuracy (the shipped classifier). Students that are not shipped are listed as such.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluate import TEXT_STUDENTS, TEXT_TEACHER, TextMethod, text_methods
from .images import save_captioned_rows

__all__ = ["DemoRow", "demo_rows", "run_demo", "TextMethod", "TEXT_TEACHER", "TEXT_STUDENTS", "TEXT_W", "demo_prompts",
           "text_plan", "run_text_section"]

TEXT_W = 2.0  # guidance w of the text rows (guidance_scale 3: the test bed's previews and benchmarks)


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


# -- text-to-image ----------------------------------------------------------------------------------------------

def demo_prompts() -> list[str]:
    """Ten prompts, digit d = 0..9 in order, thickness and slant mixed (thin / - / thick by d mod 9 // 3, left /
    - / right by d mod 3): the prompt suite's entry 9 d + d mod 9."""
    from .evaluate import SUITE, prompt_suite
    suite = prompt_suite(len(SUITE))
    return [suite.texts[9 * d + d % 9] for d in range(10)]


def text_plan(*, students: Path | None = None, teacher_steps: int = 50, solver_steps: int = 5) -> list[TextMethod]:
    """The text-to-image methods (:func:`fewstep.evaluate.text_methods`): ``mnist-sd`` with its stock scheduler at
    ``teacher_steps`` (the speed-up's baseline) and with fewstep's default solver (``fewstep.sampling.DEFAULT_SOLVER``)
    at ``solver_steps``, both guided; then each student of :data:`TEXT_STUDENTS` (a pipeline folder named so under
    ``students``, default the shipped assets), with ``folder`` None when it is not there. [] when ``mnist-sd``
    itself is not shipped."""
    return text_methods(teacher_steps=teacher_steps, solver_steps=solver_steps, students=students,
                        labels=("teacher, stock {stock} {steps} steps", "teacher, fewstep {solver} {steps} steps"))


def _text_pipeline(folder: Path, cache: dict):
    """The stock pipeline of ``folder``, loaded once and warmed up (one prompt, one step) for fair timings."""
    from .evaluate import generate_prompted, load_text_pipeline
    if folder not in cache:
        pipe = load_text_pipeline(folder)
        generate_prompted(pipe, demo_prompts()[:1], steps=1, guidance_scale=1.0)
        cache[folder] = pipe
    return cache[folder]


def _run_text_row(row: TextMethod, prompts: list[str], w: float, seed: int,
                  cache: dict) -> tuple[torch.Tensor, float, float]:
    """(images (N, 1, H, W) in [-1, 1], seconds per image, network evaluations per image) of one method."""
    from .evaluate import generate_prompted, make_scheduler
    pipe = _text_pipeline(row.folder, cache)
    own = pipe.scheduler
    if row.scheduler != "own":
        pipe.scheduler = make_scheduler(row.scheduler, own)
    try:
        images, seconds, evals = generate_prompted(pipe, prompts, steps=row.steps,
                                                   guidance_scale=row.guidance_scale(w), seed=seed,
                                                   batch_size=len(prompts))
    finally:
        pipe.scheduler = own
    return images, seconds / len(prompts), evals


def run_text_section(plan: list[TextMethod], *, w: float = TEXT_W, seed: int = 0, prompts: list[str] | None = None,
                     classifier=None, progress: bool = True) -> tuple[dict, list[torch.Tensor]]:
    """Run the shipped methods of ``plan`` on the same prompts and seeds (one batch each) at guidance w (a
    guided method's guidance_scale is 1 + w, a DMD generator's 1); returns (the section's table as a dict, one
    image batch per row run). The first row is the speed-up's baseline."""
    from .api import load
    from .evaluate import parse_prompts, prompted_class_accuracy
    prompts = demo_prompts() if prompts is None else list(prompts)
    asked = parse_prompts(prompts)
    classifier = classifier or load("mnist-classifier")
    say = print if progress else (lambda *a, **k: None)
    rows, images, not_shipped, cache = [], [], [], {}
    t_start = time.perf_counter()
    for row in plan:
        if row.folder is None:
            not_shipped.append(f"{row.label} ({row.model})")
            continue
        x, secs, evals = _run_text_row(row, prompts, w, seed, cache)
        accuracy = prompted_class_accuracy(x, asked, classifier)
        rows.append({"label": row.label, "model": row.model, "scheduler": row.scheduler, "steps": row.steps,
                     "guidance_scale": row.guidance_scale(w), "network_evals": evals, "seconds_per_image": secs,
                     "prompted_digit_accuracy": accuracy})
        images.append(x)
        say(f"{row.label}: {evals:g} network evaluations, {secs:.4f} s/image, prompted digit {accuracy:.0%}")
    base = rows[0]["seconds_per_image"] if rows else 1.0
    for r in rows:
        r["speedup"] = base / r["seconds_per_image"]
    section = {"teacher": TEXT_TEACHER, "prompts": prompts, "seed": seed, "rows": rows, "not_shipped": not_shipped,
               "seconds": time.perf_counter() - t_start}
    return section, images


def _text_image(section: dict, images: list[torch.Tensor], path: Path) -> Path:
    captions = [_row_caption(r["label"], round(r["network_evals"]), r["speedup"],
                             f", {r['prompted_digit_accuracy']:.0%} digits") for r in section["rows"]]
    return save_captioned_rows(captions, images, path, titles=section["prompts"])


def _text_markdown(section: dict) -> list[str]:
    lines = ["", f"## Text-to-image: {section['teacher']}, the same {len(section['prompts'])} prompts and seeds "
             "in every row", "",
             "Prompts: " + "; ".join(f'"{p}"' for p in section["prompts"]) + ". Guidance: guidance_scale as listed "
             "(1 + w; a guided student takes w as an input and runs no classifier-free guidance). Network "
             "evaluations counted per image (a guided teacher step counts two); seconds per image from one batch "
             "of all prompts; prompted digit: share of images the shipped classifier reads as the digit their prompt "
             f"names. Section time (loading included): {section['seconds']:.1f} s.", "",
             "| method | guidance_scale | network evals | s / image | speed-up vs row 1 | prompted digit |",
             "|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['label']} | {r['guidance_scale']:g} | {r['network_evals']:g} | "
                     f"{r['seconds_per_image']:.4f} | {r['speedup']:.1f}x | {r['prompted_digit_accuracy']:.0%} |")
    for s in section["not_shipped"]:
        lines.append(f"\nNot shipped yet: {s}")
    return lines


def _row_caption(label: str, evals: int, speedup: float, extra: str = "") -> str:
    speed = f"{speedup:.0f}x" if speedup >= 10 else f"{speedup:.1f}x"
    return f"{label}\n{evals} eval{'s' if evals != 1 else ''}, {speed}{extra}"


def _comparison_image(rows: list[dict], images: list[torch.Tensor], path: Path) -> Path:
    captions = [_row_caption(r["label"], r["network_evals"], r["speedup"]) for r in rows]
    return save_captioned_rows(captions, images, path)


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
    if doc.get("text_to_image"):
        lines += _text_markdown(doc["text_to_image"])
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def run_demo(out: Path, *, w: float = 1.0, seed: int = 0, fid_n: int = 200, budget_seconds: float = 100.0,
             progress: bool = True, rows: list[DemoRow] | None = None, text_rows: list[TextMethod] | None = None,
             students: Path | None = None) -> dict:
    """Run the demo into folder ``out``; returns the table as a dict (also written as JSON).
    ``rows`` replaces :func:`demo_rows` (the first row is the speed-up's baseline); ``text_rows`` replaces
    :func:`text_plan` (``[]``: no text-to-image section); ``students``: the folder holding the text-to-image
    student pipelines (default: the shipped assets)."""
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
    rvr, clf = None, None
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
    methods = text_plan(students=students) if text_rows is None else text_rows
    if not methods and text_rows is None:
        skipped.append(f"text-to-image section: {TEXT_TEACHER} is not shipped in this version")
    text, text_images = (run_text_section(methods, seed=seed, classifier=clf, progress=progress) if methods
                         else (None, []))
    doc = {"w": w, "seed": seed, "fid_n": fid_n, "timing_batch": len(labels), "real_vs_real_fid": rvr,
           "rows": rows, "skipped": skipped, "text_to_image": text,
           "meta": _meta()}
    doc["files"] = {"image": str(_comparison_image(rows, images, out / "comparison.png")),
                    "markdown": str(out / "table.md"), "json": str(out / "table.json")}
    if text_images:
        doc["files"]["text_image"] = str(_text_image(text, text_images, out / "text_to_image.png"))
    (out / "table.md").write_text(_markdown(doc))
    (out / "table.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc
