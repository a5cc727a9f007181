"""Guided distillation of a pipeline without images (the teacher's own samples) against with images (``--data``):

    python benchmarks/bench_guided_data.py --out RUN [--steps 600] [--images 2000] [--threads 1]

Without ``--data``, ``fewstep distill guided --teacher PIPELINE`` noises the teacher's own samples (``samples.n``
seeded noises at w = 1, ``samples.solver`` in ``samples.steps`` calls, cached in ``teacher-samples.safetensors``);
with ``--data DIR`` it noises the VAE latents of the user's captioned images (their captions are the prompts).
This runs stage 1 of ``mnist-sd``'s guided distillation both ways, same settings and steps (``--until 32
--max-train-steps K``), the image route on as many MNIST train images (captioned by the test bed's grammar,
written as a Hugging Face imagefolder) as the sample route has samples, and compares the runs' FID / prompted-digit
probe curves (``stage1/fid.jsonl``: the w-conditioned student at w = 1 in 32 DDIM steps against held-out MNIST).
Writes ``benchmarks/results/guided_data.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.bench.machine import machine_line
from fewstep.data.captions import caption_images, load_mnist32
from fewstep.recipes.guided import MNIST_SD_GUIDED

RESULTS = Path(__file__).parent / "results"


def write_image_folder(root: Path, n: int) -> Path:
    """``n`` MNIST train digits, the first n / 10 of each class (the split is sorted by class), as 32x32 PNGs
    and their test-bed captions as ``root/metadata.jsonl``."""
    if (root / "metadata.jsonl").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist32("train")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[: n // 10] for c in range(10)])
    images, labels = images[keep], labels[keep]
    rows = []
    for i, (img, text) in enumerate(zip(images, caption_images(images, labels))):
        pixels = ((img[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(root / f"{i:05d}.png")
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def distill(out: Path, steps: int, threads: int, data: Path | None) -> float:
    """Stage 1 of guided distillation of mnist-sd into ``out`` (resumed when already there); wall seconds."""
    cmd = [sys.executable, "-m", "fewstep", "distill", "guided", "--teacher", "mnist-sd", "--until", "32",
           "--max-train-steps", str(steps), "--out", str(out), "--threads", str(threads), "--no-progress"]
    if data is not None:
        cmd += ["--data", str(data)]
    if (out / "stage1").is_dir():
        cmd.append("--resume")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def curve(out: Path) -> list[dict]:
    path = out / "stage1" / "fid.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (two sub-runs and the image folder)")
    p.add_argument("--steps", type=int, default=600, help="stage-1 training steps of each run")
    p.add_argument("--images", type=int, default=MNIST_SD_GUIDED.samples.n,
                   help="MNIST train images of the image route (default: as many as the teacher samples)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    folder = write_image_folder(args.out / "mnist-images", args.images)
    runs = {"teacher samples": (args.out / "samples", None), "images (--data)": (args.out / "images", folder)}
    seconds = {name: distill(out, args.steps, args.threads, data) for name, (out, data) in runs.items()}
    doc = {"command": "python benchmarks/bench_guided_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
           "teacher_samples": {"n": MNIST_SD_GUIDED.samples.n, "solver": MNIST_SD_GUIDED.samples.solver,
                               "steps": MNIST_SD_GUIDED.samples.steps, "w": 1.0},
           "images": args.images,
           "runs": {name: {"seconds": seconds[name], "probe": curve(out)} for name, (out, _) in runs.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guided_data.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Guided stage 1 of mnist-sd: teacher samples against images ({doc['date']})", "",
             f"`{doc['command']}`; {doc['machine']}", "",
             "| training inputs | step | FID probe (n) | prompted digit |", "|---|---|---|---|"]
    for name, run in doc["runs"].items():
        for point in run["probe"]:
            lines.append(f"| {name} | {point['step']} | {point['fid']:.1f} ({point['n']}) | "
                         f"{100 * point['class_accuracy']:.1f}% |")
    (RESULTS / "guided_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
