"""FewstepScheduler honours the source config's family (flow matching, zero-SNR VP, EDM) or refuses it.

Exact answers come from a Gaussian mixture whose posterior mean E[x0 | x_t] is known in closed
form at any (alpha, sigma): wrapped as a diffusers-style model (flow velocity, v-prediction, EDM's
preconditioned output), it lets fewstep and diffusers be compared on the same sigmas, and lets
convergence orders be measured. Pipelines are built from tiny random components (no download),
called with precomputed prompt embeddings. Parity is the max over samples of the relative error.
"""
from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, SD3Transformer2DModel,
                       UniPCMultistepScheduler)

import fewstep.diffusers as fd
from fewstep.data.gmm import GaussianMixture
from fewstep.diffusers import FewstepScheduler
from fewstep.schedules import FlowMatching, ZeroSNRDiscreteVP

D = 6  # values per sample: (B, 1, 2, 3)
SHAPE = (1, 2, 3)


@pytest.fixture(scope="module")
def gmm():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, D, generator=g, dtype=torch.float64) * 1.5
    return GaussianMixture(means, torch.tensor([0.2, 0.4, 0.3, 0.25], dtype=torch.float64))


def x0_exact(gmm, x, alpha: float, sigma: float) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).double()
    a = torch.full((x.shape[0],), float(alpha), dtype=torch.float64)
    s = torch.full((x.shape[0],), float(sigma), dtype=torch.float64)
    return gmm.posterior_mean(flat, a, s).reshape(x.shape)


def velocity(gmm, x, sigma: float) -> torch.Tensor:
    """Rectified flow: x = (1 - s) x0 + s eps, v = eps - x0 = (x - x0) / s."""
    return ((x.double() - x0_exact(gmm, x, 1.0 - sigma, sigma)) / sigma).float()


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over samples of ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def flow_loop(sched, gmm, x):
    """diffusers' loop, the model evaluated at the scheduler's sigma for step i (DPM-Solver and UniPC
    round their flow timesteps to integers; the comparison is of solvers, not of that rounding)."""
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(gmm, x, float(sched.sigmas[i])), t, x).prev_sample
    return x


# ---------------------------------------------------------------------------
# Family detection and the source's grid
# ---------------------------------------------------------------------------

FLOW_SOURCES = {
    "flowmatch-euler-shift3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "flowmatch-heun-shift3": lambda: FlowMatchHeunDiscreteScheduler(shift=3.0),
    "dpm-flow": lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                    prediction_type="flow_prediction"),
    "unipc-flow": lambda: UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0,
                                                  prediction_type="flow_prediction"),
}


@pytest.mark.parametrize("name", list(FLOW_SOURCES))
def test_flow_configs_are_read_as_flow_matching(name):
    src = FLOW_SOURCES[name]()
    assert FewstepScheduler.from_config(src.config, solver="dpmpp_2m").config.spacing == "shifted_uniform"  # flow default
    fs = FewstepScheduler.from_config(src.config, solver="dpmpp_2m", spacing="logsnr")
    assert fs.config.family == "flow" and fs.config.prediction_type == "flow_prediction"
    assert isinstance(fs.schedule, FlowMatching)
    assert fs.config.shift == (src.config.get("shift") or src.config.get("flow_shift"))
    fs.set_timesteps(8)
    assert fs.timesteps.dtype == torch.float32 and len(fs.sigmas) == 9 and float(fs.sigmas[-1]) == 0.0
    assert torch.allclose(fs.timesteps, fs.sigmas[:-1] * 1000)  # the model's input is sigma * 1000
    assert float(fs.sigmas[0]) == 1.0  # pure noise, where the pipeline draws its latents


