"""``FewstepScheduler``: fewstep's one-call-per-step solvers behind diffusers' scheduler interface.

A thin stateful adapter: it keeps the grid, the step index and the solver's state,
and every update is the solver's own step function from ``fewstep.solvers``. What the
source config describes (flow matching, discrete VP, EDM) is read in ``families``.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..denoisers import dynamic_threshold
from ..sampling import DEFAULT_SOLVER, solver_grid
from ..schedules import SPACINGS
from ..solvers import SOLVERS, get_solver
from ..solvers._common import grid_points
from ..solvers.baseline import ddim_step
from ..solvers.learned import learned_stepper
from .families import FAMILY_CLASSES, _col, family_of, log_unused, source_class, translate_config

__all__ = ["FewstepScheduler", "STEPPABLE"]


def _as_tuned(grid):
    from ..grids import TunedGrid, load_grid
    if isinstance(grid, TunedGrid):
        return grid
    return TunedGrid.from_dict(dict(grid)) if isinstance(grid, dict) else load_grid(grid)

STEPPABLE = tuple(n for n, s in SOLVERS.items() if s.step is not None)
SCHEDULER_SPACINGS = SPACINGS + ("linspace", "source", "shifted_uniform")


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Any fewstep solver that needs one model call per step, as a diffusers scheduler.

    Steppable solvers: ddim, ddpm, dpm_solver_2m/3m, dpmpp_2m/3m, sde_dpmpp_2m/3m and
    unipc_bh{1,2}_{1,2,3}. Singlestep, Heun and adaptive solvers need the whole loop:
    run them with ``fewstep.diffusers.sample(pipe, solver=...)``.

    Keep a pipeline's model with
    ``FewstepScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m", spacing="logsnr")``:
    the source config's family is honoured or refused (``fewstep.diffusers.families``):

    * flow matching (``family="flow"``: FlowMatchEuler/Heun configs, DPM-Solver/UniPC/DEIS with
      ``use_flow_sigmas``): x_t = (1 - sigma) x0 + sigma noise, v-prediction, timesteps
      sigma * num_train_timesteps (floats); static ``shift`` or dynamic shifting with ``mu``.
    * discrete VP (``family="vp"``): betas, prediction type, ``rescale_betas_zero_snr``,
      ``snr_shift_scale``.
    * EDM (``family="edm"``): sigma_min/max, sigma_data, rho; the model input is scaled by c_in.

    ``scheduler.family`` is the family object (``fewstep.diffusers.families``) that maps times to
    model timesteps, scales the model input and turns its output into x0, for the scheduler and
    the model adapters alike.

    spacing: ``logsnr``, ``time_uniform``, ``time_quadratic``, ``karras`` (fewstep's grids, between
    the model's lowest and highest finite-SNR training noise levels; flow: after the shift), or
    ``source``: the source scheduler's own timesteps (its ``timestep_spacing`` / shift / Karras
    sigmas). ``linspace`` is diffusers' default integer VP timesteps (``source`` for flow and EDM).
    ``shifted_uniform`` (flow only): uniform in the unshifted time, then shifted, as diffusers'
    DPM-Solver / UniPC flow mode; the best grid for flow models in `fewstep bench solvers --model flow-mixture`.
    fewstep's default is ``logsnr`` because its solvers are exponential integrators in log-SNR;
    the source's spacing was chosen for its own sampler. A model whose top noise level is pure
    noise (flow matching at sigma = 1, zero-terminal-SNR VP) starts every grid there; the step
    from it is DDIM's (the exact limit of every solver's first step), and the solver's history
    starts at the next point, which is an infinite log-SNR away. final: ``zero`` (last step
    denoises to clean data) or ``tmin``. Timesteps are the model's (possibly fractional) inputs.
    grid: a tuned grid (``fewstep.grids.TunedGrid``, its dict or a JSON path; VP and flow configs, flow
    without dynamic shifting): then ``set_timesteps(n)`` uses its times (n must be its NFE; a flow grid
    starts from pure noise, sigma = 1); it warns if fitted to another schedule or solver. Without
    ``solver`` the grid's own solver is used. A learned solver (``fewstep.tune.tune_solver``) also applies
    its per-step coefficients in ``step`` and keeps its fitted first point (also on flow configs), so the
    loop equals ``fewstep.sample(..., grid=tuned)`` on the same noise.
    ``set_timesteps(sigmas=tuned.sigmas)`` gives any VP scheduler the same points.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 solver: str | None = None, spacing: str = "logsnr", final: str = "zero",
                 lower_order_final: bool = True, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 solver_options: dict | None = None, family: str = "vp", source_grid: str | None = None,
                 rescale_betas_zero_snr: bool = False, snr_shift_scale: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0,
                 sigma_schedule: str = "karras", grid=None):
        tuned = _as_tuned(grid) if grid is not None else None
        if solver is None:  # a tuned grid's own solver, else fewstep's default
            solver = tuned.solver if tuned is not None else DEFAULT_SOLVER
            self.register_to_config(solver=solver)
        if solver not in STEPPABLE:
            spec = get_solver(solver)  # raises for unknown names, with suggestions
            raise ValueError(f"solver {solver!r} ({spec.kind}) cannot run one model call per step inside a "
                             f"diffusers pipeline; use fewstep.diffusers.sample(pipe, solver={solver!r}) or one of "
                             f"{', '.join(STEPPABLE)}")
        self.family = family_of(self.config)  # raises for an unknown family or prediction type
        if spacing not in SCHEDULER_SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SCHEDULER_SPACINGS)}")
        if final not in ("zero", "tmin"):
            raise ValueError(f"final must be 'zero' or 'tmin', got {final!r}")
        if spacing == "shifted_uniform" and spacing not in self.family.spacings:
            raise ValueError("spacing='shifted_uniform' is the flow-matching grid; this config is "
                             f"{family}: use logsnr, time_uniform, time_quadratic, karras, linspace or source")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if spacing == "source" and source_grid and source_grid.startswith("unsupported:"):
            raise ValueError(f"spacing='source' cannot follow the source's {source_grid.split(':', 1)[1]}=True "
                             "grid; choose one of fewstep's spacings (e.g. 'karras')")
        self.schedule = self.family.schedule
        if grid is not None:  # a tuned grid (TunedGrid, its dict or a JSON path), kept in the config as a dict
            if not self.family.tuned_grids:
                raise ValueError(f"a tuned grid is supported for the VP and flow-matching families, not {family}")
            if use_dynamic_shifting and family == "flow":
                raise ValueError("a tuned grid fixes the sigmas, but this flow config has use_dynamic_shifting=True "
                                 "(its shift follows the image size): tune at one size with use_dynamic_shifting "
                                 "off, or leave grid out")
            self._tuned = tuned
            self.register_to_config(grid=self._tuned.to_dict())
            self._tuned.grid_for(self.schedule, solver=solver)  # warns now if fitted elsewhere
        if hasattr(self.schedule, "alphas_cumprod"):  # VP: read by some diffusers pipelines
            self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        spec = get_solver(solver)
        learned = tuned.learned if tuned is not None else {}
        options = {**learned.get("options", {}), **(solver_options or {})}
        if "lower_order_final" in inspect.signature(spec.step).parameters:  # first-order steps have none
            options.setdefault("lower_order_final", lower_order_final)
        self._step_fn = spec.stepper(**options)
        if learned:  # a learned solver: the same step function with its per-step corrections
            self._step_fn = learned_stepper(self._step_fn, learned["method"], learned["coefficients"],
                                            basis=int(learned.get("basis", 4)))
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self.grid = None
        self._points = None
        self._step_index = None
        self._begin_index = None
        self._state = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' ``from_config``, reading the source config's family (flow matching, VP,
        EDM) key by key: keys about the model are honoured or refused with an error naming them,
        keys about the source's own sampler are listed once in a debug message. Unlike diffusers,
        values the source left at its own defaults are kept (diffusers drops them, which would swap
        e.g. an LCM pipeline's betas for ours)."""
        if config is not None:
            ours, unused = translate_config(config)
            name = source_class(config)
            log_unused(name, unused)
            config = ours
            if "spacing" not in kwargs and "spacing" not in dict(config):
                # flow: measured (benchmarks/results/flow_solvers.md), on shifted flow models the log-SNR grid
                # gains nothing over FlowMatchEuler; the shifted uniform-in-sigma grid is what helps
                kwargs["spacing"] = FAMILY_CLASSES[config.get("family") or "vp"].default_spacing
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def init_noise_sigma(self) -> float:
        """Std of the pipeline's initial noise: 1 for VP and flow; EDM: sqrt(sigma_max^2 + 1), as
        diffusers' EDM schedulers."""
        return self.family.init_noise_sigma(self._points[0].sigma if self._points else None)

    # -- timesteps --------------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``timesteps[begin_index]`` (image-to-image pipelines)."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu: float | None = None):
        """Build the grid from a step count, explicit model timesteps, or diffusers sigmas.

        VP: ``timesteps`` are model timesteps, ``sigmas`` EDM sigmas sqrt((1 - abar) / abar).
        Flow: ``timesteps`` are sigma * num_train_timesteps (used as given, not shifted);
        ``sigmas`` are *unshifted* sigmas, shifted by the config's shift or by ``mu`` as
        FlowMatchEulerDiscreteScheduler does. Flux-style pipelines always pass
        ``sigmas=linspace(1, 1/n, n)``, that scheduler's own default: unless spacing is
        ``source`` those are read as the step count n and fewstep's spacing is used. ``mu``:
        dynamic shifting's log-shift (required when the config has ``use_dynamic_shifting``).
        EDM: ``timesteps`` are c_noise = log(sigma) / 4, ``sigmas`` are sigmas.
        """
        fam = self.family
        if sigmas is not None and self.config.spacing not in ("source", "linspace"):
            n = fam.stock_steps(sigmas)  # flow: the pipeline's stock grid means n steps of fewstep's spacing
            if n is not None and num_inference_steps in (None, n):
                num_inference_steps, sigmas = n, None
        if sigmas is not None and num_inference_steps is not None:
            if len(torch.as_tensor(sigmas).flatten()) != num_inference_steps:
                raise ValueError("sigmas must have num_inference_steps entries")
            num_inference_steps = None
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        fam.check_mu(mu)
        grid = self._grid(num_inference_steps, timesteps, sigmas, mu)
        sch = self.schedule
        self._points = grid_points(sch, sch.check_times(grid, "timesteps"))
        if len(self._points) < 2 or any(b.t >= a.t for a, b in zip(self._points, self._points[1:])):
            raise ValueError("timesteps must be strictly decreasing with no repeats")
        self.grid = grid
        self.timesteps = fam.timestep(grid[:-1]).float().to(device)
        # diffusers' sigmas (n + 1 of them): flow sigma, EDM sigma, or VP's sigma / alpha
        self.sigmas = fam.diffusers_sigmas(grid).float()
        self.num_inference_steps = len(self.timesteps)
        self._step_index, self._state = None, None

    def _grid(self, n, timesteps, sigmas, mu) -> torch.Tensor:
        """The grid of times (with its final point) for one of set_timesteps' three ways."""
        fam, spacing = self.family, self.config.spacing
        if timesteps is not None:
            t = fam.time(timesteps)
        elif sigmas is not None:
            t, ends_at_zero = fam.grid_from_sigmas(sigmas, mu)
            if ends_at_zero:
                return t
        elif self.config.grid is not None:
            t = self._tuned_times(n)
            if fam.starts_from_pure_noise and not self.config.grid.get("learned"):
                # (a learned solver keeps its fitted first point, pure noise on flow models, as fewstep.sample)
                t = t.clone()
                t[0] = self.schedule.t_upper  # run from pure noise, as the pipeline's latents are drawn
            return t
        elif spacing in fam.spacings:
            t = fam.source_times(spacing, self._check_steps(n), mu)
        else:
            return self._fewstep_grid(n, **fam.grid_ends(mu))
        return torch.cat([t, self._final_point(t)])

    def _fewstep_grid(self, n: int, **ends) -> torch.Tensor:
        """fewstep's spacing between the model's finite-SNR ends; a pure-noise top (alpha = 0) is
        the grid's first point instead of the top finite one (the first step starts from it)."""
        n = self._check_steps(n)
        grid, _ = solver_grid(self.schedule, self.config.solver, n, self.config.spacing, self.config.final,
                              rho=self.config.rho, **ends)
        if self.schedule.t_upper > self.schedule.t_max:
            grid = grid.clone()
            grid[0] = self.schedule.t_upper
        return grid

    def _final_point(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.final == "zero":
            return torch.zeros(1, dtype=torch.float64)
        return torch.tensor([self.schedule.t_min], dtype=torch.float64) if t[-1] > self.schedule.t_min \
            else torch.zeros(1, dtype=torch.float64)

    def _tuned_times(self, n) -> torch.Tensor:
        """The tuned grid's times (mapped by log-SNR if it was fitted on another schedule)."""
        tuned = _as_tuned(self.config.grid)
        if n != tuned.nfe:
            raise ValueError(f"this scheduler's tuned grid spends {tuned.nfe} model calls; call the pipeline "
                             f"with num_inference_steps={tuned.nfe} (got {n})")
        with warnings.catch_warnings():  # already warned at construction
            warnings.simplefilter("ignore")
            return tuned.grid_for(self.schedule, solver=self.config.solver)

    @staticmethod
    def _check_steps(n) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        return n

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._start = self._begin_index
            return
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()[0].to(self.timesteps.device)
        hits = torch.nonzero((self.timesteps - t).abs() < 1e-3)
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t)} is not one of this scheduler's timesteps; call set_timesteps "
                             "and step with the values from scheduler.timesteps")
        self._step_index = self._start = int(hits[0])

    # -- the diffusers contract ---------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """VP and flow: the model sees x_t as is. EDM: x_t * c_in, c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        (Karras et al. 2022, Table 1), at the current step's sigma."""
        if not self.family.scales_model_input:  # the identity: no step needed
            return sample
        if self._points is None:
            raise ValueError("call set_timesteps before scale_model_input")
        if self._step_index is None:
            self._init_step_index(timestep)
        return self.family.scale_model_input(sample, self._points[self._step_index].sigma)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        """One solver step. Extra keyword arguments of other schedulers' ``step`` (eta,
        use_clipped_model_output, s_churn, ...) are accepted and ignored."""
        if self._points is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._points) - 1:
            raise ValueError("all steps are done; call set_timesteps again to sample anew")
        p = self._points[i]
        x0 = self._x0(model_output, sample, p)
        learned = bool(self.config.grid and self.config.grid.get("learned"))
        if p.alpha == 0.0 and not learned:  # (a learned solver's step function takes this step itself)
            # pure noise (lambda = -inf): DDIM's step is the limit of every solver's first step; a point an
            # infinite log-SNR away adds nothing to a multistep history, so the solver starts at i + 1
            prev, _ = ddim_step(sample.to(x0.dtype), x0, i, self._points)
            self._start, self._state = i + 1, None
        else:
            b = self._start  # img2img: the solver sees the grid from its starting point on
            prev, self._state = self._step_fn(sample, x0, i - b, self._points[b:], self._state, generator)
        self._step_index = i + 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _x0(self, out: torch.Tensor, sample: torch.Tensor, p) -> torch.Tensor:
        if out.shape != sample.shape:
            if out.ndim == sample.ndim and out.shape[1] == 2 * sample.shape[1]:
                out = out[:, : sample.shape[1]]  # learned variance: keep the mean half
            else:
                raise ValueError(f"model output shape {tuple(out.shape)} does not fit the sample "
                                 f"{tuple(sample.shape)}")
        a = torch.full((sample.shape[0],), p.alpha, dtype=torch.float64, device=sample.device)
        s = torch.full((sample.shape[0],), p.sigma, dtype=torch.float64, device=sample.device)
        x0 = self.family.x0(out, sample, a, s)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at the (integer or fractional) model timesteps
        (flow: sigma = timestep / num_train_timesteps; EDM: sigma = exp(4 timestep))."""
        a, s = self.family.alpha_sigma(timesteps)
        a, s = _col(a, original_samples), _col(s, original_samples)
        return (a * original_samples.double() + s * noise.double()).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow matching's img2img noising, as FlowMatchEulerDiscreteScheduler.scale_noise:
        sigma noise + (1 - sigma) sample at the model timestep(s), sigma = timestep / num_train_timesteps."""
        if not self.family.scale_noise:
            raise ValueError("scale_noise is the flow-matching noising; use add_noise for VP and EDM models")
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
