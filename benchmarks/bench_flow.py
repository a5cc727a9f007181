"""Flow-matching solver benchmark: FewstepScheduler against diffusers' flow schedulers.

    OMP_NUM_THREADS=1 python benchmarks/bench_flow.py [--quick] [--out benchmarks/results/flow_solvers]

The model is exact: the MNIST-fitted Gaussian mixture (fewstep.bench.solvers.mnist_mixture, 30
diagonal components, 784 dims, unconditional) under rectified flow, x = (1 - s) x0 + s noise, with
its exact velocity v = (x - E[x0 | x]) / s as a diffusers flow model called with the pipeline's
timestep (v(x, timestep / 1000)), and the SD3 shift 3. Each run starts from the same noise at
sigma = 1. ``rmse`` is against a converged reference (fewstep's unipc_bh2_3, 1000 steps; its
distance to dpmpp_3m at 1000 steps is reported). Every row runs through the scheduler
interface, one model call and one ``step`` per timestep, as a pipeline would: NFE = steps.
``overhead_us_per_step`` is the median time of one ``scheduler.step`` on a (4, 16, 64, 64)
latent with a cached model output.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from fewstep.bench.solvers import mnist_mixture
from fewstep.diffusers import FewstepScheduler

SHIFT = 3.0
SOLVERS = ("ddim", "dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m", "dpmpp_3m", "unipc_bh1_1", "unipc_bh1_2",
           "unipc_bh1_3", "unipc_bh2_1", "unipc_bh2_2", "unipc_bh2_3")
# (spacing, source_grid): "source" follows FlowMatchEuler's sigmas; source_grid="dpmsolver" / "unipc" gives
# the shifted-uniform sigmas of diffusers' DPM-Solver / UniPC flow mode (same model, another grid recipe)
SPACINGS = (("source", None), ("source", "dpmsolver"), ("source", "unipc"), ("logsnr", None),
            ("time_uniform", None), ("time_quadratic", None), ("karras", None))
NFES = (5, 6, 8, 10, 15, 20)
DIFFUSERS = {
    "FlowMatchEulerDiscreteScheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=SHIFT),
    "DPMSolverMultistepScheduler(flow)": lambda: DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=SHIFT, prediction_type="flow_prediction"),
    "UniPCMultistepScheduler(flow)": lambda: UniPCMultistepScheduler(
        use_flow_sigmas=True, flow_shift=SHIFT, prediction_type="flow_prediction"),
}


class FlowMixture:
    """The exact flow velocity of a Gaussian mixture, called like a diffusers flow transformer."""

    def __init__(self, gmm):
        self.gmm = gmm

    def __call__(self, x: torch.Tensor, timestep) -> torch.Tensor:
        s = float(torch.as_tensor(timestep).flatten()[0]) / 1000.0
        flat = x.reshape(x.shape[0], -1).double()
        a = torch.full((x.shape[0],), 1.0 - s, dtype=torch.float64)
        x0 = self.gmm.posterior_mean(flat, a, torch.full_like(a, s))
        return ((flat - x0) / s).reshape(x.shape).float()


def run_scheduler(sched, model, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    sched.set_timesteps(n)
    calls = 0
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
        calls += 1
    return x, calls


def rmse(a, b) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def overhead(make, shape=(4, 16, 64, 64), steps=20, repeats=5) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    times = []
    for _ in range(repeats):
        s = make()
        s.set_timesteps(steps)
        y = x.clone()
        t0 = time.perf_counter()
        for t in s.timesteps:
            y = s.step(out, t, y).prev_sample
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def main(quick: bool, out: Path) -> dict:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    t_start = time.time()
    model = FlowMixture(mnist_mixture())
    n_samples = 32 if quick else 64
    x_T = torch.randn((n_samples, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    src = DIFFUSERS["FlowMatchEulerDiscreteScheduler"]()
    ref, _ = run_scheduler(FewstepScheduler.from_config(src.config, solver="unipc_bh2_3"), model, x_T.clone(), 1000)
    check, _ = run_scheduler(FewstepScheduler.from_config(src.config, solver="dpmpp_3m"), model, x_T.clone(), 1000)
    nfes = (5, 10) if quick else NFES
    rows = []
    for name, make in DIFFUSERS.items():
        for n in nfes:
            x, calls = run_scheduler(make(), model, x_T.clone(), n)
            rows.append({"impl": "diffusers", "scheduler": name, "spacing": "default", "nfe": calls,
                         "rmse": rmse(x, ref)})
    solvers = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3") if quick else SOLVERS
    for solver in solvers:
        for spacing, grid in SPACINGS:
            kw = {"source_grid": grid} if grid else {}
            label = f"{spacing}:{grid}" if grid else spacing
            for n in nfes:
                fs = FewstepScheduler.from_config(src.config, solver=solver, spacing=spacing, **kw)
                x, calls = run_scheduler(fs, model, x_T.clone(), n)
                rows.append({"impl": "fewstep", "scheduler": solver, "spacing": label, "nfe": calls,
                             "rmse": rmse(x, ref)})
    ov = {name: overhead(make) for name, make in DIFFUSERS.items()}
    for solver in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3"):
        ov[f"FewstepScheduler({solver})"] = overhead(lambda: FewstepScheduler.from_config(src.config, solver=solver))
    doc = {"model": f"exact MNIST-fitted Gaussian mixture under rectified flow, shift {SHIFT}",
           "samples": n_samples, "reference": "fewstep unipc_bh2_3, 1000 steps",
           "reference_check_rmse_vs_dpmpp_3m_1000": rmse(check, ref), "rows": rows,
           "overhead_us_per_step": ov, "seconds": time.time() - t_start,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}}
    doc["summary"] = summarize(rows, nfes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc, nfes))
    return doc


def summarize(rows, nfes) -> dict:
    summary = {}
    for n in nfes:
        d = {r["scheduler"]: r["rmse"] for r in rows if r["impl"] == "diffusers" and r["nfe"] == n}
        f = [r for r in rows if r["impl"] == "fewstep" and r["nfe"] == n]
        best = min(f, key=lambda r: r["rmse"])
        best_d = min(d.values())
        summary[n] = {"best_fewstep": f"{best['scheduler']} / {best['spacing']}", "best_fewstep_rmse": best["rmse"],
                      "best_diffusers_rmse": best_d, "best_diffusers": min(d, key=d.get),
                      "flowmatch_euler_rmse": d["FlowMatchEulerDiscreteScheduler"],
                      "ratio_vs_best_diffusers": best["rmse"] / best_d,
                      "ratio_vs_flowmatch_euler": best["rmse"] / d["FlowMatchEulerDiscreteScheduler"]}
    return summary


def markdown(doc, nfes) -> str:
    lines = [f"# Flow-matching solvers ({doc['model']})", "",
             f"RMSE against {doc['reference']} (its distance to dpmpp_3m at 1000 steps: "
             f"{doc['reference_check_rmse_vs_dpmpp_3m_1000']:.1e}); {doc['samples']} samples; NFE = steps.", "",
             "| NFE | best fewstep (solver / spacing) | its RMSE | best diffusers | its RMSE | FlowMatchEuler RMSE "
             "| ratio vs best diffusers | ratio vs FlowMatchEuler |", "|---|---|---|---|---|---|---|---|"]
    for n, s in doc["summary"].items():
        lines.append(f"| {n} | {s['best_fewstep']} | {s['best_fewstep_rmse']:.4g} | {s['best_diffusers']} | "
                     f"{s['best_diffusers_rmse']:.4g} | {s['flowmatch_euler_rmse']:.4g} | "
                     f"{s['ratio_vs_best_diffusers']:.3f} | {s['ratio_vs_flowmatch_euler']:.3f} |")
    lines += ["", "## Every row", "", "| impl | scheduler / solver | spacing | " + " | ".join(f"NFE {n}" for n in nfes)
              + " |", "|---|---|---|" + "---|" * len(nfes)]
    keys = dict.fromkeys((r["impl"], r["scheduler"], r["spacing"]) for r in doc["rows"])
    for k in keys:
        vals = {r["nfe"]: r["rmse"] for r in doc["rows"] if (r["impl"], r["scheduler"], r["spacing"]) == k}
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(f"{vals.get(n, float('nan')):.4g}" for n in nfes)
                     + " |")
    lines += ["", "## Overhead per step (us, scheduler.step on a (4, 16, 64, 64) latent)", "",
              "| scheduler | us / step |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in doc["overhead_us_per_step"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/flow_solvers")
    a = ap.parse_args()
    d = main(a.quick, Path(a.out))
    print(Path(a.out).with_suffix(".md").read_text().split("## Every row")[0])
    print(f"{d['seconds']:.0f} s")
