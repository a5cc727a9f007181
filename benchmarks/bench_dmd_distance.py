"""DMD's regression distance on MNIST: l2 against pseudo-Huber, in short runs of the mnist-dmd-1 recipe.

    python benchmarks/bench_dmd_distance.py --distance l2 --steps 600 &
    python benchmarks/bench_dmd_distance.py --distance pseudo_huber --steps 600 &
    python benchmarks/bench_dmd_distance.py --report

Each run is the `mnist-dmd-1` preset with only the distance changed (and, for short runs, the
generator's EMA decay lowered to 0.99 so the export reflects the last ~100 steps rather than the
teacher it starts from); both reuse the same regression set when ``--pairs-from`` names one.
After training, FID / KID / class accuracy of the exported generator (n samples, seed 0, w
baked in) are appended to benchmarks/results/dmd_distance.json; ``--report`` writes the table
(dmd_distance.md). Short runs compare how fast each distance gets to good samples, not where
a full run ends.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dmd_distance.json"


def train_and_score(distance: str, steps: int, root: Path, pairs_from: Path | None, n: int, ema: float) -> dict:
    import fewstep
    from dataclasses import replace

    from fewstep.recipes import MNIST_DMD, run_dmd
    from fewstep.evaluate import evaluate
    out = root / distance
    out.mkdir(parents=True, exist_ok=True)
    if pairs_from is not None and pairs_from.is_file() and not (out / "regression-set.safetensors").exists():
        shutil.copy(pairs_from, out / "regression-set.safetensors")  # reused when its settings match
    preset = replace(MNIST_DMD, distance=distance, steps=steps,
                     ema_decay={"generator": ema, "fake": MNIST_DMD.ema_decay["fake"]})
    t0 = time.time()
    folder = run_dmd(out, preset, name=f"dmd-{distance}", resume=True, progress=False)
    minutes = (time.time() - t0) / 60
    gen = fewstep.load(folder)
    w = float(gen.config.get("real_w", 0.0))
    res = evaluate(gen, w=w, n=n, seed=0)
    return {"distance": distance, "steps": steps, "generator_ema": ema, "n": n, "w": w, "fid": res["fid"],
            "kid": res["kid"], "class_accuracy": res["class_accuracy"], "real_vs_real_fid": res["baseline"]["fid"],
            "train_minutes": round(minutes, 1), "date": time.strftime("%Y-%m-%d")}


def report(doc: dict) -> str:
    lines = ["| distance | training steps | FID | KID | class accuracy | training minutes |", "|---|---|---|---|---|---|"]
    for r in sorted(doc["rows"], key=lambda r: (r["steps"], r["distance"])):
        lines.append(f"| {r['distance']} | {r['steps']} | {r['fid']:.1f} | {r['kid']:.4f} | "
                     f"{100 * r['class_accuracy']:.1f}% | {r['train_minutes']} |")
    if doc["rows"]:
        r = doc["rows"][0]
        lines.append(f"\nn = {r['n']}, w = {r['w']:g} (baked in), seed 0; real-vs-real FID at this n: "
                     f"{r['real_vs_real_fid']:.2f}. The mnist-dmd-1 recipe with only the distance changed; "
                     f"generator EMA {r['generator_ema']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distance", choices=["l2", "pseudo_huber", "lpips"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--root", type=Path, default=Path("runs/dmd-distance"))
    ap.add_argument("--pairs-from", type=Path, default=None,
                    help="an existing regression-set.safetensors of the mnist-dmd-1 recipe (e.g. runs/mnist-dmd-1/)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report:
        if args.distance is None:
            ap.error("give --distance (or --report)")
        row = train_and_score(args.distance, args.steps, args.root, args.pairs_from, args.n, args.ema)
        print(json.dumps(row), flush=True)
        doc = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}  # re-read: runs finish in any order
        doc["rows"] = [r for r in doc["rows"] if (r["distance"], r["steps"]) != (row["distance"], row["steps"])]
        doc["rows"].append(row)
        OUT.write_text(json.dumps(doc, indent=1) + "\n")
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    OUT.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