@pytest.mark.parametrize("name", ["flowmatch-euler-shift3", "dpm-flow", "unipc-flow"])
def test_source_spacing_reproduces_the_source_sigmas(name):
    src = FLOW_SOURCES[name]()
    fs = FewstepScheduler.from_config(src.config, solver="ddim", spacing="source")
    for n in (4, 10):
        src.set_timesteps(n)
        fs.set_timesteps(n)
        assert torch.allclose(fs.sigmas, src.sigmas.float(), atol=1e-6)


def test_shifted_uniform_spacing_is_dpmsolvers_flow_grid_for_any_flow_source():
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    dpm.set_timesteps(10)
    fs = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="unipc_bh2_3",
                                      spacing="shifted_uniform")
    fs.set_timesteps(10)
    assert torch.allclose(fs.sigmas, dpm.sigmas, atol=1e-6)
    with pytest.raises(ValueError, match="shifted_uniform"):
        FewstepScheduler(spacing="shifted_uniform")


def test_dynamic_shifting_follows_mu_like_flowmatch_euler():
    src = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          time_shift_type="exponential")
    fs = FewstepScheduler.from_config(src.config, solver="ddim", spacing="source")
    sig = np.linspace(1.0, 1 / 7, 7)  # what Flux passes
    for mu in (0.5, 1.1):
        src.set_timesteps(sigmas=sig, mu=mu)
        fs.set_timesteps(sigmas=sig, mu=mu)
        assert torch.allclose(fs.sigmas, src.sigmas, atol=1e-6)
        assert torch.allclose(fs.timesteps, src.timesteps, atol=1e-3)
    with pytest.raises(ValueError, match="mu"):
        fs.set_timesteps(7)
    # fewstep's spacing: the stock sigmas mean "7 steps"; mu translates the grid in log-SNR
    fl = FewstepScheduler.from_config(src.config, solver="dpmpp_2m", spacing="logsnr")
    fl.set_timesteps(sigmas=sig, mu=0.5)
    lo = fl.sigmas.clone()
    fl.set_timesteps(sigmas=sig, mu=1.1)
    hi = fl.sigmas
    lam = lambda s: torch.log((1 - s[1:-1].double()) / s[1:-1].double())  # noqa: E731
    assert len(hi) == 8 and torch.allclose(lam(lo) - lam(hi), torch.full((6,), 0.6, dtype=torch.float64), atol=1e-4)


# ---------------------------------------------------------------------------
# Exact answers: parity with diffusers' flow schedulers on the same sigmas, and convergence
# ---------------------------------------------------------------------------

PARITY = {  # name: (diffusers flow scheduler, fewstep solver)
    "FlowMatchEuler": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "ddim"),
    "DPMSolverMultistep-flow": (lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                                    prediction_type="flow_prediction"), "dpmpp_2m"),
    "UniPCMultistep-flow": (lambda: UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                            prediction_type="flow_prediction"), "unipc_bh2_2"),
}


@pytest.mark.parametrize("n", [5, 12])
@pytest.mark.parametrize("name", list(PARITY))
def test_flow_parity_with_diffusers_on_the_same_sigmas(gmm, name, n):
    make, solver = PARITY[name]
    ref = make()
    ref.set_timesteps(n)
    fs = FewstepScheduler.from_config(ref.config, solver=solver)
    fs.set_timesteps(timesteps=(ref.sigmas[:-1].double() * 1000))  # the same sigmas, not re-shifted
    assert torch.allclose(fs.sigmas, ref.sigmas, atol=1e-6)
    x = noise(16)
    a, b = flow_loop(fs, gmm, x.clone()), flow_loop(ref, gmm, x.clone())
    assert rel(a, b) < 1e-4


