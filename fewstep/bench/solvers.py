"""The solver benchmark: error against a reference ODE solution, by NFE, for every
fewstep ODE solver and grid and for diffusers' schedulers on the same model; plus each
solver's own time per step with the model excluded.

    fewstep bench solvers [--quick] [--json PATH] [--model NAME|PATH] [--w FLOAT]
                          [--nfe LIST] [--samples N] [--out-dir DIR]

``--model flow-mixture`` runs the flow-matching model instead (``fewstep.bench.flow``: diffusers'
flow schedulers against FewstepScheduler on every grid, tuned grids included).

What is measured
  * ``rmse``: root-mean-square difference of the final x0 (over all samples and values)
    from the reference solution started at the same x_T. The reference is RK4 in lambda
    (float64 state; ``fewstep.tune.reference_trajectory``, the solve of ``fewstep.reference``): the
    probability-flow ODE from t = 1 to t_min = 1/N, then one denoising step -- the
    limit of every grid that ends in 0, fewstep's and diffusers' alike. Its own error is
    taken as the RMSE of its difference from the solve with half the steps; a row within
    10x of that is marked and not ranked (``report.UNRANKED``).
  * spacing ``tuned``: the model's shipped tuned grid (``fewstep.grids``) for that solver and
    NFE, where the model ships one.
  * ``nfe``: model calls actually made (counted for every run, never assumed). A
    classifier-free-guided call (conditional and unconditional halves in one batch)
    counts as one call, for fewstep and diffusers alike.
  * ``overhead_us_per_step``: solver time per model call on a (8, 4, 64, 64) tensor with a
    trivial cached model (fewstep: the whole sampler on a denoiser returning a cached
    tensor; diffusers: ``scheduler.step()`` alone), the median over repeats, measured on the
    rows of the measured (impl, solver) pairs and null elsewhere.

Stochastic samplers (ddpm, sde_dpmpp_2m/3m) are left out: their error against an ODE
solution does not measure solver accuracy. Adaptive DPM-Solver-12/23 choose their own NFE;
their rows sweep the tolerance (spacing ``adaptive_rtol=...``).
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..solvers import SOLVERS
from . import flow
from .machine import machine_info
from .models import BenchArgumentError, load_bench_model
from .overhead import OVERHEAD_PAIRS, QUICK_OVERHEAD_PAIRS, adapter_overhead, measure_overhead
from .report import DEFAULT_SOLVERS, DEFAULT_SPACING, defaults_check, markdown, plot
from .runner import (DIFFUSERS_GRIDS, QUICK_DIFFUSERS_GRIDS, diffusers_sample, fewstep_sample, reference, rmse,
                     tuned_grid)

__all__ = ["BenchArgumentError", "parse_nfe_list", "make_plan", "run", "DEFAULT_NFES", "QUICK_NFES"]

DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20, 50)
QUICK_NFES = (5, 10)
SPACINGS = ("logsnr", "time_uniform", "karras")
QUICK_SPACINGS = ("logsnr", "karras")
QUICK_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_2", "unipc_bh2_3")
ADAPTIVE_RTOLS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)

# (scheduler, spacing name, kwargs beyond the model's betas and prediction type)
DIFFUSERS_CONFIGS = (
    ("DPMSolverMultistepScheduler", "default", {}),
    ("DPMSolverMultistepScheduler", "karras", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", "lu_lambdas", {"use_lu_lambdas": True}),
    ("DPMSolverSinglestepScheduler", "default", {}),
    ("UniPCMultistepScheduler", "default", {}),
    ("DEISMultistepScheduler", "default", {}),
    ("EulerDiscreteScheduler", "default", {}),
    ("HeunDiscreteScheduler", "default", {}),
    ("DDIMScheduler", "default", {"clip_sample": False}),  # clip_sample=False: an ODE solver, not a clipper
    ("DDIMScheduler", "trailing", {"clip_sample": False, "timestep_spacing": "trailing"}),
)
QUICK_DIFFUSERS_CONFIGS = tuple(c for c in DIFFUSERS_CONFIGS if (c[0], c[1]) in {
    ("DPMSolverMultistepScheduler", "default"), ("DPMSolverMultistepScheduler", "karras"),
    ("UniPCMultistepScheduler", "default"), ("DDIMScheduler", "default"), ("EulerDiscreteScheduler", "default")})


def parse_nfe_list(text) -> tuple[int, ...]:
    """'5,10,20' (commas or spaces) -> (5, 10, 20): integers from 1 to 1000, sorted, unique."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        values = [int(v) for v in items]
    except (TypeError, ValueError):
        raise BenchArgumentError(f"--nfe must be a comma-separated list of integers, e.g. 5,10,20; "
                                 f"got {text!r}") from None
    if not values or any(v < 1 or v > 1000 for v in values):
        raise BenchArgumentError(f"--nfe needs at least one integer, each from 1 to 1000; got {text!r}")
    return tuple(sorted(set(values)))


