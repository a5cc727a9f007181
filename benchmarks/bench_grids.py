"""Tuned time grids (fewstep.tune) against fixed spacings and diffusers' default scheduler, judged on
held-out noise and labels only (never the calibration ones).

    python benchmarks/bench_grids.py --model gmm-mnist                       # exact mixture, ~15 min
    python benchmarks/bench_grids.py --model mnist-teacher --ship            # + writes the shipped grids
    python benchmarks/bench_grids.py --model gmm-mnist --methods dp,refine,dp+refine --solvers dpmpp_2m

Calibration: ``--calibration`` noises with random labels drawn from seed 1234. Held-out: ``--heldout``
noises from seed 0 with labels i mod 10 (the solver benchmark's set), reference
``fewstep.reference.reference_solution`` (RK4 in log-SNR, float64 state). The diffusers row is
``DPMSolverMultistepScheduler`` with its defaults, run by diffusers' own loop on the same model
(the teacher seen as a 1000-step discrete VP with its alphas at the knots; ``fewstep.bench``).
Writes ``benchmarks/results/grids_<model>.{json,md,png}``; reference solves are cached in ``--cache``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fewstep.bench.machine import machine_info, machine_line
from fewstep.bench.models import NULL_LABEL, load_bench_model
from fewstep.bench.runner import diffusers_sample, disk_cached
from fewstep.denoisers import ClassifierFreeGuidance, ModelDenoiser
from fewstep.reference import reference_solution
from fewstep.schedules import time_grid
from fewstep.tune import calibration_set, grid_rmse, tune_grid

ROOT = Path(__file__).resolve().parents[1]


class Problem:
    """A model seen by the tuner (its own schedule and denoiser) and by diffusers (``fewstep.bench``)."""

    def __init__(self, name: str, w: float):
        self.name, self.w = name, w
        self.bench = load_bench_model(name, w)
        if name == "gmm-mnist":
            bm = self.bench
            den = ModelDenoiser(bm.model, bm.schedule, "eps", time_input="discrete")
            self.schedule, self.dtype, self.model = bm.schedule, torch.float64, None
            self.denoiser = ClassifierFreeGuidance(den, w, lambda c: {"labels": torch.full_like(c["labels"],
                                                                                              NULL_LABEL)})
        else:
            import fewstep
            self.model = fewstep.load(name)
            self.schedule, self.dtype = self.model.schedule, torch.float32
            self.denoiser = self.model.denoiser(w)
        self.shape, self.null = self.bench.shape, self.bench.null_label

    def diffusers_default(self, x_T, labels, nfe):
        cond = {"labels": labels}
        uncond = {"labels": torch.full_like(labels, self.null)} if self.w else None
        with torch.no_grad():
            return diffusers_sample(self.bench, x_T.to(torch.float32), "DPMSolverMultistepScheduler", {}, nfe,
                                    cond, uncond)[0]


def heldout_set(p: Problem, n: int, steps: int, cache: Path):
    x_T = torch.randn((n, *p.shape), generator=torch.Generator().manual_seed(0)).to(p.dtype)
    labels = torch.arange(n) % 10

    @torch.no_grad()
    def make():
        start = time.perf_counter()
        x, err = reference_solution(p.denoiser, p.schedule, x_T, p.schedule.t_max, 0.0, steps=steps,
                                    cond={"labels": labels})
        return {"x": x, "max_abs_diff_vs_half_steps": err, "steps": 2 * steps,
                "seconds": time.perf_counter() - start}
    ref = disk_cached(cache / f"{p.name}-w{p.w:g}-heldout{n}-rk{steps}.pt", make)
    return x_T, labels, ref


def calibration(p: Problem, n: int, steps: int, candidates: int, cache: Path):
    from fewstep.tune import reference_trajectory
    cal = calibration_set(n, p.shape, seed=1234, num_classes=10, dtype=p.dtype)
    cal.trajectory = disk_cached(cache / f"{p.name}-w{p.w:g}-cal{n}-rk{steps}-c{candidates}.pt",
                            lambda: reference_trajectory(p.denoiser, p.schedule, cal.x_T, cal.cond, steps=steps,
                                                         candidates=candidates))
    return cal


def run(args) -> dict:
    torch.set_num_threads(1)
    p = Problem(args.model, args.w)
    cache = Path(args.cache)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')} grids {p.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    x_T, labels, ref = heldout_set(p, args.heldout, args.ref_steps, cache)
    log(f"held-out reference: max|x(2N) - x(N)| = {ref['max_abs_diff_vs_half_steps']:.2g}")
    cal = calibration(p, args.calibration, 2 * args.ref_steps, args.candidates, cache)
    log(f"calibration reference: own error {cal.trajectory.error['rmse']:.2g} (RMSE)")
    held = lambda solver, grid: grid_rmse(p.denoiser, p.schedule, solver, grid, x_T, {"labels": labels},  # noqa: E731
                                          ref["x"])
    rows, tuned = [], {}
    for nfe in args.nfe:
        d = p.diffusers_default(x_T, labels, nfe)
        rows.append({"solver": "DPMSolverMultistepScheduler", "grid": "diffusers_default", "nfe": nfe,
                     "rmse": float((d.to(torch.float64) - ref["x"].to(torch.float64)).pow(2).mean().sqrt())})
        for solver in args.solvers:
            for spacing in ("logsnr", "karras"):
                rows.append({"solver": solver, "grid": spacing, "nfe": nfe,
                             "rmse": held(solver, time_grid(p.schedule, nfe, spacing))})
            for method in args.methods:
                g = tune_grid(p.denoiser, p.schedule, solver=solver, nfe=nfe, calibration=cal, method=method,
                              max_evals=args.max_evals(nfe), free_end=args.free_end, model=p.model,
                              conditioning={"w": p.w}, log=log)
                g.cost["reference_seconds"] = round(cal.trajectory.seconds, 1)
                e = held(solver, torch.tensor(g.times, dtype=torch.float64))
                rows.append({"solver": solver, "grid": f"tuned:{method}", "nfe": nfe, "rmse": e,
                             "calibration_rmse": g.calibration["rmse"], "model_calls": g.cost["model_calls"],
                             "seconds": g.cost["seconds"], "times": g.times})
                tuned[(solver, nfe, method)] = g
                if args.ship and method == args.methods[-1]:  # written as soon as it is measured
                    ship(p, g, rows, ref, args)
                log(f"{solver} NFE {nfe} {method}: held-out {e:.4g} ({g.cost['model_calls']} calls, "
                    f"{g.cost['seconds']:.0f} s)")
    doc = {"model": p.name, "w": p.w, "command": "python benchmarks/bench_grids.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
           "load_average": machine_info()["load_average_at_start"], "machine": machine_line(),
           "heldout": {"samples": args.heldout, "seed": 0, "labels": "i mod 10",
                       "reference_max_abs_diff_vs_half_steps": ref["max_abs_diff_vs_half_steps"],
                       "reference_rk4_steps": ref["steps"], "reference_seconds": round(ref["seconds"], 1)},
           "calibration": {"samples": args.calibration, "seed": 1234, "labels": "uniform random",
                           "reference": cal.trajectory.error, "reference_model_calls": cal.trajectory.model_calls,
                           "reference_seconds": round(cal.trajectory.seconds, 1)},
           "rows": rows}
    return doc


def ship(p: Problem, g, rows: list, ref: dict, args) -> None:
    """Write a tuned grid with its held-out error beside the baselines' on the same held-out set."""
    base = {r["grid"]: r["rmse"] for r in rows if r["nfe"] == g.nfe and r["solver"] in (g.solver,
                                                                                        "DPMSolverMultistepScheduler")}
    g.heldout = {"rmse": base[f"tuned:{args.methods[-1]}"], "samples": args.heldout, "seed": 0, "labels": "i mod 10",
                 "logsnr": base["logsnr"], "karras": base["karras"],
                 "diffusers_default_dpmsolver": base["diffusers_default"],
                 "reference": f"fewstep.reference.reference_solution, {ref['steps']} RK4 steps, "
                              f"max|x(2N) - x(N)| = {ref['max_abs_diff_vs_half_steps']:.2g}"}
    g.save(ROOT / "fewstep" / "assets" / p.name / "grids" / f"{g.solver}-nfe{g.nfe}-w{p.w:g}.json")


