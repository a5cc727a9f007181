"""FewstepScheduler: diffusers' scheduler contract, parity with diffusers' own schedulers inside
their pipelines, save/load round trips, and clear errors.

Offline: every model is a tiny random network built from a config (as diffusers' own tests
do). Where many steps are needed, a closed-form model stands in for the UNet: for Gaussian
data x0 ~ N(M, S^2) the exact noise prediction and the exact probability-flow ODE map are
known, so results are checked against numbers, not just for running.

Tolerances. float32 round-off is ~1e-7 relative per operation. With an epsilon-predicting
*random* UNet the noise prediction does not cancel x, so x0_hat = (x - sigma eps) / alpha
grows like 1 / alpha_T (~150 for linear betas) and samples reach |x| ~ 500: for those runs
differences are compared relative to the sample's size. For v / sample prediction values
stay O(1) and the issue's 1e-4 is absolute.
"""
from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch

from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline,  # noqa: E402
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, UNet2DConditionModel,
                       UniPCMultistepScheduler)
from diffusers.configuration_utils import ConfigMixin  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import fewstep  # noqa: E402
from fewstep.denoisers import ModelDenoiser  # noqa: E402
from fewstep.diffusers import DiffusersDenoiser, FewstepScheduler  # noqa: E402
from fewstep.diffusers import sample as pipeline_sample  # noqa: E402
from fewstep.diffusers.scheduler import STEPPABLE  # noqa: E402
from fewstep.schedules import SPACINGS  # noqa: E402
from fewstep.solvers import SOLVERS  # noqa: E402
from _tiny_models import tiny_unet

ALL_SPACINGS = SPACINGS + ("linspace",)
STOCHASTIC = {n for n in STEPPABLE if SOLVERS[n].stochastic}
EXPECTED_STEPPABLE = {"ddim", "ddpm", "dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m",
                      "sde_dpmpp_3m", "unipc_bh1_1", "unipc_bh1_2", "unipc_bh1_3", "unipc_bh2_1", "unipc_bh2_2",
                      "unipc_bh2_3"}


# ---------------------------------------------------------------------------
# Tiny models, noise and loops
# ---------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def cond_unet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, norm_num_groups=4,
            attention_head_dim=4).eval()