@dataclass
class Plan:
    nfes: tuple
    samples: int
    solvers: tuple
    spacings: tuple
    diffusers_grids: dict
    diffusers_configs: tuple
    adaptive: tuple
    ref_steps: int
    overhead_pairs: tuple
    overhead_steps: int
    overhead_repeats: int


# samples when --samples is not given: (quick, full) by model; the exact synthetic mixtures are cheap, and their
# narrow modes make the RMSE a count of the few samples a solver sends to another mode, so they get many samples
# (at 64 samples the cosine model read 1.04x at 5 calls where 1,024 give 0.90x)
MODEL_SAMPLES = {"gmm-sd-v": (256, 1024), "gmm-cosine": (256, 1024), "mnist-teacher": (8, 64)}
DEFAULT_SAMPLES = (16, 64)
# the defaults check that --quick adds on the exact models it does not run in full (a few seconds each)
QUICK_DEFAULT_MODELS = ("gmm-sd-v", "gmm-cosine")


def make_plan(quick: bool, nfes, samples, model: str = "gmm-mnist") -> Plan:
    samples = samples or MODEL_SAMPLES.get(model, DEFAULT_SAMPLES)[0 if quick else 1]
    if quick:
        return Plan(nfes or QUICK_NFES, samples, QUICK_SOLVERS, QUICK_SPACINGS, QUICK_DIFFUSERS_GRIDS,
                    QUICK_DIFFUSERS_CONFIGS, (), 32, QUICK_OVERHEAD_PAIRS, 10, 5)
    ode = tuple(n for n, s in SOLVERS.items() if not s.stochastic and s.kind != "adaptive")
    adaptive = tuple(n for n, s in SOLVERS.items() if s.kind == "adaptive")
    return Plan(nfes or DEFAULT_NFES, samples, ode, SPACINGS, DIFFUSERS_GRIDS, DIFFUSERS_CONFIGS,
                adaptive, 128, OVERHEAD_PAIRS, 20, 9)


def _row(impl, solver, spacing, nfe, rmse):
    return {"impl": impl, "solver": solver, "spacing": spacing, "nfe": int(nfe), "rmse": rmse,
            "overhead_us_per_step": None}


def _fewstep_rows(bm, plan, x_T, x_ref, cond, uncond, log):
    rows, seen = [], set()
    for solver in plan.solvers:
        spacings = plan.spacings + tuple(g[0] for g in plan.diffusers_grids.get(solver, ())) + ("tuned",)
        for spacing in spacings:
            for nfe in plan.nfes:
                if spacing == "tuned" and tuned_grid(bm, solver, nfe) is None:  # the model ships none for it
                    continue
                x, spent = fewstep_sample(bm, x_T, solver, spacing, nfe, cond, uncond)
                if (solver, spacing, spent) not in seen:
                    seen.add((solver, spacing, spent))
                    rows.append(_row("fewstep", solver, spacing, spent, rmse(x, x_ref)))
        log(f"fewstep {solver}: done")
    for solver in plan.adaptive:
        for rtol in ADAPTIVE_RTOLS:
            x, spent = fewstep_sample(bm, x_T, solver, "adaptive", 0, cond, uncond,
                                      rtol=rtol, atol=0.0078 * rtol / 0.05)
            rows.append(_row("fewstep", solver, f"adaptive_rtol={rtol:g}", spent, rmse(x, x_ref)))
        log(f"fewstep {solver}: done")
    return rows


