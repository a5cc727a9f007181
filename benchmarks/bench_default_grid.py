"""Scan of default-grid rules (issue 20): which log-SNR grid of K calls ending in 0 never loses to diffusers'
default DPMSolverMultistepScheduler on the exact benchmark models.

    python benchmarks/bench_default_grid.py                      # the table in BENCHMARKS.md (unipc_bh2_3)
    python benchmarks/bench_default_grid.py --rules chosen,top30_h1 --solvers unipc_bh2_3,dpmpp_2m --out ""
    python benchmarks/bench_default_grid.py --ends --models gmm-cosine --samples 256   # first/last real point map
    python benchmarks/bench_default_grid.py --flow --solvers unipc_bh2_3,dpmpp_2m,dpmpp_3m,unipc_bh2_2  # flow defaults

Each rule maps (schedule, K) to K + 1 times (t_max, K - 1 real points, 0). The RMSE of the solver on that
grid is divided by the RMSE of diffusers' default scheduler on the same noise (both against the RK4
reference of ``fewstep.bench.runner.reference``); the table prints the ratio by model and NFE, the
worst ratio over NFE 4-20 and the ratio at NFE 10 (targets: <= 1 everywhere, <= 0.5 at 10).
Samples: 64 on gmm-mnist, 1024 on the two narrow-mode models (their RMSE counts the few samples sent to
another mode: at 256 samples the cosine model's ratio at 20 calls read 0.12x for a rule that reads 1.27x at
1024). The reference and diffusers' errors are cached under ``--cache``. Writes
``benchmarks/results/default_grid.{json,md}``. The flow-matching model is not scanned: its
FewstepScheduler default is the shifted-uniform flow grid, not a log-SNR grid (``bench solvers
--model flow-mixture`` measures it).
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

from fewstep.bench.models import load_bench_model
from fewstep.bench.runner import diffusers_sample, reference, rmse
from fewstep.sampling import sample
from fewstep.schedules import time_grid

NFES = (4, 5, 6, 8, 10, 15, 20)
SAMPLES = {"gmm-mnist": 64, "gmm-sd-v": 1024, "gmm-cosine": 1024}  # the full bench's counts
F64 = torch.float64


def loglinear(schedule, K: int, lam_top: float, h_max: float | None, lam_end: float | None = None) -> torch.Tensor:
    """t_max, then K - 1 points uniform in lambda: lam_top + h k (k = 1..K-1) with h = (lam_end - lam_top) / K
    (lam_end: the schedule's t_min unless given) capped at h_max; then 0."""
    lam_lo = float(schedule.lambda_(torch.tensor(schedule.t_min, dtype=F64))) if lam_end is None else lam_end
    h = (lam_lo - lam_top) / K
    h = h if h_max is None else min(h, h_max)
    lam = lam_top + h * torch.arange(1, K, dtype=F64)
    t = schedule.t_of_lambda(lam) if K > 1 else torch.zeros(0, dtype=F64)
    return torch.cat([torch.tensor([schedule.t_max], dtype=F64), t, torch.zeros(1, dtype=F64)])


def lam_max_of(schedule) -> float:
    return float(schedule.lambda_(torch.tensor(schedule.t_max, dtype=F64)))


def capped(top: float, h_max: float | None):
    """Uniform part starting no higher than EDM sigma ``top`` (the pre-scan rule: top 30, h_max 1)."""
    return lambda s, K: loglinear(s, K, max(lam_max_of(s), -math.log(top)), h_max)


def schedule_top(h_max: float | None, frac: float = 1.0):
    """The first real point where the schedule's own uniform-time grid of K steps puts it (diffusers'
    linspace: t = t_max (K - frac) / K), then uniform in lambda towards t_min (0 replacing it), h <= h_max."""
    def rule(s, K):
        if K == 1:
            return torch.tensor([s.t_max, 0.0], dtype=F64)
        t1 = torch.tensor(s.t_max * (K - frac) / K, dtype=F64)
        lam1 = float(s.lambda_(t1))
        lam_lo = float(s.lambda_(torch.tensor(s.t_min, dtype=F64)))
        h = (lam_lo - lam1) / (K - 1)
        h = h if h_max is None else min(h, h_max)
        lam = lam1 + h * torch.arange(0, K - 1, dtype=F64)
        return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_lambda(lam), torch.zeros(1, dtype=F64)])
    return rule


def blend(w: float, spacing: str = "time_uniform"):
    """Geometric blend of two default grids ending in 0: sigma_k = sigma_k(spacing)^(1 - w) sigma_k(logsnr)^w
    (w = 0: ``spacing``, w = 1: the log-SNR default)."""
    def rule(s, K):
        g0, g1 = time_grid(s, K, spacing), time_grid(s, K)
        lam = (1 - w) * s.lambda_(g0[1:-1]) + w * s.lambda_(g1[1:-1])
        return torch.cat([g0[:1], s.t_of_lambda(lam), g0[-1:]])
    return rule


