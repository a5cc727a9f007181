"""diffusers models as fewstep denoisers, and the pipeline helper ``fewstep.diffusers.sample``.

Offline: tiny random UNets and a tiny VAE built from configs. A "pipe" for the helper is
any object with ``.unet`` and ``.scheduler`` (and optionally ``.vae``).

Tolerances: float32 round-off (~1e-7 relative per operation). x0 from an epsilon model at
the noisiest step is (x - sigma eps) / alpha with 1 / alpha ~ 150, so those comparisons are
relative to the values' size. Helper outputs are clamped to [-1, 1]; where the comparison
should be informative the tests use v-prediction, whose x0 = alpha x - sigma v stays O(1)
even for a random network.
"""
from __future__ import annotations

import types

import pytest
import torch

from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       UNet2DConditionModel)

import fewstep  # noqa: E402
from fewstep.diffusers import DiffusersDenoiser, FewstepScheduler, pipeline_denoiser  # noqa: E402
from fewstep.diffusers import sample as pipeline_sample  # noqa: E402
from fewstep.sampling import expected_nfe, solver_grid  # noqa: E402
from _tiny_models import tiny_unet


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gens(*seeds):
    return [gen(s) for s in seeds]


def noise_like_helper(shape, seeds) -> torch.Tensor:
    """x_T as the helper draws it: one (1, C, H, W) draw per sample from its own generator."""
    return torch.cat([torch.randn((1, *shape), generator=gen(s)) for s in seeds])


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def class_unet():
    return tiny_unet(num_class_embeds=11)  # classes 0..9, 10 = the null class


def pipe_of(unet, scheduler, **extra):
    return types.SimpleNamespace(unet=unet, scheduler=scheduler, **extra)


def alpha_sigma(ac: torch.Tensor, k: torch.Tensor):
    """alpha, sigma at integer timesteps k from alphas_cumprod (float64), shaped for (B, C, H, W)."""
    a = ac.double()[k].sqrt().view(-1, 1, 1, 1)
    return a, (1 - a * a).sqrt()


def count_calls(module):
    """Count forward calls of a module (NFE) with a hook; returns (counter list, handle)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
    return calls, module.register_forward_hook(hook)


# ---------------------------------------------------------------------------
# DiffusersDenoiser: prediction type and schedule from a scheduler config
# ---------------------------------------------------------------------------

CONFIG_SOURCES = {  # name: (scheduler, fewstep prediction name)
    "ddpm-linear-eps": (lambda: DDPMScheduler(), "eps"),
    "ddim-scaled_linear-v": (lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, prediction_type="v_prediction"), "v"),
    "dpm-cos-500-x0": (lambda: DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2",
                                                           num_train_timesteps=500, prediction_type="sample"), "x0"),
    "ddpm-trained-300-v": (lambda: DDPMScheduler(trained_betas=torch.linspace(1e-4, 0.04, 300).tolist(),
                                                 num_train_timesteps=300, prediction_type="v_prediction"), "v"),
}


@pytest.mark.parametrize("name", list(CONFIG_SOURCES))
def test_denoiser_reads_prediction_type_and_betas(unet, name):
    make, prediction = CONFIG_SOURCES[name]
    sched = make()
    for config in (sched.config, dict(sched.config)):  # a FrozenDict or a plain dict
        den = DiffusersDenoiser(unet, config)
        assert den.prediction == prediction
        assert den.schedule.N == sched.config.num_train_timesteps
        # diffusers' float32 cumprod over N factors: ~N * 6e-8 relative round-off at most
        ac = sched.alphas_cumprod.double()
        assert ((den.schedule.alphas_cumprod - ac).abs() / ac).max() < 1e-4
        assert den.net is unet and not den.learned_variance


def test_denoiser_defaults_are_diffusers_defaults(unet):
    """Missing keys mean diffusers' defaults: linear betas 1e-4..0.02 over 1000 steps, epsilon."""
    den = DiffusersDenoiser(unet, {})
    assert den.prediction == "eps" and den.schedule.N == 1000
    ac = DDPMScheduler().alphas_cumprod.double()
    assert ((den.schedule.alphas_cumprod - ac).abs() / ac).max() < 1e-4


