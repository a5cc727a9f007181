"""FID / KID / class accuracy of the shipped teacher at 4-6 model calls: its tuned grids against the
same solver on the log-SNR and Karras grids and against diffusers' default DPMSolverMultistepScheduler
grid, on class-balanced samples (held-out seeds: generation seed 2, never a calibration noise).

    python benchmarks/bench_grids_fid.py                       # NFE 4,5,6, n = 2000 (minutes per row)
    python benchmarks/bench_grids_fid.py --nfe 5 --n 500       # a quicker look

The diffusers row runs fewstep's dpmpp_2m on diffusers' default timesteps (mapped to the teacher's
time by log-SNR): the same algorithm as DPMSolverMultistepScheduler on an identical grid, which
the solver benchmark measures equal to 1e-7. Rows are appended to
benchmarks/results/grids_fid.json as they finish (rerun to add rows; finished rows are kept), and
the table is rewritten to grids_fid.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fewstep
from fewstep.bench.models import load_bench_model
from fewstep.bench.runner import diffusers_grid
from fewstep.evaluate import evaluate

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "grids_fid.json"


def diffusers_default_times(model, w: float, nfe: int) -> torch.Tensor:
    bm = load_bench_model("mnist-teacher", w)
    t = diffusers_grid(bm, "DPMSolverMultistepScheduler", {}, nfe)
    lam = bm.schedule.lambda_(t[:-1])
    cont = model.schedule.t_of_lambda(lam).clamp(model.schedule.t_min, model.schedule.t_max)
    return torch.cat([cont, torch.zeros(1, dtype=torch.float64)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", default="4,5,6")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--solver", default="dpmpp_2m")
    ap.add_argument("--grids", default="tuned,logsnr,karras,diffusers_default")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    model = fewstep.load("mnist-teacher")
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    done = {(r["solver"], r["grid"], r["nfe"], r["n"], r["w"]) for r in doc["rows"]}
    for nfe in [int(v) for v in args.nfe.split(",")]:
        for grid in args.grids.split(","):
            if (args.solver, grid, nfe, args.n, args.w) in done:
                continue
            kw = {"grid": diffusers_default_times(model, args.w, nfe)} if grid == "diffusers_default" else \
                {"spacing": grid}
            start = time.perf_counter()
            res = evaluate(model, solver=args.solver, steps=nfe, w=args.w, n=args.n, seed=2, **kw)
            row = {"solver": args.solver, "grid": grid, "nfe": nfe, "n": args.n, "w": args.w, "fid": res["fid"],
                   "kid": res["kid"], "class_accuracy": res["class_accuracy"], "real_vs_real_fid": res["baseline"]["fid"],
                   "seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d")}
            doc["rows"].append(row)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(doc, converged_row(args.w, args.n)))
            print(json.dumps(row), flush=True)
    out.with_suffix(".md").write_text(markdown(doc, converged_row(args.w, args.n)))


def markdown(doc: dict, converged: dict | None = None) -> str:
    """FID (KID, class accuracy) by grid and NFE, with the converged teacher's FID for scale."""
    rows = doc["rows"]
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    lines = ["| NFE | " + " | ".join(grids) + " |", "|---|" + "---|" * len(grids)]
    for nfe in sorted({r["nfe"] for r in rows}):
        cells = []
        for g in grids:
            r = next((r for r in rows if r["grid"] == g and r["nfe"] == nfe), None)
            cells.append("" if r is None else f"{r['fid']:.1f} ({r['kid']:.3f}, {100 * r['class_accuracy']:.1f}%)")
        best = min((r["fid"] for r in rows if r["nfe"] == nfe), default=None)
        cells = [f"**{c.split(' (')[0]}**{c[len(c.split(' (')[0]):]}" if c and best is not None
                 and float(c.split(" (")[0]) == round(best, 1) else c for c in cells]
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    r0 = rows[0] if rows else {}
    lines.append(f"\nFID (KID, class accuracy); solver {r0.get('solver')}, w = {r0.get('w')}, n = {r0.get('n')}, "
                 f"generation seed 2; real-vs-real FID at this n: {r0.get('real_vs_real_fid', float('nan')):.2f}.")
    if converged:
        lines.append(f"The converged teacher ({converged['solver']}, {converged['steps']} steps, seed 0) scores "
                     f"FID {converged['fid']:.2f} at this n.")
    return "\n".join(lines) + "\n"


def converged_row(w: float, n: int) -> dict | None:
    path = OUT.parent / "teacher.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    row = next((r for r in doc["results"] if r["w"] == w), None)
    return None if row is None or doc["n"] != n else {"solver": doc["solver"], "steps": doc["steps"], "fid": row["fid"]}


if __name__ == "__main__":
    main()
