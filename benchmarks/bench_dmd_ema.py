"""A DMD run's exported generator (its EMA) against the raw generator weights of the same step.

    python benchmarks/bench_dmd_ema.py runs/mnist-dmd-1 [--name mnist-dmd-1] [--n 2000]

Reads the run's export (``RUN/NAME``, the EMA weights) and its last checkpoint
(``RUN/run/ckpt-*``, raw weights of the same step), samples both with the same seed, n and
baked-in w, and scores them with fewstep's evaluation (shipped classifier features). Results are
appended to benchmarks/results/dmd_ema.json (one row per run and weights) and written as a table
to dmd_ema.md. The EMA decay follows the training loop's warm-up, min(decay, (1 + s) / (10 + s)),
so at step s it is at most (1 + s) / (10 + s), whatever the preset asks for.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dmd_ema.json"


def score_both(run: Path, name: str, n: int) -> list[dict]:
    import fewstep
    from fewstep.evaluate import evaluate
    from fewstep.train import ema_decay_at, latest_checkpoint, load_checkpoint_weights
    gen = fewstep.load(run / name)
    ckpt = latest_checkpoint(run / "run")
    if ckpt is None:
        raise SystemExit(f"{run / 'run'} holds no checkpoint: train the run first")
    step = json.loads((Path(ckpt) / "state.json").read_text())["step"]
    if step != gen.config.get("train_steps"):
        raise SystemExit(f"the last checkpoint ({ckpt}, step {step}) is not the exported step "
                         f"({gen.config.get('train_steps')}): export the run again or pass the matching run")
    decay = gen.config["preset"]["ema_decay"]["generator"]
    w = float(gen.config.get("real_w", 0.0))
    rows = []
    for which in ("ema", "model"):
        if which == "model":
            gen.net.load_state_dict(load_checkpoint_weights(ckpt, "model", network="generator"))
        res = evaluate(gen, w=w, n=n, seed=0)
        rows.append({"run": str(run), "name": name, "step": step, "weights": "raw" if which == "model" else "EMA",
                     "ema_decay_at_step": round(ema_decay_at(step, decay), 5) if which == "ema" else 0.0,
                     "n": n, "w": w, "fid": res["fid"], "kid": res["kid"], "is": res["is"],
                     "class_accuracy": res["class_accuracy"], "date": time.strftime("%Y-%m-%d")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(doc: dict) -> str:
    lines = ["| run | step | weights | EMA decay at that step | FID | KID | IS | class accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['name']} | {r['step']} | {r['weights']} | {r['ema_decay_at_step']:g} | {r['fid']:.2f} | "
                     f"{r['kid']:.4f} | {r['is']:.2f} | {100 * r['class_accuracy']:.2f}% |")
    if doc["rows"]:
        lines.append(f"\nn = {doc['rows'][0]['n']}, seed 0, w baked in.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a DMD run folder (fewstep distill dmd --out RUN)")
    ap.add_argument("--name", default="mnist-dmd-1", help="the exported generator's folder name inside RUN")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = score_both(args.run, args.name, args.n)
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    doc["rows"] = [r for r in doc["rows"] if (r["name"], r["step"]) != (args.name, rows[0]["step"])] + rows
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
