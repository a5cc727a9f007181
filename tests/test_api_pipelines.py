"""fewstep.load / fewstep.generate / `fewstep sample --prompt` for text-to-image diffusers pipelines (issue 21):
the shipped mnist-sd (a real model), and a random SD3 pipeline without T5 built here."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fewstep
from fewstep.api import ASSETS, DIFFUSERS_CATALOGUE, pipeline_calls
from fewstep.cli import main
from fewstep.data.text import load_tokenizer
from fewstep.nets.textbed import build_sd3_transformer, build_text_encoder, build_vae

TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16}


@pytest.fixture(scope="module")
def sd():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = fewstep.load("mnist-sd")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """An untrained StableDiffusion3Pipeline without T5 (the test bed's layout, tiny random components)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    tok = load_tokenizer()
    encoders = [build_text_encoder(tok, TINY_TEXT, seed=k, projection=True) for k in (1, 2)]
    vae = build_vae({"block_out_channels": [8, 8, 8], "norm_num_groups": 4})
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.1)
    transformer = build_sd3_transformer({"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2},
                                        joint_attention_dim=32, pooled_projection_dim=32)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1],
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    folder = tmp_path_factory.mktemp("sd3") / "mnist-sd3"
    pipe.save_pretrained(folder)
    (folder / "fewstep.json").write_text(json.dumps({"recipe": "mnist-sd3"}))
    return folder


# ---- load -----------------------------------------------------------------------------------------