def _lam(s, t) -> float:
    return float(s.lambda_(torch.as_tensor(t, dtype=F64)))


def end_rule(top: float, end: str, h_max: float | None = None):
    """Uniform in lambda from a virtual top at EDM sigma ``top`` (its point replaced by t_max) to the last real
    point b, K intervals in all. b: ``tu`` = where the schedule's uniform-time grid of K steps ends
    (t = t_min + (t_max - t_min) / K, diffusers' last real point); ``cur`` = where steps of at most 1 in lambda
    from the top stop (as the pre-scan rule); ``min`` the
    lower of the two; ``gm`` their geometric mean."""
    def rule(s, K):
        if K == 1:
            return torch.tensor([s.t_max, 0.0], dtype=F64)
        lam_top = max(_lam(s, s.t_max), -math.log(top))
        b_tu = _lam(s, s.t_min + (s.t_max - s.t_min) / K)
        lam_lo = _lam(s, s.t_min)
        b_cur = lam_top + (K - 1) * min((lam_lo - lam_top) / K, 1.0)  # steps of at most 1 from the top
        lam_b = {"tu": b_tu, "cur": b_cur, "min": max(b_tu, b_cur), "gm": 0.5 * (b_tu + b_cur),
                 "min_gm": max(b_tu, 0.5 * (b_tu + b_cur))}[end]
        h = (lam_b - lam_top) / (K - 1)
        if h_max is not None and h > h_max:
            h = h_max
        lam = lam_top + h * torch.arange(1, K, dtype=F64)
        return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_lambda(lam), torch.zeros(1, dtype=F64)])
    return rule


def karras_rule(top: float, rho: float):
    """Karras et al. (2022, eq. 5) spacing, sigma^(1/rho) uniform, from a virtual top at EDM sigma ``top`` (its point
    replaced by t_max) to the chosen rule's last real point (the lower of: steps of at most 1 in lambda from the
    top, the schedule's uniform-time grid's end); K intervals in all."""
    def rule(s, K):
        if K == 1:
            return torch.tensor([s.t_max, 0.0], dtype=F64)
        chosen = time_grid(s, K)
        sig_top = min(top, float(s.edm_sigma(torch.tensor(s.t_max, dtype=F64))))
        sig_b = float(s.edm_sigma(chosen[-2]))
        u = torch.arange(1, K, dtype=F64) / (K - 1)
        sig = (sig_top ** (1 / rho) + u * (sig_b ** (1 / rho) - sig_top ** (1 / rho))) ** rho
        return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_edm_sigma(sig), torch.zeros(1, dtype=F64)])
    return rule


def power_rule(top: float, p: float):
    """lambda = lam_top + (lam_b - lam_top) u^p, u = k / (K - 1): the chosen rule's ends (virtual top at EDM sigma
    ``top``, its point replaced by t_max), p < 1 denser towards the end, p > 1 towards the top."""
    def rule(s, K):
        if K == 1:
            return torch.tensor([s.t_max, 0.0], dtype=F64)
        chosen = time_grid(s, K)
        lam_top = max(_lam(s, s.t_max), -math.log(top))
        lam_b = _lam(s, chosen[-2])
        u = torch.arange(1, K, dtype=F64) / (K - 1)
        lam = lam_top + (lam_b - lam_top) * u ** p
        return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_lambda(lam), torch.zeros(1, dtype=F64)])
    return rule


def angle_rule(top: float, end: float):
    """Uniform in the angle theta = arctan(EDM sigma) from ``top`` to ``end`` (the spacing of a uniform-time grid
    under the cosine schedule, Nichol & Dhariwal 2021, whatever the model's own schedule: densest in log-sigma
    at sigma = 1), t_max first, K - 1 real points, then 0. Probes where a model's samples choose their mode."""
    def rule(s, K):
        if K == 1:
            return torch.tensor([s.t_max, 0.0], dtype=F64)
        top_s = min(top, float(s.edm_sigma(torch.tensor(s.t_max, dtype=F64))) / 1.5)
        th = torch.linspace(math.atan(top_s), math.atan(end), K - 1, dtype=F64)
        sig = torch.tan(th)
        return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_edm_sigma(sig), torch.zeros(1, dtype=F64)])
    return rule