@torch.no_grad()
def run(scheduler, model, x, generator=None, **cond) -> torch.Tensor:
    """diffusers' denoising loop: one model call and one scheduler step per timestep."""
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t, **cond)
        out = getattr(out, "sample", out)
        extra = {} if generator is None else {"generator": generator}  # UniPC's step takes no generator
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def to_image(x: torch.Tensor) -> torch.Tensor:
    """The pipelines' post-processing: [-1, 1] -> [0, 1], clamped."""
    return (x / 2 + 0.5).clamp(0, 1)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |a|) (see the module docstring)."""
    return float((a.double() - b.double()).abs().max() / max(1.0, float(a.abs().max())))


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class GaussianData:
    """x0 ~ N(M, S^2) elementwise: the exact noise prediction and the exact ODE map.

    alpha at a (possibly fractional) model timestep k interpolates log alpha linearly
    between training steps, with alpha = 1 at k = -1 (DPM-Solver, arXiv 2206.00927, App. D:
    t = (k + 1) / N), written here with numpy, independently of fewstep's schedule code.
    """

    M, S = 0.3, 0.5

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.double().numpy()
        self.knots = np.arange(-1, len(ac), dtype=np.float64)
        self.log_alpha = np.concatenate([[0.0], 0.5 * np.log(ac)])

    def alpha(self, k) -> float:
        k = float(torch.as_tensor(k, dtype=torch.float64).flatten()[0])
        return float(np.exp(np.interp(k, self.knots, self.log_alpha)))

    def _radius(self, a: float) -> float:  # std of x_t: sqrt(alpha^2 S^2 + sigma^2)
        return math.sqrt(a * a * self.S ** 2 + 1.0 - a * a)

    def eps(self, x: torch.Tensor, k) -> torch.Tensor:
        """E[eps | x_t] = sigma (x - alpha M) / (alpha^2 S^2 + sigma^2)."""
        a = self.alpha(k)
        return ((x.double() - a * self.M) * math.sqrt(1 - a * a) / self._radius(a) ** 2).to(x.dtype)

    def denoise(self, x: torch.Tensor, k) -> torch.Tensor:
        """E[x0 | x_t] = M + alpha S^2 (x - alpha M) / (alpha^2 S^2 + sigma^2)."""
        a = self.alpha(k)
        return self.M + a * self.S ** 2 * (x.double() - a * self.M) / self._radius(a) ** 2

    def ode(self, x: torch.Tensor, k_from, k_to) -> torch.Tensor:
        """The probability-flow ODE keeps (x - alpha M) / std(x_t) constant."""
        a0, a1 = self.alpha(k_from), self.alpha(k_to)
        return a1 * self.M + self._radius(a1) * (x.double() - a0 * self.M) / self._radius(a0)


def gaussian_loop(fs: FewstepScheduler, data: GaussianData, x: torch.Tensor, generator=None) -> torch.Tensor:
    for t in fs.timesteps:
        x = fs.step(data.eps(x, t), t, x, generator=generator).prev_sample
    return x


# ---------------------------------------------------------------------------
# Parity with diffusers' schedulers on the same timesteps
# ---------------------------------------------------------------------------

REFERENCES = {  # name: (diffusers scheduler for a prediction type, fewstep solver)
    "DPMSolverMultistep": (lambda pt: DPMSolverMultistepScheduler(prediction_type=pt), "dpmpp_2m"),
    "UniPCMultistep": (lambda pt: UniPCMultistepScheduler(prediction_type=pt), "unipc_bh2_2"),
    "DDIM": (lambda pt: DDIMScheduler(prediction_type=pt, clip_sample=False), "ddim"),
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_equals_diffusers_scheduler_on_the_same_timesteps(unet, name, prediction_type):
    make, solver = REFERENCES[name]
    ref = make(prediction_type)
    ref.set_timesteps(10)
    fs = FewstepScheduler.from_config(ref.config, solver=solver)
    fs.set_timesteps(timesteps=ref.timesteps)
    assert torch.equal(fs.timesteps, ref.timesteps.float())
    x = randn((2, 3, 8, 8), 1)
    a, b = run(ref, unet, x), run(fs, unet, x)
    assert max_rel_diff(a, b) < 1e-5  # measured ~6e-7
    assert (to_image(a) - to_image(b)).abs().max() < 1e-4


EXTRA_REFERENCES = {  # name: (diffusers scheduler, FewstepScheduler keywords, stochastic)
    # diffusers weighs DPM-Solver++(3M)'s second difference like the official code ("legacy")
    "dpmpp_3m-legacy": (lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction", solver_order=3),
                        dict(solver="dpmpp_3m", solver_options={"third_order": "legacy"}), False),
    "dpm_solver_2m": (lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction", algorithm_type="dpmsolver",
                                                          final_sigmas_type="sigma_min"),
                      dict(solver="dpm_solver_2m", final="tmin"), False),
    "sde_dpmpp_2m": (lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction",
                                                         algorithm_type="sde-dpmsolver++"),
                     dict(solver="sde_dpmpp_2m"), True),
    "ddpm": (lambda: DDPMScheduler(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing"),
             dict(solver="ddpm"), True),
    "unipc_bh2_3": (lambda: UniPCMultistepScheduler(prediction_type="v_prediction", solver_order=3),
                    dict(solver="unipc_bh2_3"), False),
    # diffusers' UniPC-bh1 returns NaN on a final step to sigma = 0, so stop at t_min on both sides
    "unipc_bh1_2": (lambda: UniPCMultistepScheduler(prediction_type="v_prediction", solver_type="bh1",
                                                    final_sigmas_type="sigma_min"),
                    dict(solver="unipc_bh1_2", final="tmin"), False),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # algorithm_type="dpmsolver" is deprecated in diffusers
@pytest.mark.parametrize("name", list(EXTRA_REFERENCES))
def test_more_solvers_equal_their_diffusers_counterparts(unet, name):
    make, kw, stochastic = EXTRA_REFERENCES[name]
    ref = make()
    ref.set_timesteps(12)
    fs = FewstepScheduler.from_config(ref.config, **kw)
    fs.set_timesteps(timesteps=ref.timesteps)
    x = randn((2, 3, 8, 8), 1)
    a = run(ref, unet, x, generator=gen(5) if stochastic else None)
    b = run(fs, unet, x, generator=gen(5) if stochastic else None)  # same noise draws, step by step
    assert (a - b).abs().max() < 1e-4


# ---------------------------------------------------------------------------
# Inside diffusers' pipelines
# ---------------------------------------------------------------------------

def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def informative(images) -> float:
    """Fraction of pixels the [0, 1] clamp left alone (compared values carry information)."""
    images = torch.as_tensor(np.asarray(images))
    return float(((images > 0) & (images < 1)).float().mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddpm_pipeline_swap_equals_dpmsolver(unet, prediction_type):
    ref = DPMSolverMultistepScheduler(prediction_type=prediction_type)
    pipe = quiet(DDPMPipeline(unet=unet, scheduler=ref))
    a = pipe(batch_size=2, num_inference_steps=8, generator=gen(0), output_type="np").images
    # spacing="linspace" reproduces diffusers' default timesteps inside the pipeline's own set_timesteps
    pipe.scheduler = FewstepScheduler.from_config(ref.config, solver="dpmpp_2m", spacing="linspace")
    b = pipe(batch_size=2, num_inference_steps=8, generator=gen(0), output_type="np").images
    assert isinstance(pipe.scheduler, FewstepScheduler)
    assert torch.equal(pipe.scheduler.timesteps, ref.timesteps.float())
    assert a.shape == b.shape == (2, 8, 8, 3)
    assert np.abs(a - b).max() < 1e-4
    if prediction_type == "sample":  # x0 = model output: images are not saturated, the check is sharp
        assert informative(a) > 0.9


def test_ddpm_pipeline_swap_equals_unipc(unet):
    # UniPCMultistepScheduler.step takes no generator, so DDPMPipeline cannot run it: reference by hand
    ref = UniPCMultistepScheduler(prediction_type="sample")
    ref.set_timesteps(8)
    pipe = quiet(DDPMPipeline(unet=unet, scheduler=FewstepScheduler.from_config(
        ref.config, solver="unipc_bh2_2", spacing="linspace")))
    images = pipe(batch_size=2, num_inference_steps=8, generator=gen(0), output_type="pt").images
    x_T = randn_tensor((2, 3, 8, 8), generator=gen(0))  # the pipeline's own starting noise
    expected = to_image(run(ref, unet, x_T))
    assert images.shape == (2, 3, 8, 8)
    assert (images - expected).abs().max() < 1e-4
    assert informative(expected) > 0.9


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddim_pipeline_swap_equals_ddim(unet, prediction_type, monkeypatch):
    pipe = quiet(DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False, prediction_type=prediction_type)))
    a = pipe(batch_size=2, num_inference_steps=10, generator=gen(0), eta=0.0, output_type="pt").images
    ddim_timesteps = pipe.scheduler.timesteps.clone()  # "leading": 900, 800, ..., 0
    # DDIMPipeline.__init__ turns any scheduler into a DDIMScheduler: swap after construction
    fs = FewstepScheduler.from_config(pipe.scheduler.config, solver="ddim")
    pipe.scheduler = fs
    # The pipeline calls set_timesteps(num_inference_steps): hand it DDIM's grid instead
    monkeypatch.setattr(fs, "set_timesteps", lambda num_inference_steps, device=None:
                        FewstepScheduler.set_timesteps(fs, timesteps=ddim_timesteps[:num_inference_steps]))
    b = pipe(batch_size=2, num_inference_steps=10, generator=gen(0), eta=0.0, output_type="pt").images
    assert isinstance(pipe.scheduler, FewstepScheduler)
    assert torch.equal(fs.timesteps, ddim_timesteps.float())
    assert (a - b).abs().max() < 1e-4
    if prediction_type == "sample":
        assert informative(a) > 0.9


@pytest.mark.parametrize("solver", sorted(STEPPABLE))
def test_every_steppable_solver_runs_in_a_pipeline_as_fewsteps_sampler(unet, solver):
    """The pipeline's images equal fewstep.sample with the same solver on the scheduler's grid."""
    fs = FewstepScheduler.from_config(DDPMScheduler(prediction_type="sample").config, solver=solver)
    pipe = quiet(DDPMPipeline(unet=unet, scheduler=fs))
    images = pipe(batch_size=2, num_inference_steps=6, generator=gen(0), output_type="pt").images
    g = gen(0)
    x_T = randn_tensor((2, 3, 8, 8), generator=g)  # then the same generator draws the solver's noise
    with torch.no_grad():
        out = fewstep.sample(DiffusersDenoiser(unet, fs.config), x_T, fs.schedule, solver=solver, grid=fs.grid,
                             generator=g)
    assert out.nfe == 6
    assert (images - to_image(out.x)).abs().max() < 1e-5  # same arithmetic; float32 round-off only
    assert informative(images) > 0.5


def test_learned_variance_unet_in_a_pipeline():
    """A UNet with 2C output channels (mean, variance): the scheduler keeps the mean half."""
    unet6 = tiny_unet(out_channels=6)
    fs = FewstepScheduler.from_config(DDPMScheduler(variance_type="learned_range").config, solver="dpmpp_2m")
    images = quiet(DDPMPipeline(unet=unet6, scheduler=fs))(batch_size=2, num_inference_steps=5, generator=gen(0),
                                                            output_type="pt").images
    ref = FewstepScheduler.from_config(fs.config)
    ref.set_timesteps(5)
    mean_half = lambda x, t: unet6(x, t).sample[:, :3]  # noqa: E731
    expected = to_image(run(ref, mean_half, randn_tensor((2, 3, 8, 8), generator=gen(0))))
    assert images.shape == (2, 3, 8, 8)
    assert (images - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------
# A small conditional pipeline with classifier-free guidance
# ---------------------------------------------------------------------------

class TinyTextPipeline(DiffusionPipeline):
    """The denoising loop of StableDiffusionPipeline on precomputed prompt embeddings
    (no text encoder or VAE: transformers is not a dependency)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds, guidance_scale=3.0, num_inference_steps=6,
                 generator=None):
        cfg = self.unet.config
        shape = (prompt_embeds.shape[0], cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = randn_tensor(shape, generator=generator) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = self.unet(inp, t, encoder_hidden_states=embeds).sample.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(guided, t, latents, generator=generator).prev_sample
        return latents


def prompts():
    g = gen(3)
    return torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)