def test_denoiser_rejects_an_unsupported_prediction_type(unet):
    with pytest.raises(ValueError, match=r"flow_prediction.*epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet, {"prediction_type": "flow_prediction"})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_equals_manual_conversion(unet, prediction_type):
    sched = DDPMScheduler(prediction_type=prediction_type)
    den = DiffusersDenoiser(unet, sched.config)
    x = torch.randn(3, 3, 8, 8, generator=gen(0))
    k = torch.tensor([999, 500, 0])  # one timestep per sample
    t = (k.double() + 1) / 1000  # fewstep's continuous time of discrete step k
    with torch.no_grad():
        got = den(x, t)
        out = unet(x, k.float()).sample.double()
    a, s = alpha_sigma(sched.alphas_cumprod, k)
    xd = x.double()
    expected = {"epsilon": (xd - s * out) / a,  # x = a x0 + s eps
                "v_prediction": a * xd - s * out,  # v = a eps - s x0, a^2 + s^2 = 1
                "sample": out}[prediction_type]
    assert got.shape == x.shape and got.dtype == x.dtype
    scale = max(1.0, float(expected.abs().max()))  # ~300 for eps at k = 999 (1 / alpha ~ 150)
    assert (got.double() - expected).abs().max() < 1e-5 * scale


def test_denoiser_at_fractional_timesteps(unet):
    """Between training steps the model gets the fractional timestep and log alpha is
    interpolated linearly (DPM-Solver, arXiv 2206.00927, App. D)."""
    sched = DDPMScheduler(prediction_type="v_prediction")
    den = DiffusersDenoiser(unet, sched.config)
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    k = torch.tensor([250.5, 700.25], dtype=torch.float64)
    with torch.no_grad():
        got = den(x, (k + 1) / 1000)
        v = unet(x, k.float()).sample.double()
    log_ac = sched.alphas_cumprod.double().log()
    lo, frac = k.floor().long(), k - k.floor()
    a = (0.5 * ((1 - frac) * log_ac[lo] + frac * log_ac[lo + 1])).exp().view(-1, 1, 1, 1)
    s = (1 - a * a).sqrt()
    assert (got.double() - (a * x.double() - s * v)).abs().max() < 1e-5


def test_learned_variance_keeps_the_mean_half():
    unet6 = tiny_unet(out_channels=6)  # mean and variance, 3 channels each
    sched = DDPMScheduler(variance_type="learned_range")
    den = DiffusersDenoiser(unet6, sched.config)
    assert den.learned_variance
    x = torch.randn(2, 3, 8, 8, generator=gen(2))
    k = torch.tensor([600, 40])
    with torch.no_grad():
        got = den(x, (k.double() + 1) / 1000)
        eps = unet6(x, k.float()).sample[:, :3].double()
    a, s = alpha_sigma(sched.alphas_cumprod, k)
    expected = (x.double() - s * eps) / a
    assert got.shape == x.shape
    assert (got.double() - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))


def test_unknown_conditioning_is_an_error(unet):
    den = DiffusersDenoiser(unet, DDPMScheduler().config)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown conditioning.*prompt"):
        den(x, 0.5, prompt=torch.zeros(1, 4))


def test_pipeline_denoiser(unet):
    sched = DDPMScheduler(prediction_type="v_prediction")
    den = pipeline_denoiser(pipe_of(unet, sched))
    assert isinstance(den, DiffusersDenoiser) and den.net is unet and den.prediction == "v"
    with pytest.raises(ValueError, match="DiffusersDenoiser"):
        pipeline_denoiser(types.SimpleNamespace(transformer=unet, scheduler=sched))


# ---------------------------------------------------------------------------
# The helper: any fewstep solver on a pipeline's model, with guidance
# ---------------------------------------------------------------------------

