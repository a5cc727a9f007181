"""The text-to-image evaluation (fewstep.evaluate.evaluate_prompts, `fewstep eval --model <pipeline>`):
the scores on real captioned digits, the schedulers it swaps in, and a run end to end on tiny random
pipelines built from the test bed's components (no training)."""
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.data.captions import SLANT, THICKNESS, caption_images, load_mnist32, parse_caption
from fewstep.data.text import load_tokenizer
from fewstep.evaluate import (attribute_adherence, centre_crop, check_scheduler_name, evaluate_prompts, flow_settings,
                              generate_prompted, heldout_reference, load_text_pipeline, make_scheduler, parse_prompts,
                              prompt_suite, prompted_class_accuracy, suite_size)
from fewstep.nets.textbed import build_sd3_transformer, build_text_encoder, build_unet, build_vae
from fewstep.recipes.textbed import MNIST_SD, sd_scheduler

TINY_VAE = {"block_out_channels": [8, 8, 8], "norm_num_groups": 4}
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16}
SCHEDULER_NAMES = ["stock", "dpmsolver", "unipc", "fewstep", "fewstep:dpmpp_2m"]


def tiny_sd():
    """A StableDiffusionPipeline of the test bed's components at tiny sizes, random weights."""
    from diffusers import StableDiffusionPipeline
    tok = load_tokenizer()
    unet = build_unet({"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 2},
                      cross_attention_dim=TINY_TEXT["hidden_size"])
    pipe = StableDiffusionPipeline(vae=build_vae(TINY_VAE), text_encoder=build_text_encoder(tok, TINY_TEXT, seed=1),
                                   tokenizer=tok, unet=unet, scheduler=sd_scheduler(MNIST_SD), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3():
    """A StableDiffusion3Pipeline (no T5) of the test bed's components at tiny sizes, random weights, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    tok = load_tokenizer()
    encoders = [build_text_encoder(tok, TINY_TEXT, seed=k, projection=True) for k in (1, 2)]
    width = 2 * TINY_TEXT["hidden_size"]
    transformer = build_sd3_transformer({"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2},
                                        joint_attention_dim=width, pooled_projection_dim=width)
    vae = build_vae(TINY_VAE)
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1],
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def heldout():
    x, y = load_mnist32("heldout")
    return x, y, caption_images(x, y)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "tiny-sd"
    tiny_sd().save_pretrained(folder)
    return folder


# -- the prompt suite ----------------------------------------------------------

def test_suite_has_every_digit_thickness_and_slant_equally_often():
    suite = prompt_suite(2000)
    assert len(suite.texts) == 2070 and suite_size(90) == 90 and suite_size(91) == 180
    combos = {}
    for text in suite.texts:
        combos[parse_caption(text)] = combos.get(parse_caption(text), 0) + 1
    assert set(combos) == {(d, t, s) for d in range(10) for t in THICKNESS for s in SLANT}
    assert set(combos.values()) == {23}
    # what the suite says each prompt asks for is what the prompt's words say
    back = parse_prompts(suite.texts)
    assert torch.equal(back.labels, suite.labels) and (back.thickness, back.slant) == (suite.thickness, suite.slant)
    assert len(set(prompt_suite(90).texts)) == 90  # one batch of 90: each prompt once


@pytest.mark.parametrize("n", [0, 89, 2.5, True])
def test_suite_refuses_fewer_images_than_prompts(n):
    with pytest.raises(ValueError, match="n >= 90"):
        suite_size(n)


# -- the scores on real digits -------------------------------------------------

def test_adherence_is_one_on_real_digits_with_their_measured_captions(heldout):
    x, _, captions = heldout
    scores = attribute_adherence(centre_crop(x), parse_prompts(captions))
    assert scores == {"thickness_adherence": 1.0, "slant_adherence": 1.0, "mean_adherence": 1.0}


def test_adherence_is_about_one_half_with_shuffled_captions(heldout):
    x, _, captions = heldout
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    scores = attribute_adherence(centre_crop(x), parse_prompts([captions[i] for i in order]))
    for key in ("thickness_adherence", "slant_adherence", "mean_adherence"):
        assert 0.35 < scores[key] < 0.65, scores


def test_thickness_is_compared_within_the_prompted_digit():
    """A "thick one" with less ink than a "thin eight" still counts: ones carry less ink than eights."""
    ones, eights = torch.full((4, 1, 28, 28), -1.0), torch.full((4, 1, 28, 28), -1.0)
    for k in range(4):
        ones[k, 0, 4:24, 13:14 + k] = 1.0       # one-pixel to four-pixel wide strokes
        eights[k, 0, 4:24, 8:18 + k] = 1.0      # far more ink than any one
    prompts = parse_prompts(["a thin one", "a thin one", "a thick one", "a thick one",
                             "a thin eight", "a thin eight", "a thick eight", "a thick eight"])
    assert attribute_adherence(torch.cat([ones, eights]), prompts)["thickness_adherence"] == 1.0


def test_prompted_digit_accuracy_on_real_captioned_digits(heldout):
    x, y, captions = heldout
    classifier = fewstep.load("mnist-classifier")
    prompts = parse_prompts(captions)
    assert torch.equal(prompts.labels, y)
    assert prompted_class_accuracy(x, prompts, classifier) > 0.95  # 32x32 images: the 28x28 centre is read
    wrong = parse_prompts([captions[i] for i in torch.roll(torch.arange(len(y)), 100).tolist()])  # other digits
    assert prompted_class_accuracy(x, wrong, classifier) < 0.1


# -- schedulers ----------------------------------------------------------------

@pytest.mark.parametrize("name, words", [("euler", "unknown scheduler 'euler'"), ("unipc:bh2", "unknown scheduler"),
                                         ("fewstep:heun", "one model call per step"),
                                         ("fewstep:no_such", "one model call per step")])
def test_unknown_scheduler_names_are_refused(name, words):
    with pytest.raises(ValueError, match=words):
        check_scheduler_name(name)


def _latents(pipe, scheduler, steps):
    stock = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(["a thin zero", "an eight slanted left"], num_inference_steps=steps, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images
    finally:
        pipe.scheduler = stock


def test_flow_schedulers_solve_the_sd3_pipelines_ode():
    """On SD3 (flow matching, shift 3) every named scheduler approaches the same ODE solution as the stock
    FlowMatchEuler at 100 steps: 10 steps of a second-order solver (or 20 of Euler) are within 5% of the
    latents' RMS of it, while DPMSolverMultistep without the flow settings (epsilon prediction) is O(1) off."""
    from diffusers import DPMSolverMultistepScheduler
    pipe = tiny_sd3()
    assert flow_settings(pipe.scheduler.config) == {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                    "flow_shift": 3.0}
    ref = _latents(pipe, make_scheduler("stock", pipe.scheduler), 100)
    rel = lambda x: float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())  # noqa: E731
    for name in SCHEDULER_NAMES:
        err = rel(_latents(pipe, make_scheduler(name, pipe.scheduler), 20 if name == "stock" else 10))
        assert err < 0.05, (name, err)
    assert rel(_latents(pipe, DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), 10)) > 0.5


