"""The shipped MNIST teacher's quality: FID / KID / IS / class accuracy for w in {0, 1, 2, 4},
beside the real-vs-real baseline, with sample grids per w and a step-convergence check.

    python benchmarks/bench_teacher.py [--n 2000] [--steps 25] [--solver dpmpp_2m]

Each w is one `fewstep eval` run (the same library call); results go to
benchmarks/results/teacher.{json,md} and benchmarks/results/teacher_w<w>.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.bench.machine import machine_info
import fewstep
from fewstep.evaluate import evaluate
from fewstep.images import save_image_grid

OUT = Path(__file__).parent / "results"


def convergence(model, solver: str, w: float, steps_list, n: int = 60) -> list[dict]:
    """RMSE of samples at each step count against the most steps, from the same noise."""
    labels = torch.arange(n) % 10
    runs = {s: fewstep.generate(model, labels, w=w, solver=solver, steps=s, seed=123) for s in steps_list}
    ref = runs[max(steps_list)]
    return [{"steps": s, "rmse_vs_%d" % max(steps_list): float((runs[s] - ref).pow(2).mean().sqrt())}
            for s in steps_list if s != max(steps_list)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--ws", default="0,1,2,4")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = fewstep.load("mnist-teacher")
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    conv = convergence(model, args.solver, 1.0, [10, 15, 25, 50])
    print("convergence (w=1):", conv, flush=True)
    rows = []
    for w in [float(v) for v in args.ws.split(",")]:
        res = evaluate(model, solver=args.solver, steps=args.steps, w=w, n=args.n, seed=0, progress=False)
        rows.append(res)
        print(json.dumps({k: res[k] for k in ("w", "fid", "kid", "is", "class_accuracy", "seconds_per_image")}),
              flush=True)
        grid = fewstep.generate(model, torch.arange(100) % 10, w=w, solver=args.solver, steps=args.steps, seed=0)
        save_image_grid(grid, OUT / f"teacher_w{w:g}.png", nrow=10)
    doc = {"model": "mnist-teacher", "solver": args.solver, "steps": args.steps, "n": args.n,
           "convergence_w1": conv, "results": rows,
           "machine": {**machine_info(), "threads": torch.get_num_threads(), "wall_time_s": round(time.time() - t0, 1)}}
    (OUT / "teacher.json").write_text(json.dumps(doc, indent=2) + "\n")
    (OUT / "teacher.md").write_text(markdown(doc))
    print((OUT / "teacher.md").read_text())


def markdown(doc: dict) -> str:
    base = doc["results"][0]["baseline"]
    lines = [f"# mnist-teacher quality ({doc['solver']}, {doc['steps']} steps, n = {doc['n']})", "",
             "| w | FID | KID | IS | class accuracy | NFE | s / image |", "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        lines.append(f"| {r['w']:g} | {r['fid']:.2f} | {r['kid']:.4f} ± {r['kid_std']:.4f} | {r['is']:.2f} | "
                     f"{100 * r['class_accuracy']:.1f}% | {r['nfe']} | {r['seconds_per_image']:.4f} |")
    lines.append(f"| real vs real | {base['fid']:.2f} | {base['kid']:.4f} ± {base['kid_std']:.4f} | {base['is']:.2f} "
                 "| – | – | – |")
    lines += ["", "Convergence in steps (w = 1, 60 samples, RMSE against 50 steps from the same noise):", ""]
    lines += [f"- {c['steps']} steps: {list(c.values())[1]:.4f}" for c in doc["convergence_w1"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
