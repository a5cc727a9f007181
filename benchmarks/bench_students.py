"""Distilled students of the text-to-image test bed through the stock diffusers call, beside their teacher
(issue 22): all rows in one run, on the 90-prompt suite and the same held-out reference.

    python benchmarks/bench_students.py --teacher mnist-sd --guidance 3 \
        --student runs/sd-dmd1/export/mnist-sd-dmd-1 [--student FOLDER ...] [--n 2070] [--quick]

Rows (:func:`fewstep.evaluate.evaluate_prompts`: class accuracy of the prompted digit, thickness / slant
adherence, FID / KID against the 1,000 held-out digits, network evaluations counted, seconds per image):

* the teacher with its stock scheduler at 50 and 20 steps (``--teacher-steps``), at ``--guidance``;
* the teacher through ``FewstepScheduler`` (its default solver) at each student's number of steps;
* each student folder through its own stock call: ``DiffusionPipeline.from_pretrained(folder)`` and
  ``pipe(prompts, num_inference_steps=<its steps>, guidance_scale=...)`` with no fewstep code (a one-step
  DMD generator: guidance_scale 1, the guidance is baked in; a guided student: 1 + w, w an input);

plus images per second of each stock call at batch 1 and 64, and each student's FID-against-training-steps
curve where its run folder kept one (``run/fid.jsonl``, ``stage1/fid.jsonl``, ``round-<N>/fid.jsonl``).
Results: benchmarks/results/students_<teacher>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fewstep
from fewstep.bench.machine import machine_info, machine_line
from fewstep.evaluate import evaluate_prompts, heldout_reference, load_text_pipeline, suite_size

OUT = Path(__file__).parent / "results"
KEEP = ("scheduler", "scheduler_class", "steps", "guidance_scale", "n", "fid", "kid", "kid_std", "class_accuracy",
        "thickness_adherence", "slant_adherence", "mean_adherence", "nfe", "seconds_per_image")


def student_info(folder: Path) -> dict:
    """What the student's fewstep.json says: its steps and guidance (w input or baked in)."""
    info = json.loads((folder / "fewstep.json").read_text())
    guided = bool(info.get("w_input"))
    return {"steps": int(info["student_steps"]), "guided": guided, "real_w": info.get("real_w"),
            "recipe": info.get("recipe"), "train_steps": info.get("train_steps"),
            "train_seconds": info.get("train_seconds")}


@torch.no_grad()
def images_per_second(pipe, steps: int, guidance_scale: float, batch: int, repeats: int) -> float:
    """Images per second of the stock call at ``batch`` prompts (after one warm-up call)."""
    prompts = ["a thick seven"] * batch
    call = lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,  # noqa: E731
                        generator=torch.Generator().manual_seed(0), output_type="pt")
    call()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    return batch * repeats / (time.perf_counter() - t0)


def fid_curves(folder: Path) -> dict:
    """{stage: [(step, fid), ...]} from the run folder above ``DIR/export/<name>``, or for a shipped student the
    curve published in benchmarks/results/curves/<name>.jsonl."""
    logs = {log.parent.name: log for log in sorted(folder.parent.parent.glob("*/fid.jsonl"))}
    if not logs and (OUT / "curves" / f"{folder.name}.jsonl").is_file():
        logs = {"run": OUT / "curves" / f"{folder.name}.jsonl"}
    curves = {}
    for stage, log in logs.items():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        curves[stage] = [(r["step"], r["fid"]) for r in rows]
    return curves


def compact(row: dict, **extra) -> dict:
    return {**extra, **{k: row[k] for k in KEEP if k in row}}