def test_vp_schedulers_keep_the_pipelines_betas_and_prediction():
    pipe = tiny_sd()
    assert flow_settings(pipe.scheduler.config) == {}
    for name in SCHEDULER_NAMES:
        s = make_scheduler(name, pipe.scheduler)
        assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "scaled_linear"
        assert torch.allclose(s.alphas_cumprod.double(), pipe.scheduler.alphas_cumprod.double(), rtol=1e-6)
        assert (s is not pipe.scheduler) and torch.isfinite(_latents(pipe, s, 3)).all()


# -- end to end ----------------------------------------------------------------

KEYS = {"class_accuracy", "thickness_adherence", "slant_adherence", "mean_adherence", "fid", "kid", "nfe",
        "seconds_per_image", "scheduler", "scheduler_class", "steps", "guidance_scale", "n", "seed", "baseline"}


@pytest.fixture(scope="module")
def classifier():
    return fewstep.load("mnist-classifier")


@pytest.mark.parametrize("make, calls", [(tiny_sd, 4), (tiny_sd3, 3)])  # PNDM (skip_prk_steps): steps + 1 calls
def test_network_evaluations_are_counted_and_batches_seeded(make, calls):
    pipe = make()
    prompts = prompt_suite(90).texts[:4]
    a, _, guided = generate_prompted(pipe, prompts, steps=3, guidance_scale=2.0, seed=1, batch_size=2)
    b, _, plain = generate_prompted(pipe, prompts, steps=3, guidance_scale=1.0, seed=1, batch_size=2)
    assert guided == 2 * calls and plain == calls  # classifier-free guidance doubles the rows of every call
    assert a.shape == (4, 1, 32, 32) and -1 <= a.min() and a.max() <= 1
    again, _, _ = generate_prompted(pipe, prompts, steps=3, guidance_scale=2.0, seed=1, batch_size=2)
    other, _, _ = generate_prompted(pipe, prompts, steps=3, guidance_scale=2.0, seed=2, batch_size=2)
    assert torch.equal(a, again) and not torch.allclose(a, other)
    assert not torch.allclose(a[:2], a[2:])  # batch 2 draws other noise than batch 1


