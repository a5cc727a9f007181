"""``fewstep bench speed``: images per second for every shipped model and sampler, in one run.

Each row times ``fewstep.generate`` end to end (noise, every network call, the solver) at batch
1 (best of three after a warm-up) and at a large batch (one run after the warm-up), on the
same machine and threads, so the rows can be compared with each other. ``--model`` times the models
you name instead (fewstep models or folders, diffusers pipeline folders: a teacher with fewstep's
default solver, an exported student with its own stock call), text pipelines on one prompt.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .machine import machine_info

__all__ = ["speed_rows", "model_rows", "time_row", "run_speed"]

PROMPT = "a handwritten seven"  # the text pipelines' prompt (the test bed's grammar)


def speed_rows(w: float = 1.0) -> list[dict]:
    """(label, model, options) of every shipped generative model with its samplers of interest."""
    from ..api import SHIPPED
    rows = []
    if "mnist-teacher" in SHIPPED:
        for solver, steps in (("ddim", 50), ("dpmpp_2m", 25), ("dpmpp_2m", 10), ("dpmpp_2m", 5)):
            rows.append({"label": f"mnist-teacher {solver} {steps} steps", "model": "mnist-teacher",
                         "options": {"solver": solver, "steps": steps}})
    if "mnist-guided-stage1" in SHIPPED:
        rows.append({"label": "mnist-guided-stage1 dpmpp_2m 10 steps", "model": "mnist-guided-stage1",
                     "options": {"solver": "dpmpp_2m", "steps": 10}})
    for k in (8, 4, 2, 1):
        if f"mnist-guided-{k}" in SHIPPED:
            rows.append({"label": f"mnist-guided-{k}", "model": f"mnist-guided-{k}", "options": {}})
    for name in ("mnist-dmd-1", "mnist-dmd2-4"):
        if name in SHIPPED:
            rows.append({"label": name, "model": name, "options": {}})
    for r in rows:
        r["w"] = w
    return rows


def model_rows(models, w: float = 1.0) -> list[dict]:
    """One row per named model (a shipped name or a folder), with its default sampler."""
    return [{"label": str(m), "model": str(m), "options": {}, "w": w} for m in models]


def _inputs(model, n: int, prompt: str) -> dict:
    """generate's conditioning for n images: prompts for a text pipeline, labels for a class model."""
    from ..api import is_pipeline
    if is_pipeline(model):
        return {"prompts": [prompt], "n": n}
    return {"labels": torch.arange(n) % (model.num_classes or 10)}


@torch.no_grad()
def time_row(model, options: dict, w: float, batch: int, device, repeats: int, prompt: str = PROMPT) -> float:
    """Seconds per image of ``generate`` at ``batch`` (best of ``repeats`` after a batch-1 warm-up)."""
    from ..api import generate
    generate(model, w=w, seed=0, batch_size=1, **_inputs(model, 1, prompt), **options)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, w=w, seed=0, batch_size=batch, **_inputs(model, batch, prompt), **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / batch


def run_speed(out_dir, *, batches=(1, 256), w: float = 1.0, device: str = "cpu", rows: list[dict] | None = None,
              log=print) -> dict:
    """Time every row at every batch size; write speed.json and speed.md into ``out_dir``."""
    from ..api import load
    dev = torch.device(device)
    plan = speed_rows(w) if rows is None else rows
    results, loaded = [], {}
    for r in plan:
        model = loaded.setdefault(r["model"], load(r["model"]).to(dev))
        w, evals = _guidance_and_evals(model, r)
        for b in batches:
            spi = time_row(model, r["options"], w, b, dev, repeats=3 if b == 1 else 1)
            results.append({"label": r["label"], "model": r["model"], "w": w, "network_evals": evals, "batch": b,
                            "seconds_per_image": spi, "images_per_second": 1.0 / spi})
            log(f"{r['label']}, batch {b}: {1.0 / spi:.1f} images/s ({evals} network evaluations)")
    doc = {"device": str(dev), "w": w, "batches": list(batches), "rows": results,
           "machine": machine_info(dev)}
    doc["date"] = doc["machine"]["day"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "speed.md").write_text(speed_markdown(doc))
    return doc


def _guidance_and_evals(model, row: dict) -> tuple[float, int | None]:
    """(w, network evaluations per image) of a row: a pipeline's model calls (its guided call batches cond and
    uncond; a student with w baked in runs at w = 0), a fewstep model's evaluations."""
    from ..api import is_pipeline, pipeline_calls, pipeline_student
    w, opts = row["w"], row["options"]
    if not is_pipeline(model):
        solver, steps = model.check_sampling(opts.get("solver"), opts.get("steps"), w)
        return w, model.evaluations(solver, steps, w, "logsnr")
    record = pipeline_student(model)
    if record is not None and not record.get("w_input"):
        w = 0.0
    calls = pipeline_calls(model, opts.get("solver"), opts.get("steps"))
    return w, None if calls is None else calls * (2 if w > 0 and record is None else 1)


def speed_markdown(doc: dict) -> str:
    batches = doc["batches"]
    lines = [f"# Sampling speed ({doc['date']}, {doc['device']}, {doc['machine']['torch_threads']} torch threads, "
             f"torch {doc['machine']['torch']})", "",
             "| sampler | network evals | " + " | ".join(f"images/s at batch {b}" for b in batches) +
             " | speed-up at batch 1 |", "|---|---|" + "---|" * len(batches) + "---|"]
    by_label: dict = {}
    for r in doc["rows"]:
        by_label.setdefault(r["label"], {"evals": r["network_evals"]})[r["batch"]] = r["images_per_second"]
    base = next(iter(by_label.values()), {}).get(batches[0])
    for label, v in by_label.items():
        cells = " | ".join(f"{v[b]:.1f}" for b in batches)
        v["evals"] = "—" if v["evals"] is None else v["evals"]
        up = f"{v[batches[0]] / base:.1f}x" if base else "—"
        lines.append(f"| {label} | {v['evals']} | {cells} | {up} |")
    lines.append("\nSpeed-up is against the first row (by default the teacher's 50-step DDIM at the same w).")
    return "\n".join(lines) + "\n"
