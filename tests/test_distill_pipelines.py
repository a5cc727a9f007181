"""Distilling diffusers pipelines (tiny random-weight SD and SD3 pipelines saved to folders, offline): every route
runs end to end, exports a pipeline folder that stock diffusers loads, and the stock call with the student's own
scheduler gives fewstep's student sampler's images to 1e-4 from the same initial latents."""
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_textbed import TINY_SD, TINY_SD3, TINY_VAE, tiny_data  # noqa: E402

from fewstep import load  # noqa: E402
from fewstep.distill import student_grid, NetX0, generator_times, sample_student  # noqa: E402
from fewstep.recipes import Hyper  # noqa: E402
from fewstep.recipes.dmd import MNIST_DMD, PairSettings, run_dmd  # noqa: E402
from fewstep.recipes.guided import MNIST_GUIDED, run_guided  # noqa: E402
from fewstep.recipes.progressive import MNIST_PROGRESSIVE, run_progressive  # noqa: E402
from fewstep.recipes.teachers import PipelineTeacher, load_student, read_prompts, teacher_from  # noqa: E402
from fewstep.recipes.textbed import run_sd, run_sd3, run_vae  # noqa: E402

PROMPTS = ["a thick seven", "a thin two slanted left", "a handwritten zero"]
LOOP = dict(batch_size=4, ckpt_every_minutes=None, sample_every_minutes=None)
PAIRS = PairSettings(n=6, steps=3)
TINY_DMD = replace(MNIST_DMD, steps=2, pairs=PAIRS, fid_probe=0, warmup=0, **LOOP)
TINY_GUIDED = replace(MNIST_GUIDED, stage1=Hyper(2, 1e-3, 0, 0.9), start_steps=8, rounds={4: 2, 2: 1, 1: 1},
                      encoder_rounds={4: 1}, samples=PAIRS, fid_probe=0, round_warmup=0, **LOOP)
TINY_PROGRESSIVE = replace(MNIST_PROGRESSIVE, start_steps=8, rounds={4: 2}, samples=PAIRS, round_warmup=0, **LOOP)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    run_vae(out, TINY_VAE, data=tiny_data, progress=False)
    return run_sd(out, TINY_SD, data=tiny_data, progress=False), run_sd3(out, TINY_SD3, data=tiny_data, progress=False)


def _stock(folder):
    from diffusers import DiffusionPipeline
    kw = {"text_encoder_3": None, "tokenizer_3": None} if "3" in Path(folder).name else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(teacher, n=2):
    return torch.randn(n, *teacher.image_shape, generator=torch.Generator().manual_seed(0))


def _ids(teacher, prompts):
    return torch.tensor([teacher.prompts.index(p) for p in prompts])