RULES = {
    "angle5_0.06": angle_rule(5.0, 0.06),
    "angle8_0.06": angle_rule(8.0, 0.06),
    "angle20_0.1": angle_rule(20.0, 0.1),
    "top20_p0.7": power_rule(20.0, 0.7),
    "top20_p0.85": power_rule(20.0, 0.85),
    "top20_p1.2": power_rule(20.0, 1.2),
    "top30_p0.7": power_rule(30.0, 0.7),
    "top30_p0.85": power_rule(30.0, 0.85),
    "top50_p0.7": power_rule(50.0, 0.7),
    "top20_rho3": karras_rule(20.0, 3.0),
    "top20_rho7": karras_rule(20.0, 7.0),
    "top30_rho7": karras_rule(30.0, 7.0),
    "top50_rho7": karras_rule(50.0, 7.0),
    "top30_tu": end_rule(30.0, "tu"),
    "top30_min": end_rule(30.0, "min"),
    "top30_gm": end_rule(30.0, "gm"),
    "top25_min": end_rule(25.0, "min"),
    "top20_min": end_rule(20.0, "min"),
    "top15_min": end_rule(15.0, "min"),
    "top10_min": end_rule(10.0, "min"),
    "top30_min_gm": end_rule(30.0, "min_gm"),
    "top20_min_gm": end_rule(20.0, "min_gm"),
    "top15_min_gm": end_rule(15.0, "min_gm"),
    "blend0.25": blend(0.25),
    "blend0.5": blend(0.5),
    "blend0.75": blend(0.75),
    "chosen": lambda s, K: time_grid(s, K),  # fewstep's default now (= top20_min)
    "time_uniform": lambda s, K: time_grid(s, K, "time_uniform"),
    "karras": lambda s, K: time_grid(s, K, "karras"),
    "sched_top_h1": schedule_top(1.0),
    "sched_top_h0.8": schedule_top(0.8),
    "sched_top_h1.2": schedule_top(1.2),
    "sched_top_none": schedule_top(None),
    "top30_h1": capped(30.0, 1.0),  # the rule before this scan
    "top10_h1": capped(10.0, 1.0),
    "top20_h1": capped(20.0, 1.0),
    "top30_h0.8": capped(30.0, 0.8),
    "top10_h0.8": capped(10.0, 0.8),
}


def _load(name: str, samples: int, cache: Path):
    """Model, noise, conditioning, reference and diffusers' default errors; cached on disk."""
    bm = load_bench_model(name)
    n = samples or SAMPLES[name]
    path = cache / f"{name}_{n}.pt"
    x_T = torch.randn((n, *bm.shape), generator=torch.Generator().manual_seed(0))
    cond, uncond = bm.conditioning(n)
    if path.is_file():
        saved = torch.load(path)
        return bm, x_T, cond, uncond, saved["x_ref"], saved["diffusers"]
    x_ref, _ = reference(bm, x_T, cond, uncond, 64)
    theirs = {}
    for K in NFES:
        x, _ = diffusers_sample(bm, x_T, "DPMSolverMultistepScheduler", {}, K, cond, uncond)
        theirs[K] = rmse(x, x_ref)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"x_ref": x_ref, "diffusers": theirs}, path)
    return bm, x_T, cond, uncond, x_ref, theirs


def scan(models, rules, solvers, samples, cache, log=print) -> list[dict]:
    rows = []
    for name in models:
        bm, x_T, cond, uncond, x_ref, theirs = _load(name, samples, cache)
        den = bm.denoiser(uncond)
        for rule in rules:
            for solver in solvers:
                ratios = {}
                for K in NFES:
                    grid = RULES[rule](bm.schedule, K)
                    out = sample(den, x_T, bm.schedule, solver=solver, grid=grid, cond=cond)
                    assert out.nfe == K, (rule, K, out.nfe)
                    ratios[K] = rmse(out.x, x_ref) / theirs[K]
                rows.append({"model": name, "rule": rule, "solver": solver, "ratios": ratios,
                             "worst": max(ratios.values()), "at10": ratios[10]})
                log(f"{name:10s} {rule:14s} {solver:12s} " + " ".join(f"{ratios[K]:5.2f}" for K in NFES)
                    + f"  worst {rows[-1]['worst']:.2f}")
    return rows


def ends_grid(s, K: int, sigma_a: float, sigma_b: float) -> torch.Tensor:
    """t_max, then K - 1 points uniform in lambda from EDM sigma ``sigma_a`` down to ``sigma_b``, then 0."""
    sig = torch.exp(torch.linspace(math.log(sigma_a), math.log(sigma_b), K - 1, dtype=F64))
    return torch.cat([torch.tensor([s.t_max], dtype=F64), s.t_of_edm_sigma(sig), torch.zeros(1, dtype=F64)])


