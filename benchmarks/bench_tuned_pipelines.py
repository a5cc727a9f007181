"""Tuned solvers through the real pipeline call: RMSE to the converged solution on held-out noises and held-out
prompts, beside diffusers' schedulers and FewstepScheduler's defaults at the same number of model calls.

    python benchmarks/bench_tuned_pipelines.py mnist-sd [--steps 4,5,6,8,10] [--n 32]

The held-out set is the one `benchmarks/tune_shipped.py` scored (seed 1235, the prompts every 4th of the test
bed's 90, never seen in fitting). Each row is the stock ``pipe(prompts, num_inference_steps=K, guidance_scale=
1 + w, latents=x_T, output_type="latent")`` with ``pipe.scheduler`` swapped; its final latents are compared
with the RK4 reference solve of the same model, noises and prompts (``fewstep.reference.reference_solution``,
from pure noise on flow models as the pipeline starts). NFE: the network's forward calls counted (the SD / SD3
calls batch the conditional and unconditional halves into one), so a scheduler that spends more calls than
steps is shown as such. Rows: the stock scheduler, DPMSolverMultistep
(default, Karras, Lu lambdas; flow mode on SD3) and UniPC (default; flow mode), on SD3 also each flow scheduler
at shifts 1 and 2 (their spacing; the pipeline's own is 3), FewstepScheduler's default and dpmpp_2m, and the
shipped tuned solver (``tuned``, where one exists for K).
Writes benchmarks/results/tuned_pipelines_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from fewstep.api import shipped_solver
from fewstep.bench.machine import machine_line
from fewstep.diffusers import FewstepScheduler
from fewstep.evaluate import flow_settings, load_text_pipeline
from fewstep.recipes.teachers import teacher_from
from fewstep.reference import rmse
from fewstep.tune import calibration_set, heldout_reference, prompt_split

OUT = Path(__file__).parent / "results"
FLOW_SHIFTS = (1.0, 2.0)  # besides the pipeline's own: diffusers' flow schedulers on other spacings
W = {"mnist-sd": 1.0, "mnist-sd3": 2.0}  # each pipeline's best guidance (BENCHMARKS.md), as tune_shipped.py


def log(msg: str) -> None:
    print(f"[bench tuned pipelines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def schedulers(source) -> dict:
    """name -> a fresh scheduler built from the pipeline's own scheduler config (None where not available)."""
    import diffusers

    from fewstep.diffusers import FewstepScheduler
    cfg, flow = source.config, flow_settings(source.config)

    def from_cfg(cls, **extra):
        accepted = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in cfg.items() if k in accepted}, **{**flow, **extra})

    out = {f"stock ({type(source).__name__})": type(source).from_config(cfg),
           "DPMSolverMultistep": from_cfg(diffusers.DPMSolverMultistepScheduler),
           "UniPCMultistep": from_cfg(diffusers.UniPCMultistepScheduler)}
    if flow:  # the flow schedulers' spacing is their shift: the pipeline's own and the smaller ones
        for shift in FLOW_SHIFTS:
            if shift != flow["flow_shift"]:
                out[f"FlowMatchEuler shift {shift:g}"] = type(source).from_config(cfg, shift=shift)
                out[f"DPMSolverMultistep shift {shift:g}"] = from_cfg(diffusers.DPMSolverMultistepScheduler,
                                                                      flow_shift=shift)
                out[f"UniPCMultistep shift {shift:g}"] = from_cfg(diffusers.UniPCMultistepScheduler, flow_shift=shift)
    if not flow:
        out["DPMSolverMultistep karras"] = from_cfg(diffusers.DPMSolverMultistepScheduler, use_karras_sigmas=True)
        out["DPMSolverMultistep lu_lambdas"] = from_cfg(diffusers.DPMSolverMultistepScheduler, use_lu_lambdas=True)
        # DDIM clips x0 to [-1, 1] by default (clip_sample=True), which breaks latents: off, as latent pipelines set it
        out["DDIM trailing"] = from_cfg(diffusers.DDIMScheduler, timestep_spacing="trailing", clip_sample=False)
    out["FewstepScheduler (default)"] = FewstepScheduler.from_config(cfg)
    out["FewstepScheduler dpmpp_2m"] = FewstepScheduler.from_config(cfg, solver="dpmpp_2m")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(W))
    p.add_argument("--steps", default="4,5,6,8,10")
    p.add_argument("--n", type=int, default=32, help="held-out noises (as tune_shipped.py's held-out set)")
    p.add_argument("--reference-steps", type=int, default=128, help="RK4 steps (and twice as many for the check)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = W[args.model]
    teacher = teacher_from(args.model)
    pipe = load_text_pipeline(args.model)
    net = getattr(pipe, "unet", None) or pipe.transformer
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    _, held = prompt_split(len(teacher.prompts))
    ho = calibration_set(args.n, teacher.image_shape, seed=1235, num_classes=teacher.num_classes, classes=held)
    labels = ho.cond["labels"]
    texts = [teacher.prompts[i] for i in labels.tolist()]
    den, sch = teacher.denoiser(w), teacher.schedule
    start = time.perf_counter()
    ref, err = heldout_reference(den, sch, ho, reference_steps=args.reference_steps)
    log(f"reference: {time.perf_counter() - start:.0f} s, max|x(2N) - x(N)| = {err:.2g}")
    rows = []
    for k in [int(v) for v in args.steps.split(",")]:
        scheds = schedulers(pipe.scheduler)
        try:
            tuned = shipped_solver(args.model, k)
            scheds[f"tuned ({tuned.method}, {tuned.solver})"] = FewstepScheduler.from_config(pipe.scheduler.config,
                                                                                           grid=tuned)
        except ValueError:
            pass
        for name, sched in scheds.items():
            original = pipe.scheduler
            pipe.scheduler = sched
            calls.clear()
            with torch.no_grad():
                out = pipe(texts, num_inference_steps=k, guidance_scale=1.0 + w, latents=ho.x_T.clone(),
                           output_type="latent").images
            pipe.scheduler = original
            nfe = len(calls)  # the SD / SD3 calls batch cond + uncond: one network call per step
            rows.append({"steps": k, "scheduler": name, "nfe": nfe, "rmse": rmse(out.double(), ref.double())})
            log(f"{k} steps, {name}: NFE {nfe}, RMSE {rows[-1]['rmse']:.4f}")
    doc = {"model": args.model, "w": w, "guidance_scale": 1 + w, "n": args.n, "heldout_prompts": len(held),
           "reference": f"RK4 {2 * args.reference_steps} steps, max|x(2N) - x(N)| = {err:.2g}",
           "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/bench_tuned_pipelines.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]), "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / f"tuned_pipelines_{args.model}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / f"tuned_pipelines_{args.model}.md").write_text(markdown(doc))
    log("done")


def markdown(doc: dict) -> str:
    steps = sorted({r["steps"] for r in doc["rows"]})
    names = list(dict.fromkeys(r["scheduler"] for r in doc["rows"]))
    cell = {(r["scheduler"], r["steps"]): r for r in doc["rows"]}
    lines = [f"# {doc['model']}: tuned solver through the pipeline call ({doc['date']}, {doc['machine']})", "",
             f"`{doc['command']}`: latent RMSE to the converged solution ({doc['reference']}) on {doc['n']} held-out "
             f"noises and {doc['heldout_prompts']} held-out prompts, guidance_scale {doc['guidance_scale']:g}. "
             "A cell whose network calls differ from the steps shows them in brackets. Bold: the best at each "
             "budget; last rows: the tuned solver's error as a share of diffusers' default and best.", "",
             "| scheduler | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    best = {k: min((r["rmse"] for r in doc["rows"] if r["steps"] == k and r["nfe"] <= k), default=None)
            for k in steps}
    for n in names:
        cells = []
        for k in steps:
            r = cell.get((n, k))
            if r is None:
                cells.append("")
                continue
            v = f"{r['rmse']:.4f}" + ("" if r["nfe"] == k else f" [{r['nfe']}]")
            cells.append(f"**{v}**" if r["rmse"] == best[k] else v)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for label, pick in (("tuned / diffusers default", lambda k: cell.get((names[0], k))),
                        ("tuned / diffusers best", lambda k: min(
                            (r for r in doc["rows"] if r["steps"] == k and r["nfe"] <= k
                             and not r["scheduler"].startswith(("Fewstep", "tuned"))),
                            key=lambda r: r["rmse"], default=None))):
        cells = []
        for k in steps:
            t = next((r for r in doc["rows"] if r["steps"] == k and r["scheduler"].startswith("tuned")), None)
            b = pick(k)
            cells.append(f"{t['rmse'] / b['rmse']:.2f}x" if t and b else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
