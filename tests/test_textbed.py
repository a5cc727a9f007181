"""The MNIST text-to-image test bed: components, recipes (tiny settings, a few steps) and the saved
pipelines loaded and sampled by plain diffusers."""
import json
from dataclasses import replace

import pytest
import torch

from fewstep.data.captions import caption
from fewstep.data.text import load_tokenizer
from fewstep.nets.textbed import (RepeatedTokenJointAttnProcessor, build_sd3_transformer, build_text_encoder,
                                  build_unet, build_vae, param_count)
from fewstep.recipes import RECIPES
from fewstep.recipes.textbed import (MNIST_SD, MNIST_SD3, MNIST_VAE, FlowLatentLoss, caption_table, latent_stats,
                                     posterior_moments, prompt_separation, run_sd, run_sd3, run_vae, shift_sigmas)

TINY_VAE_NET = {"block_out_channels": [8, 8, 8], "norm_num_groups": 4}
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16}
LOOP = dict(batch_size=8, warmup=0, ckpt_every_minutes=None, sample_every_minutes=None)
TINY_VAE = replace(MNIST_VAE, vae=TINY_VAE_NET, steps=3, **LOOP)
TINY_SD = replace(MNIST_SD, vae=TINY_VAE, text=TINY_TEXT, steps=3,
                  unet={"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 2}, **LOOP)
TINY_SD3 = replace(MNIST_SD3, vae=TINY_VAE, text=TINY_TEXT, steps=3,
                   transformer={"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2}, **LOOP)


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 32, 32, generator=g) * 2 - 1
    captions = [caption(i % 10, ("thin", None, "thick")[i % 3], (None, "left")[i % 2]) for i in range(24)]
    return x, captions


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run folder: the tiny VAE stage, then mnist-sd and mnist-sd3 reusing it."""
    out = tmp_path_factory.mktemp("textbed")
    vae = run_vae(out, TINY_VAE, data=tiny_data, progress=False)
    sd = run_sd(out, TINY_SD, data=tiny_data, progress=False)
    sd3 = run_sd3(out, TINY_SD3, data=tiny_data, progress=False)
    return out, vae, sd, sd3


def test_components_have_the_shapes_the_pipelines_need():
    tok = load_tokenizer()
    vae = build_vae()
    z = vae.encode(torch.zeros(2, 1, 32, 32)).latent_dist.mean
    assert z.shape == (2, 4, 8, 8)
    assert vae.decode(z).sample.shape == (2, 1, 32, 32)
    te = build_text_encoder(tok)
    ids = tok(["a thick seven"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert te(ids)[0].shape == (1, 16, 64)
    te2 = build_text_encoder(tok, projection=True)
    assert te2(ids).text_embeds.shape == (1, 64)
    assert te.config.vocab_size == len(tok) and te.config.eos_token_id == tok.eos_token_id
    unet = build_unet()
    assert unet(torch.zeros(2, 4, 8, 8), 10, torch.zeros(2, 16, 64)).sample.shape == (2, 4, 8, 8)
    sd3 = build_sd3_transformer()
    out = sd3(hidden_states=torch.zeros(2, 4, 8, 8), encoder_hidden_states=torch.zeros(2, 5, 128),
              pooled_projections=torch.zeros(2, 128), timestep=torch.ones(2)).sample
    assert out.shape == (2, 4, 8, 8)
    # sized for a 2-core CPU: about 1-3M parameters each
    for m in (vae, unet, sd3):
        assert 0.5e6 < param_count(m) < 3e6
    # the same seed gives the same weights whatever the RNG state; another seed does not
    torch.manual_seed(123)
    assert torch.equal(build_text_encoder(tok).get_input_embeddings().weight,
                       te.get_input_embeddings().weight)
    assert not torch.equal(build_text_encoder(tok, seed=5).get_input_embeddings().weight,
                           te.get_input_embeddings().weight)


def test_bad_component_configs_are_refused():
    with pytest.raises(ValueError, match="one entry per block_out_channels"):
        build_vae({"block_out_channels": [8, 8]})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_sd3_transformer({"sample_size": 7})
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        build_text_encoder(load_tokenizer(), {"hidden_size": 30})
    with pytest.raises(ValueError, match="seed must be an integer"):
        build_unet(seed=1.5)


def test_one_repeated_token_equals_the_pipelines_256_zero_rows():
    m = build_sd3_transformer({"num_layers": 2}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights than at initialisation, so that the context weighs in
        for p in m.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    z, clip = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, 128, generator=g)
    pooled, t = torch.randn(3, 128, generator=g), torch.tensor([10.0, 500.0, 990.0])
    full = torch.cat([clip, torch.zeros(3, 256, 128)], 1)
    with torch.no_grad():
        want = m(hidden_states=z, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        m.set_attn_processor(RepeatedTokenJointAttnProcessor(256))
        got = m(hidden_states=z, encoder_hidden_states=full[:, :17], pooled_projections=pooled, timestep=t).sample
        m.set_attn_processor(RepeatedTokenJointAttnProcessor(1))  # the zero row counted once
        wrong = m(hidden_states=z, encoder_hidden_states=full[:, :17], pooled_projections=pooled, timestep=t).sample
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max())
    assert (wrong - want).abs().max() > 1e-2 * want.abs().max()  # the count matters
    with pytest.raises(ValueError, match="positive integer"):
        RepeatedTokenJointAttnProcessor(0)


def test_random_frozen_text_encoders_separate_every_prompt():
    from fewstep.data.captions import DIGITS, caption
    prompts = [""] + [caption(d, t, s) for d in range(len(DIGITS)) for t in ("thin", None, "thick")
                      for s in ("left", None, "right")]
    assert len(set(prompts)) == 91
    tok = load_tokenizer()
    ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        seq = build_text_encoder(tok, seed=1)(ids)[0]
        pooled = build_text_encoder(tok, seed=2, projection=True)(ids).text_embeds
    assert prompt_separation(seq) > 0.05
    assert prompt_separation(pooled) > 0.05  # SD3's pooled vector alone tells the 91 prompts apart
    assert prompt_separation(torch.cat([seq[:1], seq[:1], seq[1:]])) == 0.0  # a collision reads 0


def test_caption_table_puts_the_empty_prompt_in_the_table():
    distinct, index, null = caption_table(["a thin one", "a thick two", "a thin one"])
    assert distinct[null] == "" and len(distinct) == 3
    assert [distinct[i] for i in index] == ["a thin one", "a thick two", "a thin one"]


def test_vae_scaling_factor_is_one_over_the_latent_std(trained):
    from diffusers import AutoencoderKL
    out, folder, _, _ = trained
    vae = AutoencoderKL.from_pretrained(folder)
    x, _ = tiny_data()
    # independently: many posterior draws, pooled
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        draws = torch.stack([d.sample(generator=g) for _ in range(400)]).double()
    assert vae.config.scaling_factor == pytest.approx(1 / draws.std().item(), rel=0.01)
    assert vae.config.shift_factor == pytest.approx(draws.mean().item(), abs=0.01 * draws.std().item())
    # and exactly by the law of total variance
    mean, std = latent_stats(*posterior_moments(vae, x))
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=1e-5)
    info = json.loads((folder / "fewstep.json").read_text())
    assert info["train_steps"] == 3 and info["latent_std"] == pytest.approx(std, rel=1e-5)
    # the stage was reused by both pipelines, not retrained
    assert len(json.loads((out / "mnist-vae-train" / "latest.json").read_text())["dir"]) > 0
    assert sorted(p.name for p in (out / "mnist-vae-train").glob("ckpt-*")) == ["ckpt-00000003"]


def test_latent_stats_by_the_law_of_total_variance():
    means = torch.tensor([[0.0], [2.0]])
    stds = torch.tensor([[1.0], [1.0]])
    m, s = latent_stats(means, stds)
    assert m == pytest.approx(1.0) and s == pytest.approx(2 ** 0.5)  # Var = Var(mu) 1 + E sigma^2 1


def test_stable_diffusion_folder_loads_and_samples_with_plain_diffusers(trained):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    _, _, folder, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.skip_prk_steps
    assert pipe.vae.config.shift_factor is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a thick seven", num_inference_steps=2, guidance_scale=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1
    pil = pipe(["a thin one", ""], num_inference_steps=2, guidance_scale=2).images
    assert pil[0].size == (32, 32) and pil[0].mode == "L"
    info = json.loads((folder / "fewstep.json").read_text())
    assert info["train_steps"] == 3 and info["captions"] == len(set(tiny_data()[1])) + 1  # and ""


def test_sd3_folder_loads_without_t5_and_samples_with_plain_diffusers(trained):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    _, _, _, folder = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.shift_factor is not None
    assert all(isinstance(p, JointAttnProcessor2_0) for p in pipe.transformer.attn_processors.values())
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a thick seven", num_inference_steps=2, guidance_scale=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()


def test_flow_loss_matches_the_full_sequence_loss_it_replaces(trained):
    """The shortened training sequence gives the transformer the same loss as the pipeline's full one."""
    from diffusers import StableDiffusion3Pipeline
    _, _, _, folder = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(["a thin two", ""], None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
    assert embeds.shape == (2, 16 + 256, 16 + 16)
    batch = (torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), 0.1), torch.tensor([0, 1]))
    losses = []
    for ctx, proc in ((embeds, None), (embeds[:, :17], RepeatedTokenJointAttnProcessor(256))):
        if proc is not None:
            pipe.transformer.set_attn_processor(proc)
        loss = FlowLatentLoss(ctx, pooled, 1, 0.0, _identity_latents(), 3.0, "logit_normal")
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(loss(pipe.transformer, batch))
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)


class _identity_latents:
    def draw(self, mu, sigma):
        return mu + sigma * torch.randn_like(mu)


def test_shifted_times_are_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.linspace(1, 1e-3, 1000, dtype=torch.float64)
    assert len(sched.sigmas) == 1000
    assert torch.allclose(shift_sigmas(u, 3.0).float(), sched.sigmas, atol=1e-6)
    assert not torch.allclose(shift_sigmas(u, 1.0).float(), sched.sigmas, atol=1e-3)


def test_resume_continues_the_step_count(tmp_path):
    out = tmp_path / "run"
    s = replace(TINY_VAE, steps=2)
    run_vae(out, s, data=tiny_data, progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        run_vae(out, replace(s, steps=4), data=tiny_data, progress=False)
    run_vae(out, replace(s, steps=4), data=tiny_data, progress=False, resume=True)
    log = [json.loads(line) for line in (out / "mnist-vae-train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert json.loads((out / "mnist-vae" / "fewstep.json").read_text())["train_steps"] == 4
    state = json.loads((out / "mnist-vae-train" / "ckpt-00000004" / "state.json").read_text())
    assert state["step"] == 4


def test_recipes_are_registered_and_bad_settings_refused(tmp_path):
    assert RECIPES["mnist-vae"].run is run_vae and RECIPES["mnist-sd"].run is run_sd
    assert RECIPES["mnist-sd3"].run is run_sd3
    with pytest.raises(ValueError, match="prediction must be"):
        run_sd(tmp_path, replace(TINY_SD, prediction="x0"), data=tiny_data)
    with pytest.raises(ValueError, match="caption_dropout"):
        run_sd3(tmp_path, replace(TINY_SD3, caption_dropout=1.0), data=tiny_data)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        run_vae(tmp_path, TINY_VAE, data=lambda: torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="one caption string per image"):
        run_sd(tmp_path, TINY_SD, data=lambda: (torch.zeros(4, 1, 32, 32), ["a thin one"]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_targets_are_the_schedulers(prediction):
    """A UNet answering diffusers' own target (noise, or DDPMScheduler.get_velocity on the same betas) has
    zero loss."""
    from diffusers import DDPMScheduler
    from fewstep.recipes.textbed import VPLatentLoss, _Latents, sd_scheduler
    sched = DDPMScheduler.from_config(sd_scheduler(replace(MNIST_SD, prediction=prediction)).config)
    z = torch.randn(6, 4, 8, 8)

    class Oracle(torch.nn.Module):
        def forward(self, z_t, t, context):
            a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (z_t - a.sqrt() * z) / (1 - a).sqrt()
            assert torch.allclose(sched.add_noise(z, eps, t), z_t, atol=1e-5)
            out = eps if prediction == "epsilon" else sched.get_velocity(z, eps, t)
            return type("Out", (), {"sample": out})()

    embeds = torch.randn(3, 16, 64)
    batch = (z, torch.zeros_like(z), torch.tensor([0, 1, 2, 0, 1, 2]))
    for p, want_zero in ((prediction, True), ("v_prediction" if prediction == "epsilon" else "epsilon", False)):
        loss = VPLatentLoss(sched.alphas_cumprod, embeds, 2, 0.1, p, _Latents(1.0, 0.0))(Oracle(), batch)
        assert loss.shape == (6,)
        assert (loss.max() < 1e-8) if want_zero else (loss.max() > 1e-3)


def test_shipped_vae_loads_offline_and_keeps_the_digits():
    """fewstep/assets/mnist-vae (fp16) loads with plain diffusers; its scaling factor is 1/std of the latents
    it recorded; the shipped classifier reads its reconstructions of 200 held-out digits as their labels."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL

    import fewstep
    from fewstep.data.captions import load_mnist32
    from fewstep.metrics import class_accuracy
    folder = Path(fewstep.__file__).parent / "assets" / "mnist-vae"
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    info = json.loads((folder / "fewstep.json").read_text())
    assert abs(vae.config.scaling_factor * info["latent_std"] - 1) < 1e-6
    x, y = load_mnist32("heldout")
    x, y = x[::5], y[::5]
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert rec.shape == x.shape and (rec - x).abs().mean() < 0.03
    acc = class_accuracy(fewstep.load("mnist-classifier"), rec[:, :, 2:30, 2:30], y)
    assert acc >= 0.95, acc
