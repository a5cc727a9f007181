"""Distilled students against their teacher on MNIST, all in one run: FID / KID / IS / class
accuracy and seconds per image, counted in network evaluations (a guided teacher step costs two).

    python benchmarks/bench_distilled.py guided [--n 2000] [--ws 0,0.5,1,2,4] [--models DIR]
    python benchmarks/bench_distilled.py dmd    [--n 2000] [--models DIR]

guided: the students mnist-guided-{8,4,2,1} (deterministic and stochastic samplers) for each w,
  beside the teacher with DDIM and DPM-Solver++(2M) at the same network evaluations and the
  teacher's converged reference (DPM-Solver++(2M), 25 steps).
dmd: mnist-dmd-1 (and mnist-dmd2-4 when present) beside the teacher at w = 1 with DPM-Solver++
  at 1, 2, 4 and 8 network evaluations, its converged reference, and mnist-guided-1 at w = 1;
  per-class shares of the generated digits (shipped classifier); images per second at batch 1
  and at batch 256.
Students load by shipped name, or from --models DIR/<name> (a distillation run's folder).
Results: benchmarks/results/distilled_<which>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fewstep.bench.machine import machine_info, machine_line
import fewstep
from fewstep.evaluate import evaluate

OUT = Path(__file__).parent / "results"
REFERENCE = ("dpmpp_2m", 25)  # the converged reference of every other MNIST table here


def find(name: str, models: Path | None):
    """A student by name: from the models folder when given and present, else shipped; None if absent."""
    if models is not None and (models / name / "config.json").is_file():
        return fewstep.load(models / name)
    try:
        return fewstep.load(name)
    except FileNotFoundError:
        return None


PARTIAL: list[Path] = []  # set by main(): every finished row is appended there at once (long runs can be cut)


def row(model, label: str, n: int, w: float, network_evals: int, **kw) -> dict:
    res = evaluate(model, w=w, n=n, seed=0, **kw)
    out = {"model": label, "w": w, "network_evals": network_evals,
           **{k: res[k] for k in ("fid", "kid", "kid_std", "is", "class_accuracy", "seconds_per_image")},
           "baseline_fid": res["baseline"]["fid"]}
    print(json.dumps(out), flush=True)
    for path in PARTIAL:
        with open(path, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


def stored_reference(path: Path | None, n: int, w: float, per_step: int) -> dict | None:
    """The teacher's converged row at w from benchmarks/bench_teacher.py's results (same sampler,
    seed 0 and n), so an expensive 50-evaluation row is not recomputed; None if not there."""
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if (doc.get("solver"), doc.get("steps"), doc.get("n")) != (REFERENCE[0], REFERENCE[1], n):
        return None
    for r in doc["results"]:
        if r["w"] == w and r.get("seed", 0) == 0 and r.get("spacing", "logsnr") == "logsnr":
            solver, steps = REFERENCE
            out = {"model": f"teacher reference ({solver}, {steps} steps)", "w": w,
                   "network_evals": steps * per_step, "baseline_fid": None, "source": str(path),
                   **{k: r[k] for k in ("fid", "kid", "kid_std", "is", "class_accuracy", "seconds_per_image")}}
            print(json.dumps(out), flush=True)
            return out
    return None


def teacher_rows(teacher, n: int, w: float, evals: list[int], stored: Path | None = None,
                 solvers=("ddim", "dpmpp_2m")) -> list[dict]:
    """The teacher at each budget of network evaluations (guided: steps = evals / 2) and its reference
    (read from ``stored`` when it holds this w, else computed)."""
    rows = []
    per_step = teacher.evaluations_per_call(w)
    for e in evals:
        steps = e // per_step
        if steps < 1:
            continue
        for solver in solvers:
            rows.append(row(teacher, f"teacher {solver} {steps} steps", n, w, steps * per_step, solver=solver,
                            steps=steps))
    solver, steps = REFERENCE
    rows.append(stored_reference(stored, n, w, per_step) or
                row(teacher, f"teacher reference ({solver}, {steps} steps)", n, w, steps * per_step, solver=solver,
                    steps=steps))
    return rows


def bench_guided(args) -> dict:
    teacher = fewstep.load("mnist-teacher")
    students = {k: find(f"mnist-guided-{k}", args.models) for k in (8, 4, 2, 1)}
    rows = []
    for w in args.ws:
        for k, student in students.items():
            if student is None:
                continue
            rows.append(row(student, f"mnist-guided-{k} deterministic", args.n, w, k))
            rows.append(row(student, f"mnist-guided-{k} stochastic", args.n, w, k, stochastic=True))
        rows += teacher_rows(teacher, args.n, w, [1, 2, 4, 8], args.reference_from)
    return {"rows": rows, "missing": [f"mnist-guided-{k}" for k, s in students.items() if s is None]}


@torch.no_grad()
def images_per_second(model, batch: int, repeats: int | None = None, **kw) -> float:
    """Best of ``repeats`` timed runs (default 3 at batch 1, 1 at larger batches) after a batch-1 warm-up."""
    labels = torch.arange(batch) % 10
    fewstep.generate(model, labels[:1], seed=0, batch_size=1, **kw)  # warm-up
    best = float("inf")
    for _ in range(repeats or (3 if batch == 1 else 1)):
        t0 = time.perf_counter()
        fewstep.generate(model, labels, seed=0, batch_size=batch, **kw)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def class_shares(model, n: int, **kw) -> list[float]:
    """Shares of each class among n generated digits with balanced labels, by the shipped classifier."""
    clf = fewstep.load("mnist-classifier")
    x = fewstep.generate(model, torch.arange(n) % 10, seed=1, **kw)
    pred = torch.cat([clf(x[i:i + 500]).argmax(1) for i in range(0, n, 500)])
    return (torch.bincount(pred, minlength=10).float() / n).tolist()


def bench_dmd(args) -> dict:
    teacher = fewstep.load("mnist-teacher")
    rows, speed, shares = [], [], {}
    for name in ("mnist-dmd-1", "mnist-dmd2-4"):
        gen = find(name, args.models)
        if gen is None:
            continue
        rows.append(row(gen, name, args.n, float(gen.config.get("real_w", 0.0)), gen.default_steps))  # w baked in
        shares[name] = class_shares(gen, args.n)
        speed += [{"model": name, "batch": b, "images_per_second": images_per_second(gen, b)} for b in (1, 256)]
    g1 = find("mnist-guided-1", args.models)
    if g1 is not None:
        rows.append(row(g1, "mnist-guided-1", args.n, 1.0, 1))
        speed += [{"model": "mnist-guided-1", "batch": b, "images_per_second": images_per_second(g1, b, w=1.0)}
                  for b in (1, 256)]
    rows += teacher_rows(teacher, args.n, 1.0, [1, 2, 4, 8], args.reference_from, solvers=("dpmpp_2m",))
    # the teacher's shares for context, from 500 samples (its 50 evaluations per image make 2,000 costly here)
    shares["teacher reference (n = 500)"] = class_shares(teacher, 500, w=1.0, solver=REFERENCE[0], steps=REFERENCE[1])
    speed += [{"model": f"teacher dpmpp_2m {s} steps (w = 1)", "batch": b,
               "images_per_second": images_per_second(teacher, b, w=1.0, solver="dpmpp_2m", steps=s)}
              for s in (4, 25) for b in (1, 256)]
    return {"rows": rows, "speed": speed, "class_shares": shares}


def markdown(doc: dict) -> str:
    lines = [f"# {doc['which']} (n = {doc['n']}, {doc['meta']['date']})", "",
             "| model | w | network evals | FID | KID | IS | class acc. | s / image |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['w']:g} | {r['network_evals']} | {r['fid']:.2f} | {r['kid']:.4f} | "
                     f"{r['is']:.2f} | {100 * r['class_accuracy']:.1f}% | {r['seconds_per_image']:.4f} |")
    base = [r["baseline_fid"] for r in doc["rows"] if r.get("baseline_fid") is not None]
    if base:
        lines.append(f"\nReal-vs-real FID at this n: {base[0]:.2f}.")
    stored = sorted({r["source"] for r in doc["rows"] if r.get("source")})
    if stored:
        stored = [str(Path(x).relative_to(Path(__file__).resolve().parents[1])) if Path(x).is_absolute() else x
                  for x in stored]
        lines.append(f"Teacher reference rows read from {', '.join(stored)} (same sampler, seed and n; their "
                     "seconds per image come from that run).")
    for s in doc.get("speed", []):
        lines.append(f"- {s['model']}, batch {s['batch']}: {s['images_per_second']:.1f} images/s")
    for name, sh in doc.get("class_shares", {}).items():
        lines.append(f"- class shares, {name}: " + ", ".join(f"{v:.3f}" for v in sh))
    if doc.get("merged_from"):
        lines.append(f"\nRows of {', '.join(doc['merged_from'])}, each measured in its own run (same n and seeds).")
    if doc.get("cut_short"):
        lines.append("\nThis run was cut short for time; these are the rows it finished.")
    if doc.get("missing"):
        lines.append(f"\nNot measured (not trained yet): {', '.join(doc['missing'])}.")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws = sorted({r["w"] for r in doc["rows"]})
    fig, axes = plt.subplots(1, len(ws), figsize=(4.2 * len(ws), 3.6), squeeze=False)
    for ax, w in zip(axes[0], ws):
        series: dict = {}
        for r in doc["rows"]:
            if r["w"] != w or "reference" in r["model"]:
                continue
            kind = r["model"].split(" ")[0] + (" " + r["model"].split(" ")[1] if r["model"].startswith("teacher") else
                                               (" stoch." if "stochastic" in r["model"] else " det."))
            kind = "student det." if kind.endswith("det.") and "guided" in kind else kind
            kind = "student stoch." if kind.endswith("stoch.") and "guided" in kind else kind
            series.setdefault(kind, []).append((r["network_evals"], r["fid"]))
        for kind, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        ref = [r for r in doc["rows"] if r["w"] == w and "reference" in r["model"]]
        if ref:
            ax.axhline(ref[0]["fid"], color="k", ls="--", lw=1, label="teacher converged")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel("FID (classifier features)")
        ax.set_title(f"w = {w:g}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(doc: dict, path: Path) -> None:
    """Quality/diversity along w: FID (diversity + fidelity) against IS for the 4-step student and
    the teacher's converged reference, one point per w."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, pick in (("mnist-guided-4 (4 evals)", lambda m: m == "mnist-guided-4 deterministic"),
                        ("teacher converged", lambda m: "reference" in m)):
        pts = sorted((r["w"], r["is"], r["fid"]) for r in doc["rows"] if pick(r["model"]))
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=label)
            for w, i, f in pts:
                ax.annotate(f"w={w:g}", (i, f), fontsize=7)
    ax.set_xlabel("IS (classifier logits)")
    ax.set_ylabel("FID (classifier features)")
    ax.legend(fontsize=8)
    ax.set_title("guidance trades diversity for fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(shares: dict, path: Path) -> None:
    """Per-class histogram of generated digits (classified by the shipped classifier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(shares))
    for j, (name, sh) in enumerate(shares.items()):
        ax.bar([c + j * width for c in range(10)], sh, width=width, label=name)
    ax.axhline(0.1, color="k", lw=1, ls="--")
    ax.axhspan(0.08, 0.12, color="k", alpha=0.08, label="expected share ± 20%")
    ax.set_xticks([c + 0.4 - width / 2 for c in range(10)], [str(c) for c in range(10)])
    ax.set_xlabel("class (as classified)")
    ax.set_ylabel("share of samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_curves(specs: list[str]) -> dict:
    """{label: [(training step, FID), ...]} from LABEL=PATH specs of fid.jsonl probe logs."""
    curves = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        pts = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        curves[label] = {"n": pts[0]["n"] if pts else None, "points": [(d["step"], d["fid"]) for d in pts]}
    return curves


def plot_curves(curves: dict, path: Path, reference: float | None = None) -> None:
    """FID (n = 500 probe) against training steps, one line per run/round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, c in curves.items():
        ax.plot([p[0] for p in c["points"]], [p[1] for p in c["points"]], "o-", ms=3, label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="teacher converged (same n)")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (classifier features), n = 500")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["guided", "dmd"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--ws", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--models", type=Path, default=None, help="folder holding distilled students by name")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference-from", type=Path, default=Path(__file__).parent / "results" / "teacher.json",
                   help="reuse the teacher's converged rows from this bench_teacher.py result (same n, seed 0)")
    p.add_argument("--from-partial", type=Path, default=None,
                   help="write the report from the rows a cut-short run left in its .partial.jsonl")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. one file per set of w)")
    p.add_argument("--merge", nargs="*", type=Path, default=[], metavar="JSON",
                   help="write one report (table, plots along w) from the rows of earlier runs' JSON results")
    p.add_argument("--curves", nargs="*", default=[], metavar="LABEL=PATH",
                   help="fid.jsonl probe logs of the training runs, plotted as FID against training steps")
    p.add_argument("--curve-reference", type=float, default=None,
                   help="the converged teacher's FID at the probe's n, drawn as a line")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.merge:  # runs made separately (e.g. one per set of w), reported together as they were measured
        docs = [json.loads(path.read_text()) for path in args.merge]
        doc = {"rows": sorted((r for d in docs for r in d["rows"]), key=lambda r: r["w"]),
               "merged_from": [str(path) for path in args.merge],
               "cut_short": False}  # each source lists its own rows; together they are the set asked for
    elif args.from_partial:  # a run that was cut: its finished rows, as they were measured
        rows = [json.loads(line) for line in args.from_partial.read_text().splitlines() if line.strip()]
        doc = {"rows": rows, "cut_short": True}
    else:
        PARTIAL[:] = [OUT / f"distilled_{args.which}{args.tag}.partial.jsonl"]
        PARTIAL[0].unlink(missing_ok=True)
        doc = bench_guided(args) if args.which == "guided" else bench_dmd(args)
    doc.update(which=args.which, n=args.n, meta={
        "command": "python benchmarks/bench_distilled.py " + " ".join(argv or []),
        "machine": machine_line(), "date": machine_info()["day"], "wall_time_s": round(time.time() - t0, 1)})
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"distilled_{args.which}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    if doc["rows"]:
        plot(doc, stem.with_suffix(".png"))
    if args.which == "guided" and doc["rows"]:
        plot_tradeoff(doc, OUT / f"distilled_guided{args.tag}_tradeoff.png")
    if args.curves:
        doc["fid_curves"] = read_curves(args.curves)
        plot_curves(doc["fid_curves"], OUT / f"distilled_{args.which}{args.tag}_curves.png", args.curve_reference)
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    if doc.get("class_shares"):
        plot_shares(doc["class_shares"], OUT / "distilled_dmd_classes.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
