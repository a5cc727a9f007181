"""A distillation run's raw generator weights against its EMA, through the stock one-step call of its export
(issue 22: how much of a DMD generator's quality the weight average carries).

    python benchmarks/bench_ema.py RUN [--checkpoint ckpt-00005000] [--n 990] [--which ema,model]

RUN is a ``fewstep distill dmd`` run folder of a pipeline teacher with whole-network weights (not ``--lora-rank``;
``RUN/run/ckpt-*``, ``RUN/export/<name>``).
Each choice of weights is written into a copy of the export (``RUN/ema-check/<which>``) and scored by
:func:`fewstep.evaluate.evaluate_prompts` (one step, guidance_scale 1, the test bed's prompt suite, one held-out
reference shared by the rows). Prints one line per row.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fewstep import load
from fewstep.evaluate import evaluate_prompts, heldout_reference, suite_size
from fewstep.train import load_checkpoint_weights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint", default=None, help="default: the newest")
    p.add_argument("--n", type=int, default=990)
    p.add_argument("--which", default="ema,model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = args.run / "run" / args.checkpoint if args.checkpoint else sorted((args.run / "run").glob("ckpt-*"))[-1]
    export = next((args.run / "export").iterdir())
    classifier = load("mnist-classifier")
    reference = heldout_reference(suite_size(args.n), classifier)
    for which in args.which.split(","):
        folder = args.run / "ema-check" / which
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(export, folder)
        weights = {k.removeprefix("unet."): v.contiguous()
                   for k, v in load_checkpoint_weights(ckpt, which, "generator").items()}
        if any("lora" in k for k in weights):
            raise SystemExit(f"{args.run} is a LoRA run: bench_ema.py scores whole-network generators only")
        save_file(weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
        r = evaluate_prompts(str(folder), steps=1, guidance_scale=1.0, n=args.n, classifier=classifier,
                             reference=reference)
        print(f"{ckpt.name} {which}: FID {r['fid']:.1f}, prompted digit {r['class_accuracy']:.1%} (n = {r['n']})")


if __name__ == "__main__":
    main()
