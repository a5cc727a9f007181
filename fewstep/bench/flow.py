"""The flow-matching model of the solver benchmark: ``fewstep bench solvers --model flow-mixture``.

The model is exact: the MNIST-fitted Gaussian mixture (``models.mnist_mixture``, 30 diagonal
components, 784 values, unconditional) under rectified flow, x = (1 - s) x0 + s noise, called as
a diffusers flow transformer is, with the pipeline's timestep s * 1000 and returning the exact
velocity v = (x - E[x0 | x]) / s; the grids use SD3's shift 3. Every row runs through the
scheduler interface (one model call and one ``step`` per timestep, as a pipeline does, NFE =
steps) from the same noise at sigma = 1:

  * diffusers: FlowMatchEulerDiscreteScheduler (the SD3 / Flux default), DPMSolverMultistep and
    UniPCMultistep in flow mode;
  * fewstep: ``FewstepScheduler`` with every solver on fewstep's spacings, on the source's grid
    (``source``) and on the shifted-uniform grid of diffusers' DPM-Solver / UniPC flow mode
    (``source:dpmsolver``, ``source:unipc``);
  * ``tuned``: ``FewstepScheduler(grid=...)`` with a grid fitted by ``fewstep.tune.tune_grid`` to this
    model on calibration noise of another seed (never the noise the rows are judged on), started from
    the flow grids above as well as fewstep's, with its last finite point free (flow grids end well
    above t_min: the source's last sigma is the shift of 1 / n).

``rmse`` is against a converged reference (fewstep's unipc_bh2_3, 1000 steps; its distance to
dpmpp_3m at 1000 steps is reported as its error). ``overhead_us_per_step`` is the median time of
one ``scheduler.step`` on a (4, 16, 64, 64) latent with a cached model output.
"""
from __future__ import annotations

import logging
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .machine import machine_info
from .models import mnist_mixture
from ..reference import rmse

NAME = "flow-mixture"
SHIFT = 3.0
SOLVERS = ("ddim", "dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m", "dpmpp_3m", "unipc_bh1_1", "unipc_bh1_2",
           "unipc_bh1_3", "unipc_bh2_1", "unipc_bh2_2", "unipc_bh2_3")
QUICK_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3")
TUNED_SOLVERS = ("dpmpp_2m", "unipc_bh2_2", "unipc_bh1_2")
QUICK_TUNED_SOLVERS = ("dpmpp_2m",)
# (spacing, source_grid): "source" follows FlowMatchEuler's sigmas; source_grid="dpmsolver" / "unipc" gives
# the shifted-uniform sigmas of diffusers' DPM-Solver / UniPC flow mode (same model, another grid recipe)
SPACINGS = (("source", None), ("source", "dpmsolver"), ("source", "unipc"), ("logsnr", None),
            ("time_uniform", None), ("time_quadratic", None), ("karras", None))
NFES = (5, 6, 8, 10, 15, 20)
QUICK_NFES = (5, 10)
OVERHEAD_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3")
FLOW_EULER = "FlowMatchEulerDiscreteScheduler"
OTHER_SHIFTS = (1.0, 2.0, 4.0)  # diffusers' flow schedulers also on these shifts where "their best spacing" is asked


