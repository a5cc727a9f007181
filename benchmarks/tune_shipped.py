"""Fit the tuned solvers shipped with the models (``<model>/grids/<solver>-nfe<K>-w<w>.json``; used by
``fewstep.shipped_solver(name, K)``, ``fewstep sample --spacing tuned`` and ``grid="tuned"``):

    python benchmarks/tune_shipped.py mnist-sd [--steps 4,5,6,8] [--threads 1]

One ``fewstep.tune.tune_model`` call per model: the calibration and held-out sets (and their reference solves)
are shared by every budget. Settings per model in ``SETTINGS`` (guidance: each model's best guidance scale in
BENCHMARKS.md; text-to-image pipelines fit on the test bed's 90 prompts, every 4th held out). The method is
``tune_solver``'s default (``auto``: coeff and PAS both fitted, the better on the validation split kept, or the
times alone when neither beats them). Writes the JSONs into the model's folder and a summary
benchmarks/results/tuned_<model>.json (errors on held-out noises and prompts, fitting cost).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fewstep.api import _resolve, load
from fewstep.bench.machine import machine_line
from fewstep.recipes.teachers import teacher_from
from fewstep.tune import tune_model

OUT = Path(__file__).parent / "results"
# guidance w (diffusers' guidance_scale = 1 + w) and fitting sizes; max_evals bounds each method's
# Levenberg-Marquardt runs so that a budget fits in about 5 CPU minutes on the pipelines
SETTINGS = {
    "mnist-teacher": {"w": 1.0, "samples": 64, "heldout": 32, "max_evals": None},
    "mnist-sd": {"w": 1.0, "samples": 48, "heldout": 32, "max_evals": 100},
    "mnist-sd3": {"w": 2.0, "samples": 48, "heldout": 32, "max_evals": 100},
}


def log(msg: str) -> None:
    print(f"[tune shipped {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(SETTINGS))
    p.add_argument("--steps", default="4,5,6,8")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=None, help="default: the model's grids/ folder")
    p.add_argument("--max-evals", type=int, default=None,
                   help="cap of each Levenberg-Marquardt run (default: the model's SETTINGS)")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration noises (fitting + validation; default: the model's SETTINGS)")
    p.add_argument("--times", default="auto", choices=["auto", "tuned", "fixed"],
                   help="tune_solver's times (default auto: both fits, tuned times kept only where they validate "
                        "better by more than one standard error)")
    p.add_argument("--tag", default=None, help="summary benchmarks/results/tuned_<model>_<tag>.json instead of "
                                               "tuned_<model>.json (a trial that does not replace the shipped record)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(SETTINGS[args.model])
    if args.max_evals is not None:
        cfg["max_evals"] = args.max_evals
    if args.samples is not None:
        cfg["samples"] = args.samples
    folder = _resolve(args.model)
    model = teacher_from(args.model) if (folder / "model_index.json").is_file() else load(args.model)
    steps = [int(k) for k in args.steps.split(",")]
    start = time.perf_counter()
    grids = tune_model(model, solver=args.solver, nfe=steps, w=cfg["w"], samples=cfg["samples"], seed=1234,
                       method="learned", heldout=cfg["heldout"], max_evals=cfg["max_evals"], times=args.times, log=log)
    total = time.perf_counter() - start
    out_dir = args.out_dir or folder / "grids"
    rows = []
    for g in grids:
        path = g.save(out_dir / f"{g.solver}-nfe{g.nfe}-w{g.w:g}.json")
        rows.append({"nfe": g.nfe, "method": g.method, "times": g.calibration.get("times", "tuned"), "heldout_rmse": g.heldout["rmse"],
                     "times_alone": g.heldout["grid_alone"], "best_fixed": g.heldout["best_fixed"],
                     "fixed_spacings": g.heldout["fixed_spacings"], "calibration_rmse": g.calibration["rmse"],
                     "model_calls": g.cost["model_calls"], "seconds": g.cost["seconds"],
                     "reference_seconds": g.cost["reference_seconds"], "file": str(path)})
        log(f"{path.name}: {g.method}, held-out RMSE {g.heldout['rmse']:.4g} (times alone "
            f"{g.heldout['grid_alone']:.4g}, best fixed spacing {g.heldout['best_fixed']:.4g}), "
            f"fit {g.cost['seconds']:.0f} s")
    doc = {"model": args.model, "solver": args.solver, "settings": cfg, "machine": machine_line(),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/tune_shipped.py " + " ".join(
               argv if argv is not None else sys.argv[1:]), "total_seconds": total, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / f"tuned_{args.model}{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(doc, indent=1) + "\n")
    log(f"done in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
