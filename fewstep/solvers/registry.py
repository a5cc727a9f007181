"""The public solver names and how each spends its budget of model calls (NFE)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .adaptive import dpm_adaptive
from .baseline import ddim, ddim_step, euler, heun
from .dpm_solver import check_multistep_options, dpm_multistep, dpm_multistep_step, dpm_singlestep
from .unipc import check_unipc_options, unipc, unipc_step

__all__ = ["SolverSpec", "SOLVERS", "get_solver"]


@dataclass(frozen=True)
class SolverSpec:
    """A named sampler.

    kind: ``multistep`` (one call per step; ``steps`` = NFE = grid intervals),
    ``singlestep`` (``steps`` = NFE budget, split into per-step orders like
    DPM-Solver-fast), ``heun`` (``steps`` = grid intervals, NFE = 2 steps - 1 when
    ending at 0), ``adaptive`` (``steps`` only sets the grid's ends; NFE is chosen by
    the error control). ``stochastic`` samplers draw fresh noise every step.
    """
    name: str
    fn: Callable
    kind: str
    order: int
    stochastic: bool = False
    invertible: bool = False
    options: dict = field(default_factory=dict)
    summary: str = ""
    step: Callable | None = None
    check: Callable | None = None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **{**self.options, **kwargs})

    def stepper(self, **options) -> Callable:
        """The per-step update with this solver's options bound (validated)."""
        if self.step is None:
            raise ValueError(f"solver {self.name!r} ({self.kind}) needs the whole sampling loop and cannot run "
                             "one model call at a time; use fewstep.sample or fewstep.diffusers.sample instead")
        opts = {**self.options, **options}
        if self.check is not None:
            self.check(**opts)
        return partial(self.step, **opts)


def _specs():
    yield SolverSpec("ddim", ddim, "multistep", 1, invertible=True, summary="DDIM (eta = 0), first order",
                     step=ddim_step)
    yield SolverSpec("ddpm", partial(ddim, eta=1.0), "multistep", 1, stochastic=True,
                     summary="DDPM ancestral sampling (DDIM with eta = 1)", step=partial(ddim_step, eta=1.0))
    yield SolverSpec("euler", euler, "multistep", 1, summary="Euler in EDM variables (equals DDIM)")
    yield SolverSpec("heun", heun, "heun", 2, summary="Heun, EDM Alg. 1 (deterministic)")
    for o in (1, 2, 3):
        yield SolverSpec(f"dpm_solver_{o}", partial(dpm_singlestep, data=False), "singlestep", o,
                         options={"order": o}, summary=f"singlestep DPM-Solver-{o} (noise prediction)")
    yield SolverSpec("dpm_solver_fast", partial(dpm_singlestep, data=False), "singlestep", 3, options={"order": 3},
                     summary="DPM-Solver-fast: order-3 steps with a 2/1 tail to hit the NFE budget")
    for o in (2, 3):
        yield SolverSpec(f"dpmpp_{o}s", partial(dpm_singlestep, data=True), "singlestep", o, options={"order": o},
                         summary=f"singlestep DPM-Solver++({o}S)")
        yield SolverSpec(f"dpm_solver_{o}m", dpm_multistep, "multistep", o, invertible=True,
                         options={"order": o, "data": False}, summary=f"multistep DPM-Solver (noise), order {o}",
                         step=dpm_multistep_step, check=check_multistep_options)
        yield SolverSpec(f"dpmpp_{o}m", dpm_multistep, "multistep", o, invertible=True,
                         options={"order": o, "data": True}, summary=f"multistep DPM-Solver++({o}M)",
                         step=dpm_multistep_step, check=check_multistep_options)
        yield SolverSpec(f"sde_dpmpp_{o}m", dpm_multistep, "multistep", o, stochastic=True,
                         options={"order": o, "data": True, "sde": True}, summary=f"SDE-DPM-Solver++({o}M)",
                         step=dpm_multistep_step, check=check_multistep_options)
    yield SolverSpec("dpm_solver_12", dpm_adaptive, "adaptive", 2, options={"order": 2},
                     summary="adaptive DPM-Solver-12 (rtol/atol)")
    yield SolverSpec("dpm_solver_23", dpm_adaptive, "adaptive", 3, options={"order": 3},
                     summary="adaptive DPM-Solver-23 (rtol/atol)")
    for v in ("bh1", "bh2"):
        for o in (1, 2, 3):
            yield SolverSpec(f"unipc_{v}_{o}", unipc, "multistep", o + 1,
                             options={"order": o, "variant": v}, summary=f"UniPC-{o} ({v}), order {o + 1}",
                             step=unipc_step, check=check_unipc_options)


SOLVERS: dict[str, SolverSpec] = {s.name: s for s in _specs()}


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        close = difflib.get_close_matches(str(name), SOLVERS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown solver {name!r}{hint}; known solvers: {', '.join(SOLVERS)}")
    return SOLVERS[name]
