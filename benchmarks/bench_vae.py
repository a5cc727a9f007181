"""How well the text test bed's VAE keeps the digits: reconstruction error and the shipped classifier's
accuracy on reconstructions of the held-out split.

    python benchmarks/bench_vae.py VAE_FOLDER [--out benchmarks/results/vae]

VAE_FOLDER is an exported ``mnist-vae`` (``fewstep train mnist-vae --out DIR`` writes DIR/mnist-vae),
loaded with plain ``diffusers.AutoencoderKL.from_pretrained``. Each held-out digit (28x28, padded to
32x32 with background) is encoded to its posterior mean and decoded; the 28x28 centre of the
reconstruction is classified by ``mnist-classifier`` beside the original. Target (issue 21): accuracy on
reconstructions >= 98%. Writes JSON + markdown with the machine and date.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fewstep
from fewstep.bench.machine import machine_line
from fewstep.data.captions import load_mnist32
from fewstep.metrics import class_accuracy


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Decode each image's posterior mean (the deterministic reconstruction), clamped to [-1, 1]."""
    out = [vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) for x in images.split(batch)]
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vae", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vae"))
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()  # shipped weights are fp16
    x, y = load_mnist32("heldout")
    t0 = time.perf_counter()
    rec = reconstruct(vae, x)
    seconds = time.perf_counter() - t0
    classifier = fewstep.load("mnist-classifier")
    centre = (slice(None), slice(None), slice(2, 30), slice(2, 30))
    doc = {
        "vae": str(args.vae), "n": len(x), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
        "l1_per_pixel": float((rec - x).abs().mean()), "rmse_per_pixel": float((rec - x).pow(2).mean().sqrt()),
        "accuracy_originals": class_accuracy(classifier, x[centre], y),
        "accuracy_reconstructions": class_accuracy(classifier, rec[centre], y),
        "seconds_per_image": seconds / len(x),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# VAE reconstructions ({doc['date']}, {doc['machine']})", "",
          f"`python benchmarks/bench_vae.py {args.vae}`; held-out digits, n = {doc['n']}.", "",
          "| L1 / pixel | RMSE / pixel | classifier accuracy: originals | reconstructions | s / image |",
          "|---|---|---|---|---|",
          f"| {doc['l1_per_pixel']:.4f} | {doc['rmse_per_pixel']:.4f} | {100 * doc['accuracy_originals']:.1f}% | "
          f"{100 * doc['accuracy_reconstructions']:.1f}% | {doc['seconds_per_image']:.5f} |"]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
