"""Solver overhead with the model excluded: each solver's own time per model call on a trivial
cached model, fewstep's whole sampler against diffusers' ``step()`` alone."""
from __future__ import annotations

import statistics
import time

import torch

from ..denoisers import ModelDenoiser
from ..sampling import solver_grid
from ..schedules import DiscreteVP
from ..solvers import SOLVERS
from .runner import diffusers_steps, fewstep_steps

__all__ = ["OVERHEAD_PAIRS", "QUICK_OVERHEAD_PAIRS", "measure_overhead", "adapter_overhead"]

# overhead: fewstep solver vs the diffusers scheduler running the same algorithm (None: no counterpart)
OVERHEAD_PAIRS = (("dpmpp_2m", "DPMSolverMultistepScheduler"), ("dpmpp_2s", "DPMSolverSinglestepScheduler"),
                  ("unipc_bh2_2", "UniPCMultistepScheduler"), ("ddim", "DDIMScheduler"),
                  ("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler"),
                  ("dpmpp_3m", None), ("unipc_bh2_3", None), (None, "DEISMultistepScheduler"))
QUICK_OVERHEAD_PAIRS = OVERHEAD_PAIRS[:1] + OVERHEAD_PAIRS[2:4]
OVERHEAD_SCHEDULER_KW = {"DDIMScheduler": {"clip_sample": False}}


def _fewstep_overhead(solver: str, schedule, x_T, x0, steps: int):
    spec = SOLVERS[solver]
    grid, opts = solver_grid(schedule, solver, fewstep_steps(solver, steps), "logsnr")

    def once():
        start = time.perf_counter()
        out = spec(lambda x, t, **c: x0, x_T, grid, schedule, **opts)
        return (time.perf_counter() - start) / out.nfe
    return once


def _diffusers_overhead(name: str, kw: dict, x_T, eps, steps: int):
    import diffusers
    s = getattr(diffusers, name)(**kw, **OVERHEAD_SCHEDULER_KW.get(name, {}))

    def once():
        s.set_timesteps(diffusers_steps(name, steps))
        x, spent = x_T.clone(), 0.0
        for t in s.timesteps:
            s.scale_model_input(x, t)  # not timed (step() alone is); Euler/Heun expect the call
            start = time.perf_counter()
            x = s.step(eps, t, x).prev_sample
            spent += time.perf_counter() - start
        return spent / len(s.timesteps)
    return once


def measure_overhead(pairs=OVERHEAD_PAIRS, shape=(8, 4, 64, 64), steps: int = 20, repeats: int = 7,
                     seed: int = 0) -> dict:
    """Median microseconds per model call of each solver with a trivial cached model.

    fewstep: the whole sampler (validation, grid points, updates, the NFE counter's
    finiteness check) on a denoiser that returns a cached x0. diffusers: ``step()`` alone
    with a cached eps. Repeats alternate between the two sides so machine noise hits both.
    Returns {("fewstep", solver) | ("diffusers", scheduler): microseconds}.
    """
    g = torch.Generator().manual_seed(seed)
    x_T, x0, eps = (torch.randn(shape, generator=g) for _ in range(3))
    schedule = DiscreteVP.from_name("linear")
    kw = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon"}
    timers = {}
    for solver, name in pairs:
        if solver is not None and ("fewstep", solver) not in timers:
            timers[("fewstep", solver)] = _fewstep_overhead(solver, schedule, x_T, x0, steps)
        if name is not None and ("diffusers", name) not in timers:
            timers[("diffusers", name)] = _diffusers_overhead(name, kw, x_T, eps, steps)
    times = {k: [] for k in timers}
    for f in timers.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in timers.items():
            times[k].append(f())
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def adapter_overhead(shape=(8, 4, 64, 64), steps: int = 20, repeats: int = 7, seed: int = 0) -> float:
    """dpmpp_2m's time per call through the eps adapter (ModelDenoiser on a cached eps
    model): the path a user of an eps model takes; reported next to the bare number."""
    g = torch.Generator().manual_seed(seed)
    x_T, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    schedule = DiscreteVP.from_name("linear")
    den = ModelDenoiser(lambda x, t: eps, schedule, "eps", time_input="discrete")
    grid, _ = solver_grid(schedule, "dpmpp_2m", steps, "logsnr")
    spec, times = SOLVERS["dpmpp_2m"], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = spec(den, x_T, grid, schedule)
        times.append((time.perf_counter() - start) / out.nfe)
    return 1e6 * statistics.median(times[1:])