def per_sample_generators():
    return [gen(10), gen(11)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_conditional_pipeline_cfg_scheduler_equals_diffusers(cond_unet, prediction_type):
    pos, neg = prompts()
    ref = DPMSolverMultistepScheduler(prediction_type=prediction_type)
    pipe = quiet(TinyTextPipeline(cond_unet, ref))
    a = pipe(pos, neg, guidance_scale=3.0, generator=per_sample_generators())
    pipe.scheduler = FewstepScheduler.from_config(ref.config, solver="dpmpp_2m", spacing="linspace")
    b = pipe(pos, neg, guidance_scale=3.0, generator=per_sample_generators())
    assert a.shape == b.shape == (2, 4, 8, 8)
    assert max_rel_diff(a, b) < 1e-5  # measured ~6e-7


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc_bh2_3", "sde_dpmpp_2m"])
def test_conditional_pipeline_cfg_scheduler_equals_helper(cond_unet, solver):
    """Guidance scale s in the pipeline is w = s - 1 in fewstep's convention."""
    pos, neg = prompts()
    fs = FewstepScheduler.from_config(DDPMScheduler(prediction_type="v_prediction").config, solver=solver)
    pipe = quiet(TinyTextPipeline(cond_unet, fs))
    latents = pipe(pos, neg, guidance_scale=3.0, num_inference_steps=6, generator=per_sample_generators())
    images = pipeline_sample(pipe, solver=solver, steps=6, guidance=2.0, prompt_embeds=pos,
                             negative_prompt_embeds=neg, generator=per_sample_generators(), progress=False)
    assert images.shape == latents.shape == (2, 4, 8, 8)
    assert (images - latents.clamp(-1, 1)).abs().max() < 1e-4
    assert float((latents.abs() < 1).float().mean()) > 0.3  # many values are compared, not clamped away
    # guidance changes the result (the unconditional branch is really used)
    plain = pipe(pos, neg, guidance_scale=1.0, num_inference_steps=6, generator=per_sample_generators())
    assert (plain - latents).abs().max() > 1e-2


# ---------------------------------------------------------------------------
# save_pretrained / from_pretrained / from_config
# ---------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(solver="unipc_bh2_3", spacing="karras", final="tmin", prediction_type="v_prediction",
         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=500,
         solver_options={"corrector": False}),
    dict(solver="sde_dpmpp_3m", spacing="time_quadratic", prediction_type="sample",
         beta_schedule="squaredcos_cap_v2", lower_order_final=False),
    dict(solver="ddim", spacing="linspace", trained_betas=np.linspace(1e-4, 0.03, 200).tolist(),
         num_train_timesteps=200),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=["default", "unipc-karras-v", "sde3m-cos-x0", "ddim-trained"])
