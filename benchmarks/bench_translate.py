"""Class-to-class translation with the distilled encoder and decoder, against the undistilled ODE.

    python benchmarks/bench_translate.py [--models DIR] [--per-class 20] [--w 1]

Held-out MNIST digits are encoded under their own class and decoded under every other class
(Meng et al. 2022, Sec. 4.4). Rows: the distilled k-step encoder + a decoder student (default
mnist-guided-encoder-4 + mnist-guided-4), and the undistilled ODE of the stage-1 student (DDIM
inversion, then DDIM) at the same k + k steps and at 32 + 32 steps (the pair the rounds were
distilled from).
Reported: target-class accuracy of the translations (shipped classifier), the round-trip error
(encode and decode under the digit's own class; RMSE to the input, images in [-1, 1]), and the
distilled encoder's latent error against the 32-step DDIM inversion (RMSE).
Results: benchmarks/results/translate.{json,md,png}.
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
from fewstep.data.mnist import load_mnist
from fewstep.distill.samplers import encode_student, sample_student
from fewstep.reference import rmse

OUT = Path(__file__).parent / "results"


def find(name: str, models: Path | None):
    if models is not None and (models / name / "config.json").is_file():
        return fewstep.load(models / name)
    return fewstep.load(name)


@torch.no_grad()
def measure(encode, decode, x0, y, clf, num_classes: int = 10) -> dict:
    """encode(x, labels) -> z, decode(z, labels) -> x: translation accuracy matrix and round trip."""
    z = encode(x0, y)
    back = decode(z, y).clamp(-1, 1)
    hits = torch.zeros(num_classes, num_classes)
    for target in range(num_classes):
        keep = y != target
        out = decode(z[keep], torch.full((int(keep.sum()),), target)).clamp(-1, 1)
        pred = clf(out).argmax(1)
        for s in range(num_classes):
            if s != target:
                hits[s, target] = (pred[y[keep] == s] == target).float().mean()
    off_diag = ~torch.eye(num_classes, dtype=torch.bool)
    return {"accuracy": float(hits[off_diag].mean()), "matrix": hits.tolist(), "round_trip_rmse": rmse(back, x0),
            "latent": z}


def grid_figure(rows: dict, x0: torch.Tensor, path: Path) -> None:
    """One source digit per class (rows), translated to every class (columns), per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.6), squeeze=False)
    for ax, (label, imgs) in zip(axes[0], rows.items()):
        # imgs: (10 sources, 11 columns = input + 10 targets)
        tiles = torch.cat([torch.cat(list(r), dim=-1) for r in imgs], dim=-2)[0]
        ax.imshow(((tiles + 1) / 2).clamp(0, 1).numpy(), cmap="gray")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([14 + 28 * i for i in range(11)], ["in"] + [str(c) for c in range(10)], fontsize=7)
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None, help="folder holding the students by name")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--encoder", default="mnist-guided-encoder-4")
    p.add_argument("--decoder", default="mnist-guided-4")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--w", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    t0 = time.time()
    enc, dec, stage1 = (find(n, args.models) for n in (args.encoder, args.decoder, "mnist-guided-stage1"))
    k = enc.student_steps
    clf = fewstep.load("mnist-classifier")
    x, y = load_mnist("heldout")
    idx = torch.cat([torch.nonzero(y == c).flatten()[: args.per_class] for c in range(10)])
    x0, y0 = x[idx], y[idx]
    sch, w = dec.schedule, args.w

    def distilled():
        return (lambda x_, lab: encode_student(enc.denoiser(w), x_, sch, enc.student_steps, cond={"labels": lab}).x,
                lambda z, lab: sample_student(dec.denoiser(w), z, sch, dec.student_steps, cond={"labels": lab}).x)

    def ode(steps: int):
        d = stage1.denoiser(w)
        return (lambda x_, lab: encode_student(d, x_, sch, steps, cond={"labels": lab}).x,
                lambda z, lab: sample_student(d, z, sch, steps, cond={"labels": lab}).x)

    methods = {f"distilled encoder-{enc.student_steps} + student-{dec.student_steps}": distilled(),
               f"stage-1 ODE, {k} + {k} DDIM steps": ode(k), "stage-1 ODE, 32 + 32 DDIM steps": ode(32)}
    rows, figs = [], {}
    results = {label: measure(e, d, x0, y0, clf) for label, (e, d) in methods.items()}
    z_ref = results["stage-1 ODE, 32 + 32 DDIM steps"]["latent"]
    for label, r in results.items():
        rows.append({"method": label, "target_accuracy": r["accuracy"], "round_trip_rmse": r["round_trip_rmse"],
                     "latent_rmse_vs_32_step_inversion": rmse(r["latent"], z_ref), "matrix": r["matrix"]})
        e, d = methods[label]
        first = torch.stack([torch.nonzero(y0 == c).flatten()[0] for c in range(10)])
        z = e(x0[first], y0[first])
        cols = [x0[first]] + [d(z, torch.full((10,), t)).clamp(-1, 1) for t in range(10)]
        figs[label] = torch.stack(cols, dim=1)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "matrix"}), flush=True)
    doc = {"w": w, "per_class": args.per_class, "rows": rows, "meta": {
        "command": "python benchmarks/bench_translate.py " + " ".join(argv),
        "machine": machine_line(), "date": machine_info()["day"], "wall_time_s": round(time.time() - t0, 1)}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"translate{args.tag}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Class-to-class translation (w = {w:g}, {args.per_class} held-out digits per class, "
             f"{doc['meta']['date']})", "", "| method | network calls | target-class accuracy | round-trip RMSE | "
             "latent RMSE vs 32-step inversion |", "|---|---|---|---|---|"]
    for r, calls in zip(rows, [f"{enc.student_steps} + {dec.student_steps}", f"{k} + {k}", "32 + 32"]):
        lines.append(f"| {r['method']} | {calls} | {100 * r['target_accuracy']:.1f}% | {r['round_trip_rmse']:.3f} | "
                     f"{r['latent_rmse_vs_32_step_inversion']:.3f} |")
    (OUT / f"translate{args.tag}.md").write_text("\n".join(lines) + "\n")
    grid_figure(figs, x0, OUT / f"translate{args.tag}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
