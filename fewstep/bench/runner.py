"""Running one configuration: fewstep on its grids, diffusers' own loop, diffusers' grids in fewstep
time, and the reference ODE solution they are judged against."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..sampling import expected_nfe, sample, solver_grid
from ..reference import rmse  # the one distance every row is judged by (re-exported)
from ..schedules import time_grid
from ..solvers import SOLVERS
from .models import BenchModel

__all__ = ["disk_cached", "DIFFUSERS_GRIDS", "diffusers_grid", "fewstep_sample", "diffusers_sample", "reference", "rmse",
           "fewstep_steps", "diffusers_steps", "tuned_grid"]

# fewstep solver -> the diffusers grids it also runs on: (spacing name, scheduler, scheduler kwargs)
DIFFUSERS_GRIDS = {
    "dpmpp_2m": (("diffusers_default", "DPMSolverMultistepScheduler", {}),
                 ("diffusers_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
                 ("diffusers_lu_lambdas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True})),
    "unipc_bh2_2": (("diffusers_default", "UniPCMultistepScheduler", {}),),
    "ddim": (("diffusers_default", "DDIMScheduler", {"clip_sample": False}),),
}
QUICK_DIFFUSERS_GRIDS = {"dpmpp_2m": DIFFUSERS_GRIDS["dpmpp_2m"][:1], "unipc_bh2_2": DIFFUSERS_GRIDS["unipc_bh2_2"],
                         "ddim": DIFFUSERS_GRIDS["ddim"]}



def _scheduler(bm: BenchModel, name: str, extra: dict):
    import diffusers
    return getattr(diffusers, name)(**bm.scheduler_kwargs, **extra)


def diffusers_grid(bm: BenchModel, name: str, extra: dict, steps: int) -> torch.Tensor:
    """A diffusers scheduler's grid in fewstep time, ending in 0: (timestep + 1) / N, or from
    its sigmas when they are not the sigmas of its integer timesteps (Karras, Lu lambdas)."""
    s = _scheduler(bm, name, extra)
    s.set_timesteps(steps)
    if extra.get("use_karras_sigmas") or extra.get("use_lu_lambdas"):
        sig = s.sigmas.to(torch.float64)
        t = bm.schedule.t_of_edm_sigma(sig[sig > 0]).clamp(bm.schedule.t_min, bm.schedule.t_max)
    else:
        t = (s.timesteps.to(torch.float64) + 1.0) / bm.schedule.N
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def fewstep_steps(solver: str, nfe: int) -> int:
    # heun spends 2 * steps - 1 calls on a grid ending in 0: the most steps within the budget
    return max(1, (nfe + 1) // 2) if SOLVERS[solver].kind == "heun" else nfe


def fewstep_sample(bm: BenchModel, x_T: torch.Tensor, solver: str, spacing: str, nfe: int,
                   cond: dict, uncond: dict | None, **options):
    """Run a fewstep solver with a budget of ``nfe`` calls; returns (x0, model calls counted)."""
    steps = fewstep_steps(solver, nfe)
    extra = {}
    if spacing.startswith("diffusers_"):
        _, name, kw = next(g for g in DIFFUSERS_GRIDS[solver] if g[0] == spacing)
        grid = diffusers_grid(bm, name, kw, steps)
    elif spacing == "tuned":
        grid = tuned_grid(bm, solver, nfe)
    elif spacing.startswith("adaptive"):
        grid = time_grid(bm.schedule, 2, "logsnr")  # adaptive: the grid only fixes t_max, t_min, then 0
    else:
        grid, extra = solver_grid(bm.schedule, solver, steps, spacing)
    out = sample(bm.denoiser(uncond), x_T, bm.schedule, solver=solver, grid=grid, cond=cond, **extra, **options)
    want = expected_nfe(solver, grid, extra)
    if want is not None and out.nfe != want:
        raise RuntimeError(f"{solver} on {spacing} spent {out.nfe} model calls, expected {want}")
    return out.x, out.nfe


def tuned_grid(bm: BenchModel, solver: str, nfe: int) -> torch.Tensor | None:
    """The model's shipped tuned grid for (solver, nfe, w) on the bench's view of its schedule (the
    same noising, so its points map exactly by log-SNR); None when there is none."""
    import warnings

    from ..grids import find_grid
    if bm.grids is None:
        return None
    try:
        tuned = find_grid(bm.grids, solver, nfe, bm.w)
    except ValueError:
        return None
    with warnings.catch_warnings():  # the bench's discrete view is another parametrization, by construction
        warnings.simplefilter("ignore")
        return tuned.grid_for(bm.schedule, solver=solver)


def diffusers_steps(name: str, nfe: int) -> int:
    # HeunDiscreteScheduler calls the model 2 * steps - 1 times (counted below, not assumed)
    return max(1, (nfe + 1) // 2) if name == "HeunDiscreteScheduler" else nfe


def diffusers_sample(bm: BenchModel, x_T: torch.Tensor, name: str, extra: dict, nfe: int,
                     cond: dict, uncond: dict | None):
    """diffusers' own loop on the same model; returns (x0, model calls counted)."""
    s = _scheduler(bm, name, extra)
    s.set_timesteps(diffusers_steps(name, nfe))
    model_output = bm.guided_output(cond, uncond)
    x, calls = x_T * s.init_noise_sigma, 0
    with torch.no_grad():
        for t in s.timesteps:
            out = model_output(s.scale_model_input(x, t), t)
            calls += 1
            x = s.step(out, t, x).prev_sample
    return x, calls


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------

def reference(bm: BenchModel, x_T: torch.Tensor, cond: dict, uncond: dict | None, steps: int):
    """The reference x0 (float64) and its JSON record, with its own convergence: classic RK4 in
    log-SNR with 2 * steps and with steps steps (``fewstep.tune.reference_trajectory``, the same
    solve as ``fewstep.reference``, which also reports the RMSE of the difference)."""
    from ..tune import reference_trajectory
    start = time.perf_counter()
    traj = reference_trajectory(bm.denoiser(uncond), bm.schedule, x_T.to(torch.float64), cond, steps=2 * steps,
                                candidates=1)
    max_diff, rms_diff = traj.error["max_abs"], traj.error["rmse"]
    x_ref = traj.final.to(torch.float64)
    info = {"method": "classic RK4 uniform in lambda on y = x / sigma, float64 state (fewstep.tune.reference_trajectory)",
            "t_from": bm.schedule.t_max, "t_to": 0.0,
            "end": f"ODE to t_min = {bm.schedule.t_min:g}, then one denoising step (the limit of grids ending in 0)",
            "steps": 2 * steps, "model_calls": traj.model_calls,
            "max_abs_diff_vs_half_steps": max_diff, "rmse_diff_vs_half_steps": rms_diff,
            # its own error, RMSE like the rows: not assumed to be 1/15 of the difference (the asymptotic RK4
            # factor), since a learned model's ODE may not be in the asymptotic range at these steps
            "error_estimate": rms_diff, "unranked_below": 10.0 * rms_diff,
            "convergence": f"RMSE |x({2 * steps} steps) - x({steps} steps)| = {rms_diff:.3g} (max {max_diff:.3g}); "
                           "taken as the reference's own error (in the asymptotic range it is ~1/15 of that)",
            "samples": x_T.shape[0], "rms_of_reference": float(x_ref.pow(2).mean().sqrt()),
            "seconds": round(time.perf_counter() - start, 1)}
    return x_ref, info


def disk_cached(path, make):
    """``make()``, saved to ``path`` (torch.save) the first time and loaded from there after: an interrupted
    benchmark does not solve its reference again."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value
