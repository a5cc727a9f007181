"""Learned solvers (fewstep.tune.tune_solver: pas, coeff) against the tuned grid alone, fewstep's best fixed
solver and diffusers' default and best schedulers, on held-out noises only.

    python benchmarks/bench_learned.py --model gmm-mnist              # exact guided MNIST mixture (VP, eps)
    python benchmarks/bench_learned.py --model flow-mixture           # exact mixture under flow matching, shift 3
    python benchmarks/bench_learned.py --model mnist-teacher --quick --calibration 64 --heldout 64   # slower
    python benchmarks/bench_learned.py --model gmm-mnist --quick      # NFE 5, 8; one tuned solver

Calibration: ``--calibration`` noises (random labels) from seed 1234, of which tune_solver's default 25 % are
its validation split; held-out: ``--heldout`` noises from seed 0 (labels i mod 10), never seen by a fit.
Every learned or tuned row is ``tune_solver`` with its defaults (no starts, no free-end flag); the flow
model also gets the flow benchmark's hand-picked ``tune_grid`` settings (its pipeline grids as starts, free
end, 1024 reference steps) as a row, to show the defaults match them.

gmm-mnist: reference RK4 in log-SNR (``fewstep.bench.runner.reference``); diffusers rows by diffusers' own
loop (``DIFFUSERS_CONFIGS`` of ``fewstep bench solvers``: DPM-Solver++ default / Karras / Lu, singlestep,
UniPC, DEIS, Euler, Heun, DDIM), default = DPMSolverMultistepScheduler. flow-mixture: every row through the
scheduler interface from pure noise at sigma = 1 (``fewstep.bench.flow``), reference fewstep unipc_bh2_3
at 1000 steps; diffusers rows FlowMatchEuler (default), DPM-Solver and UniPC in flow mode, each at the model's
shift 3 and at shifts 1, 2 and 4 (``OTHER_SHIFTS``: a flow scheduler's spacing is its shift; "diffusers best" is
the best of them all).
Every row records the RMSE, the median held-out sample's RMSE and how many samples end more than ``FAR``
from the reference (in another mode: on multi-modal models a few of them make most of the RMSE).
Writes ``benchmarks/results/learned_<model>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fewstep.bench.machine import machine_info, machine_line
from fewstep.bench.runner import disk_cached
from fewstep.reference import rmse
from fewstep.schedules import time_grid
from fewstep.tune import calibration_set, tune_grid, tune_solver

ROOT = Path(__file__).resolve().parents[1]
FIXED_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "unipc_bh1_2", "unipc_bh1_3",
                 "unipc_bh2_2", "unipc_bh2_3")
VP_SPACINGS = ("logsnr", "karras", "time_uniform", "time_quadratic")
METHODS = ("grid", "coeff", "pas")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} learned] {msg}", file=sys.stderr, flush=True)


CACHE = Path("/tmp/fewstep-learned-cache")  # set from --cache
FAR = 0.2  # a sample more than this RMS from the reference ended in another mode (data in [-1, 1])


def scores(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """RMSE over all samples, and the per-sample view behind it: the median sample's RMSE, and how many samples
    are more than ``FAR`` from the reference (on a multi-modal model, the ones sent to another mode: a few of
    them carry most of the RMSE)."""
    per = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1).pow(2).mean(1).sqrt()
    return {"rmse": rmse(x, ref), "median": float(per.median()), "far": int((per > FAR).sum())}


def _cached_ref(name: str, make):
    """A held-out reference (x, info), cached on disk in --cache."""
    return disk_cached(CACHE / f"{name}.pt", make)


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------

class GMMMnist:
    """The guided exact MNIST mixture on linear betas (eps), as ``fewstep bench solvers`` runs it."""
    name, family = "gmm-mnist", "vp"

    def __init__(self, w: float, n_heldout: int, ref_steps: int):
        from fewstep.bench.models import NULL_LABEL, load_bench_model
        from fewstep.bench.runner import reference
        from fewstep.denoisers import ClassifierFreeGuidance, ModelDenoiser
        self.bm = bm = load_bench_model("gmm-mnist", w)
        den = ModelDenoiser(bm.model, bm.schedule, "eps", time_input="discrete")
        self.denoiser = ClassifierFreeGuidance(den, w, lambda c: {"labels": torch.full_like(c["labels"], NULL_LABEL)})
        self.schedule, self.shape, self.w = bm.schedule, bm.shape, w
        self.x_T = torch.randn((n_heldout, *bm.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.cond, self.uncond = bm.conditioning(n_heldout)
        self.ref, self.ref_info = _cached_ref(f"gmm-mnist-w{w:g}-n{n_heldout}-rk{ref_steps}",
                                              lambda: reference(bm, self.x_T, self.cond, self.uncond, ref_steps))

    def calibration(self, n: int):
        return calibration_set(n, self.shape, seed=1234, num_classes=10, dtype=torch.float64)

    def fixed_rows(self, nfe: int) -> list:
        from fewstep.sampling import sample
        rows = []
        for solver in FIXED_SOLVERS:
            for sp in VP_SPACINGS:
                x = sample(self.denoiser, self.x_T, self.schedule, solver=solver, grid=time_grid(self.schedule, nfe, sp),
                           cond=self.cond).x
                rows.append({"impl": "fewstep", "row": f"{solver} / {sp}", "kind": "fixed", "nfe": nfe,
                             **scores(x, self.ref)})
        return rows

    def diffusers_rows(self, nfe: int) -> list:
        from fewstep.bench.runner import diffusers_sample
        from fewstep.bench.solvers import DIFFUSERS_CONFIGS
        rows = []
        for name, spacing, extra in DIFFUSERS_CONFIGS:
            x, calls = diffusers_sample(self.bm, self.x_T.float(), name, extra, nfe, self.cond, self.uncond)
            if calls != nfe:  # Heun spends 2 steps - 1 calls: only budgets it can hit exactly
                continue
            rows.append({"impl": "diffusers", "row": f"{name} / {spacing}", "kind": "diffusers", "nfe": nfe,
                         **scores(x, self.ref), "default": (name, spacing) == ("DPMSolverMultistepScheduler",
                                                                                   "default")})
        return rows

    def heldout(self, tuned) -> dict:
        from fewstep.sampling import sample
        return scores(sample(self.denoiser, self.x_T, self.schedule, grid=tuned, cond=self.cond).x, self.ref)


class TeacherProblem(GMMMnist):
    """The shipped MNIST teacher (cosine VP, v prediction) at guidance w: tuned and judged on its own schedule
    (reference RK4, ``fewstep.reference``); diffusers rows on its 1000-step discrete view
    (``fewstep.bench.models``), as ``benchmarks/bench_grids.py`` runs it."""
    name, family = "mnist-teacher", "vp"

    def __init__(self, w: float, n_heldout: int, ref_steps: int):
        import fewstep
        from fewstep.bench.models import load_bench_model
        from fewstep.reference import reference_solution
        self.bm = bm = load_bench_model("mnist-teacher", w)
        self.model = fewstep.load("mnist-teacher")
        self.denoiser, self.schedule, self.shape, self.w = self.model.denoiser(w), self.model.schedule, bm.shape, w
        self.x_T = torch.randn((n_heldout, *bm.shape), generator=torch.Generator().manual_seed(0))
        self.cond, self.uncond = bm.conditioning(n_heldout)
        def make():
            start = time.perf_counter()
            with torch.no_grad():
                ref, err = reference_solution(self.denoiser, self.schedule, self.x_T, self.schedule.t_max, 0.0,
                                              steps=ref_steps, cond=self.cond)
            return ref, {"method": f"fewstep.reference.reference_solution, {2 * ref_steps} RK4 steps in log-SNR",
                         "error_estimate": err, "seconds": round(time.perf_counter() - start, 1)}
        self.ref, self.ref_info = _cached_ref(f"mnist-teacher-w{w:g}-n{n_heldout}-rk{ref_steps}", make)

    def calibration(self, n: int):
        return calibration_set(n, self.shape, seed=1234, num_classes=10)


class FlowMixtureProblem:
    """The exact MNIST mixture under flow matching (SD3's shift 3), every row through a scheduler."""
    name, family = "flow-mixture", "flow"

    def __init__(self, n_heldout: int, ref_steps: int):
        from fewstep.bench.flow import FLOW_EULER, OTHER_SHIFTS, FlowMixture, diffusers_schedulers, run_scheduler
        from fewstep.bench.models import mnist_mixture
        from fewstep.diffusers import FewstepScheduler
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        self.gmm = mnist_mixture()
        self.model, self.makers = FlowMixture(self.gmm), diffusers_schedulers(OTHER_SHIFTS)  # each on its best shift
        self.src = self.makers[FLOW_EULER]().config
        self.schedule = FewstepScheduler.from_config(self.src, solver="dpmpp_2m").schedule
        self.denoiser, self.shape = self.gmm.denoiser(self.schedule), (1, 28, 28)
        self.x_T = torch.randn((n_heldout, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        self.run_scheduler = run_scheduler
        def make():
            start = time.perf_counter()
            ref, _ = run_scheduler(FewstepScheduler.from_config(self.src, solver="unipc_bh2_3"), self.model,
                                   self.x_T.clone(), 1000)
            check, _ = run_scheduler(FewstepScheduler.from_config(self.src, solver="dpmpp_3m"), self.model,
                                     self.x_T.clone(), 1000)
            return ref, {"method": "fewstep unipc_bh2_3, 1000 steps, through FewstepScheduler from sigma = 1",
                         "error_estimate": rmse(check, ref), "check": "dpmpp_3m, 1000 steps",
                         "seconds": round(time.perf_counter() - start, 1)}
        self.ref, self.ref_info = _cached_ref(f"flow-mixture-n{n_heldout}", make)
        self.default_name = FLOW_EULER

    def calibration(self, n: int):
        return calibration_set(n, self.shape, seed=1234)  # pure noise: tune_solver starts flow models at sigma = 1

    def _row(self, impl, row, kind, sched, nfe, **extra):
        x, calls = self.run_scheduler(sched, self.model, self.x_T.clone(), nfe)
        return {"impl": impl, "row": row, "kind": kind, "nfe": calls, **scores(x, self.ref), **extra}

    def fixed_rows(self, nfe: int) -> list:
        from fewstep.bench.flow import fixed_schedulers  # the flow benchmark's fixed grids, shifted ones included
        return [self._row("fewstep", f"{solver} / {label}", "fixed", make(), nfe)
                for solver in FIXED_SOLVERS for label, make in fixed_schedulers(self.src, solver).items()]

    def diffusers_rows(self, nfe: int) -> list:
        return [self._row("diffusers", name, "diffusers", make(), nfe, default=name == self.default_name)
                for name, make in self.makers.items()]

    def heldout(self, tuned) -> dict:
        from fewstep.diffusers import FewstepScheduler
        row = self._row("fewstep", "", "", FewstepScheduler.from_config(self.src, grid=tuned), tuned.nfe)
        return {k: row[k] for k in ("rmse", "median", "far")}

    def handpicked(self, cal, solver: str, nfe: int):
        """The flow benchmark's own tune_grid settings (``fewstep.bench.flow.tune_flow_grids``)."""
        from fewstep.bench.flow import flow_starts
        from fewstep.tune import Calibration
        if getattr(self, "_handpicked_cal", None) is None:  # its own 1024-step reference, shared, noise at t_max
            sigma = float(self.schedule.sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)))
            self._handpicked_cal = Calibration(cal.x_T * sigma, cal.cond, cal.seed)
        return tune_grid(self.denoiser, self.schedule, solver=solver, nfe=nfe, calibration=self._handpicked_cal,
                         reference_steps=1024, candidates=64, starts=flow_starts(self.src, nfe), free_end=True)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

class Progress:
    """Rows and fits so far, written after each piece to ``<out>.partial.json`` so an interrupted run resumes."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        doc = json.loads(path.read_text()) if resume and path.is_file() else {}
        self.rows, self.fits, self.done = doc.get("rows", []), doc.get("fits", []), set(doc.get("done", []))

    def save(self, key: str) -> None:
        self.done.add(key)
        self.path.write_text(json.dumps({"rows": self.rows, "fits": self.fits, "done": sorted(self.done)}, default=float))


@torch.no_grad()
def run(args, out: Path) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    global CACHE
    CACHE = Path(args.cache)
    make = {"gmm-mnist": lambda: GMMMnist(args.w, args.heldout, args.ref_steps),
            "mnist-teacher": lambda: TeacherProblem(args.w, args.heldout, args.ref_steps),
            "flow-mixture": lambda: FlowMixtureProblem(args.heldout, args.ref_steps)}[args.model]
    p = make()
    log(f"{p.name}: held-out reference ready ({p.ref_info.get('error_estimate', 0):.2g} own error)")
    cal = p.calibration(args.calibration)
    progress = Progress(out.with_suffix(".partial.json"), args.resume)
    rows, fits = progress.rows, progress.fits
    for nfe in args.nfe:
        if f"rows/{nfe}" not in progress.done:
            rows += p.diffusers_rows(nfe)
            rows += p.fixed_rows(nfe)
            progress.save(f"rows/{nfe}")
        if args.shipped is not None:  # the tuned solvers a model ships (or a folder of tune JSONs): no fitting
            from fewstep.grids import load_grid
            for solver in args.solvers:
                path = Path(args.shipped) / f"{solver}-nfe{nfe}-w{args.w:g}.json"
                if not path.is_file() or f"shipped/{solver}/{nfe}" in progress.done:
                    continue
                tuned = load_grid(path)
                h = p.heldout(tuned)
                e = h["rmse"]
                rows.append({"impl": "fewstep", "row": f"{solver} / shipped ({tuned.method})", "method": "auto",
                             "kind": "learned" if tuned.learned else "tuned_grid", "nfe": nfe, **h})
                progress.save(f"shipped/{solver}/{nfe}")
                log(f"{path.name}: held-out {e:.4g}")
            continue
        for solver in args.solvers:
            for method in args.methods:
                if method == "coeff" and nfe < 3 or f"fit/{solver}/{nfe}/{method}" in progress.done:
                    continue
                start = time.perf_counter()
                tuned = tune_solver(p.denoiser, p.schedule, solver=solver, nfe=nfe, calibration=cal, method=method,
                                    reference_steps=args.tune_ref_steps, conditioning={"name": p.name}, times=args.times,
                                    log=lambda m: log(f"  {m}"))
                seconds = time.perf_counter() - start
                h = p.heldout(tuned)
                e = h["rmse"]
                kind = "learned" if tuned.learned else "tuned_grid"
                rows.append({"impl": "fewstep", "row": f"{solver} / {method}", "kind": kind if method != "grid" else
                             "tuned_grid", "method": method, "nfe": nfe, **h})
                fits.append({"solver": solver, "method": method, "nfe": nfe, "heldout_rmse": e,
                             "heldout_median": h["median"], "heldout_far": h["far"],
                             "fitting_rmse": tuned.calibration["rmse"], "validation_rmse": tuned.calibration["validation_rmse"],
                             "validation_error": tuned.calibration["validation_error"],
                             "fell_back_to_grid": bool(tuned.calibration.get("fell_back_to_grid")),
                             "model_calls": tuned.cost["model_calls"], "seconds": round(seconds, 1),
                             "reference_model_calls": tuned.cost["reference_model_calls"],
                             "reference_seconds": tuned.cost["reference_seconds"], "times": tuned.times,
                             "learned": tuned.learned})
                progress.save(f"fit/{solver}/{nfe}/{method}")
                log(f"{solver} NFE {nfe} {method}: held-out {e:.4g} (fit {tuned.calibration['rmse']:.4g}, validation "
                    f"{tuned.calibration['validation_rmse']:.4g}; {tuned.cost['model_calls']} calls, {seconds:.0f} s)")
            mine = {f["method"]: f for f in fits if f["solver"] == solver and f["nfe"] == nfe}
            if "coeff" in mine and "pas" in mine and f"auto/{solver}/{nfe}" not in progress.done:
                pick = min(("coeff", "pas"), key=lambda k: mine[k]["validation_error"])  # tune_solver's "auto"
                rows.append({"impl": "fewstep", "row": f"{solver} / auto (default: {pick})", "kind": "auto",
                             "method": "auto", "nfe": nfe, "rmse": mine[pick]["heldout_rmse"],
                             **({"median": mine[pick]["heldout_median"], "far": mine[pick]["heldout_far"]}
                                if "heldout_median" in mine[pick] else {})})
                progress.save(f"auto/{solver}/{nfe}")
            if p.family == "flow" and args.handpicked and f"hand/{solver}/{nfe}" not in progress.done:
                g = p.handpicked(cal, solver, nfe)
                h = p.heldout(g)
                e = h["rmse"]
                rows.append({"impl": "fewstep", "row": f"{solver} / flow benchmark's tune_grid settings",
                             "kind": "handpicked", "nfe": nfe, **h})
                progress.save(f"hand/{solver}/{nfe}")
                log(f"{solver} NFE {nfe} hand-picked tune_grid: held-out {e:.4g}")
    m = machine_info()
    return {"model": p.name, "w": getattr(p, "w", None), "command": "python benchmarks/bench_learned.py "
            + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(m),
            "load_average": m["load_average_at_start"], "wall_time_s": round(time.perf_counter() - t0, 1),
            "heldout": {"samples": args.heldout, "seed": 0, "reference": p.ref_info},
            "calibration": {"samples": args.calibration, "seed": 1234, "validation_share": 0.25,
                            "reference_steps": args.tune_ref_steps},
            "nfes": list(args.nfe), "rows": rows, "fits": fits, "summary": summarize(rows, args.nfe)}


def summarize(rows: list, nfes) -> dict:
    out = {}
    for n in nfes:
        at = [r for r in rows if r["nfe"] == n]
        best = lambda kind: min((r for r in at if r["kind"] == kind), key=lambda r: r["rmse"], default=None)  # noqa: E731
        d_best, d_default = best("diffusers"), next(r for r in at if r.get("default"))
        euler = min((r["rmse"] for r in at if r["kind"] == "diffusers" and r["row"].startswith("FlowMatchEuler")),
                    default=None)  # flow: FlowMatchEuler on its best shift, beside the default (its model's shift)
        entry = {"diffusers_best": d_best["row"], "diffusers_best_rmse": d_best["rmse"],
                 **({"flow_euler_best_rmse": euler} if euler is not None else {}),
                 "diffusers_default_rmse": d_default["rmse"], "diffusers_best_median": d_best.get("median"),
                 "diffusers_best_far": d_best.get("far"), "samples_far": {r["row"]: r["far"] for r in at if "far" in r}}
        for kind in ("fixed", "tuned_grid", "learned", "auto", "handpicked"):
            b = best(kind)
            if b is not None:
                entry[kind] = b["row"]
                entry[f"{kind}_rmse"] = b["rmse"]
                entry[f"{kind}_vs_diffusers_best"] = b["rmse"] / d_best["rmse"]
                entry[f"{kind}_vs_diffusers_default"] = b["rmse"] / d_default["rmse"]
                if euler is not None:
                    entry[f"{kind}_vs_flow_euler_best"] = b["rmse"] / euler
                entry[f"{kind}_median"], entry[f"{kind}_far"] = b.get("median"), b.get("far")
        for method in ("coeff", "pas", "grid", "auto"):
            b = min((r for r in at if r.get("method") == method), key=lambda r: r["rmse"], default=None)
            if b is not None:
                entry[f"{method}_rmse"] = b["rmse"]
                entry[f"{method}_vs_diffusers_best"] = b["rmse"] / d_best["rmse"]
        out[n] = entry
    return out


def markdown(doc: dict) -> str:
    nfes, s = doc["nfes"], doc["summary"]
    ref = doc["heldout"]["reference"]
    lines = [f"# Learned solvers on {doc['model']}" + (f" (w = {doc['w']:g})" if doc["w"] is not None else ""), "",
             f"Generated by `{doc['command']}` on {doc['date']}: {doc['machine']}, load average {doc['load_average']}, "
             f"{doc['wall_time_s']:.0f} s in all.", "",
             f"- Held-out: {doc['heldout']['samples']} noises (seed 0); reference: "
             f"{ref.get('method', ref.get('convergence', ''))} (own error {ref.get('error_estimate', 0):.2g}).",
             f"- Calibration: {doc['calibration']['samples']} noises (seed 1234), 25 % of them the validation split; "
             f"`tune_solver` defaults ({doc['calibration']['reference_steps']} reference steps).",
             "- RMSE of the final sample against the reference, held-out noises only; ratios are to diffusers' best "
             "scheduler at the same number of model calls. coeff / pas / auto: the best over the tuned solvers; "
             "auto is `tune_solver`'s default method (coeff and pas both fitted, the one with the lower validation "
             "error kept), read off the two fits.", "",
             "| NFE | diffusers default | diffusers best | best fixed fewstep | tuned grid | coeff | pas | auto (default) "
             "| auto / diffusers best | best learned | best learned / diffusers best |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
    for n in nfes:
        e = s[n] if n in s else s[str(n)]
        lines.append(f"| {n} | {fmt(e['diffusers_default_rmse'])} | {fmt(e['diffusers_best_rmse'])} ({e['diffusers_best']}) "
                     f"| {fmt(e.get('fixed_rmse'))} ({e.get('fixed')}) | {fmt(e.get('grid_rmse'))} | "
                     f"{fmt(e.get('coeff_rmse'))} | {fmt(e.get('pas_rmse'))} | {fmt(e.get('auto_rmse'))} | "
                     f"{e.get('auto_vs_diffusers_best', float('nan')):.3f} | {fmt(e.get('learned_rmse'))} "
                     f"({e.get('learned')}) | {e.get('learned_vs_diffusers_best', float('nan')):.3f} |")
    if all("flow_euler_best_rmse" in e for e in s.values()):
        lines += ["", "Against FlowMatchEuler (the flow pipelines' stock scheduler; target 0.25x): at the model's shift 3 "
                  "(diffusers default) and on its best shift:", "",
                  "| NFE | best learned / FlowMatchEuler shift 3 | best learned / FlowMatchEuler best shift |",
                  "|---|---|---|"]
        for n in nfes:
            e = s[n] if n in s else s[str(n)]
            lines.append(f"| {n} | {e.get('learned_vs_diffusers_default', float('nan')):.3f} | "
                         f"{e.get('learned_vs_flow_euler_best', float('nan')):.3f} |")
    if all(e.get("learned_median") is not None and e.get("diffusers_best_median") is not None for e in s.values()):
        n_samples = doc["heldout"]["samples"]
        lines += ["", f"The per-sample view behind the RMSE: the median held-out sample's RMSE, and how many of the "
                  f"{n_samples} samples end more than {FAR} RMS from the reference (in another mode: one such sample "
                  f"alone makes an RMSE of at least {FAR}/sqrt({n_samples}) = {FAR / n_samples ** 0.5:.3f}):", "",
                  "| NFE | diffusers best: median sample | far samples | best learned: median sample | far samples "
                  "| median / diffusers best's |", "|---|---|---|---|---|---|"]
        for n in nfes:
            e = s[n] if n in s else s[str(n)]
            lines.append(f"| {n} | {fmt(e['diffusers_best_median'])} | {e['diffusers_best_far']} | "
                         f"{fmt(e['learned_median'])} | {e['learned_far']} | "
                         f"{e['learned_median'] / e['diffusers_best_median']:.3f} |")
    if any("handpicked_rmse" in e for e in s.values()):
        lines += ["", "Tuned grid with `tune_solver`'s defaults against the flow benchmark's hand-picked `tune_grid` "
                  "settings (its pipeline grids as starts, free end, 1024 reference steps):", "",
                  "| NFE | tune_solver method grid (defaults) | hand-picked tune_grid |", "|---|---|---|"]
        for n in nfes:
            e = s[n] if n in s else s[str(n)]
            lines.append(f"| {n} | {fmt(e.get('grid_rmse'))} | {fmt(e.get('handpicked_rmse'))} |")
    if doc["fits"]:
        lines += ["", "Fitting cost (beyond the shared reference solve of the calibration noises) and errors:", "",
                  "| solver | method | NFE | model calls | seconds | fitting RMSE | validation RMSE | held-out RMSE | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for f in doc["fits"]:
        note = "fell back to the grid" if f["fell_back_to_grid"] else ""
        lines.append(f"| {f['solver']} | {f['method']} | {f['nfe']} | {f['model_calls']} | {f['seconds']:.0f} | "
                     f"{f['fitting_rmse']:.3e} | {f['validation_rmse']:.3e} | {f['heldout_rmse']:.3e} | {note} |")
    if doc["fits"]:
        f = doc["fits"][0]
        lines += ["", f"The calibration reference solve: {f['reference_model_calls']} model calls, "
                  f"{f['reference_seconds']:.0f} s (once per model, shared by every fit)."]
    lines += ["", "Every row:", "", "| impl | row | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|" + "---|" * len(nfes)]
    keys = list(dict.fromkeys((r["impl"], r["row"]) for r in doc["rows"]))
    for k in keys:
        vals = {r["nfe"]: r["rmse"] for r in doc["rows"] if (r["impl"], r["row"]) == k}
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(fmt(vals.get(n)) for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gmm-mnist", choices=["gmm-mnist", "flow-mixture", "mnist-teacher"])
    ap.add_argument("--w", type=float, default=1.0, help="guidance weight (gmm-mnist)")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--solvers", default="dpmpp_2m,unipc_bh2_2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--ref-steps", type=int, default=64, help="held-out reference RK4 steps (x2 internally; gmm-mnist)")
    ap.add_argument("--tune-ref-steps", type=int, default=128, help="tune_solver's reference_steps (its default)")
    ap.add_argument("--no-handpicked", dest="handpicked", action="store_false")
    ap.add_argument("--quick", action="store_true", help="NFE 5, 8; dpmpp_2m only")
    ap.add_argument("--shipped", default=None, metavar="DIR",
                    help="score the tuned solvers in DIR (<solver>-nfe<K>-w<w>.json, e.g. a model's grids/ folder) "
                         "on the held-out noises instead of fitting new ones")
    ap.add_argument("--times", default="auto", choices=["auto", "tuned", "fixed"],
                    help="tune_solver's times (default auto: both fits, tuned times kept only where they validate "
                         "better by more than one standard error)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.partial.json (written as it goes)")
    ap.add_argument("--cache", default="/tmp/fewstep-learned-cache", help="held-out references are cached here")
    args = ap.parse_args(argv)
    if args.quick:
        args.nfe, args.solvers = "5,8", "dpmpp_2m"
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.solvers, args.methods = args.solvers.split(","), args.methods.split(",")
    out = ROOT / "benchmarks" / "results" / f"learned_{args.model}{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = run(args, out)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