def test_flow_convergence_orders(gmm):
    """Error against a converged solution halves by 2^order when the step count doubles."""
    src = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = noise(8, 1)

    def solve(solver, n):
        fs = FewstepScheduler.from_config(src.config, solver=solver, spacing="logsnr")
        fs.set_timesteps(n)
        return flow_loop(fs, gmm, x.clone())

    ref = solve("unipc_bh2_3", 800)  # agrees with dpmpp_3m at 800 steps to 2e-6
    # asymptotic range (a sharp mixture: fewer steps are pre-asymptotic); measured 0.89, 1.82, 3.05, 2.90
    for solver, order in (("ddim", 1), ("dpmpp_2m", 2), ("dpmpp_3m", 3), ("unipc_bh2_2", 3)):
        e = [float((solve(solver, n) - ref).double().pow(2).mean().sqrt()) for n in (120, 240)]
        assert math.log2(e[0] / e[1]) > order - 0.35, (solver, e)


# ---------------------------------------------------------------------------
# The set_timesteps / step contract for flow
# ---------------------------------------------------------------------------

def test_flow_pipeline_contract():
    src = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fs = FewstepScheduler.from_config(src.config, solver="dpmpp_2m")
    params = inspect.signature(fs.set_timesteps).parameters
    assert {"num_inference_steps", "device", "timesteps", "sigmas", "mu"} <= set(params)
    ts, n = retrieve_timesteps(fs, 6, "cpu")
    assert n == 6 and ts.dtype == torch.float32 and fs.order == 1 and fs.init_noise_sigma == 1.0
    x, eps = noise(3), noise(3, 5)
    assert torch.equal(fs.scale_model_input(x, ts[0]), x)
    # scale_noise: FlowMatchEuler's img2img noising at the same timestep
    src.set_timesteps(6)
    fs2 = FewstepScheduler.from_config(src.config, solver="ddim", spacing="source")
    fs2.set_timesteps(6)
    src.set_begin_index(2)
    fs2.set_begin_index(2)
    t = src.timesteps[2:3]
    assert torch.allclose(fs2.scale_noise(x, t, eps), src.scale_noise(x, t, eps), atol=1e-6)
    # tuple and dataclass returns agree
    out = velocity_like = torch.ones_like(x)
    fs.set_timesteps(4)
    a = fs.step(out, fs.timesteps[0], x).prev_sample
    fs.set_timesteps(4)
    (b,) = fs.step(velocity_like, fs.timesteps[0], x, return_dict=False)
    assert torch.equal(a, b)


def test_flow_img2img_begin_index_equals_flowmatch_euler(gmm):
    src = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fs = FewstepScheduler.from_config(src.config, solver="ddim", spacing="source")
    for s in (src, fs):
        s.set_timesteps(10)
        s.set_begin_index(4)
    x0 = noise(4, 7) * 0.5
    eps = noise(4, 8)
    xa = fs.scale_noise(x0, fs.timesteps[4:5], eps)
    xb = src.scale_noise(x0, src.timesteps[4:5], eps)
    for i in range(4, 10):
        xa = fs.step(velocity(gmm, xa, float(fs.sigmas[i])), fs.timesteps[i], xa).prev_sample
        xb = src.step(velocity(gmm, xb, float(src.sigmas[i])), src.timesteps[i], xb).prev_sample
    assert rel(xa, xb) < 1e-4


# ---------------------------------------------------------------------------
# A real SD3 pipeline, tiny random components, precomputed prompt embeddings
# ---------------------------------------------------------------------------

def retrieve_timesteps(scheduler, n, device):
    """diffusers' retrieve_timesteps (the pipelines' helper; its module needs transformers)."""
    try:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps as rt
    except ImportError:  # the check it makes: a scheduler without `sigmas` is refused
        assert "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
        scheduler.set_timesteps(n, device=device)
        return scheduler.timesteps, len(scheduler.timesteps)
    return rt(scheduler, n, device)


def sd3_pipe(scheduler):
    # StableDiffusion3Pipeline imports transformers (a test dependency); no text encoder is built
    from diffusers import StableDiffusion3Pipeline
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                   pooled_projection_dim=8, out_channels=4).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=4,
                            norm_num_groups=2, sample_size=16, layers_per_block=1, shift_factor=0.06,
                            scaling_factor=1.5).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(2, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 8, generator=g),
                negative_prompt_embeds=torch.randn(2, 5, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(2, 8, generator=g))


