"""FID / KID / class accuracy of the shipped teacher at 4-6 model calls: its tuned grids against the
same solver on the log-SNR and Karras grids and against diffusers' default DPMSolverMultistepScheduler
grid, on class-balanced samples (held-out seeds: generation seed 2, never a calibration noise).

    python benchmarks/bench_grids_fid.py                       # NFE 4,5,6, n = 2000 (minutes per row)
    python benchmarks/bench_grids_fid.py --nfe 5 --n 500       # a quicker look

The diffusers row runs fewstep's dpmpp_2m on diffusers' default timesteps (mapped to the teacher's
time by log-SNR): the same algorithm as DPMSolverMultistepScheduler on an identical grid, which
the solver benchmark measures equal to 1e-7. Rows are appended to
benchmarks/results/grids_fid.json as they finish (rerun to add rows; finished rows are kept).
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
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
