"""Learned solvers: a one-call-per-step base solver whose every step is corrected by a few coefficients
fitted to one model (``fewstep.tune.tune_solver``). Two methods, both exact no-ops at zero coefficients:

``pas``    PCA-based adaptive search (Wang et al. 2024, arXiv 2411.06503): the step's direction is
           corrected inside a small per-sample basis of the trajectory's own past directions,
               D' = D + ||D|| sum_j c_j u_j,
           u_1 = D / ||D||, u_2.. the top principal directions of {x_T, D_0, ..., D_i} (unit-normalised,
           uncentred) orthogonalised against u_1 and each other, each flipped to point along x_s - x_T
           (along x_T at the first step) so that one set of coefficients means the same for every
           sample. The paper writes d' = sum_j c_j u_j in EDM's variables with c_1 starting at the mean
           ||d||; here D is the step's effective data prediction (below) and the coefficients are relative
           to each sample's ||D||, so zero coefficients are the base solver exactly. ``basis`` (k) numbers
           per step.
``coeff``  one scale per step on the base solver's high-order correction (in the spirit of DC-Solver,
           arXiv 2409.03755, and S4S, arXiv 2502.17423, which learn the multistep combination):
               x_t = x_t^base + c_i (x_t^base - x_t^DDIM),
           x_t^DDIM the first-order step from the same point with the same model output. One number per step.

The effective data prediction of a step s -> t is read off the base update in the exponential-integrator
frame x_t = (sigma_t / sigma_s) x_s + (alpha_t - sigma_t alpha_s / sigma_s) D (DPM-Solver++, arXiv
2211.01095, eq. 9 with D constant; DDIM's D is the model's x0_hat), so a correction of D by delta moves
x_t by (alpha_t - sigma_t alpha_s / sigma_s) delta. Every family (VP eps / v, flow, EDM) is this frame:
the corrections never branch on the prediction type.

UniPC's corrector recomputes the current point from the previous one; a correction added to a step's
output is carried into that state, so the next corrected point moves by the same amount. A step from pure
noise (alpha = 0, flow matching's t = 1) is DDIM's, and the base solver starts afresh at the next point,
as in ``FewstepScheduler``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from ._common import Point, SamplerOutput, run_steps
from .baseline import ddim_step

__all__ = ["LEARNED_METHODS", "learned_step", "learned_stepper", "pas_basis", "step_direction",
           "zero_coefficients", "check_coefficients"]

LEARNED_METHODS = ("pas", "coeff")


def zero_coefficients(method: str, steps: int, basis: int = 4) -> list:
    """The coefficients at which a learned solver is its base solver: per step, ``basis`` zeros (pas) or one."""
    return [[0.0] * (basis if method == "pas" else 1) for _ in range(steps)]


def check_coefficients(method: str, coefficients, steps: int, basis: int) -> list:
    """One list of floats per step: ``basis`` of them for pas, one for coeff."""
    if method not in LEARNED_METHODS:
        raise ValueError(f"learned method must be one of {', '.join(LEARNED_METHODS)}, got {method!r}")
    width = basis if method == "pas" else 1
    rows = [list(map(float, c)) for c in coefficients]
    if len(rows) != steps or any(len(c) != width for c in rows):
        raise ValueError(f"{method} needs {steps} rows of {width} coefficients (one row per step), got "
                         f"{[len(c) for c in rows]}")
    return rows


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).to(torch.float64)


def step_direction(x_start: torch.Tensor, x_next: torch.Tensor, s: Point, t: Point) -> tuple[torch.Tensor, float]:
    """(D, m): the step's effective data prediction (flattened per sample) and the factor m that carries a
    change of D to x_t, from x_t = (sigma_t / sigma_s) x_s + m D, m = alpha_t - sigma_t alpha_s / sigma_s."""
    m = t.alpha - t.sigma * s.alpha / s.sigma
    return (_flat(x_next) - (t.sigma / s.sigma) * _flat(x_start)) / m, m


def pas_basis(d: torch.Tensor, history: Sequence[torch.Tensor], ref: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, n) orthonormal rows per sample (zero rows where the history has too few directions):
    u_1 = d / ||d||, then the top principal directions of the unit-normalised ``history`` + [d]
    (uncentred PCA through the small Gram matrix), Gram-Schmidt against the earlier rows, signs along ``ref``."""
    d, ref = _flat(d), _flat(ref)
    vecs = torch.stack([_flat(v) for v in list(history) + [d]], 1)  # (B, m, n)
    vecs = vecs / vecs.norm(dim=2, keepdim=True).clamp_min(1e-30)
    gram = vecs @ vecs.transpose(1, 2)  # (B, m, m)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = evals.flip(1).clamp_min(0.0)
    comps = (evecs.flip(2).transpose(1, 2) @ vecs) / order.sqrt().clamp_min(1e-30)[..., None]  # (B, m, n)
    rows = [d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)]
    for j in range(comps.shape[1]):
        if len(rows) == k:
            break
        v = comps[:, j] * (order[:, j:j + 1] > 1e-10 * order[:, :1])
        for u in rows:
            v = v - (v * u).sum(1, keepdim=True) * u
        norm = v.norm(dim=1, keepdim=True)
        keep = norm > 1e-6  # a direction already in the span adds nothing
        v = torch.where(keep, v / norm.clamp_min(1e-30), torch.zeros_like(v))
        if bool(keep.any()):
            rows.append(torch.where((v * ref).sum(1, keepdim=True) < 0, -v, v))
    rows += [torch.zeros_like(d)] * (k - len(rows))
    return torch.stack(rows[:k], 1)