def run_pipe(pipe, steps, **kw):
    return pipe(**embeds(), height=16, width=16, num_inference_steps=steps, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images


@pytest.mark.parametrize("dynamic", [False, True], ids=["shift3", "dynamic-mu"])
def test_sd3_pipeline_end_to_end(dynamic):
    src = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=16, max_image_seq_len=256) if dynamic
           else FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe = sd3_pipe(src)
    ref = run_pipe(pipe, 6)
    pipe.scheduler = FewstepScheduler.from_config(src.config, solver="ddim", spacing="source")
    same = run_pipe(pipe, 6)  # Euler on FlowMatchEuler's own sigmas: the same images
    assert rel(same, ref) < 1e-4
    pipe.scheduler = FewstepScheduler.from_config(src.config, solver="dpmpp_2m", spacing="logsnr")  # as fd.sample
    img = run_pipe(pipe, 6)
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
    if not dynamic:  # the helper runs the same solver on the same grid: the same images
        helped = fd.sample(pipe, solver="dpmpp_2m", steps=6, guidance=1.0, **embeds(),
                           generator=torch.Generator().manual_seed(3), progress=False)
        assert rel(helped, img * 2 - 1) < 1e-4
    else:
        with pytest.raises(ValueError, match="mu"):
            fd.sample(pipe, solver="dpmpp_2m", steps=6, **{k: v for k, v in embeds().items() if "neg" not in k},
                      progress=False)


def test_helper_runs_singlestep_and_adaptive_solvers_on_sd3():
    pipe = sd3_pipe(FlowMatchEulerDiscreteScheduler(shift=3.0))
    e = {k: v for k, v in embeds().items() if "neg" not in k}
    for solver in ("dpmpp_2s", "heun", "dpm_solver_fast"):
        x = fd.sample(pipe, solver=solver, steps=6, **e, generator=torch.Generator().manual_seed(0), progress=False)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_helper_refuses_uncovered_transformers():
    from types import SimpleNamespace

    class FluxTransformer2DModel(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    pipe = SimpleNamespace(transformer=FluxTransformer2DModel(), scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="FluxTransformer2DModel is not covered.*SD3Transformer2DModel"):
        fd.pipeline_denoiser(pipe)


# ---------------------------------------------------------------------------
# Zero terminal SNR (VP) and EDM
# ---------------------------------------------------------------------------

def vp_v_model(gmm, sched: ZeroSNRDiscreteVP):
    def model(x, k):
        t = (float(k) + 1.0) / sched.N
        a, s = float(sched.alpha(t)), float(sched.sigma(t))
        x0 = x0_exact(gmm, x, a, s)
        eps = x.double() if a == 0 else (x.double() - a * x0) / s
        return (a * eps - s * x0).float()  # v = alpha eps - sigma x0
    return model


def test_zero_snr_v_prediction_matches_ddim_and_samples_without_nan(gmm):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
              prediction_type="v_prediction", timestep_spacing="trailing")
    ddim = DDIMScheduler(**kw, clip_sample=False)
    ddim.set_timesteps(8)
    fs = FewstepScheduler.from_config(ddim.config, solver="ddim", spacing="source")
    assert isinstance(fs.schedule, ZeroSNRDiscreteVP) and float(fs.schedule.alpha(1.0)) == 0.0
    fs.set_timesteps(8)
    assert torch.equal(fs.timesteps, ddim.timesteps.float()) and float(fs.timesteps[0]) == 999
    model = vp_v_model(gmm, fs.schedule)
    x = noise(16, 2)
    outs = []
    for s in (fs, ddim):
        y = x.clone()
        for t in s.timesteps:
            y = s.step(model(y, t), t, y).prev_sample
        outs.append(y)
    assert rel(outs[0], outs[1]) < 1e-4
    def solve(solver, n):
        f = FewstepScheduler.from_config(ddim.config, solver=solver)  # logsnr grid, from pure noise
        f.set_timesteps(n)
        assert float(f.grid[0]) == 1.0
        y = x.clone()
        for t in f.timesteps:
            y = f.step(model(y, t), t, y, generator=torch.Generator().manual_seed(0)).prev_sample
        assert torch.isfinite(y).all()
        return y

    ref = solve("unipc_bh2_3", 500)  # agrees with dpmpp_3m at 500 steps to 1e-6
    for solver in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_3", "dpm_solver_2m"):
        assert rel(solve(solver, 20), ref) < 0.08  # measured 0.012 - 0.076
    solve("sde_dpmpp_2m", 10)