def test_config_save_load_round_trip(tmp_path, kw):
    fs = FewstepScheduler(**kw)
    fs.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FewstepScheduler"
    for loaded in (FewstepScheduler.from_pretrained(tmp_path), FewstepScheduler.from_config(fs.config),
                   FewstepScheduler.from_config(FewstepScheduler.load_config(tmp_path))):
        assert type(loaded) is FewstepScheduler
        assert public(loaded.config) == public(fs.config)
        fs.set_timesteps(7)
        loaded.set_timesteps(7)
        assert torch.equal(loaded.timesteps, fs.timesteps)
        data = GaussianData(fs.schedule.alphas_cumprod)
        x = randn((2, 3, 4, 4), 0)
        assert torch.equal(gaussian_loop(loaded, data, x, gen(1)), gaussian_loop(fs, data, x, gen(1)))


def test_scheduler_save_pretrained_round_trip(tmp_path, unet):
    fs = FewstepScheduler(solver="dpmpp_3m", spacing="karras", prediction_type="sample")
    fs.save_pretrained(tmp_path)
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert (loaded.config.solver, loaded.config.spacing) == ("dpmpp_3m", "karras")
    assert public(loaded.config) == public(fs.config)
    for s in (fs, loaded):
        s.set_timesteps(6)
    x = randn((2, 3, 8, 8), 2)
    assert torch.equal(run(loaded, unet, x), run(fs, unet, x))