def diffusers_schedulers(other_shifts=()) -> dict:
    """name -> maker of diffusers' flow schedulers at the model's shift (``SHIFT``), and, for each of
    ``other_shifts``, the three again on that shift's grid (named "... shift K": the flow schedulers' spacing
    is their shift, so "each on its best spacing" means trying several)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    def three(shift: float, suffix: str) -> dict:
        flow = {"use_flow_sigmas": True, "flow_shift": shift, "prediction_type": "flow_prediction"}
        return {FLOW_EULER + suffix: lambda: FlowMatchEulerDiscreteScheduler(shift=shift),
                f"DPMSolverMultistepScheduler(flow){suffix}": lambda: DPMSolverMultistepScheduler(**flow),
                f"UniPCMultistepScheduler(flow){suffix}": lambda: UniPCMultistepScheduler(**flow)}
    out = three(SHIFT, "")
    for shift in other_shifts:
        if shift != SHIFT:
            out.update(three(float(shift), f" shift {shift:g}"))
    return out


def fixed_schedulers(source_config, solver: str) -> dict:
    """spacing label -> maker of ``FewstepScheduler`` with ``solver`` on each fixed flow grid of the benchmark:
    ``SPACINGS`` (labelled ``spacing`` or ``spacing:source_grid``) and the shifted-uniform grid at each of
    ``OTHER_SHIFTS`` (``shifted_uniform:shift K``, the shifts diffusers' rows get too)."""
    from ..diffusers import FewstepScheduler
    grids = {(f"{spacing}:{grid}" if grid else spacing): {"spacing": spacing, **({"source_grid": grid} if grid else {})}
             for spacing, grid in SPACINGS}
    grids.update({f"shifted_uniform:shift {k:g}": {"spacing": "shifted_uniform", "shift": k} for k in OTHER_SHIFTS})
    return {label: partial(FewstepScheduler.from_config, source_config, solver=solver, **kw)
            for label, kw in grids.items()}


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
    """A pipeline's denoising loop: set_timesteps(n), then one model call and one step per timestep."""
    sched.set_timesteps(n)
    calls = 0
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
        calls += 1
    return x, calls


def step_overhead(make, shape=(4, 16, 64, 64), steps: int = 20, repeats: int = 5) -> float:
    """Median microseconds of one scheduler.step (model output cached)."""
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


def flow_starts(source_config, nfe: int) -> dict:
    """The flow grids a pipeline runs today, as starting points of the tuner: the source's own shifted
    sigmas and the shifted-uniform grid of diffusers' DPM-Solver flow mode."""
    from ..diffusers import FewstepScheduler
    out = {}
    for spacing in ("source", "shifted_uniform"):
        s = FewstepScheduler.from_config(source_config, solver="dpmpp_2m", spacing=spacing)
        s.set_timesteps(nfe)
        out[spacing] = s.grid
    return out


def tune_flow_grids(gmm, source_config, solvers, nfes, *, samples: int, seed: int, log) -> dict:
    """Tuned grids for (solver, nfe), fitted on ``samples`` calibration noises drawn with ``seed``."""
    from ..diffusers import FewstepScheduler
    from ..tune import calibration_set, tune_grid
    schedule = FewstepScheduler.from_config(source_config, solver="dpmpp_2m").schedule
    cal = calibration_set(samples, (1, 28, 28), seed=seed)
    cal.x_T = cal.x_T * float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    denoiser = gmm.denoiser(schedule)
    grids = {}
    for solver in solvers:
        for nfe in nfes:
            start = time.perf_counter()
            grids[(solver, nfe)] = tune_grid(denoiser, schedule, solver=solver, nfe=nfe, calibration=cal,
                                             reference_steps=1024, candidates=64, starts=flow_starts(source_config, nfe), free_end=True,
                                             conditioning={"name": NAME, "shift": SHIFT})
            log(f"tuned {solver} NFE {nfe}: calibration RMSE {grids[(solver, nfe)].calibration['rmse']:.4g} "
                f"({time.perf_counter() - start:.0f} s)")
    return grids


def run(*, quick: bool = False, nfes=None, samples: int | None = None, seed: int = 0,
        log: Callable[[str], None] | None = None) -> dict:
    """Every row of the flow benchmark; returns the JSON document (see the module docstring)."""
    from ..diffusers import FewstepScheduler
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    gmm = mnist_mixture()
    model = FlowMixture(gmm)
    n_samples = samples or (16 if quick else 64)
    nfes = tuple(nfes or (QUICK_NFES if quick else NFES))
    x_T = torch.randn((n_samples, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    makers = diffusers_schedulers(OTHER_SHIFTS)  # each of diffusers' flow schedulers on several shifts
    src = makers[FLOW_EULER]().config
    ref, _ = run_scheduler(FewstepScheduler.from_config(src, solver="unipc_bh2_3"), model, x_T.clone(), 1000)
    check, _ = run_scheduler(FewstepScheduler.from_config(src, solver="dpmpp_3m"), model, x_T.clone(), 1000)
    log(f"reference: unipc_bh2_3 1000 steps, {rmse(check, ref):.2g} from dpmpp_3m 1000 steps")
    rows = []

    def add(impl, name, spacing, sched, n):
        x, calls = run_scheduler(sched, model, x_T.clone(), n)
        rows.append({"impl": impl, "solver": name, "spacing": spacing, "nfe": calls, "rmse": rmse(x, ref),
                     "overhead_us_per_step": None})

    for name, make in makers.items():
        for n in nfes:
            add("diffusers", name, "default", make(), n)
    for solver in (QUICK_SOLVERS if quick else SOLVERS):
        for label, make in fixed_schedulers(src, solver).items():
            for n in nfes:
                add("fewstep", solver, label, make(), n)
        log(f"fewstep {solver}: done")
    tuned_nfes = tuple(n for n in nfes if n <= 10)
    cal_samples = min(16 if quick else 64, n_samples)
    grids = tune_flow_grids(gmm, src, QUICK_TUNED_SOLVERS if quick else TUNED_SOLVERS, tuned_nfes,
                            samples=cal_samples, seed=seed + 1, log=log)
    tuning = {}
    for (solver, n), g in grids.items():
        add("fewstep", solver, "tuned", FewstepScheduler.from_config(src, solver=solver, grid=g), n)
        tuning[f"{solver}/{n}"] = {"calibration_rmse": g.calibration["rmse"], "heldout_rmse": rows[-1]["rmse"],
                                   "model_calls": g.cost["model_calls"] + g.cost["reference_model_calls"],
                                   "seconds": g.cost["seconds"], "times": g.times}
    overhead = {("diffusers", k): step_overhead(m) for k, m in makers.items() if " shift " not in k}
    for solver in OVERHEAD_SOLVERS:
        overhead[("fewstep", solver)] = step_overhead(lambda: FewstepScheduler.from_config(src, solver=solver))
    for r in rows:
        r["overhead_us_per_step"] = overhead.get((r["impl"], r["solver"].split(" shift ")[0]))
    machine = machine_info()
    machine["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    return {"model": {"name": NAME, "description": f"exact MNIST-fitted Gaussian mixture under rectified flow, "
                      f"shift {SHIFT}", "samples": n_samples, "seed": seed},
            "reference": {"method": "fewstep unipc_bh2_3, 1000 steps, through FewstepScheduler",
                          "error_estimate": rmse(check, ref), "check": "dpmpp_3m, 1000 steps"},
            "tuning": {"calibration_samples": cal_samples, "calibration_seed": seed + 1, "grids": tuning},
            "machine": machine, "quick": quick, "nfes": list(nfes), "results": rows,
            "summary": summarize(rows, nfes)}


def summarize(rows, nfes) -> dict:
    summary = {}
    for n in nfes:
        d = {r["solver"]: r["rmse"] for r in rows if r["impl"] == "diffusers" and r["nfe"] == n}
        f = [r for r in rows if r["impl"] == "fewstep" and r["nfe"] == n]
        fixed = [r for r in f if r["spacing"] != "tuned"]
        best, best_fixed, best_d = min(f, key=lambda r: r["rmse"]), min(fixed, key=lambda r: r["rmse"]), min(d.values())
        euler = min(v for k, v in d.items() if k.startswith(FLOW_EULER))  # on its best shift
        summary[n] = {"best_fewstep": f"{best['solver']} / {best['spacing']}", "best_fewstep_rmse": best["rmse"],
                      "best_fixed": f"{best_fixed['solver']} / {best_fixed['spacing']}",
                      "best_fixed_rmse": best_fixed["rmse"],
                      "best_diffusers_rmse": best_d, "best_diffusers": min(d, key=d.get),
                      "flowmatch_euler_rmse": d[FLOW_EULER], "flowmatch_euler_best_rmse": euler,
                      "ratio_vs_best_diffusers": best["rmse"] / best_d,
                      "ratio_vs_flowmatch_euler": best["rmse"] / d[FLOW_EULER],
                      "ratio_vs_flowmatch_euler_best": best["rmse"] / euler}
    return summary


# FewstepScheduler.from_config(flow config, solver=...) with no spacing uses "shifted_uniform": the rows
# labelled "source:dpmsolver" (the same sigmas)
DEFAULT_ROW_SPACING = "source:dpmsolver"


def defaults_lines(doc: dict) -> list[str]:
    """The defaults (``report.DEFAULT_SOLVERS`` through FewstepScheduler with no spacing) against the flow
    default FlowMatchEulerDiscreteScheduler: RMSE and ratio by NFE (target: <= 1, and <= 0.5 at NFE 10)."""
    from .report import DEFAULT_SOLVERS
    idx = {(r["impl"], r["solver"], r["spacing"], r["nfe"]): r["rmse"] for r in doc["results"]}
    nfes = doc["nfes"]
    lines = ["| FewstepScheduler default, solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for solver in DEFAULT_SOLVERS:
        cells = []
        for n in nfes:
            f, d = idx.get(("fewstep", solver, DEFAULT_ROW_SPACING, n)), idx.get(("diffusers", FLOW_EULER, "default", n))
            cells.append("-" if f is None or d is None else f"{f:.3g} ({f / d:.2f}x)")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines.append(f"| diffusers {FLOW_EULER} | " + " | ".join(
        f"{idx[('diffusers', FLOW_EULER, 'default', n)]:.3g}" for n in nfes) + " |")
    return lines


def markdown(doc: dict, png_name: str | None = None) -> str:
    nfes = doc["nfes"]
    lines = [f"# Flow-matching solvers ({doc['model']['description']})", "",
             f"RMSE against {doc['reference']['method']} (its distance to {doc['reference']['check']}: "
             f"{doc['reference']['error_estimate']:.1e}); {doc['model']['samples']} samples (seed "
             f"{doc['model']['seed']}); NFE = steps. Tuned grids were fitted on {doc['tuning']['calibration_samples']} "
             f"other noises (seed {doc['tuning']['calibration_seed']}).", "",
             f"diffusers' flow schedulers run at the model's shift {SHIFT:g} and at shifts "
             f"{', '.join(f'{k:g}' for k in OTHER_SHIFTS)} (their spacing is their shift); best diffusers is the best "
             "of all of them.", "",
             "| NFE | best fewstep (solver / spacing) | its RMSE | best fixed spacing | its RMSE | best diffusers | "
             "its RMSE | FlowMatchEuler RMSE (model's shift / best shift) | ratio vs best diffusers | "
             "ratio vs FlowMatchEuler (model's shift / best shift) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in doc["summary"].items():
        lines.append(f"| {n} | {s['best_fewstep']} | {s['best_fewstep_rmse']:.4g} | {s['best_fixed']} | "
                     f"{s['best_fixed_rmse']:.4g} | {s['best_diffusers']} | {s['best_diffusers_rmse']:.4g} | "
                     f"{s['flowmatch_euler_rmse']:.4g} / {s.get('flowmatch_euler_best_rmse', float('nan')):.4g} | "
                     f"{s['ratio_vs_best_diffusers']:.3f} | {s['ratio_vs_flowmatch_euler']:.3f} / "
                     f"{s.get('ratio_vs_flowmatch_euler_best', float('nan')):.3f} |")
    lines += ["", "## Defaults against the flow default (FlowMatchEuler)", ""] + defaults_lines(doc)
    if png_name:
        lines += ["", f"![flow solvers]({png_name})"]
    lines += ["", "## Tuned grids (fit cost and held-out error)", "",
              "| solver / NFE | calibration RMSE | held-out RMSE | model calls to fit | seconds |", "|---|---|---|---|---|"]
    for k, g in doc["tuning"]["grids"].items():
        lines.append(f"| {k} | {g['calibration_rmse']:.4g} | {g['heldout_rmse']:.4g} | {g['model_calls']} | "
                     f"{g['seconds']:.0f} |")
    lines += ["", "## Every row", "", "| impl | scheduler / solver | spacing | " + " | ".join(f"NFE {n}" for n in nfes)
              + " | us / step |", "|---|---|---|" + "---|" * (len(nfes) + 1)]
    keys = dict.fromkeys((r["impl"], r["solver"], r["spacing"]) for r in doc["results"])
    for k in keys:
        mine = [r for r in doc["results"] if (r["impl"], r["solver"], r["spacing"]) == k]
        vals = {r["nfe"]: r["rmse"] for r in mine}
        us = mine[0]["overhead_us_per_step"]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(f"{vals[n]:.4g}" if n in vals else "" for n in nfes)
                     + f" | {'' if us is None else f'{us:.0f}'} |")
    m = doc["machine"]
    lines += ["", f"Overhead: one `scheduler.step` on a (4, 16, 64, 64) latent, median of 5. Machine: {m['cpu']}, "
              f"{m['torch_threads']} torch thread(s), torch {m['torch']}, diffusers {m['diffusers']}, {m['date']}, "
              f"{m['wall_time_s']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """RMSE against NFE: diffusers' flow schedulers, fewstep's best fixed spacing, fewstep's tuned grids."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for name in dict.fromkeys(r["solver"] for r in rows if r["impl"] == "diffusers" and " shift " not in r["solver"]):
        pts = sorted((r["nfe"], r["rmse"]) for r in rows if r["impl"] == "diffusers" and r["solver"] == name)
        ax.plot(*zip(*pts), "s--", label=f"diffusers {name}")
    ax.plot(list(map(int, doc["summary"])), [s["best_diffusers_rmse"] for s in doc["summary"].values()], "s-",
            color="0.5", label="diffusers, best of all shifts")
    best = {}
    for r in rows:
        if r["impl"] == "fewstep" and r["spacing"] != "tuned":
            best[r["nfe"]] = min(best.get(r["nfe"], float("inf")), r["rmse"])
    ax.plot(*zip(*sorted(best.items())), "o-", color="k", label="fewstep, best fixed spacing")
    for solver in dict.fromkeys(r["solver"] for r in rows if r["spacing"] == "tuned"):
        pts = sorted((r["nfe"], r["rmse"]) for r in rows if r["spacing"] == "tuned" and r["solver"] == solver)
        ax.plot(*zip(*pts), "o-", lw=2, label=f"fewstep {solver}, tuned grid")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(doc["nfes"], [str(n) for n in doc["nfes"]])
    ax.minorticks_off()
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("RMSE to the converged solution")
    ax.set_title(doc["model"]["description"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