def test_evaluate_prompts_end_to_end_on_a_tiny_pipeline_folder(sd_folder, classifier):
    pipe = load_text_pipeline(sd_folder)
    stock = pipe.scheduler
    reference = heldout_reference(90, classifier)
    res = evaluate_prompts(pipe, scheduler="fewstep", steps=2, guidance_scale=2.0, n=90, batch_size=45,
                           classifier=classifier, reference=reference)
    assert KEYS <= set(res) and res["n"] == 90 and res["scheduler_class"] == "FewstepScheduler"
    for key in ("class_accuracy", "thickness_adherence", "slant_adherence", "fid", "kid", "seconds_per_image"):
        assert torch.isfinite(torch.tensor(res[key])), key
    assert res["nfe"] == 4  # 2 steps, each a conditional and an unconditional evaluation
    assert res["fid"] > res["baseline"]["fid"]  # random weights are far from digits
    assert res["baseline"]["class_accuracy"] > 0.95  # the baseline is real digits, read right
    assert pipe.scheduler is stock  # the pipeline's own scheduler is put back
    with pytest.raises(ValueError, match="made for n=90"):
        evaluate_prompts(pipe, n=180, classifier=classifier, reference=reference)


def test_cli_eval_on_a_pipeline_writes_json_markdown_and_plot(sd_folder, tmp_path):
    out = tmp_path / "text.json"
    r = CliRunner().invoke(main, ["eval", "--model", str(sd_folder), "--scheduler", "stock,fewstep:dpmpp_2m",
                                  "--steps", "2", "--guidance-scale", "2", "-n", "90", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert [(row["scheduler"], row["steps"]) for row in doc["rows"]] == [("stock", 2), ("fewstep:dpmpp_2m", 2)]
    assert all(KEYS <= set(row) and row["n"] == 90 for row in doc["rows"])
    assert doc["reference"]["split"] == "heldout" and doc["reference"]["n_reference"] == 1000
    assert "| fewstep:dpmpp_2m (FewstepScheduler) | 2 | 2 | 4 |" in out.with_suffix(".md").read_text()
    assert Image.open(out.with_suffix(".png")).size[0] > 300


def test_cli_eval_passes_every_list_to_the_grid(sd_folder, monkeypatch):
    import fewstep.evaluate

    def stop(pipe, **kw):
        raise ValueError(f"reached the grid with {kw['schedulers']} {kw['steps_list']} {kw['guidance_scales']} "
                         f"n={kw['n']} batch={kw['batch_size']}")
    monkeypatch.setattr(fewstep.evaluate, "evaluate_prompts_grid", stop)
    r = CliRunner().invoke(main, ["eval", "--model", str(sd_folder), "--scheduler", "unipc,fewstep", "--steps", "5,10",
                                  "--guidance-scale", "1.5,4", "-n", "100"])
    assert "reached the grid with ['unipc', 'fewstep'] [5, 10] [1.5, 4.0] n=100 batch=90" in r.output, r.output
    r = CliRunner().invoke(main, ["eval", "--model", str(sd_folder), "--sweep-steps", "3,4", "--batch-size", "30"])
    assert "reached the grid with ['stock'] [3, 4] [3.0] n=2000 batch=30" in r.output, r.output


@pytest.mark.parametrize("args, words", [
    (["--scheduler", "euler"], "unknown scheduler 'euler'"),
    (["-n", "50"], "the prompt suite has 90 prompts"),
    (["--w", "1"], "--w: for fewstep models"),
    (["--solver", "dpmpp_2m"], "--solver: for fewstep models"),
    (["--guidance-scale", "0.5"], "expected numbers >= 1"),
    (["--steps", "5", "--sweep-steps", "5,10"], "give the step budgets once"),
])
def test_cli_eval_pipeline_misuse_is_one_line(sd_folder, args, words):
    r = CliRunner().invoke(main, ["eval", "--model", str(sd_folder), *args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and words in lines[0], r.output


def test_cli_eval_refuses_prompt_options_for_other_models(tmp_path):
    r = CliRunner().invoke(main, ["eval", "--model", "mnist-teacher", "--scheduler", "stock", "-n", "20"])
    assert r.exit_code == 2 and "--scheduler and --guidance-scale are for diffusers text pipelines" in r.output
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    r = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "ddpm"), "-n", "90"])
    assert r.exit_code == 2 and "DDPMPipeline without a text encoder" in r.output, r.output