def test_class_conditional_cfg_helper_equals_scheduler_loop(class_unet):
    """Helper with guidance w on class labels == FewstepScheduler loop with CFG done by hand
    on the noise prediction: eps_c + w (eps_c - eps_u) (diffusers' guidance_scale = 1 + w)."""
    sched = DDPMScheduler(prediction_type="v_prediction")
    labels, null = torch.tensor([3, 7]), torch.full((2,), 10)
    w = 1.5
    images = pipeline_sample(pipe_of(class_unet, sched), solver="dpmpp_2m", steps=8, guidance=w,
                             class_labels=labels, uncond_class_labels=null, generator=gens(0, 1), progress=False)
    fs = FewstepScheduler.from_config(sched.config, solver="dpmpp_2m")
    fs.set_timesteps(8)
    x = noise_like_helper((3, 8, 8), (0, 1))
    with torch.no_grad():
        for t in fs.timesteps:
            c = class_unet(x, t, class_labels=labels).sample
            u = class_unet(x, t, class_labels=null).sample
            x = fs.step(c + w * (c - u), t, x).prev_sample
    assert images.shape == (2, 3, 8, 8)
    assert (images - x.clamp(-1, 1)).abs().max() < 1e-4
    assert float((x.abs() < 1).float().mean()) > 0.3  # the clamp leaves most values to compare
    unguided = pipeline_sample(pipe_of(class_unet, sched), solver="dpmpp_2m", steps=8, class_labels=labels,
                               generator=gens(0, 1), progress=False)
    assert (unguided - images).abs().max() > 1e-2  # guidance is really applied