def test_pipeline_save_pretrained_round_trip(tmp_path, unet):
    fs = FewstepScheduler(solver="unipc_bh2_3", spacing="time_quadratic", prediction_type="sample")
    pipe = quiet(DDPMPipeline(unet=unet, scheduler=fs))
    before = pipe(batch_size=2, num_inference_steps=6, generator=gen(0), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "FewstepScheduler"
    reloaded = quiet(DDPMPipeline.from_pretrained(tmp_path, local_files_only=True))
    assert type(reloaded.scheduler) is FewstepScheduler
    assert (reloaded.scheduler.config.solver, reloaded.scheduler.config.spacing) == ("unipc_bh2_3", "time_quadratic")
    assert public(reloaded.scheduler.config) == public(fs.config)
    after = reloaded(batch_size=2, num_inference_steps=6, generator=gen(0), output_type="np").images
    assert np.array_equal(before, after)  # same weights (safetensors), same config: bit-identical
    assert informative(before) > 0.9
    alone = FewstepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert public(alone.config) == public(fs.config)


SOURCES = {
    "ddpm-scaled_linear-v": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012, prediction_type="v_prediction"),
    "ddim-cos-500-x0": lambda: DDIMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500,
                                             prediction_type="sample"),
    "dpm-trained-700": lambda: DPMSolverMultistepScheduler(trained_betas=np.linspace(1e-4, 0.03, 700).tolist(),
                                                           num_train_timesteps=700),
    "euler-linear": lambda: EulerDiscreteScheduler(),
    # built with its defaults (scaled_linear, 0.00085 .. 0.012): diffusers' from_config drops
    # default-valued keys, yet the pipeline's schedule is this one
    "lcm-defaults": lambda: LCMScheduler(),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_from_config_keeps_the_pipelines_schedule(name):
    src = SOURCES[name]()
    fs = FewstepScheduler.from_config(src.config, solver="dpmpp_2m", spacing="logsnr")
    assert (fs.config.solver, fs.config.spacing) == ("dpmpp_2m", "logsnr")
    assert fs.config.prediction_type == src.config.prediction_type
    n = src.config.num_train_timesteps
    assert fs.config.num_train_timesteps == n and len(fs) == n and fs.schedule.N == n
    # diffusers builds alphas_cumprod with a float32 cumprod: up to ~N * 6e-8 relative error
    ac = src.alphas_cumprod.double()
    assert ((fs.schedule.alphas_cumprod - ac).abs() / ac).max() < 1e-4
    fs.set_timesteps(10)
    assert float(fs.timesteps[0]) == n - 1  # the grid starts at the last training step
    # the model sees x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps at integer timesteps k
    x0, eps, k = torch.ones(1, 1), torch.zeros(1, 1), n // 3
    assert abs(float(fs.add_noise(x0, eps, torch.tensor([k]))) - float(ac[k].sqrt())) < 1e-4 * float(ac[k].sqrt())


def test_from_config_does_not_silently_drop_zero_snr_rescaling():
    """rescale_betas_zero_snr changes the betas: they are honoured (issue 9; tests/test_diffusers_flow.py
    checks sampling), with the terminal alpha exactly 0."""
    src = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    fs = FewstepScheduler.from_config(src.config)
    assert fs.config.rescale_betas_zero_snr and float(fs.schedule.alphas_cumprod[-1]) == 0.0
    assert (fs.schedule.alphas_cumprod - src.alphas_cumprod.double()).abs().max() < 1e-6


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 1.5)])
def test_from_config_keeps_dynamic_thresholding(unet, ratio, max_value):
    """thresholding / dynamic_thresholding_ratio / sample_max_value carry diffusers' meaning:
    s = clamp(quantile(|x0|, ratio), 1, sample_max_value); x0 <- clamp(x0, -s, s) / s."""
    ref = DPMSolverMultistepScheduler(prediction_type="v_prediction", thresholding=True,
                                      dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    ref.set_timesteps(8)
    fs = FewstepScheduler.from_config(ref.config, solver="dpmpp_2m")
    fs.set_timesteps(timesteps=ref.timesteps)
    x = randn((2, 3, 8, 8), 1)
    assert (run(ref, unet, x) - run(fs, unet, x)).abs().max() < 1e-4


# ---------------------------------------------------------------------------
# diffusers' common scheduler checks
# ---------------------------------------------------------------------------

def test_public_api():
    fs = FewstepScheduler()
    assert isinstance(fs, SchedulerMixin) and isinstance(fs, ConfigMixin)
    assert fewstep.FewstepScheduler is FewstepScheduler  # `from fewstep import FewstepScheduler`
    for name in ("set_timesteps", "step", "scale_model_input", "add_noise", "set_begin_index", "save_pretrained",
                 "from_pretrained", "from_config", "save_config", "load_config"):
        assert callable(getattr(fs, name)), name
    assert {"num_inference_steps", "device", "timesteps", "sigmas"} <= set(
        inspect.signature(fs.set_timesteps).parameters)
    assert {"model_output", "timestep", "sample", "generator", "return_dict"} <= set(
        inspect.signature(fs.step).parameters)
    assert fs.init_noise_sigma == 1.0
    assert isinstance(fs.order, int) and fs.order == 1  # one model call per timestep
    assert len(fs) == 1000 and len(FewstepScheduler(num_train_timesteps=300)) == 300
    x = randn((2, 3, 4, 4), 0)
    assert torch.equal(fs.scale_model_input(x, 999), x)  # VP: the model sees x_t as is
    fs.set_timesteps(5)
    assert fs.num_inference_steps == 5 and fs.timesteps.shape == (5,) and fs.timesteps.dtype == torch.float32
    assert fs.step_index is None and fs.begin_index is None
    fs.step(torch.zeros_like(x), fs.timesteps[0], x)
    assert fs.step_index == 1
    fs.set_begin_index(3)
    assert fs.begin_index == 3
    fs.set_timesteps(4)  # a new grid restarts the step counter
    assert fs.step_index is None


def test_set_timesteps_three_ways():
    fs = FewstepScheduler()
    fs.set_timesteps(timesteps=[900, 500, 100])
    assert fs.timesteps.tolist() == [900.0, 500.0, 100.0] and fs.num_inference_steps == 3
    assert float(fs.grid[-1]) == 0.0  # final="zero": the last step denoises to clean data
    fs.set_timesteps(num_inference_steps=4, device="cpu")
    assert fs.timesteps.device.type == "cpu" and len(fs.timesteps) == 4
    for bad in (dict(), dict(num_inference_steps=4, timesteps=[900, 100]), dict(num_inference_steps=0),
                dict(num_inference_steps=2.5), dict(timesteps=[100, 500]), dict(timesteps=[500, 500, 100]),
                dict(timesteps=[1500, 100]), dict(sigmas=[-1.0, 0.0])):
        with pytest.raises(ValueError):
            fs.set_timesteps(**bad)


SIGMA_SOURCES = {
    "dpm-karras": lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True),
    "euler-linear": lambda: EulerDiscreteScheduler(),
    # Stable Diffusion's schedule: its sigma_max, computed in float32, maps to t slightly above 1
    "euler-scaled_linear": lambda: EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012),
    "dpm-scaled_linear": lambda: DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012),
}