def test_load_mnist_sd_returns_the_stock_pipeline_offline(sd, monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(sd, StableDiffusionPipeline)
    assert sd.name_or_path == str(ASSETS / "mnist-sd")
    assert sd.unet.dtype == sd.text_encoder.dtype == torch.float32  # stored as float16, loaded as float32
    images = sd("a thick seven", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
    vae = fewstep.load("mnist-vae")
    assert isinstance(vae, AutoencoderKL) and vae.config.in_channels == 1
    assert fewstep.load("mnist-sd", dtype=torch.float16).unet.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype= is for diffusers folders"):
        fewstep.load("mnist-teacher", dtype=torch.float16)


def test_load_any_pipeline_folder_including_sd3_without_t5(sd3_folder):
    from diffusers import StableDiffusion3Pipeline
    pipe = fewstep.load(sd3_folder)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.name_or_path == str(sd3_folder)


def test_mnist_sd3_is_reported_until_its_folder_appears_then_loads(sd3_folder, tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline
    assert set(DIFFUSERS_CATALOGUE) == {"mnist-vae", "mnist-sd", "mnist-sd3", "mnist-sd-guided-4", "mnist-sd-dmd-1",
                                        "mnist-sd-dmd-1-lora", "mnist-sd-dmd-1-cooldown", "mnist-sd-dmd-1-ttur",
                                        "mnist-sd-dmd-1-anneal", "mnist-sd3-dmd-1"}
    assets = tmp_path / "assets"
    assets.mkdir()
    monkeypatch.setattr(fewstep.api, "ASSETS", assets)
    monkeypatch.setattr(fewstep.api, "DIFFUSERS_SHIPPED", {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        fewstep.load("mnist-sd3")
    assert "not shipped in this version yet" in str(e.value) and "fewstep train mnist-sd3 --out DIR" in str(e.value)
    shutil.copytree(sd3_folder, assets / "mnist-sd3")  # the folder appears: shipped, no code change
    pipe = fewstep.load("mnist-sd3")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.name_or_path == str(assets / "mnist-sd3")


# ---- generate(prompts=) ---------------------------------------------------------------------------

def test_generate_prompts_draws_the_prompted_digit(sd):
    images = fewstep.generate(sd, prompts=["a handwritten seven"], n=8, steps=6, w=2, seed=0)
    assert images.shape == (8, 1, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3
    labels = fewstep.load("mnist-classifier")(images[:, :, 2:30, 2:30]).argmax(1)
    assert (labels == 7).float().mean() >= 0.75, labels.tolist()


def test_generate_prompts_is_the_stock_pipeline_at_guidance_scale_one_plus_w(sd):
    """generate(w=2) equals the stock pipeline call with FewstepScheduler at guidance_scale 3 on the same noise;
    guidance_scale 2 gives other images."""
    from fewstep import FewstepScheduler
    from fewstep.distributed import sample_generators
    ours = fewstep.generate(sd, prompts=["a thick seven", "a thin two"], steps=5, w=2, seed=3)
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in sample_generators(3, 0, 2)])
    stock = sd.scheduler
    try:
        sd.scheduler = FewstepScheduler.from_config(stock.config)  # unipc_bh2_3, generate's default solver too
        runs = [sd(["a thick seven", "a thin two"], latents=noise, guidance_scale=scale, num_inference_steps=5,
                   output_type="pt").images * 2 - 1 for scale in (3.0, 2.0)]
    finally:
        sd.scheduler = stock
    assert (ours - runs[0]).abs().max() < 1e-3
    assert (ours - runs[1]).abs().max() > 0.1


def test_generate_prompts_does_not_depend_on_batch_size(sd):
    kw = dict(prompts=["a thin one", "an eight slanted right", ""], n=5, steps=3, w=1, seed=7)
    a = fewstep.generate(sd, batch_size=5, **kw)
    b = fewstep.generate("mnist-sd", batch_size=2, **kw)
    assert a.shape == (5, 1, 32, 32) and torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a[:2], fewstep.generate(sd, batch_size=5, **{**kw, "n": 2}), atol=1e-4)  # (seed, i) only
    assert (a[0] - a[3]).abs().max() > 0.1  # same prompt, another seed per image
    c = fewstep.generate(sd, batch_size=5, **{**kw, "seed": 8})
    assert (a - c).abs().max() > 0.1


def test_generate_prompts_on_sd3_without_t5(sd3_folder):
    pipe = fewstep.load(sd3_folder)
    kw = dict(prompts=["a thick seven", "a handwritten one"], n=3, steps=3, w=1.5, seed=1)
    a = fewstep.generate(pipe, batch_size=3, **kw)
    b = fewstep.generate(pipe, batch_size=1, **kw)
    assert a.shape == (3, 1, 32, 32) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.allclose(a, b, atol=1e-4)
    for solver, steps in ((None, 5), ("heun", 3), ("dpmpp_2s", 4)):  # the count is what sampling spends
        calls = []
        hook = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
        try:
            fewstep.generate(pipe, prompts=["a thin one"], solver=solver, steps=steps)
        finally:
            hook.remove()
        assert pipeline_calls(pipe, solver, steps) == len(calls), (solver, steps, len(calls))
    with pytest.raises(ValueError, match="not 'a \\[handwritten"):  # its fewstep.json says: the test bed's grammar
        fewstep.generate(pipe, prompts=["seven thick a"])


def _one_line(call, kind, *words):
    with pytest.raises(kind) as e:
        call()
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_bad_prompts_and_mixups_get_one_line_errors(sd):
    _one_line(lambda: fewstep.generate(sd, prompts=["a purple seven"]), ValueError, "unknown word 'purple'",
              "the vocabulary is")
    _one_line(lambda: fewstep.generate(sd, prompts="a seven"), ValueError, "write 'a handwritten seven'")
    _one_line(lambda: fewstep.generate(sd, labels=[7]), ValueError, "text-to-image pipeline", "prompts=")
    _one_line(lambda: fewstep.generate("mnist-teacher", prompts=["a handwritten seven"]), ValueError,
              "class-conditional", "labels=")
    _one_line(lambda: fewstep.generate(sd, prompts=[]), ValueError, "at least one prompt")
    _one_line(lambda: fewstep.generate(sd, prompts=["a thin one"], spacing="tuned"), ValueError, "needs steps=K")
    _one_line(lambda: fewstep.generate(sd, prompts=["a thin one"], n=0), ValueError, "n must be")
    _one_line(lambda: fewstep.generate(fewstep.load("mnist-vae"), prompts=["a thin one"]), TypeError,
              "AutoencoderKL")


# ---- fewstep sample --prompt ----------------------------------------------------------------------

def test_cli_sample_prompts_writes_the_grid(tmp_path):
    out = tmp_path / "grid.png"
    r = CliRunner().invoke(main, ["sample", "--model", "mnist-sd", "--prompt", "a thick seven", "--prompt",
                                  "a thin one", "-n", "4", "--steps", "3", "--w", "1", "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "NFE 3" in r.output and "4 images" in r.output
    with Image.open(out) as im:
        assert im.size == (2 * 34 + 2, 2 * 34 + 2)  # one column per prompt, 32 px images and 2 px padding


@pytest.mark.parametrize("args, words", [
    (["--model", "mnist-sd", "--prompt", "a purple seven"], ["unknown word 'purple'"]),
    (["--model", "mnist-sd"], ["--prompt"]),
    (["--model", "mnist-teacher", "--prompt", "a thick seven"], ["--labels"]),
    (["--model", "mnist-sd", "--prompt", "a thick seven", "--labels", "7"], ["--labels is for fewstep models"]),
])
def test_cli_sample_prompt_errors_are_one_line(tmp_path, args, words):
    r = CliRunner().invoke(main, ["sample", *args, "--out", str(tmp_path / "x.png")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.output
    assert not (tmp_path / "x.png").exists()


def test_the_shipped_lora_student_loads_as_its_model_card_says_and_matches_the_merged_pipeline(one_thread):
    """mnist-sd-dmd-1-lora: stock load_lora_weights into mnist-sd plus its DDIM scheduler (the model card's code)
    gives the shipped merged pipeline's one-step images (the merged weights are fp16 on disk: to 1e-2; the adapter
    moves the images by 0.06 on average)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fewstep.api import ASSETS
    folder = ASSETS / "mnist-sd-dmd-1-lora"
    pipe = fewstep.load("mnist-sd")  # StableDiffusionPipeline.from_pretrained, float32 from the fp16 files
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lora_weights(folder)
    pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    merged = fewstep.load(folder)
    merged.set_progress_bar_config(disable=True)
    prompts = ["a thick seven", "a thin two slanted left"]
    lat = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    a = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    b = merged(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    assert a.shape == b.shape == (2, 1, 32, 32)
    assert (a - b).abs().max() < 1e-2 and (a - b).abs().mean() < 5e-4