def test_zero_snr_epsilon_model_follows_diffusers_clamp():
    src = EulerDiscreteScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012)
    fs = FewstepScheduler.from_config(src.config)
    assert abs(float(fs.schedule.alphas_cumprod[-1]) - 2.0 ** -24) < 1e-12  # as diffusers' Euler / DPM / UniPC
    fs.set_timesteps(10)
    assert torch.isfinite(fs.timesteps).all()


def edm_model(gmm, sigma_data=0.5, v=False):
    def model(x_in, c_noise):
        sig = math.exp(4.0 * float(c_noise))
        x = x_in * math.sqrt(sig * sig + sigma_data ** 2)
        x0 = x0_exact(gmm, x, 1.0, sig)
        c_skip = sigma_data ** 2 / (sig * sig + sigma_data ** 2)
        c_out = sig * sigma_data / math.sqrt(sig * sig + sigma_data ** 2) * (-1 if v else 1)
        return ((x0 - c_skip * x.double()) / c_out).float()
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_matches_edm_dpmsolver(gmm, prediction_type):
    ref = EDMDPMSolverMultistepScheduler(prediction_type=prediction_type, sigma_max=20.0)
    ref.set_timesteps(10)
    fs = FewstepScheduler.from_config(ref.config, solver="dpmpp_2m", spacing="source")
    fs.set_timesteps(10)
    assert fs.config.family == "edm" and torch.allclose(fs.sigmas, ref.sigmas, rtol=1e-5)
    assert torch.allclose(fs.timesteps, ref.timesteps, atol=1e-5)
    assert abs(fs.init_noise_sigma - ref.init_noise_sigma) < 1e-4
    model = edm_model(gmm, v=prediction_type == "v_prediction")
    x = noise(16, 4) * ref.init_noise_sigma
    outs = []
    for s in (fs, ref):
        y = x.clone()
        for t in s.timesteps:
            y = s.step(model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    assert rel(outs[0], outs[1]) < 1e-4


def test_edm_euler_config_and_fewstep_spacing(gmm):
    src = EDMEulerScheduler(sigma_max=20.0)
    fs = FewstepScheduler.from_config(src.config, solver="unipc_bh2_3", spacing="karras")
    fs.set_timesteps(12)
    assert abs(float(fs.sigmas[0]) - 20.0) < 1e-4 and float(fs.sigmas[-1]) == 0.0
    model = edm_model(gmm)
    y = noise(4, 1) * fs.init_noise_sigma
    for t in fs.timesteps:
        y = fs.step(model(fs.scale_model_input(y, t), t), t, y).prev_sample
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------
# Refusals: one line naming the key (or the class), never a silent wrong answer
# ---------------------------------------------------------------------------

REFUSED = {
    "invert_sigmas": (lambda: FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, {}, "invert_sigmas"),
    "stochastic_sampling": (lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config, {},
                            "stochastic_sampling"),
    "flow-sigmas-eps": (lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True).config, {}, "use_flow_sigmas"),
    "continuous-timesteps": (lambda: EulerDiscreteScheduler(timestep_type="continuous").config, {}, "timestep_type"),
    "ddpm-flow-prediction": (lambda: {**{k: v for k, v in DDPMScheduler().config.items() if not k.startswith("_")},
                                      "prediction_type": "flow_prediction"}, {}, "flow_prediction"),
    "karras-source": (lambda: FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config,
                      {"spacing": "source"}, "use_karras_sigmas"),
    "zero-snr-eps-linear": (lambda: DDIMScheduler(rescale_betas_zero_snr=True).config, {}, "rescale_betas_zero_snr"),
    "unknown-class": (lambda: {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "snr": 0.15},
                      {}, "ScoreSdeVeScheduler"),
    "unknown-keys": (lambda: dict(__import__("diffusers").IPNDMScheduler().config), {}, "IPNDMScheduler"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_configs_name_the_key(case):
    make, kw, key = REFUSED[case]
    with pytest.raises(ValueError, match=key) as err:
        FewstepScheduler.from_config(make(), **kw)
    assert "\n" not in str(err.value)


def test_unused_keys_are_one_debug_message_not_a_warning(caplog):
    src = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    with caplog.at_level(logging.DEBUG, logger="fewstep.diffusers"):
        FewstepScheduler.from_config(src.config, solver="unipc_bh2_2")
    msgs = [r for r in caplog.records if r.name == "fewstep.diffusers"]
    assert len(msgs) == 1 and msgs[0].levelno == logging.DEBUG and "solver_order" in msgs[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_flow_config_round_trips(tmp_path):
    src = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1)
    fs = FewstepScheduler.from_config(src.config, solver="unipc_bh2_3", spacing="karras")
    fs.save_pretrained(tmp_path)
    back = FewstepScheduler.from_pretrained(tmp_path)
    assert back.config.family == "flow" and back.config.time_shift_type == "linear"
    for s in (fs, back):
        s.set_timesteps(5, mu=2.0)
    assert torch.equal(fs.timesteps, back.timesteps)


# ---------------------------------------------------------------------------
# Tuned grids on flow-matching configs, and the flow model of `fewstep bench solvers`
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian():
    """One Gaussian with stds from 0.02 to 1: no modes to switch between, so a grid fitted on 16 noises
    carries over to others (on mixtures, small calibration sets overfit; BENCHMARKS.md)."""
    g = torch.Generator().manual_seed(3)
    return GaussianMixture(torch.randn(1, D, generator=g, dtype=torch.float64),
                           torch.logspace(-1.7, 0, D, dtype=torch.float64)[None], torch.ones(1))


def _flow_tuned(model, nfe: int):
    from fewstep.bench.flow import flow_starts
    from fewstep.tune import calibration_set, tune_grid
    source = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched = FewstepScheduler.from_config(source, solver="dpmpp_2m")
    return tune_grid(model.denoiser(sched.schedule), sched.schedule, solver="dpmpp_2m", nfe=nfe,
                     calibration=calibration_set(16, SHAPE, seed=1), reference_steps=256, candidates=32,
                     starts=flow_starts(source, nfe), free_end=True)


def test_flow_scheduler_runs_a_tuned_grid_from_pure_noise_and_beats_fixed_spacings(gaussian):
    source = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tuned = _flow_tuned(gaussian, 4)
    assert tuned.calibration["rmse"] < tuned.calibration["fixed_spacings"]["shifted_uniform"]  # a start it was given
    fs = FewstepScheduler.from_config(source.config, solver="dpmpp_2m", grid=tuned)
    fs.set_timesteps(4)
    assert float(fs.grid[0]) == 1.0 and float(fs.grid[-1]) == 0.0  # starts at sigma = 1, as latents are drawn
    assert torch.allclose(fs.grid[1:], torch.tensor(tuned.times[1:], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        fs.set_timesteps(5)
    x = noise(64, seed=5)  # held-out noise (the grid was fitted on seed 1)
    ref = FewstepScheduler.from_config(source.config, solver="unipc_bh2_3")
    ref.set_timesteps(400)
    target = flow_loop(ref, gaussian, x.clone())
    errors = {}
    for spacing in ("logsnr", "karras", "shifted_uniform", "source"):
        other = FewstepScheduler.from_config(source.config, solver="dpmpp_2m", spacing=spacing)
        other.set_timesteps(4)
        errors[spacing] = float((flow_loop(other, gaussian, x.clone()) - target).pow(2).mean().sqrt())
    tuned_error = float((flow_loop(fs, gaussian, x.clone()) - target).pow(2).mean().sqrt())
    assert tuned_error < min(errors.values()), (tuned_error, errors)


def test_flow_tuned_grid_refuses_dynamic_shifting_and_edm(gaussian):
    from diffusers import EDMEulerScheduler
    tuned = _flow_tuned(gaussian, 3)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True"):
        FewstepScheduler.from_config(dynamic.config, solver="dpmpp_2m", grid=tuned)
    with pytest.raises(ValueError, match="not edm"):
        FewstepScheduler.from_config(EDMEulerScheduler().config, solver="dpmpp_2m", grid=tuned)


def test_bench_solvers_flow_mixture_writes_every_kind_of_row(tmp_path):
    import json

    from click.testing import CliRunner

    from fewstep.cli import main
    r = CliRunner().invoke(main, ["bench", "solvers", "--model", "flow-mixture", "--quick", "--nfe", "4",
                                  "--samples", "4", "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "flow_solvers_quick.json").read_text())
    kinds = {(row["impl"], row["spacing"]) for row in doc["results"]}
    assert {("diffusers", "default"), ("fewstep", "tuned"), ("fewstep", "source"), ("fewstep", "logsnr")} <= kinds
    names = {row["solver"] for row in doc["results"] if row["impl"] == "diffusers"}
    base = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler(flow)", "UniPCMultistepScheduler(flow)")
    assert names == set(base) | {f"{n} shift {k}" for n in base for k in (1, 2, 4)}  # each on several shifts
    assert ("fewstep", "shifted_uniform:shift 2") in kinds
    assert all(row["nfe"] == 4 and row["rmse"] > 0 for row in doc["results"])  # calls counted, not assumed
    assert doc["reference"]["error_estimate"] < 1e-2 and doc["summary"]["4"]["flowmatch_euler_rmse"] > 0
    assert (tmp_path / "flow_solvers_quick.png").stat().st_size > 0
    assert "Tuned grids" in (tmp_path / "flow_solvers_quick.md").read_text()
    bad = CliRunner().invoke(main, ["bench", "solvers", "--model", "flow-mixture", "--w", "1", "--quick"])
    assert bad.exit_code == 2 and "unconditional" in bad.output


def test_bench_flow_schedulers_on_other_shifts_follow_their_shift():
    """Each maker of ``diffusers_schedulers(other_shifts)`` builds its own shift (no late-bound closure): every
    sigma of scheduler X at shift s is the shift-1 sigma u of X shifted, s u / (1 + (s - 1) u) (SD3 eq. 23)."""
    from fewstep.bench.flow import FLOW_EULER, SHIFT, diffusers_schedulers
    makers = diffusers_schedulers((1.0, 2.0, SHIFT))
    assert len(makers) == 9  # the model's shift once, and each other shift
    for name in (FLOW_EULER, "DPMSolverMultistepScheduler(flow)", "UniPCMultistepScheduler(flow)"):
        runs = {}
        for shift, suffix in ((1.0, " shift 1"), (2.0, " shift 2"), (SHIFT, "")):
            sched = makers[name + suffix]()
            sched.set_timesteps(5)
            # interior sigmas, the last left out: FlowMatchEuler ends at its own shifted sigma_min
            runs[shift] = torch.as_tensor(sched.sigmas, dtype=torch.float64)[1:-2]
        u = runs[1.0]
        for shift in (2.0, SHIFT):
            assert torch.allclose(runs[shift], shift * u / (1 + (shift - 1) * u), rtol=5e-3), (name, shift, runs)
