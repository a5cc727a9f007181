"""Does a text-to-image test-bed pipeline draw the digit its prompt names? A first, small check.

    python benchmarks/bench_prompt_accuracy.py PIPELINE_FOLDER [--n-per-digit 20] [--steps 25]
        [--guidance 1,2,3,5] [--out benchmarks/results/prompt_accuracy]

PIPELINE_FOLDER is an exported ``mnist-sd`` (StableDiffusionPipeline) or ``mnist-sd3``
(StableDiffusion3Pipeline) folder. It is loaded with plain diffusers and called as a user would, with
its own scheduler, on the prompts "a handwritten <digit>" for every digit; the shipped classifier
reads the 28x28 centre of each 32x32 image. Reports class accuracy and seconds per image for each
guidance scale (diffusers' guidance_scale = 1 + w). Not the full prompt-following evaluation of
issue 21 (attributes, FID): just whether the digit is right.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fewstep
from fewstep.bench.machine import machine_line
from fewstep.data.captions import DIGITS, caption
from fewstep.metrics import class_accuracy


def load_pipeline(folder: Path):
    """The stock diffusers pipeline of the folder (SD3 without its T5, as the test bed ships it)."""
    index = json.loads((folder / "model_index.json").read_text())["_class_name"]
    import diffusers
    cls = getattr(diffusers, index)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if index == "StableDiffusion3Pipeline" else {}
    return cls.from_pretrained(folder, torch_dtype=torch.float32, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", type=Path)
    p.add_argument("--n-per-digit", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="1,2,3,5")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt_accuracy"))
    args = p.parse_args(argv)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    classifier = fewstep.load("mnist-classifier")
    labels = torch.arange(10).repeat_interleave(args.n_per_digit)
    prompts = [caption(int(k)) for k in labels]
    rows = []
    for scale in (float(g) for g in args.guidance.split(",")):
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=scale, generator=gen,
                      output_type="pt").images  # (N, 1, 32, 32) in [0, 1]
        seconds = (time.perf_counter() - t0) / len(prompts)
        x = images[:, :1, 2:30, 2:30] * 2 - 1
        rows.append({"guidance_scale": scale, "class_accuracy": class_accuracy(classifier, x, labels),
                     "seconds_per_image": seconds})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"pipeline": str(args.pipeline), "scheduler": type(pipe.scheduler).__name__, "steps": args.steps,
           "n": len(prompts), "prompts": "a handwritten <digit>, " + ", ".join(DIGITS[:2]) + ", ...",
           "date": time.strftime("%Y-%m-%d"), "machine": machine_line(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# Prompted digit accuracy ({doc['date']}, {doc['machine']})", "",
          f"`python benchmarks/bench_prompt_accuracy.py {args.pipeline}`: {doc['scheduler']}, {args.steps} steps, "
          f"n = {len(prompts)} ({args.n_per_digit} per digit, prompts 'a handwritten <digit>').", "",
          "| guidance_scale | class accuracy | s / image |", "|---|---|---|"]
    md += [f"| {r['guidance_scale']:g} | {100 * r['class_accuracy']:.1f}% | {r['seconds_per_image']:.4f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