def markdown(doc: dict) -> str:
    teacher50 = doc["rows"][0]  # the teacher's first stock row (50 steps by default)
    lines = [f"# Students of {doc['teacher']} through the stock diffusers call ({doc['date']}, {doc['machine']})", "",
             f"`{doc['command']}`; n = {doc['n']} images per row (the 90-prompt suite), FID / KID against the "
             f"{doc['n_reference']} held-out digits (real vs real at this n: FID {doc['baseline']['fid']:.2f}); "
             f"teacher guidance_scale {doc['guidance_scale']:g}. Wall time {doc['wall_time_s'] / 60:.1f} min.", "",
             f"| row | scheduler | steps | NFE | FID | x teacher@{teacher50['steps']} | KID | class acc. | thick / slant adherence "
             "| s/image | img/s b=1 | img/s b=64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        speed = doc["speed"].get(r["label"], {})
        lines.append(
            f"| {r['label']} | {r['scheduler_class']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | "
            f"{r['fid'] / teacher50['fid']:.2f} | {r['kid']:.4f} | {100 * r['class_accuracy']:.1f}% | "
            f"{r['thickness_adherence']:.3f} / {r['slant_adherence']:.3f} | {r['seconds_per_image']:.4f} | "
            f"{speed.get('1', float('nan')):.1f} | {speed.get('64', float('nan')):.1f} |")
    for label, curves in doc["curves"].items():
        for stage, points in curves.items():
            pts = ", ".join(f"{s}: {f:.1f}" for s, f in points)
            lines.append(f"\nFID probe of {label} ({stage}, n = 500 against training digits, a trend): {pts}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in doc["rows"]:
        axes[0].scatter(r["nfe"], r["fid"], marker="o" if r["what"] == "teacher" else "*", s=60)
        axes[0].annotate(r["label"], (r["nfe"], r["fid"]), fontsize=7)
    axes[0].set(xscale="log", xlabel="network evaluations per image", ylabel="FID (held-out digits)",
                title="quality against cost")
    for label, curves in doc["curves"].items():
        for stage, points in curves.items():
            if points:
                axes[1].plot(*zip(*points), marker=".", label=f"{label} {stage}")
    axes[1].set(xlabel="training step", ylabel="FID probe (n = 500)", title="FID during training")
    if doc["curves"]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="mnist-sd")
    p.add_argument("--student", action="append", type=Path, default=[], help="an exported student pipeline folder")
    p.add_argument("--guidance", type=float, default=3.0, help="the teacher's guidance_scale (and guided students')")
    p.add_argument("--n", type=int, default=2070)
    p.add_argument("--teacher-steps", default="50,20", help="the teacher's stock-scheduler rows (the first is the "
                                                            "speed baseline and the 'x teacher' column's)")
    p.add_argument("--quick", action="store_true", help="n = 90 and one speed repeat: checks the script")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = suite_size(90 if args.quick else args.n)
    repeats = 1 if args.quick else 3
    info = machine_info("cpu")
    classifier = fewstep.load("mnist-classifier")
    reference = heldout_reference(n, classifier)
    doc = {"command": "python benchmarks/bench_students.py " + " ".join(argv), "date": info["day"],
           "machine": machine_line(info), "teacher": args.teacher, "guidance_scale": args.guidance, "n": n,
           "n_reference": reference["n_reference"], "baseline": reference["baseline"], "rows": [], "speed": {},
           "curves": {}, "students": {}}
    t0 = time.time()
    out = OUT / f"students_{Path(args.teacher).name}{'_quick' if args.quick else ''}.json"

    def save():
        doc["wall_time_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))

    def row(pipe, label, what, scheduler, steps, guidance, speed=False):
        r = evaluate_prompts(pipe, scheduler=scheduler, steps=steps, guidance_scale=guidance, n=n,
                             classifier=classifier, reference=reference)
        doc["rows"].append(compact(r, label=label, what=what))
        if speed:
            doc["speed"][label] = {str(b): images_per_second(pipe, steps, guidance, b, repeats) for b in (1, 64)}
        print(f"[bench students] {label}: FID {r['fid']:.2f}, accuracy {100 * r['class_accuracy']:.1f}%, "
              f"adherence {r['mean_adherence']:.3f}, NFE {r['nfe']}", file=sys.stderr, flush=True)
        save()

    teacher = load_text_pipeline(args.teacher)
    for i, k in enumerate(int(k) for k in args.teacher_steps.split(",")):
        row(teacher, f"teacher, stock {k} steps", "teacher", "stock", k, args.guidance, speed=i == 0)
    students = {folder: student_info(folder) for folder in args.student}
    for k in sorted({s["steps"] for s in students.values()}):
        row(teacher, f"teacher, fewstep {k} steps", "teacher", "fewstep", k, args.guidance)
    for folder, s in students.items():
        label = folder.name
        doc["students"][label] = {**s, "folder": str(folder)}
        pipe = load_text_pipeline(folder)
        guidance = args.guidance if s["guided"] else 1.0
        row(pipe, label, "student", "stock", s["steps"], guidance, speed=True)
        doc["curves"][label] = fid_curves(folder)
    save()
    plot(doc, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
