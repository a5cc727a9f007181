"""``FewstepScheduler``: fewstep's one-call-per-step solvers behind diffusers' scheduler interface.

A thin stateful adapter: it keeps the grid, the step index and the solver's state,
and every update is the solver's own step function from ``fewstep.solvers``.
"""
from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..denoisers import dynamic_threshold, to_x0
from ..sampling import solver_grid
from ..schedules import DiscreteVP, SPACINGS, betas_by_name
from ..solvers import SOLVERS, get_solver
from ..solvers._common import grid_points

__all__ = ["FewstepScheduler", "PREDICTION_TYPES", "STEPPABLE"]

# diffusers' prediction_type -> fewstep's
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
STEPPABLE = tuple(n for n, s in SOLVERS.items() if s.step is not None)


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Any fewstep solver that needs one model call per step, as a diffusers scheduler.

    Steppable solvers: ddim, ddpm, dpm_solver_2m/3m, dpmpp_2m/3m, sde_dpmpp_2m/3m and
    unipc_bh{1,2}_{1,2,3}. Singlestep, Heun and adaptive solvers need the whole loop:
    run them with ``fewstep.diffusers.sample(pipe, solver=...)``.

    Keep a pipeline's schedule with
    ``FewstepScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m", spacing="logsnr")``.
    spacing: ``logsnr``, ``time_uniform``, ``time_quadratic``, ``karras`` or ``linspace``
    (diffusers' default integer timesteps). final: ``zero`` (last step denoises to
    clean data) or ``tmin``. Timesteps are the model's (possibly fractional) inputs.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 solver: str = "dpmpp_2m", spacing: str = "logsnr", final: str = "zero",
                 lower_order_final: bool = True, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 solver_options: dict | None = None):
        if solver not in STEPPABLE:
            spec = get_solver(solver)  # raises for unknown names, with suggestions
            raise ValueError(f"solver {solver!r} ({spec.kind}) cannot run one model call per step inside a "
                             f"diffusers pipeline; use fewstep.diffusers.sample(pipe, solver={solver!r}) or one of "
                             f"{', '.join(STEPPABLE)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported by FewstepScheduler; "
                             f"supported: {', '.join(PREDICTION_TYPES)}")
        if spacing not in SPACINGS + ("linspace",):
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS + ('linspace',))}")
        if final not in ("zero", "tmin"):
            raise ValueError(f"final must be 'zero' or 'tmin', got {final!r}")
        betas = (torch.as_tensor(trained_betas, dtype=torch.float64) if trained_betas is not None
                 else betas_by_name(beta_schedule, num_train_timesteps, beta_start, beta_end))
        self.schedule = DiscreteVP(betas=betas)
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        spec = get_solver(solver)
        options = dict(solver_options or {})
        if "lower_order_final" in inspect.signature(spec.step).parameters:  # first-order steps have none
            options.setdefault("lower_order_final", lower_order_final)
        self._step_fn = spec.stepper(**options)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self._points = None
        self._step_index = None
        self._begin_index = None
        self._state = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' ``from_config``, but keeps values the source left at its own defaults
        (diffusers drops them, which would swap e.g. an LCM pipeline's betas for ours)."""
        if config is not None:
            config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
            if config.get("rescale_betas_zero_snr"):
                raise ValueError("rescale_betas_zero_snr=True is not supported by FewstepScheduler: its final "
                                 "alpha is 0 (infinite noise), which has no finite log-SNR")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """Build the grid from a step count, explicit model timesteps, or diffusers sigmas."""
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        sch, n_train = self.schedule, self.config.num_train_timesteps
        if timesteps is not None:
            t = (torch.as_tensor(timesteps, dtype=torch.float64).flatten() + 1.0) / n_train
            grid = torch.cat([t, self._final_point(t)])
        elif sigmas is not None:
            sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if (sig < 0).any():
                raise ValueError("sigmas must be >= 0")
            pos = sch.t_of_edm_sigma(sig[sig > 0])
            if (pos <= sch.t_max * (1 + 1e-6)).all():  # float32 sigmas overshoot t_max by round-off
                pos = pos.clamp(max=sch.t_max)
            grid = torch.cat([pos, torch.zeros(1, dtype=torch.float64)]) if (sig == 0).any() else \
                torch.cat([pos, self._final_point(pos)])
        elif self.config.spacing == "linspace":
            n = self._check_steps(num_inference_steps)
            ts = torch.linspace(0, n_train - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
            if n >= n_train:  # rounding would repeat timesteps: use fractional ones instead
                ts = torch.linspace(n_train - 1, 0, n, dtype=torch.float64)
            t = (ts + 1.0) / n_train
            grid = torch.cat([t, self._final_point(t)])
        else:
            n = self._check_steps(num_inference_steps)
            grid, extra = solver_grid(sch, self.config.solver, n, self.config.spacing, self.config.final)
        self._points = grid_points(sch, sch.check_times(grid, "timesteps"))
        if len(self._points) < 2 or any(b.t >= a.t for a, b in zip(self._points, self._points[1:])):
            raise ValueError("timesteps must be strictly decreasing with no repeats")
        self.grid = grid
        self.timesteps = sch.model_timestep(grid[:-1]).float().to(device)
        self.num_inference_steps = len(self.timesteps)
        self._step_index, self._state = None, None

    def _final_point(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.final == "zero":
            return torch.zeros(1, dtype=torch.float64)
        return torch.tensor([self.schedule.t_min], dtype=torch.float64) if t[-1] > self.schedule.t_min \
            else torch.zeros(1, dtype=torch.float64)

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
        return sample  # VP: the model sees x_t as is

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        """One solver step. Extra keyword arguments of other schedulers' ``step`` (eta,
        use_clipped_model_output, ...) are accepted and ignored."""
        if self._points is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._points) - 1:
            raise ValueError("all steps are done; call set_timesteps again to sample anew")
        x0 = self._x0(model_output, sample, self._points[i])
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
        x0 = to_x0(PREDICTION_TYPES[self.config.prediction_type], out, sample, a, s)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at the (integer or fractional) model timesteps."""
        t = (torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu() + 1.0) / self.config.num_train_timesteps
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alpha(t).reshape(shape).to(original_samples.device)
        s = self.schedule.sigma(t).reshape(shape).to(original_samples.device)
        return (a * original_samples.double() + s * noise.double()).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
