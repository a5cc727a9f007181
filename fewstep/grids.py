"""Tuned time grids: a grid fitted to one model, solver and step budget, kept as a small JSON file.

A ``TunedGrid`` records the times it prescribes (in the fitted schedule's time, decreasing,
ending at 0 = a final denoising step), the same points as half log-SNR lambda (which is what
carries over to another parametrization of the same noising process), the solver and its NFE,
the schedule and model it was fitted to, and its calibration and held-out errors. Fit one with
``fewstep.tune.tune_grid`` (or ``fewstep tune``); use it with
``fewstep.sample(..., grid=load_grid(path))``, ``FewstepScheduler(..., grid=...)`` or, for a
shipped model, ``fewstep.generate(..., spacing="tuned")``.

A learned solver (``fewstep.tune.tune_solver``) is the same file with ``learned`` filled in: the method
(``pas`` or ``coeff``, ``fewstep.solvers.learned``), its coefficients (one row per step) and the PAS basis
size; it is written as format ``fewstep-grid/2`` so that a reader that cannot apply the coefficients
refuses it instead of sampling the times alone. ``fewstep.sample(..., grid=tuned)``,
``FewstepScheduler(grid=tuned)`` and ``fewstep sample --grid`` apply the coefficients.

Using a grid elsewhere than where it was fitted:
  * another solver, or a model / guidance weight other than the recorded one: a warning
    (``TunedGridWarning``); the grid is used as it is.
  * another schedule: a warning; the grid starts at that schedule's t_max and its other points
    keep their log-SNR; a grid with a point the schedule cannot reach is refused (``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .schedules import NoiseSchedule

__all__ = ["TunedGrid", "TunedGridWarning", "load_grid", "schedule_identity", "model_identity", "find_grid",
           "shipped_grids", "FORMAT", "LEARNED_FORMAT"]

FORMAT = "fewstep-grid/1"
LEARNED_FORMAT = "fewstep-grid/2"  # a grid with learned coefficients (``learned`` not empty)


class TunedGridWarning(UserWarning):
    """A tuned grid is used with a solver, schedule, model or guidance weight it was not fitted to."""


def schedule_identity(schedule: NoiseSchedule) -> dict:
    """The schedule's kind, a hash of its full config, its repr and its log-SNR range."""
    cfg = json.dumps(schedule.config(), sort_keys=True, default=float)
    ends = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    return {"kind": getattr(schedule, "kind", type(schedule).__name__), "repr": repr(schedule),
            "sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16],
            "lambda_range": [float(ends[0]), float(ends[1])]}