def _start_point(x: torch.Tensor, base_state) -> torch.Tensor:
    """The point the base step really started from: UniPC's corrected x (kept in its state), else x."""
    if isinstance(base_state, tuple) and len(base_state) == 3 and isinstance(base_state[1], torch.Tensor):
        return base_state[1]
    return x


def _carry(base_state, delta: torch.Tensor, s: Point, t: Point):
    """Shift UniPC's stored point so its next corrector output moves by ``delta`` too (its update is
    linear in that point with weight sigma_t / sigma_s, UniPC Alg. 2 in data prediction)."""
    if isinstance(base_state, tuple) and len(base_state) == 3 and isinstance(base_state[1], torch.Tensor):
        hist, x_prev, k = base_state
        return hist, x_prev + (delta * (s.sigma / t.sigma)).to(x_prev.dtype), k
    return base_state


def learned_step(x, x0, i, pts, state, generator=None, *, base: Callable, method: str, coefficients: list,
                 basis: int = 4, fit: Callable | None = None):
    """One step of the base solver, then its learned correction (module docstring).

    ``state`` = (base solver's state, PAS history: x_T then each step's corrected D). ``coefficients[j]`` is
    step j's row, aligned from the grid's end, so a scheduler that starts part-way (img2img) uses the
    right rows. ``fit(i, parts) -> row`` replaces the stored row (the fitter uses it; parts holds the
    base output, the correction directions and their weight)."""
    base_state, history = state if state is not None else (None, [x])
    s, t = pts[i], pts[i + 1]
    if s.alpha == 0.0:  # pure noise (lambda = -inf): DDIM's step, the limit of every solver's first step; the
        x_next, base_state = ddim_step(x, x0, i, pts)[0], None  # base solver's history starts at the next point
    else:
        x_next, base_state = base(x, x0, i, pts, base_state, generator)
    j = i + len(coefficients) - (len(pts) - 1)
    if j < 0:
        raise ValueError(f"the learned solver has {len(coefficients)} rows of coefficients for a grid of "
                         f"{len(pts) - 1} steps; use the grid it was fitted on")
    start = _start_point(x, base_state)
    d, m = step_direction(start, x_next, s, t) if method == "pas" else (None, None)
    row = coefficients[j]
    if fit is not None or any(row):
        if method == "pas":
            ref = history[0] if len(history) == 1 else start - history[0]
            dirs = pas_basis(d, history[1:] + [history[0]], ref, basis) * d.norm(dim=1)[:, None, None]
            weight = m
        else:
            ddim, _ = ddim_step(start, x0, i, pts)
            dirs, weight = _flat(x_next - ddim)[:, None, :], 1.0
        if fit is not None:
            row = fit(i, {"x_next": x_next, "dirs": dirs, "weight": weight})
        if any(row):
            delta = weight * torch.einsum("bkn,k->bn", dirs, torch.tensor(row, dtype=dirs.dtype))
            delta = delta.reshape(x_next.shape)
            x_next = x_next + delta.to(x_next.dtype)
            if method == "pas":
                d = d + _flat(delta) / m
            base_state = _carry(base_state, delta, s, t) if t.sigma > 0 else base_state
    if method == "pas":
        history = history + [d]
    return x_next, (base_state, history)


def learned_stepper(base: Callable, method: str, coefficients, *, basis: int = 4,
                    fit: Callable | None = None) -> Callable:
    """A step function ``(x, x0_hat, i, points, state, generator) -> (x_next, state)`` (the contract of
    ``run_steps`` and ``FewstepScheduler``) of the learned solver over the ``base`` step function."""
    rows = check_coefficients(method, coefficients, len(coefficients), basis)
    return partial(learned_step, base=base, method=method, coefficients=rows, basis=basis, fit=fit)


def learned_sample(denoiser: Callable, x: torch.Tensor, grid, schedule, *, base: Callable, method: str,
                   coefficients, basis: int = 4, cond: dict | None = None, generator=None, callback=None,
                   progress: bool = False, fit: Callable | None = None, desc: str = "learned") -> SamplerOutput:
    """Sample with a learned solver on ``grid`` (one model call per step; ``coefficients``: one row per step)."""
    n = torch.as_tensor(grid).numel() - 1
    rows = check_coefficients(method, coefficients, n, basis)
    step = partial(learned_step, base=base, method=method, coefficients=rows, basis=basis, fit=fit)
    return run_steps(step, None, denoiser, x, grid, schedule, cond=cond, generator=generator, callback=callback,
                     progress=progress, desc=desc)