@pytest.mark.parametrize("name", list(SIGMA_SOURCES))
def test_set_timesteps_from_a_diffusers_schedulers_sigmas(name):
    """diffusers rounds the timesteps of its sigmas to integers (DPM) or interpolates log sigma
    (Euler); fewstep interpolates log alpha and keeps them fractional: within half a step."""
    ref = SIGMA_SOURCES[name]()
    ref.set_timesteps(10)
    fs = FewstepScheduler.from_config(ref.config)
    fs.set_timesteps(sigmas=ref.sigmas)  # ends in 0: a final denoising step
    assert fs.num_inference_steps == 10
    assert (fs.timesteps - ref.timesteps.float()).abs().max() <= 0.5
    assert float(fs.grid[-1]) == 0.0


@pytest.mark.parametrize("final,last_t", [("zero", 0.0), ("tmin", 1e-3)])
def test_set_timesteps_from_exact_sigmas(final, last_t):
    """sigma_k = sqrt((1 - abar_k) / abar_k) at integer k maps back to timestep k, sigma_max included."""
    fs = FewstepScheduler(final=final)
    ac = fs.schedule.alphas_cumprod
    ks = torch.tensor([999, 640, 250, 30])
    fs.set_timesteps(sigmas=((1 - ac[ks]) / ac[ks]).sqrt())
    assert (fs.timesteps - ks.float()).abs().max() < 1e-3
    assert abs(float(fs.grid[-1]) - last_t) < 1e-12  # no trailing 0: the config's final point
    fs.set_timesteps(sigmas=torch.cat([((1 - ac[ks]) / ac[ks]).sqrt(), torch.zeros(1, dtype=torch.float64)]))
    assert (fs.timesteps - ks.float()).abs().max() < 1e-3
    assert float(fs.grid[-1]) == 0.0  # a trailing 0 asks for a final denoising step


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 5, 7), (3, 16), (2, 2, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_step_output_shape_and_dtype(shape, dtype):
    fs = FewstepScheduler(solver="dpmpp_3m")
    fs.set_timesteps(5)
    data = GaussianData(fs.schedule.alphas_cumprod)
    x = randn(shape, 0, dtype)
    for t in fs.timesteps:
        out = fs.step(data.eps(x, t), t, x)
        assert isinstance(out, SchedulerOutput)
        assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
        x = out.prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc_bh2_3", "sde_dpmpp_2m", "ddpm"])
def test_tuple_output_equals_dataclass_output(solver):
    a, b = FewstepScheduler(solver=solver), FewstepScheduler(solver=solver)
    a.set_timesteps(6)
    b.set_timesteps(6)
    data = GaussianData(a.schedule.alphas_cumprod)
    xa = xb = randn((2, 3, 4, 4), 0)
    ga, gb = gen(1), gen(1)
    for t in a.timesteps:
        out_a = a.step(data.eps(xa, t), t, xa, generator=ga)
        out_b = b.step(data.eps(xb, t), t, xb, generator=gb, return_dict=False)
        assert isinstance(out_b, tuple) and len(out_b) == 1
        assert torch.equal(out_a.prev_sample, out_b[0])
        xa, xb = out_a.prev_sample, out_b[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_add_noise_across_dtypes(dtype, tol):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    fs = FewstepScheduler.from_config(ref.config)
    x0, noise = randn((4, 3, 8, 8), 0).to(dtype), randn((4, 3, 8, 8), 1).to(dtype)
    ks = torch.tensor([0, 1, 500, 999])
    got = fs.add_noise(x0, noise, ks)
    assert got.dtype == dtype and got.shape == x0.shape
    # exact answer from fewstep's float64 alphas_cumprod (round-off of the output only):
    # |x_t| < 4 here, half an ulp of float16 there is ~2e-3
    ac = fs.schedule.alphas_cumprod[ks].view(-1, 1, 1, 1)
    exact = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
    assert (got.double() - exact).abs().max() <= tol * max(1.0, float(exact.abs().max()))
    # and diffusers' own add_noise (float32 alphas_cumprod: ~1e-6 relative)
    theirs = ref.add_noise(x0.float(), noise.float(), ks)
    assert (got.float() - theirs).abs().max() < max(tol * 4, 1e-5)
    # a scalar timestep applies to the whole batch
    scalar = fs.add_noise(x0, noise, torch.tensor(500))
    assert torch.equal(scalar, fs.add_noise(x0, noise, torch.full((4,), 500)))


def test_add_noise_at_fractional_timesteps_interpolates_log_alpha():
    fs = FewstepScheduler()
    data = GaussianData(fs.schedule.alphas_cumprod)
    x0, noise = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    for k in (0.5, 123.25, 998.5):
        assert abs(float(fs.add_noise(x0, noise, torch.tensor([k]))) - data.alpha(k)) < 1e-12


STEP_COUNTS = [1, 2, 3, 7, 10, 50, 100, 250, 500, 999, 1000]


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("spacing", ALL_SPACINGS)
def test_no_duplicate_timesteps(spacing, n):
    fs = FewstepScheduler(spacing=spacing)
    fs.set_timesteps(n)
    t = fs.timesteps
    assert len(t) == n == fs.num_inference_steps
    assert len(torch.unique(t)) == n
    assert (t[1:] < t[:-1]).all()
    assert float(t[0]) == 999.0 and float(t.min()) >= 0.0


@pytest.mark.parametrize("solver", sorted(STEPPABLE))
def test_1_to_1000_inference_steps_without_nan(solver):
    """The exact Gaussian model: finite everywhere, exact at one step, converged at 1000."""
    fs = FewstepScheduler(solver=solver)
    data = GaussianData(fs.schedule.alphas_cumprod)
    x_T = randn((4, 1, 32, 32), 0)
    for n in (1, 2, 3, 10, 100, 1000):
        fs.set_timesteps(n)
        x = gaussian_loop(fs, data, x_T, gen(1))
        assert torch.isfinite(x).all(), f"{solver}: NaN/inf with {n} steps"
        if n == 1:  # one step from t_max to 0 is the denoiser itself; 1 / alpha_T ~ 150 amplifies round-off
            assert (x.double() - data.denoise(x_T, fs.timesteps[0])).abs().max() < 2e-4
    if solver in STOCHASTIC:  # the SDE samples the data distribution N(M, S^2): 4096 values, ~5 std errors
        assert abs(float(x.mean()) - data.M) < 5 * data.S / 64
        assert abs(float(x.std()) - data.S) < 5 * data.S / math.sqrt(2 * 4096)
    else:  # the ODE solution at t_min, then denoised (the final step to 0)
        exact = data.denoise(data.ode(x_T, fs.timesteps[0], fs.timesteps[-1]), fs.timesteps[-1])
        tol = 1e-2 if SOLVERS[solver].order == 1 else 2e-4  # O(h^p) with h ~ 0.01 in log-SNR
        assert (x.double() - exact).abs().max() < tol


@pytest.mark.parametrize("solver", sorted(STEPPABLE))
def test_scheduler_is_fewsteps_sampler_one_call_at_a_time(solver):
    fs = FewstepScheduler(solver=solver)
    fs.set_timesteps(12)
    data = GaussianData(fs.schedule.alphas_cumprod)
    x_T = randn((2, 3, 4, 4), 0)
    stepped = gaussian_loop(fs, data, x_T, gen(1))
    den = ModelDenoiser(data.eps, fs.schedule, "eps", time_input="discrete")
    ref = fewstep.sample(den, x_T, fs.schedule, solver=solver, grid=fs.grid, generator=gen(1))
    assert ref.nfe == 12
    assert (stepped - ref.x).abs().max() < 1e-6  # the same step function: float round-off at most


@pytest.mark.parametrize("n,k", [(12, 4), (20, 8)])
@pytest.mark.parametrize("solver", sorted(STEPPABLE))
def test_set_begin_index_img2img(solver, n, k):
    """Start at timesteps[k] (image-to-image): equals fewstep.sample on the sub-grid from there."""
    fs = FewstepScheduler(solver=solver)
    fs.set_timesteps(n)
    data = GaussianData(fs.schedule.alphas_cumprod)
    x0 = data.M + data.S * randn((2, 1, 8, 8), 0)
    x_k = fs.add_noise(x0, randn((2, 1, 8, 8), 1), fs.timesteps[k:k + 1].repeat(2))
    fs.set_begin_index(k)
    x, g = x_k, gen(2)
    for t in fs.timesteps[k:]:
        x = fs.step(data.eps(x, t), t, x, generator=g).prev_sample
    den = ModelDenoiser(data.eps, fs.schedule, "eps", time_input="discrete")
    ref = fewstep.sample(den, x_k, fs.schedule, solver=solver, grid=fs.grid[k:], generator=gen(2))
    assert ref.nfe == n - k
    assert (x - ref.x).abs().max() < 1e-6


def test_step_index_found_from_the_first_timestep():
    """Without set_begin_index the start is the position of the first timestep passed to step."""
    fs = FewstepScheduler(solver="dpmpp_2m")
    fs.set_timesteps(10)
    data = GaussianData(fs.schedule.alphas_cumprod)
    x = randn((1, 1, 4, 4), 0)
    fs.step(data.eps(x, fs.timesteps[3]), fs.timesteps[3], x)
    assert fs.step_index == 4


# ---------------------------------------------------------------------------
# Solvers that cannot run one call per step, and errors
# ---------------------------------------------------------------------------

def test_steppable_solvers_are_the_one_call_per_step_samplers():
    assert set(STEPPABLE) == EXPECTED_STEPPABLE
    for name in EXPECTED_STEPPABLE:
        assert FewstepScheduler(solver=name).config.solver == name


@pytest.mark.parametrize("solver", sorted(set(SOLVERS) - set(STEPPABLE)))
def test_non_steppable_solvers_point_at_the_helper(solver):
    with pytest.raises(ValueError, match=r"fewstep\.diffusers\.sample"):
        FewstepScheduler(solver=solver)
    with pytest.raises(ValueError, match=r"fewstep\.diffusers\.sample"):
        FewstepScheduler.from_config(DDPMScheduler().config, solver=solver)


def test_named_non_steppable_solvers_are_rejected():
    for solver in ("dpm_solver_3", "heun", "dpm_solver_23"):
        with pytest.raises(ValueError, match=rf"{solver}.*fewstep\.diffusers\.sample"):
            FewstepScheduler(solver=solver)


def test_unknown_solver_spacing_final():
    with pytest.raises(ValueError, match="dpmpp_2m"):  # suggests the close name
        FewstepScheduler(solver="dpmpp2m")
    with pytest.raises(ValueError, match="spacing"):
        FewstepScheduler(spacing="leading")
    with pytest.raises(ValueError, match="final"):
        FewstepScheduler(final="denoise")


def test_unsupported_prediction_type():
    with pytest.raises(ValueError, match=r"flow_prediction.*epsilon, v_prediction, sample"):
        FewstepScheduler(prediction_type="flow_prediction")
    # (a config written out in full: diffusers drops keys listed in _use_default_values)
    cfg = {**public(DDPMScheduler().config), "prediction_type": "flow_prediction"}
    with pytest.raises(ValueError, match="flow_prediction"):
        FewstepScheduler.from_config(cfg)


def test_model_output_shape_mismatch():
    fs = FewstepScheduler()
    fs.set_timesteps(5)
    x = randn((2, 3, 8, 8), 0)
    t = fs.timesteps[0]
    for bad in ((2, 3, 4, 4), (2, 4, 8, 8), (1, 3, 8, 8), (2, 3, 8)):
        with pytest.raises(ValueError, match=r"does not fit"):
            fs.step(torch.zeros(bad), t, x)
    assert fs.step_index == 0  # a rejected call does not advance the scheduler


def test_step_before_set_timesteps():
    fs = FewstepScheduler()
    x = randn((1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="set_timesteps"):
        fs.step(torch.zeros_like(x), 999, x)


def test_timestep_not_in_schedule_and_too_many_steps():
    fs = FewstepScheduler()
    fs.set_timesteps(3)
    x = randn((1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        fs.step(torch.zeros_like(x), 123, x)
    for t in fs.timesteps:
        x = fs.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        fs.step(torch.zeros_like(x), fs.timesteps[-1], x)


def test_learned_variance_output_is_accepted():
    """A 2C-channel output (mean, variance): the first C channels are the prediction."""
    a, b = FewstepScheduler(solver="dpmpp_2m"), FewstepScheduler(solver="dpmpp_2m")
    a.set_timesteps(6)
    b.set_timesteps(6)
    data = GaussianData(a.schedule.alphas_cumprod)
    xa = xb = randn((2, 3, 4, 4), 0)
    for i, t in enumerate(a.timesteps):
        eps = data.eps(xa, t)
        garbage = 1e3 * randn((2, 3, 4, 4), 10 + i)
        xa = a.step(torch.cat([eps, garbage], 1), t, xa).prev_sample
        xb = b.step(eps, t, xb).prev_sample
        assert torch.equal(xa, xb)