def test_text_cfg_with_added_conditions_helper_equals_scheduler_loop():
    """UNet2DConditionModel with encoder_hidden_states and SDXL-style added_cond_kwargs."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 6 * 4).eval()
    sched = DDPMScheduler(prediction_type="v_prediction")
    g = gen(5)
    pos, neg = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    time_ids = torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)
    added = {"text_embeds": torch.randn(2, 6, generator=g), "time_ids": time_ids}
    neg_added = {"text_embeds": torch.zeros(2, 6), "time_ids": time_ids}
    w = 2.0
    images = pipeline_sample(pipe_of(unet, sched), solver="unipc_bh2_2", steps=6, guidance=w, prompt_embeds=pos,
                             negative_prompt_embeds=neg, added_cond_kwargs=added,
                             negative_added_cond_kwargs=neg_added, generator=gens(3, 4), progress=False)
    fs = FewstepScheduler.from_config(sched.config, solver="unipc_bh2_2")
    fs.set_timesteps(6)
    x = noise_like_helper((4, 8, 8), (3, 4))
    with torch.no_grad():
        for t in fs.timesteps:
            c = unet(x, t, encoder_hidden_states=pos, added_cond_kwargs=added).sample
            u = unet(x, t, encoder_hidden_states=neg, added_cond_kwargs=neg_added).sample
            x = fs.step(c + w * (c - u), t, x).prev_sample
    assert images.shape == (2, 4, 8, 8)
    assert (images - x.clamp(-1, 1)).abs().max() < 1e-4
    assert float((x.abs() < 1).float().mean()) > 0.3


WHOLE_LOOP_OPTIONS = {"dpm_solver_3": {}, "heun": {}, "dpm_solver_23": {"rtol": 0.2, "atol": 0.05}}


@pytest.mark.parametrize("solver", list(WHOLE_LOOP_OPTIONS))
def test_helper_runs_whole_loop_solvers(class_unet, solver):
    """Solvers the scheduler cannot run: the helper equals fewstep.sample on the pipeline's
    denoiser, with one batched model call per NFE (CFG included)."""
    sched = DDPMScheduler(prediction_type="v_prediction")
    pipe = pipe_of(class_unet, sched)
    labels, null = torch.tensor([2, 5]), torch.full((2,), 10)
    calls, handle = count_calls(class_unet)
    try:
        options = WHOLE_LOOP_OPTIONS[solver]  # solver options pass through the helper
        images = pipeline_sample(pipe, solver=solver, steps=8, guidance=1.0, class_labels=labels,
                                 uncond_class_labels=null, generator=gens(0, 1), progress=False, **options)
        helper_calls, calls[0] = calls[0], 0
        den = fewstep.ClassifierFreeGuidance(pipeline_denoiser(pipe), 1.0, {"class_labels": null})
        with torch.no_grad():
            ref = fewstep.sample(den, noise_like_helper((3, 8, 8), (0, 1)), den.denoiser.schedule, solver=solver,
                                 steps=8, cond={"class_labels": labels}, **options)
    finally:
        handle.remove()
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert (images - ref.x.clamp(-1, 1)).abs().max() < 1e-6  # the same computation
    assert helper_calls == ref.nfe
    grid, extra = solver_grid(den.denoiser.schedule, solver, 8)
    if solver != "dpm_solver_23":  # adaptive: the error control picks the NFE
        assert ref.nfe == expected_nfe(solver, grid, extra)
    if solver == "dpm_solver_3":  # the budget is the NFE
        assert ref.nfe == 8
    if solver == "heun":  # 8 intervals, two calls each but one for the last step to 0
        assert ref.nfe == 15


def test_helper_output_shape_range_and_per_sample_noise(unet):
    pipe = pipe_of(unet, DDPMScheduler())  # epsilon + random net: most values leave [-1, 1]
    images = pipeline_sample(pipe, solver="dpmpp_2m", steps=5, batch_size=3, generator=gens(7, 8, 9), progress=False)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert bool((images.abs() == 1).any())  # the clamp was needed, and applied
    # sample i depends only on its own generator, not on the batch it is in
    alone = pipeline_sample(pipe, solver="dpmpp_2m", steps=5, batch_size=1, generator=[gen(8)], progress=False)
    assert (alone[0] - images[1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="generators"):
        pipeline_sample(pipe, steps=2, batch_size=3, generator=gens(1, 2), progress=False)


def test_helper_decodes_latents_with_the_vae():
    unet = tiny_unet(in_channels=4, out_channels=4)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                            norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()
    sched = DDPMScheduler(prediction_type="v_prediction")
    images = pipeline_sample(pipe_of(unet, sched, vae=vae), solver="dpmpp_2m", steps=4, batch_size=2,
                             generator=gens(0, 1), progress=False)
    den = pipeline_denoiser(pipe_of(unet, sched))
    with torch.no_grad():
        latents = fewstep.sample(den, noise_like_helper((4, 8, 8), (0, 1)), den.schedule, solver="dpmpp_2m",
                                 steps=4).x
        expected = vae.decode(latents / 0.5).sample.clamp(-1, 1)  # latents / scaling_factor
    assert images.shape == (2, 3, 16, 16)  # one 2x upsampling in the decoder
    assert (images - expected).abs().max() < 1e-5


def test_guidance_without_negative_inputs_is_an_error(unet, class_unet):
    sched = DDPMScheduler()
    with pytest.raises(ValueError, match=r"unconditional.*class_labels|class_labels.*unconditional"):
        pipeline_sample(pipe_of(class_unet, sched), steps=2, guidance=2.0, class_labels=torch.tensor([1]),
                        progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cond_unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4).eval()
    pos = torch.randn(1, 5, 12, generator=gen(0))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        pipeline_sample(pipe_of(cond_unet, sched), steps=2, guidance=2.0, prompt_embeds=pos, progress=False)
    # w = 0 is the plain conditional model: no negative inputs needed, one call per step
    calls, handle = count_calls(cond_unet)
    try:
        out = pipeline_sample(pipe_of(cond_unet, sched), steps=3, guidance=0.0, prompt_embeds=pos,
                              generator=[gen(0)], progress=False)
    finally:
        handle.remove()
    assert out.shape == (1, 4, 8, 8) and calls[0] == 3