def model_identity(model, name: str | None = None) -> dict:
    """``{"name", "fingerprint"}`` of a model: a hash of its network's weights when it has one
    (a ``fewstep.load`` model or an ``nn.Module``), else only the name."""
    net = getattr(model, "net", model)
    ident = {"name": name or getattr(model, "source", None) or type(model).__name__}
    if isinstance(net, torch.nn.Module):
        h = hashlib.sha256()
        for key, value in sorted(net.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        ident["fingerprint"] = h.hexdigest()[:16]
    return ident


@dataclass
class TunedGrid:
    """A time grid fitted to (model, schedule, solver, NFE); see the module docstring."""
    solver: str
    nfe: int
    times: list  # decreasing, in the fitted schedule's time; the last is 0 (a final denoising step)
    lambdas: list  # half log-SNR of each time (None for t = 0)
    schedule: dict  # schedule_identity() of the schedule it was fitted on
    model: dict = field(default_factory=dict)  # model_identity() and what conditioned it (e.g. {"w": 1.0})
    calibration: dict = field(default_factory=dict)  # samples, seed, rmse, reference error, method, objective
    heldout: dict = field(default_factory=dict)  # rmse on held-out noise / labels, with its baselines
    cost: dict = field(default_factory=dict)  # model calls and seconds spent fitting
    format: str = FORMAT
    learned: dict = field(default_factory=dict)  # {"method", "coefficients", "basis"} of a learned solver, else {}

    def __post_init__(self):
        if self.learned:
            self.format = LEARNED_FORMAT

    # -- file --------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, doc: dict) -> "TunedGrid":
        if doc.get("format") not in (FORMAT, LEARNED_FORMAT):
            raise ValueError(f"not a fewstep tuned grid (format {doc.get('format')!r}, expected {FORMAT!r} or "
                             f"{LEARNED_FORMAT!r}); make one with `fewstep tune`")
        known = {f for f in cls.__dataclass_fields__}
        grid = cls(**{k: v for k, v in doc.items() if k in known})
        t = torch.tensor(grid.times, dtype=torch.float64)
        if t.numel() < 2 or not (t[1:] < t[:-1]).all() or len(grid.lambdas) != t.numel():
            raise ValueError("a tuned grid's times must be strictly decreasing, with one lambda per time")
        if grid.learned:
            _check_learned(grid.learned, t.numel() - 1)
        return grid

    # -- use ---------------------------------------------------------------
    @property
    def w(self) -> float | None:
        return self.model.get("w")

    @property
    def method(self) -> str:
        """``pas`` or ``coeff`` for a learned solver, ``grid`` for times alone."""
        return self.learned.get("method", "grid") if self.learned else "grid"

    def for_use(self, schedule: NoiseSchedule, *, solver: str | None = None, model=None,
                w: float | None = None) -> "TunedGrid":
        """A copy whose times are this grid's on ``schedule`` (``grid_for``, with its warnings), recorded as
        fitted there and for ``solver``, so passing it on (e.g. to ``fewstep.sample``) warns no more."""
        times = self.grid_for(schedule, solver=solver, model=model, w=w)
        return replace(self, times=times.tolist(), lambdas=lambdas_of(schedule, times),
                       schedule=schedule_identity(schedule), solver=solver or self.solver)

    @property
    def sigmas(self) -> list:
        """The points as diffusers' VP sigmas sqrt((1 - abar) / abar) = exp(-lambda) (0 last), for
        ``scheduler.set_timesteps(sigmas=...)``."""
        return [0.0 if v is None else math.exp(-v) for v in self.lambdas]

    def grid_for(self, schedule: NoiseSchedule, *, solver: str | None = None, model=None,
                 w: float | None = None) -> torch.Tensor:
        """The grid's times on ``schedule``, warning (``TunedGridWarning``) where ``solver``,
        ``model`` (a model or its ``model_identity`` dict) or ``w`` differ from the fitted ones;
        on another schedule the log-SNR values are mapped (refused when out of its range)."""
        if solver is not None and solver != self.solver:
            _warn(f"this grid was tuned for solver {self.solver!r}, not {solver!r}; its error is unknown there")
        if model is not None:
            self._check_model(model if isinstance(model, dict) else model_identity(model))
        if w is not None and self.w is not None and float(w) != float(self.w):
            _warn(f"this grid was tuned at guidance w = {self.w:g}, not w = {float(w):g}")
        mine = schedule_identity(schedule)
        if mine["sha256"] == self.schedule.get("sha256"):
            return torch.tensor(self.times, dtype=torch.float64)
        return self._mapped(schedule, mine)

    def _check_model(self, ident: dict) -> None:
        fp, name = self.model.get("fingerprint"), self.model.get("name")
        if fp and ident.get("fingerprint") and fp != ident["fingerprint"]:
            _warn(f"this grid was tuned for model {name!r} (weights {fp}); the model given has other weights "
                  f"({ident.get('name')!r}, {ident['fingerprint']}): its error there is unknown")
        elif not fp and name and ident.get("name") and name != ident["name"]:
            _warn(f"this grid was tuned for model {name!r}, not {ident['name']!r}")

    def _mapped(self, schedule: NoiseSchedule, mine: dict) -> torch.Tensor:
        """The first point is the start (where the noise is drawn): this schedule's t_max. The others
        keep their log-SNR; refused if this schedule cannot reach one of them."""
        lam = torch.tensor([v for v in self.lambdas[1:] if v is not None], dtype=torch.float64)
        lo, hi = mine["lambda_range"]
        span = max(abs(lo), abs(hi), 1.0) * 1e-6
        if lam.numel() and (float(lam.min()) < lo - span or float(lam.max()) > hi + span):
            raise ValueError(f"this grid was tuned on {self.schedule.get('repr')}; its log-SNR points "
                             f"[{float(lam.min()):.3f}, {float(lam.max()):.3f}] lie outside {mine['repr']}'s "
                             f"[{lo:.3f}, {hi:.3f}]: refit it with fewstep.tune.tune_grid on this schedule")
        _warn(f"this grid was tuned on {self.schedule.get('repr')}, not {mine['repr']}; its points are mapped "
              "by log-SNR (right only if both describe the same noising of the same model)")
        t = schedule.t_of_lambda(lam.clamp(lo, hi))
        tail = [0.0] if self.lambdas[-1] is None else []
        return torch.cat([torch.tensor([schedule.t_max], dtype=torch.float64), t,
                          torch.tensor(tail, dtype=torch.float64)])

    def __repr__(self) -> str:
        err = self.heldout.get("rmse", self.calibration.get("rmse"))
        kind = "" if not self.learned else f"{self.method}, "
        return (f"TunedGrid({kind}{self.solver}, NFE {self.nfe}, model {self.model.get('name')!r}, w={self.w}, "
                f"error {err if err is None else f'{err:.3g}'})")


def _check_learned(learned: dict, steps: int) -> None:
    """A learned solver's record: a known method and one row of coefficients per step (``basis`` wide for pas)."""
    method, rows = learned.get("method"), learned.get("coefficients")
    if method not in ("pas", "coeff"):
        raise ValueError(f"a learned solver's method must be 'pas' or 'coeff', got {method!r}; refit it with "
                         "fewstep.tune.tune_solver")
    width = int(learned.get("basis", 4)) if method == "pas" else 1
    if not isinstance(rows, list) or len(rows) != steps or any(len(r) != width for r in rows):
        raise ValueError(f"a {method} solver of {steps} steps needs {steps} rows of {width} coefficients; this file "
                         "has others: refit it with fewstep.tune.tune_solver")


def _warn(message: str) -> None:
    warnings.warn(message, TunedGridWarning, stacklevel=4)


def lambdas_of(schedule: NoiseSchedule, times: torch.Tensor) -> list:
    """Half log-SNR of each time, None for t = 0 (lambda = +inf)."""
    lam = schedule.lambda_(times.to(torch.float64))
    return [None if not math.isfinite(v) else float(v) for v in lam.tolist()]


def load_grid(path_or_name) -> TunedGrid:
    """A tuned grid from a JSON file written by ``TunedGrid.save`` / ``fewstep tune``."""
    path = Path(path_or_name)
    if not path.is_file():
        raise FileNotFoundError(f"no tuned grid file {str(path)!r}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    return TunedGrid.from_dict(doc)


def shipped_grids(folder) -> list[TunedGrid]:
    """Every tuned grid in ``<model folder>/grids/*.json``."""
    return [load_grid(p) for p in sorted(Path(folder).glob("grids/*.json"))]


def find_grid(folder, solver: str, nfe: int, w: float | None = None) -> TunedGrid:
    """The grid in ``<model folder>/grids/`` for (solver, nfe, w); a clear error listing what
    is there when none matches."""
    grids = shipped_grids(folder)
    for g in grids:
        if g.solver == solver and g.nfe == nfe and (w is None or g.w is None or float(g.w) == float(w)):
            return g
    have = ", ".join(f"{g.solver} NFE {g.nfe} w={g.w}" for g in grids) or "none"
    raise ValueError(f"no tuned grid for solver {solver!r}, {nfe} model calls, w = {w} in {Path(folder) / 'grids'} "
                     f"(tuned grids there: {have}); fit one with `fewstep tune`, or use spacing='logsnr' / 'karras'")