def _diffusers_rows(bm, plan, x_T, x_ref, cond, uncond, log):
    rows, seen = [], set()
    for name, spacing, extra in plan.diffusers_configs:
        for nfe in plan.nfes:
            try:
                x, spent = diffusers_sample(bm, x_T, name, extra, nfe, cond, uncond)
            except (IndexError, ValueError, RuntimeError) as e:  # e.g. Karras sigmas on cosine betas (REFERENCE.md)
                log(f"diffusers {name} ({spacing}) at NFE {nfe} failed: {type(e).__name__}: {e}")
                continue
            if (name, spacing, spent) not in seen:
                seen.add((name, spacing, spent))
                rows.append(_row("diffusers", name, spacing, spent, rmse(x, x_ref)))
        log(f"diffusers {name} ({spacing}): done")
    return rows


def run(*, quick: bool = False, json_path=None, model: str = "gmm-mnist", w: float | None = None,
        nfe=None, samples: int | None = None, out_dir="benchmarks/results", seed: int = 0,
        threads: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; write JSON, markdown and PNG; return the JSON document.

    Outputs: ``json_path`` (default ``<out_dir>/solvers.json``, ``solvers_quick.json`` with
    ``quick``) and, beside it in ``out_dir``, ``.md`` and ``.png`` of the same stem.
    threads: torch threads for the run (restored afterwards); None keeps the current setting.
    Raises BenchArgumentError for bad arguments before any work is done.
    """
    log = log or (lambda msg: None)
    nfes = parse_nfe_list(nfe) if nfe is not None else None
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise BenchArgumentError(f"--samples must be an integer >= 1, got {samples!r}")
    if model == flow.NAME:
        if w is not None:
            raise BenchArgumentError("the flow-mixture model is unconditional: leave out --w")
        return _run_flow(quick, json_path, nfes, samples, out_dir, seed, threads, log)
    plan = make_plan(quick, nfes, samples, model)
    stem = "solvers_quick" if quick else "solvers"
    out_dir = Path(out_dir)
    json_path = Path(json_path) if json_path is not None else out_dir / f"{stem}.json"
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BenchArgumentError(f"--threads must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        with _quiet_diffusers():
            doc, extras = _run(plan, model, w, seed, quick, log)
    finally:
        torch.set_num_threads(previous)
    extras["command"] = " ".join(["fewstep bench solvers"] + (["--quick"] if quick else [])
                                 + ([f"--model {model}"] if model != "gmm-mnist" else [])
                                 + ([f"--w {w:g}"] if w is not None else [])
                                 + ([f"--nfe {','.join(map(str, nfes))}"] if nfes else [])
                                 + ([f"--samples {samples}"] if samples else []))
    _write_outputs(doc, extras, json_path, out_dir / f"{json_path.stem}.md", out_dir / f"{json_path.stem}.png")
    return doc


def _run_flow(quick, json_path, nfes, samples, out_dir, seed, threads, log) -> dict:
    """The flow-matching model (``fewstep.bench.flow``): its own rows and report, written beside the others."""
    out_dir = Path(out_dir)
    json_path = Path(json_path) if json_path is not None else out_dir / f"flow_solvers{'_quick' if quick else ''}.json"
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        with _quiet_diffusers():
            doc = flow.run(quick=quick, nfes=nfes, samples=samples, seed=seed, log=log)
    finally:
        torch.set_num_threads(previous)
    doc["command"] = " ".join(["fewstep bench solvers --model flow-mixture"] + (["--quick"] if quick else [])
                              + ([f"--nfe {','.join(map(str, nfes))}"] if nfes else [])
                              + ([f"--samples {samples}"] if samples else []))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    png = out_dir / f"{json_path.stem}.png"
    flow.plot(doc, png)
    (out_dir / f"{json_path.stem}.md").write_text(f"`{doc['command']}`\n\n" + flow.markdown(doc, png.name))
    return doc


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' deprecation warnings and config notices off for the run (BENCHMARKS.md lists
    the notices that matter, e.g. DPMSolverSinglestep switching lower_order_final on)."""
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(level)


def _run(plan: Plan, model: str, w, seed: int, quick: bool, log) -> tuple[dict, dict]:
    start = time.perf_counter()
    bm = load_bench_model(model, w)
    machine = machine_info()
    log(f"model {bm.name} loaded ({time.perf_counter() - start:.0f} s)")
    x_T = torch.randn((plan.samples, *bm.shape), generator=torch.Generator().manual_seed(seed))
    cond, uncond = bm.conditioning(plan.samples)
    x_ref, ref_info = reference(bm, x_T, cond, uncond, plan.ref_steps)
    log(f"reference: {ref_info['convergence']} ({ref_info['seconds']} s)")
    rows = _fewstep_rows(bm, plan, x_T, x_ref, cond, uncond, log)
    rows += _diffusers_rows(bm, plan, x_T, x_ref, cond, uncond, log)
    overhead = measure_overhead(plan.overhead_pairs, steps=plan.overhead_steps, repeats=plan.overhead_repeats)
    adapter = adapter_overhead(steps=plan.overhead_steps, repeats=plan.overhead_repeats)
    log("overhead measured")
    for r in rows:
        r["overhead_us_per_step"] = overhead.get((r["impl"], r["solver"]))
    bm.info.update(samples=plan.samples, seed=seed)
    doc = {"model": bm.info, "reference": ref_info, "machine": machine, "results": rows}
    if quick:
        doc["defaults_check"] = {name: defaults_rows(name, plan.nfes, seed, log)
                                 for name in QUICK_DEFAULT_MODELS if name != model}
    machine["wall_time_s"] = round(time.perf_counter() - start, 1)
    extras = {"adapter_overhead_us": adapter, "overhead_steps": plan.overhead_steps,
              "overhead_repeats": plan.overhead_repeats, "quick": quick, "nfes": plan.nfes}
    return doc, extras


def defaults_rows(model: str, nfes, seed: int, log, samples: int | None = None) -> dict:
    """The defaults (``report.DEFAULT_SOLVERS`` on the default grid) and diffusers' default scheduler on one
    exact model: its rows and the check (``report.defaults_check``)."""
    bm = load_bench_model(model)
    n = samples or MODEL_SAMPLES.get(model, DEFAULT_SAMPLES)[0]
    x_T = torch.randn((n, *bm.shape), generator=torch.Generator().manual_seed(seed))
    cond, uncond = bm.conditioning(n)
    x_ref, ref_info = reference(bm, x_T, cond, uncond, 32)
    rows = []
    for solver in DEFAULT_SOLVERS:
        for nfe in nfes:
            x, spent = fewstep_sample(bm, x_T, solver, DEFAULT_SPACING, nfe, cond, uncond)
            rows.append(_row("fewstep", solver, DEFAULT_SPACING, spent, rmse(x, x_ref)))
    for nfe in nfes:
        x, spent = diffusers_sample(bm, x_T, "DPMSolverMultistepScheduler", {}, nfe, cond, uncond)
        rows.append(_row("diffusers", "DPMSolverMultistepScheduler", "default", spent, rmse(x, x_ref)))
    log(f"defaults check on {model}: done")
    return {"model": {**bm.info, "samples": n, "seed": seed}, "reference": ref_info, "results": rows,
            "check": defaults_check(rows, nfes, ref_info["unranked_below"])}


def _write_outputs(doc, extras, json_path: Path, md_path: Path, png_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, png_path, extras["nfes"])
    md_path.write_text(markdown(doc, extras, png_path.name))