def test_teacher_from_a_pipeline_folder_holds_the_prompt_bank(pipelines, one_thread):
    sd, sd3 = pipelines
    t = teacher_from(sd, PROMPTS)
    assert isinstance(t, PipelineTeacher) and t.kind == "StableDiffusionPipeline"
    assert t.num_classes == 3 and t.null_class == 3 and t.image_shape == (4, 8, 8)
    assert t.prediction == "eps" and t.net.label_context.shape[0] == 4  # three prompts and the empty one
    # the bank row of a prompt is the pipeline's own encoding of it
    stock = _stock(sd)
    ref = stock.encode_prompt(["a thin two slanted left"], "cpu", 1, False)[0]
    torch.testing.assert_close(t.net.label_context[1:2], ref.float())
    # SD3 without T5: one zero row stands for the pipeline's 256 (exactly: the same output on the full sequence)
    t3 = teacher_from(sd3, PROMPTS)
    assert t3.repeated_rows == 256 and t3.prediction == "flow"
    full, _, pooled, _ = _stock(sd3).encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    x, step = torch.randn(3, 4, 8, 8), torch.full((3,), 500.0)
    with torch.no_grad():
        short = t3.net(x, torch.full((3,), 0.5), torch.arange(3))
        stock3 = _stock(sd3).transformer(hidden_states=x, timestep=step, encoder_hidden_states=full,
                                         pooled_projections=pooled).sample
    torch.testing.assert_close(short, stock3, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gen_prediction", [None, "x0"])
def test_dmd_of_an_sd_pipeline_exports_a_one_step_pipeline_stock_diffusers_runs(pipelines, tmp_path, one_thread,
                                                                                 gen_prediction):
    t = teacher_from(pipelines[0], PROMPTS)
    settings = replace(TINY_DMD, gen_prediction=gen_prediction)
    folder = run_dmd(tmp_path, settings, name="tiny-dmd-1", teacher=lambda: t, progress=False)
    assert folder == tmp_path / "export" / "tiny-dmd-1" and (folder / "model_index.json").is_file()
    stock = _stock(folder)
    assert type(stock).__name__ == "StableDiffusionPipeline" and type(stock.scheduler).__name__ == "DDIMScheduler"
    # an x0-predicting generator exports with the scheduler's prediction_type "sample"
    assert stock.scheduler.config.prediction_type == ("sample" if gen_prediction == "x0" else "epsilon")
    lat, prompts = _latents(t), ["a thick seven", "a handwritten zero"]
    images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    net = load_student(t, folder)
    x0 = NetX0(net, t.schedule, gen_prediction or t.prediction)(lat, generator_times(t.schedule, 1).expand(2),
                                                                 _ids(t, prompts))
    ours = (t.decode(x0) + 1) / 2
    assert (ours - images).abs().max() < 1e-4
    # the generator was trained: it is no longer the teacher's UNet
    assert any(not torch.equal(a, b) for a, b in zip(net.unet.state_dict().values(), t.net.unet.state_dict().values()))


def test_guided_students_take_w_through_the_stock_guidance_embedding(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    exports = run_guided(tmp_path, TINY_GUIDED, name="tiny-guided", teacher=lambda: t, progress=False, until=4)
    assert set(exports) == {"tiny-guided-stage1", "tiny-guided-4"}
    stock = _stock(exports["tiny-guided-4"])
    assert stock.unet.config.time_cond_proj_dim is not None
    lat, prompts, w = _latents(t), ["a thick seven", "a thin two slanted left"], 1.5
    images = stock(prompts, num_inference_steps=4, guidance_scale=1 + w, latents=lat, output_type="pt").images
    net = load_student(t, exports["tiny-guided-4"])
    x0 = NetX0(net, t.schedule, t.prediction)
    den = lambda x, tt, labels: x0(x, tt, labels, torch.full((x.shape[0],), w))  # noqa: E731
    ours = sample_student(den, lat, t.schedule, 4, cond={"labels": _ids(t, prompts)}).x
    assert ((t.decode(ours) + 1) / 2 - images).abs().max() < 1e-4
    # stage 1 keeps the teacher's own scheduler (any sampler, any steps)
    assert type(_stock(exports["tiny-guided-stage1"]).scheduler).__name__ == "PNDMScheduler"


def _progressive_4(t, tmp_path, name: str):
    """(stock pipeline of the 4-step progressive student, max |stock images - the student's own sampler's|)
    from the same latents."""
    exports = run_progressive(tmp_path, TINY_PROGRESSIVE, name=name, teacher=lambda: t, progress=False)
    stock = _stock(exports[f"{name}-4"])
    lat, prompts = _latents(t), ["a handwritten zero", "a thick seven"]
    images = stock(prompts, num_inference_steps=4, guidance_scale=1.0, latents=lat, output_type="pt").images
    net = load_student(t, exports[f"{name}-4"])
    ours = sample_student(NetX0(net, t.schedule, t.prediction), lat, t.schedule, 4,
                          cond={"labels": _ids(t, prompts)}).x
    return stock, float(((t.decode(ours) + 1) / 2 - images).abs().max())


def test_progressive_students_of_a_pipeline_sample_in_their_steps(pipelines, tmp_path, one_thread):
    _, diff = _progressive_4(teacher_from(pipelines[0], PROMPTS), tmp_path, "tiny-progressive")
    assert diff < 1e-4


def test_progressive_students_of_a_flow_pipeline_run_in_stock_flow_match_euler(pipelines, tmp_path, one_thread):
    """An SD3 progressive student exports with FlowMatchEuler at shift 1 ending at 1 / N: its stock N-step call
    is the student's own DDIM sampler on its grid 1, 3/4, 1/2, 1/4, 0 from the same noise."""
    t = teacher_from(pipelines[1], PROMPTS)
    quarters = torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64)
    assert torch.equal(student_grid(t.schedule, 4), quarters)
    stock, diff = _progressive_4(t, tmp_path, "tiny-sd3-progressive")
    assert type(stock.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    stock.scheduler.set_timesteps(4)
    assert torch.allclose(stock.scheduler.sigmas.double(), quarters)
    assert diff < 1e-4


def test_dmd_of_an_sd3_pipeline_exports_a_one_step_flow_pipeline(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[1], PROMPTS)
    folder = run_dmd(tmp_path, TINY_DMD, name="tiny-sd3-dmd-1", teacher=lambda: t, progress=False)
    stock = _stock(folder)
    assert type(stock).__name__ == "StableDiffusion3Pipeline"
    lat, prompts = _latents(t), ["a thick seven", "a thin two slanted left"]
    images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    net = load_student(t, folder)
    times = t.generator_times(1)
    assert float(times[0]) == 1.0  # pure noise, where the pipeline's FlowMatchEuler starts
    x0 = NetX0(net, t.schedule, t.prediction)(lat, times.expand(2), _ids(t, prompts))
    assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4


@pytest.mark.parametrize("which, scheduler", [(0, "LCMScheduler"), (1, "FlowMatchEulerDiscreteScheduler")])
def test_dmd2_multi_step_generators_export_with_their_fresh_noise_sampler(pipelines, tmp_path, one_thread, which,
                                                                         scheduler):
    """A 4-step DMD2 generator re-noises its x0 with fresh noise between steps: SD exports with LCMScheduler
    (timesteps 999, 749, 499, 249), SD3 with FlowMatchEuler's stochastic sampling; from the same latents and the
    same noise stream the stock call equals fewstep's generator sampler (and not the deterministic DDIM / Euler
    one, which the export used to write)."""
    from fewstep.distill.dmd import generator_sample
    t = teacher_from(pipelines[which], PROMPTS)
    folder = run_dmd(tmp_path, replace(TINY_DMD, gen_steps=4, lambda_reg=0.0), name=["tiny-dmd2-4", "tiny-sd3-dmd2-4"][which],
                     teacher=lambda: t, progress=False)
    stock = _stock(folder)
    assert type(stock.scheduler).__name__ == scheduler
    stock.scheduler.set_timesteps(4)
    times = t.generator_times(4)
    if which == 0:
        assert stock.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    else:
        assert torch.allclose(stock.scheduler.sigmas[:-1].double(), times)
    lat, prompts = _latents(t), ["a thick seven", "a handwritten zero"]
    torch.manual_seed(7)  # SD3's pipeline steps its scheduler with torch's global generator
    images = stock(prompts, num_inference_steps=4, guidance_scale=1.0, latents=lat, output_type="pt",
                   generator=torch.Generator().manual_seed(7)).images
    net = load_student(t, folder)
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    noise = (lambda like: torch.randn(like.shape, generator=g)) if which == 0 else (lambda like: torch.randn(like.shape))
    with torch.no_grad():
        _, x0 = generator_sample(NetX0(net, t.schedule, t.prediction), lat, _ids(t, prompts), t.schedule, times,
                                 noise=noise)
    assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4
    torch.manual_seed(8)
    with torch.no_grad():  # the noise matters: another stream gives other images
        _, other = generator_sample(NetX0(net, t.schedule, t.prediction), lat, _ids(t, prompts), t.schedule, times)
    assert (other - x0).abs().max() > 1e-3


@pytest.mark.parametrize("which", [0, 1])
def test_diffusers_nets_return_mid_network_features_for_the_gan_head(pipelines, which):
    """DMD2's GAN head reads the fake score's features: a UNet's mid-block map, SD3's middle block's image tokens
    on the patch grid; asking for them changes nothing in the prediction."""
    from fewstep.distill.dmd import FakeScore
    t = teacher_from(pipelines[which], PROMPTS)
    x, times, ids = torch.randn(2, *t.image_shape), torch.tensor([0.3, 0.7]), torch.tensor([0, 1])
    with torch.no_grad():
        plain = t.net(x, times, ids)
        out, features = t.net(x, times, ids, return_features=True)
    assert torch.equal(out, plain)
    assert features.dim() == 4 and features.shape[:2] == (2, t.net.feature_channels)
    fake = FakeScore(t.net, gan_head=True)
    logits = fake(x, times, ids, logits=True)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_a_dmd2_generator_whose_steps_do_not_divide_the_training_steps_is_refused_before_training(pipelines, tmp_path):
    t = teacher_from(pipelines[0], PROMPTS)
    with pytest.raises(ValueError, match="only when 3 divides the teacher's 1000 training steps"):
        run_dmd(tmp_path, replace(TINY_DMD, gen_steps=3, lambda_reg=0.0), teacher=lambda: t, progress=False)
    assert not (tmp_path / "run").exists()


def test_bad_teachers_and_prompts_get_one_line_errors(pipelines, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model named"):
        teacher_from(tmp_path / "nothing-here")
    # the test bed's pipelines default to its 90-prompt suite; a user's pipeline needs --prompts
    assert teacher_from(pipelines[0]).num_classes == 90
    user = tmp_path / "user-pipeline"
    shutil.copytree(pipelines[0], user)
    (user / "fewstep.json").unlink()
    with pytest.raises(ValueError, match="distills over prompts: pass --prompts"):
        teacher_from(user)
    with pytest.raises(ValueError, match="--prompts is for text-to-image pipeline teachers"):
        teacher_from("mnist-teacher", PROMPTS)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(empty)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_dmd_of_an_unconditional_ddpm_pipeline(tmp_path, one_thread):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddpm")
    t = teacher_from(tmp_path / "ddpm")
    assert t.num_classes is None and t.image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="--prompts is for text-to-image pipelines"):
        teacher_from(tmp_path / "ddpm", PROMPTS)
    folder = run_dmd(tmp_path / "run", replace(TINY_DMD, real_w=0.0), name="ddpm-dmd-1", teacher=lambda: t,
                     progress=False)
    stock = _stock(folder)
    lat = _latents(t)
    images = stock(batch_size=2, num_inference_steps=1, output_type="np", generator=torch.Generator()).images
    assert images.shape == (2, 8, 8, 1)
    # the stock DDIM step from given noise equals the generator's x0 (DDPMPipeline draws its own noise, so the
    # scheduler is stepped by hand here, as the pipeline does)
    sch = stock.scheduler
    sch.set_timesteps(1)
    out = sch.step(stock.unet(lat, sch.timesteps[0]).sample, sch.timesteps[0], lat).prev_sample
    net = load_student(t, folder)
    x0 = NetX0(net, t.schedule, t.prediction)(lat, t.generator_times(1).expand(2), None)
    assert (out - x0).abs().max() < 1e-4


def test_bf16_and_gradient_checkpointing_train_and_fp16_is_refused_off_cuda(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    folder = run_dmd(tmp_path, replace(TINY_DMD, mixed_precision="bf16", gradient_checkpointing=True), name="bf16",
                     teacher=lambda: t, progress=False)
    net = load_student(t, folder)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    import json
    assert json.loads((folder / "fewstep.json").read_text())["preset"]["mixed_precision"] == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
            run_dmd(tmp_path / "fp16", replace(TINY_DMD, mixed_precision="fp16"), name="fp16", teacher=lambda: t,
                    progress=False)
    with pytest.raises(ValueError, match="--gradient-checkpointing is for diffusers"):
        run_dmd(tmp_path / "gc", replace(TINY_DMD, gradient_checkpointing=True), teacher=lambda: load("mnist-teacher"),
                progress=False)



def test_dmd_with_lora_rank_exports_the_lora_and_the_merged_pipeline_in_one_folder(pipelines, tmp_path, one_thread):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    t = teacher_from(pipelines[0], PROMPTS)
    folder = run_dmd(tmp_path, replace(TINY_DMD, lora_rank=2), name="tiny-dmd-1-lora2", teacher=lambda: t,
                     progress=False)
    lat, prompts = _latents(t), ["a thick seven", "a handwritten zero"]
    merged = _stock(folder)(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    base = StableDiffusionPipeline.from_pretrained(pipelines[0])
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(folder)
    base.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    lora = base(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    assert (merged - lora).abs().max() < 1e-4
    assert "load_lora_weights" in (folder / "README.md").read_text()


def test_previews_and_fid_probe_of_a_test_bed_student_decode_and_crop(pipelines, tmp_path, one_thread):
    import json
    t = teacher_from(pipelines[0])  # the test bed's 90-prompt suite: every prompt names its digit
    assert t.prompt_digits() is not None and t.prompt_digits().tolist()[:9] == [0] * 9
    run_dmd(tmp_path, replace(TINY_DMD, fid_probe=20), name="probe", teacher=lambda: t, progress=False)
    points = [json.loads(line) for line in (tmp_path / "run" / "fid.jsonl").read_text().splitlines()]
    assert points and all(torch.isfinite(torch.tensor(p["fid"])) and p["n"] == 20 for p in points)
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_memory_estimate_is_printed_and_a_run_over_budget_is_refused_before_any_work(pipelines, tmp_path, capsys):
    t = teacher_from(pipelines[0], PROMPTS)
    with pytest.raises(ValueError, match="over --max-memory"):
        run_dmd(tmp_path, replace(TINY_DMD, max_memory_gib=1e-6), teacher=lambda: t, progress=False)
    assert "training" in capsys.readouterr().out and not (tmp_path / "regression-set.safetensors").exists()


def test_fewstep_generate_and_sample_run_an_exported_student_with_its_own_stock_call(pipelines, tmp_path, one_thread):
    from click.testing import CliRunner

    import fewstep
    from fewstep.cli import main
    t = teacher_from(pipelines[0], PROMPTS)
    folder = run_dmd(tmp_path, TINY_DMD, name="tiny-dmd-1", teacher=lambda: t, progress=False)
    student = fewstep.load(folder)
    images = fewstep.generate(student, prompts=["a thick seven", "a handwritten zero"], n=4, seed=3, batch_size=3)
    assert images.shape == (4, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    again = fewstep.generate(student, prompts=["a thick seven", "a handwritten zero"], n=4, seed=3, batch_size=4)
    torch.testing.assert_close(images, again, rtol=0, atol=1e-5)  # per-sample seeds: batch size does not matter
    with pytest.raises(ValueError, match="1-step student; pass steps=1"):
        fewstep.generate(student, prompts=["a thick seven"], steps=20)
    with pytest.raises(ValueError, match="baked in; pass w=0"):
        fewstep.generate(student, prompts=["a thick seven"], w=2.0)
    r = CliRunner().invoke(main, ["sample", "--model", str(folder), "--prompt", "a thick seven", "-n", "2",
                                  "--out", str(tmp_path / "grid.png")])
    assert r.exit_code == 0 and (tmp_path / "grid.png").is_file(), r.output


def test_previews_of_a_text_teacher_write_each_rows_prompt_beside_it(pipelines, tmp_path, one_thread):
    t = teacher_from(pipelines[0], PROMPTS)
    settings = replace(TINY_DMD, sample_every_minutes=0.0)
    run_dmd(tmp_path, settings, name="tiny-dmd-1", teacher=lambda: t, progress=False)
    plain = sorted((tmp_path / "run" / "samples").glob("step-*[0-9].png"))
    captioned = sorted((tmp_path / "run" / "samples").glob("step-*-prompts.png"))
    assert plain and len(captioned) == len(plain)
    from PIL import Image
    with Image.open(captioned[-1]) as im:  # a labelled figure: wider than the bare grid (the prompts' column)
        with Image.open(plain[-1]) as bare:
            assert im.size[0] > 2 * bare.size[0]