def scan_ends(models, solver, samples, cache, nfes=(4, 5, 6, 8, 10), tops=(2, 3, 5, 8, 12, 20, 30, 50),
              ends=(0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2), log=print) -> list[dict]:
    """Ratio to diffusers' default for the grid with first real point ``a`` and last real point ``b``."""
    rows = []
    for name in models:
        bm, x_T, cond, uncond, x_ref, theirs = _load(name, samples, cache)
        den = bm.denoiser(uncond)
        for K in nfes:
            for a in tops:
                line = []
                for b in ends:
                    if not b < a or a >= float(bm.schedule.edm_sigma(torch.tensor(bm.schedule.t_max, dtype=F64))):
                        line.append(None)
                        continue
                    out = sample(den, x_T, bm.schedule, solver=solver, grid=ends_grid(bm.schedule, K, a, b), cond=cond)
                    line.append(rmse(out.x, x_ref) / theirs[K])
                rows.append({"model": name, "nfe": K, "a": a, "ratios": dict(zip(ends, line))})
                log(f"{name:10s} K={K:2d} a={a:4g} " + " ".join("  -  " if v is None else f"{v:5.2f}" for v in line))
    return rows


def flow_defaults(solvers, samples: int = 64, log=print) -> list[dict]:
    """The flow-matching model of ``bench solvers --model flow-mixture`` without its grid tuning: FewstepScheduler
    with no spacing (the flow default, shifted-uniform) for each solver, against FlowMatchEulerDiscreteScheduler
    (SD3 / Flux's default), RMSE to the bench's reference (unipc_bh2_3, 1,000 steps)."""
    from fewstep.bench import flow
    from fewstep.diffusers import FewstepScheduler
    model = flow.FlowMixture(flow.mnist_mixture())
    x_T = torch.randn((samples, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    src = flow.diffusers_schedulers()[flow.FLOW_EULER]().config
    ref, _ = flow.run_scheduler(FewstepScheduler.from_config(src, solver="unipc_bh2_3"), model, x_T.clone(), 1000)
    theirs = {K: rmse(flow.run_scheduler(flow.diffusers_schedulers()[flow.FLOW_EULER](), model, x_T.clone(), K)[0], ref)
              for K in NFES}
    rows = []
    for solver in solvers:
        ratios = {}
        for K in NFES:
            x, _ = flow.run_scheduler(FewstepScheduler.from_config(src, solver=solver), model, x_T.clone(), K)
            ratios[K] = rmse(x, ref) / theirs[K]
        rows.append({"model": "flow-mixture", "rule": "FewstepScheduler default (shifted_uniform)", "solver": solver,
                     "ratios": ratios, "worst": max(ratios.values()), "at10": ratios[10]})
        log(f"flow-mixture {solver:12s} " + " ".join(f"{ratios[K]:5.2f}" for K in NFES))
    return rows


def markdown(rows) -> str:
    lines = ["| model | rule | solver | " + " | ".join(f"NFE {K}" for K in NFES) + " | worst | met |",
             "|---|---|---|" + "---|" * (len(NFES) + 2)]
    for r in rows:
        met = r["worst"] <= 1.0 and r["at10"] <= 0.5
        lines.append(f"| {r['model']} | {r['rule']} | {r['solver']} | "
                     + " | ".join(f"{r['ratios'][K]:.2f}" for K in NFES)
                     + f" | {r['worst']:.2f} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(SAMPLES))
    p.add_argument("--rules", default="top30_h1,top10_h1,time_uniform,top30_min,top25_min,top20_min,top15_min,chosen")
    p.add_argument("--solvers", default="unipc_bh2_3")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--cache", default="/tmp/fewstep_default_grid")
    p.add_argument("--out", default="benchmarks/results/default_grid")
    p.add_argument("--flow", action="store_true", help="the flow model's FewstepScheduler defaults instead")
    p.add_argument("--ends", action="store_true", help="scan the first and last real points instead of the rules")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    start = time.perf_counter()
    if a.flow:
        rows = flow_defaults(a.solvers.split(","), a.samples or 64)
        if a.out:
            Path(a.out + "_flow.json").write_text(json.dumps({"nfes": NFES, "rows": rows}, indent=1) + "\n")
            Path(a.out + "_flow.md").write_text(markdown(rows))
        print(f"{time.perf_counter() - start:.0f} s")
        return
    if a.ends:
        rows = scan_ends(a.models.split(","), a.solvers.split(",")[0], a.samples, Path(a.cache))
        if a.out:
            Path(a.out + "_ends.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        print(f"{time.perf_counter() - start:.0f} s")
        return
    rows = scan(a.models.split(","), a.rules.split(","), a.solvers.split(","), a.samples, Path(a.cache))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"nfes": NFES, "rows": rows, "seconds": time.perf_counter() - start}
        Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(a.out + ".md").write_text(markdown(rows))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
