"""The text-to-image test bed's pipelines on the 90-prompt suite (issue 21): guidance, schedulers and steps,
beside the pixel-space teacher scored on the same held-out reference.

    python benchmarks/bench_textbed.py [PIPELINE ...] [--n 2070] [--sweep-n 450] [--guidance 1,2,3,4.5,6]
    python benchmarks/bench_textbed.py --quick        # n = 90, few rows: checks the script in minutes

PIPELINE: a diffusers pipeline folder or a shipped name (default: mnist-sd and mnist-sd3, those present).
For each pipeline, with :func:`fewstep.evaluate.evaluate_prompts` (the stock pipeline call, the prompted
digit read by the shipped classifier, thickness / slant adherence, FID / KID on classifier features
against the 1,000 held-out digits):

1. guidance sweep: the stock scheduler at 25 steps for every --guidance value, n = --sweep-n; the
   guidance scale with the lowest FID is kept;
2. at that guidance, n = --n: the stock scheduler at 50 and 25 steps; DPMSolverMultistep, UniPC,
   FewstepScheduler (its default solver) and FewstepScheduler dpmpp_2m at 5, 10 and 20 steps;
3. once for all pipelines: ``mnist-teacher`` at its converged setting (DPM-Solver++(2M), 25 guided steps,
   w = 1, the "converged" reference of BENCHMARKS.md), n = --n class-balanced digits scored against the
   same held-out reference (:func:`fewstep.evaluate.evaluate_heldout`), so that the target "FID within
   2x of mnist-teacher's" can be read off every row.

Results: benchmarks/results/textbed.{json,md,png} (textbed_quick.* with --quick), the JSON rewritten
after every row so that a cut run keeps what it finished.
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
from fewstep.evaluate import (TEXT_PIPELINES, evaluate_heldout, evaluate_prompts, heldout_reference,
                              load_text_pipeline, suite_size, text_pipeline_folder)

OUT = Path(__file__).parent / "results"
SWEEP_STEPS = 25
TEACHER = {"model": "mnist-teacher", "solver": "dpmpp_2m", "steps": 25, "w": 1.0}  # its converged setting
TARGET_RATIO = 2.0


def main_plan(quick: bool, plan: str | None = None) -> list[tuple[str, int]]:
    """(scheduler, steps) rows of step 2 (``plan``: "stock:50,fewstep:5,..." instead of the default rows)."""
    if plan:
        rows = [item.rsplit(":", 1) for item in plan.split(",")]
        return [(name, int(steps)) for name, steps in rows]
    if quick:
        return [("stock", 25), ("dpmsolver", 5), ("fewstep", 5)]
    few = [(name, k) for k in (5, 10, 20) for name in ("dpmsolver", "unipc", "fewstep", "fewstep:dpmpp_2m")]
    return [("stock", 50), ("stock", 25)] + few


def default_pipelines() -> list[str]:
    """The shipped test-bed pipelines that this installation has."""
    present = []
    for name in TEXT_PIPELINES:
        try:
            text_pipeline_folder(name)
            present.append(name)
        except FileNotFoundError:
            print(f"[bench textbed] {name} is not shipped yet: skipped", file=sys.stderr)
    return present


def compact(row: dict, **extra) -> dict:
    """The numbers of one evaluate_prompts / evaluate_heldout row, without the repeated baseline."""
    keep = ("scheduler", "scheduler_class", "steps", "guidance_scale", "solver", "w", "n", "fid", "kid", "kid_std",
            "class_accuracy", "thickness_adherence", "slant_adherence", "mean_adherence", "nfe", "network_evals",
            "seconds_per_image")
    return {**extra, **{k: row[k] for k in keep if k in row}}


class Run:
    """The document being filled, rewritten to disk after every row."""

    def __init__(self, path: Path, args, argv):
        self.path = path
        info = machine_info(args.device)
        self.doc = {"command": "python benchmarks/bench_textbed.py " + " ".join(argv), "date": info["day"],
                    "machine": machine_line(info), "machine_info": info, "n": args.n, "sweep_n": args.sweep_n,
                    "sweep_steps": SWEEP_STEPS, "seed": args.seed, "batch_size": args.batch_size, "teacher": None,
                    "references": {}, "pipelines": {}}
        self.t0 = time.time()

    def save(self) -> None:
        self.doc["wall_time_s"] = round(time.time() - self.t0, 1)
        self.path.write_text(json.dumps(self.doc, indent=1) + "\n")
        self.path.with_suffix(".md").write_text(markdown(self.doc))


def run_pipeline(run: Run, name: str, args, classifier, references: dict) -> None:
    pipe = load_text_pipeline(name, device=args.device)
    entry = run.doc["pipelines"].setdefault(name, {"pipeline": type(pipe).__name__,
                                                   "stock_scheduler": type(pipe.scheduler).__name__,
                                                   "sweep": [], "rows": [], "failed": []})
    common = dict(seed=args.seed, batch_size=args.batch_size, classifier=classifier)
    for g in args.guidance:
        r = evaluate_prompts(pipe, scheduler="stock", steps=SWEEP_STEPS, guidance_scale=g, n=args.sweep_n,
                             reference=references[args.sweep_n], **common)
        entry["sweep"].append(compact(r))
        log(f"{name} sweep: {line(entry['sweep'][-1])}")
        run.save()
    best = min(entry["sweep"], key=lambda r: r["fid"])["guidance_scale"]
    entry["guidance_scale"] = best
    for scheduler, steps in main_plan(args.quick, args.plan):
        try:
            r = evaluate_prompts(pipe, scheduler=scheduler, steps=steps, guidance_scale=best, n=args.n,
                                 reference=references[args.n], **common)
        except Exception as e:  # a scheduler that does not run on this pipeline is reported, not fatal
            entry["failed"].append({"scheduler": scheduler, "steps": steps, "error": f"{type(e).__name__}: {e}"})
            log(f"{name} {scheduler} {steps} steps FAILED: {e}")
            run.save()
            continue
        entry["rows"].append(compact(r))
        log(f"{name}: {line(entry['rows'][-1])}")
        run.save()


def line(r: dict) -> str:
    return (f"{r['scheduler']} {r['steps']} steps, g {r['guidance_scale']:g}: FID {r['fid']:.2f}, accuracy "
            f"{100 * r['class_accuracy']:.1f}%, adherence {r['mean_adherence']:.3f}, "
            f"{r['seconds_per_image']:.4f} s/image")


def log(msg: str) -> None:
    print(f"[bench textbed] {msg}", file=sys.stderr, flush=True)


def markdown(doc: dict) -> str:
    teacher = doc.get("teacher")
    lines = [f"# Text-to-image test bed on the 90-prompt suite ({doc['date']}, {doc['machine']})", "",
             f"`{doc['command']}`: the stock pipeline call, images seeded per batch of {doc['batch_size']} "
             f"(seed {doc['seed']}), scored on their 28x28 centre against the 1,000 held-out digits (shipped "
             "classifier's features). Adherence: share of \"thick\" (\"slanted right\") images above the median "
             "\"thin\" (\"slanted left\") one of the same digit; 0.5 = words ignored. NFE: network evaluations per "
             "image (guidance doubles them).", ""]
    for ref in doc["references"].values():
        b = ref["baseline"]
        lines.append(f"- real vs real at n = {ref['n']}: {ref['n_baseline']} training digits against the reference: "
                     f"FID {b['fid']:.2f}, KID {b['kid']:.4f}")
    if teacher:
        lines.append(f"- mnist-teacher, {teacher['solver']} {teacher['steps']} guided steps, w = {teacher['w']:g} "
                     f"(guidance_scale {1 + teacher['w']:g}), n = {teacher['n']}: FID **{teacher['fid']:.2f}**, "
                     f"class accuracy {100 * teacher['class_accuracy']:.1f}%, {teacher['network_evals']} network "
                     f"evaluations, {teacher['seconds_per_image']:.4f} s/image; target: FID <= "
                     f"{TARGET_RATIO:g}x = {TARGET_RATIO * teacher['fid']:.2f}")
    for name, entry in doc["pipelines"].items():
        lines += ["", f"## {name} ({entry['pipeline']}, stock scheduler {entry['stock_scheduler']})", "",
                  f"Guidance sweep (stock, {doc['sweep_steps']} steps, n = {doc['sweep_n']}):", ""]
        lines += table(entry["sweep"], teacher)
        if "guidance_scale" in entry:
            lines += ["", f"At the sweep's best guidance_scale {entry['guidance_scale']:g}, n = {doc['n']}:", ""]
            lines += table(entry["rows"], teacher)
        for f in entry["failed"]:
            lines.append(f"\n- {f['scheduler']} at {f['steps']} steps did not run: {f['error']}")
        lines += verdict(entry, teacher)
    return "\n".join(lines) + "\n"


def table(rows: list[dict], teacher: dict | None) -> list[str]:
    out = ["| scheduler | steps | guidance_scale | NFE | FID | x teacher | KID | class acc. | thickness adh. | "
           "slant adh. | mean adh. | s / image |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['fid'] / teacher['fid']:.2f}x" if teacher else ""
        out.append(f"| {r['scheduler']} ({r['scheduler_class']}) | {r['steps']} | {r['guidance_scale']:g} | "
                   f"{r['nfe']:g} | {r['fid']:.2f} | {ratio} | {r['kid']:.4f} | {100 * r['class_accuracy']:.1f}% | "
                   f"{r['thickness_adherence']:.3f} | {r['slant_adherence']:.3f} | {r['mean_adherence']:.3f} | "
                   f"{r['seconds_per_image']:.4f} |")
    return out


def verdict(entry: dict, teacher: dict | None) -> list[str]:
    """The 2x target on the converged row (the most steps of the stock scheduler) and the best row."""
    if not teacher or not entry["rows"]:
        return []
    converged = max((r for r in entry["rows"] if r["scheduler"] == "stock"), key=lambda r: r["steps"], default=None)
    best = min(entry["rows"], key=lambda r: r["fid"])
    out = [""]
    for what, r in (("converged (stock, most steps)", converged), ("best row", best)):
        if r is not None:
            ratio = r["fid"] / teacher["fid"]
            out.append(f"- {what}: {r['scheduler']} {r['steps']} steps, FID {r['fid']:.2f} = {ratio:.2f}x the "
                       f"teacher's: target {TARGET_RATIO:g}x **{'met' if ratio <= TARGET_RATIO else 'missed'}**")
    return out


def plot(doc: dict, path: Path) -> None:
    """Per pipeline: FID against guidance (the sweep) and FID against steps per scheduler, with the teacher's
    FID, 2x it and real vs real."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(doc["pipelines"])
    if not names:
        return
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.8 * len(names)), squeeze=False)
    teacher = doc.get("teacher")
    for (ax_g, ax_s), name in zip(axes, names):
        entry = doc["pipelines"][name]
        ax_g.plot([r["guidance_scale"] for r in entry["sweep"]], [r["fid"] for r in entry["sweep"]], "o-")
        ax_g.set_xlabel(f"guidance_scale (stock, {doc['sweep_steps']} steps)")
        for scheduler in dict.fromkeys(r["scheduler"] for r in entry["rows"]):
            pts = sorted((r["steps"], r["fid"]) for r in entry["rows"] if r["scheduler"] == scheduler)
            ax_s.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=scheduler)
        ax_s.set_xscale("log", base=2)
        steps = sorted({r["steps"] for r in entry["rows"]})
        ax_s.set_xticks(steps, [str(k) for k in steps])
        ax_s.set_xlabel("steps (num_inference_steps)")
        if teacher:
            ax_s.axhline(teacher["fid"], color="k", lw=1, label="mnist-teacher (converged)")
            ax_s.axhline(TARGET_RATIO * teacher["fid"], color="k", ls=":", lw=1, label=f"{TARGET_RATIO:g}x teacher")
        ref = doc["references"].get(str(doc["n"]))
        if ref:
            ax_s.axhline(ref["baseline"]["fid"], color="grey", ls="--", lw=1, label="real vs real")
        for ax in (ax_g, ax_s):
            ax.set_ylabel("FID (classifier features)")
            ax.set_title(f"{name} ({entry['pipeline']})", fontsize=9)
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipelines", nargs="*", help="pipeline folders or shipped names (default: the shipped ones present)")
    p.add_argument("--n", type=int, default=None, help="images per row of step 2 and for the teacher (default 2070)")
    p.add_argument("--sweep-n", type=int, default=None, help="images per guidance-sweep row (default 450)")
    p.add_argument("--guidance", default=None, help="comma-separated guidance scales (default 1,2,3,4.5,6)")
    p.add_argument("--quick", action="store_true", help="n = 90, guidance 1,3, three rows: checks the script")
    p.add_argument("--plan", default=None, help="the rows of step 2 as scheduler:steps,... (default: all of them)")
    p.add_argument("--out-name", default=None, help="results file stem (default textbed, textbed_quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=90)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-teacher", action="store_true", help="skip the mnist-teacher row (step 3)")
    p.add_argument("--out-dir", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.n = args.n or (90 if args.quick else 2070)
    args.sweep_n = args.sweep_n or (90 if args.quick else 450)
    args.guidance = [float(g) for g in (args.guidance or ("1,3" if args.quick else "1,2,3,4.5,6")).split(",")]
    try:
        args.n, args.sweep_n = suite_size(args.n), suite_size(args.sweep_n)  # multiples of the 90 prompts
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.pipelines or default_pipelines()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.out_name or ('textbed_quick' if args.quick else 'textbed')}.json"
    run = Run(path, args, argv)
    classifier = fewstep.load("mnist-classifier")
    references = {m: heldout_reference(m, classifier) for m in {args.n, args.sweep_n}}
    run.doc["references"] = {str(m): {k: v for k, v in ref.items() if k != "images"} for m, ref in references.items()}
    if not args.no_teacher:
        teacher = fewstep.load(TEACHER["model"])
        teacher.to(args.device)
        t = evaluate_heldout(teacher, n=args.n, w=TEACHER["w"], solver=TEACHER["solver"], steps=TEACHER["steps"],
                             seed=args.seed, classifier=classifier, reference=references[args.n])
        run.doc["teacher"] = compact(t, model=TEACHER["model"])
        log(f"mnist-teacher: FID {t['fid']:.2f}, accuracy {100 * t['class_accuracy']:.1f}%")
        run.save()
    for name in names:
        run_pipeline(run, name, args, classifier, references)
    run.save()
    plot(run.doc, path.with_suffix(".png"))
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