def markdown(doc: dict) -> str:
    rows, nfes = doc["rows"], sorted({r["nfe"] for r in doc["rows"]})
    keys = list(dict.fromkeys((r["solver"], r["grid"]) for r in rows))
    out = [f"# Tuned grids on {doc['model']} (w = {doc['w']:g})", "",
           f"Generated by `{doc['command']}` on {doc['date']} ({doc['threads']} torch thread, load average "
           f"{doc['load_average']}).", "",
           f"- Held-out: {doc['heldout']['samples']} noises (seed 0, labels i mod 10); reference "
           f"{doc['heldout']['reference_rk4_steps']} RK4 steps, max|x(2N) - x(N)| = "
           f"{doc['heldout']['reference_max_abs_diff_vs_half_steps']:.2g}.",
           f"- Calibration: {doc['calibration']['samples']} noises (seed 1234, random labels); its reference's own "
           f"RMSE error {doc['calibration']['reference']['rmse']:.2g}, {doc['calibration']['reference_model_calls']}"
           f" model calls, {doc['calibration']['reference_seconds']:.0f} s (shared by every grid).",
           "- RMSE of the final sample against the reference, held-out set only.", "",
           "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for solver, grid in keys:
        cells = {r["nfe"]: r["rmse"] for r in rows if (r["solver"], r["grid"]) == (solver, grid)}
        out.append(f"| {solver} | {grid} | " + " | ".join(f"{cells[n]:.3e}" if n in cells else "-" for n in nfes)
                   + " |")
    out += ["", "Best fewstep configuration against diffusers' default DPMSolverMultistepScheduler:", "",
            "| NFE | best fewstep (grid) | RMSE | diffusers default | ratio |", "|---|---|---|---|---|"]
    for n in nfes:
        d = next(r["rmse"] for r in rows if r["nfe"] == n and r["grid"] == "diffusers_default")
        best = min((r for r in rows if r["nfe"] == n and r["grid"] != "diffusers_default"), key=lambda r: r["rmse"])
        out.append(f"| {n} | {best['solver']} ({best['grid']}) | {best['rmse']:.3e} | {d:.3e} | "
                   f"{best['rmse'] / d:.2f} |")
    tuned = [r for r in rows if r["grid"].startswith("tuned")]
    out += ["", "Tuning cost (model calls on the calibration batch beyond the shared reference solve; seconds on "
            "this CPU):", "", "| solver | method | NFE | calls | seconds | calibration RMSE | held-out RMSE |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r['solver']} | {r['grid'][6:]} | {r['nfe']} | {r['model_calls']} | {r['seconds']:.0f} | "
            f"{r['calibration_rmse']:.3e} | {r['rmse']:.3e} |" for r in tuned]
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for solver, grid in dict.fromkeys((r["solver"], r["grid"]) for r in rows):
        pts = sorted((r["nfe"], r["rmse"]) for r in rows if (r["solver"], r["grid"]) == (solver, grid))
        style = "--" if grid == "diffusers_default" else "-" if grid.startswith("tuned") else ":"
        ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"{solver} [{grid}]")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="held-out RMSE vs reference",
           title=f"Tuned grids on {doc['model']} (w = {doc['w']:g})")
    ax.set_xticks(sorted({r["nfe"] for r in rows}), [str(n) for n in sorted({r["nfe"] for r in rows})])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gmm-mnist", choices=["gmm-mnist", "mnist-teacher"])
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--solvers", default="dpmpp_2m,unipc_bh2_2,dpm_solver_2m")
    ap.add_argument("--methods", default="dp+refine", help="comma-separated: dp, refine, dp+refine")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--ref-steps", type=int, default=64, help="held-out reference RK4 steps (x2 internally)")
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--evals", type=float, default=12.0, help="refine evaluations per free point (+20)")
    ap.add_argument("--free-end", action="store_true", help="let the last finite time move too (see tune_grid)")
    ap.add_argument("--ship", action="store_true", help="write the tuned grids into fewstep/assets/<model>/grids/")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--cache", default=os.environ.get("FEWSTEP_CACHE", "/tmp/fewstep-grids-cache"))
    args = ap.parse_args(argv)
    args.solvers = args.solvers.split(",")
    args.methods = args.methods.split(",")
    args.nfe = [int(v) for v in args.nfe.split(",")]  # in the order given (e.g. the most wanted first)
    args.max_evals = lambda nfe: int(args.evals * (nfe - 1)) + 20
    doc = run(args)
    out = ROOT / "benchmarks" / "results" / f"grids_{args.model}{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    plot(doc, out.with_suffix(".png"))
    print(markdown(doc))


if __name__ == "__main__":
    main()
