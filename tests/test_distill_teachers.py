"""Teachers beyond SD / SD3 (tiny random-weight models saved to folders, offline): an SDXL pipeline (two text
encoders, pooled embeddings, added time ids), a class-conditional UNet2DModel in a DDPMPipeline folder (class ids,
an explicit null class), a bare UNet2DModel folder with its scheduler beside it; each distils, exports a folder
stock diffusers loads, and its stock sampling equals fewstep's student sampler to 1e-4 from the same noise. Then the
one-line errors of teachers that cannot be used."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import tiny_unet  # noqa: E402
from test_distill_pipelines import PROMPTS, TINY_DMD, TINY_GUIDED, TINY_PROGRESSIVE, _ids, _latents  # noqa: E402

from fewstep.data.text import load_tokenizer  # noqa: E402
from fewstep.diffusers import DiffusersNet  # noqa: E402
from fewstep.distill import NetX0, generator_times, sample_student  # noqa: E402
from fewstep.nets.textbed import build_text_encoder, build_vae  # noqa: E402
from fewstep.recipes.dmd import run_dmd  # noqa: E402
from fewstep.recipes.guided import run_guided  # noqa: E402
from fewstep.recipes.progressive import run_progressive  # noqa: E402
from fewstep.recipes.teachers import (NO_NULL_CLASS, PipelineTeacher, check_guidance, load_student,  # noqa: E402
                                      read_prompts, student_scheduler, teacher_from)

TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16}
CLASSES = 4  # the class UNet's embeddings: ids 0..2 and the null class 3


def _sdxl_unet():
    """A tiny SDXL UNet: cross-attention over both encoders' widths (16 + 16), text_time added embedding
    (6 time ids x 4 features + the 16-wide pooled text)."""
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=2, cross_attention_dim=32, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline folder (SDXL's Euler scheduler and scaled-linear betas; 32x32 images)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok = load_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=build_vae({"block_out_channels": [8, 8, 8], "norm_num_groups": 4}),
        text_encoder=build_text_encoder(tok, TEXT, seed=1), tokenizer=tok,
        text_encoder_2=build_text_encoder(tok, TEXT, seed=2, projection=True), tokenizer_2=tok, unet=_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1))
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def class_ddpm(tmp_path_factory):
    """A DDPMPipeline folder around a class-conditional one-channel 8x8 UNet2DModel (CLASSES class embeddings)."""
    from diffusers import DDPMPipeline, DDPMScheduler
    folder = tmp_path_factory.mktemp("class-ddpm") / "ddpm"
    unet = tiny_unet(in_channels=1, out_channels=1, num_class_embeds=CLASSES)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def _stock(folder):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe




def _trained(net, teacher):
    return any(not torch.equal(a, b) for a, b in zip(net.unet.state_dict().values(),
                                                      teacher.net.unet.state_dict().values()))


# ---------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------

def test_sdxl_teacher_banks_both_encoders_and_guides_with_the_stock_negative(sdxl, one_thread):
    t = teacher_from(sdxl, PROMPTS)
    assert t.kind == "StableDiffusionXLPipeline" and t.num_classes == 3 and t.null_class == 3
    assert t.image_shape == (4, 8, 8) and t.prediction == "eps"
    stock = _stock(sdxl)
    embeds, neg, pooled, neg_pooled = stock.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(t.net.label_context[:3], embeds)  # both encoders' penultimate states, side by side
    torch.testing.assert_close(t.net.pooled_context[:3], pooled)
    # force_zeros_for_empty_prompt (SDXL's default): the stock negative is zeros, and so is the null row
    assert stock.config.force_zeros_for_empty_prompt and not neg.any() and not neg_pooled.any()
    torch.testing.assert_close(t.net.label_context[3:], neg[:1])
    torch.testing.assert_close(t.net.pooled_context[3:], neg_pooled[:1])
    assert t.net.time_ids.tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # 8 latents x vae factor 4, no crop
    # the teacher's classifier-free guidance is the stock call's: one DDIM step from t_max returns x0 at w
    stock.scheduler = student_scheduler(t, 1)
    lat, prompts, w = _latents(t), ["a thick seven", "a handwritten zero"], 2.0
    images = stock(prompts, num_inference_steps=1, guidance_scale=1 + w, latents=lat, output_type="pt").images
    with torch.no_grad():
        x0 = t.denoiser(w)(lat, generator_times(t.schedule, 1).expand(2), labels=_ids(t, prompts))
    assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4


def test_sdxl_without_force_zeros_takes_the_empty_prompt_as_its_null_row(sdxl):
    pipe = _stock(sdxl)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    t = PipelineTeacher(pipe, PROMPTS, str(sdxl))
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True)
    assert neg.abs().max() > 0  # the encoded "" this time
    torch.testing.assert_close(t.net.label_context[3:], neg)
    torch.testing.assert_close(t.net.pooled_context[3:], neg_pooled)


def test_dmd_of_an_sdxl_pipeline_exports_a_one_step_pipeline_stock_diffusers_runs(sdxl, tmp_path, one_thread):
    t = teacher_from(sdxl, PROMPTS)
    folder = run_dmd(tmp_path, TINY_DMD, name="sdxl-dmd-1", teacher=lambda: t, progress=False)
    stock = _stock(folder)
    assert type(stock).__name__ == "StableDiffusionXLPipeline" and type(stock.scheduler).__name__ == "DDIMScheduler"
    assert stock.config.force_zeros_for_empty_prompt  # the teacher's null prompt, kept
    lat, prompts = _latents(t), ["a thin two slanted left", "a thick seven"]
    images = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=lat, output_type="pt").images
    net = load_student(t, folder)
    x0 = NetX0(net, t.schedule, t.prediction)(lat, generator_times(t.schedule, 1).expand(2), _ids(t, prompts))
    assert ((t.decode(x0) + 1) / 2 - images).abs().max() < 1e-4
    assert _trained(net, t)


def test_guided_sdxl_students_take_w_through_time_cond_proj_dim(sdxl, tmp_path, one_thread):
    t = teacher_from(sdxl, PROMPTS)
    exports = run_guided(tmp_path, TINY_GUIDED, name="sdxl-guided", teacher=lambda: t, progress=False, until=4)
    stock = _stock(exports["sdxl-guided-4"])
    assert stock.unet.config.time_cond_proj_dim is not None
    lat, prompts, w = _latents(t), ["a handwritten zero", "a thin two slanted left"], 1.5
    images = stock(prompts, num_inference_steps=4, guidance_scale=1 + w, latents=lat, output_type="pt").images
    net = load_student(t, exports["sdxl-guided-4"])
    x0 = NetX0(net, t.schedule, t.prediction)
    den = lambda x, tt, labels: x0(x, tt, labels, torch.full((x.shape[0],), w))  # noqa: E731
    ours = sample_student(den, lat, t.schedule, 4, cond={"labels": _ids(t, prompts)}).x
    assert ((t.decode(ours) + 1) / 2 - images).abs().max() < 1e-4
    # w matters: the same student at w = 0 gives other images
    other = stock(prompts, num_inference_steps=4, guidance_scale=1.0, latents=lat, output_type="pt").images
    assert (other - images).abs().max() > 0


# ---------------------------------------------------------------------------
# class-conditional UNet2DModel, bare UNet folders
# ---------------------------------------------------------------------------

def test_a_class_unet_teacher_guides_with_the_null_class_it_is_given(class_ddpm):
    t = teacher_from(class_ddpm, null_class=CLASSES - 1)
    assert t.kind == "DDPMPipeline" and t.num_classes == CLASSES - 1 and t.null_class == CLASSES - 1
    assert t.image_shape == (1, 8, 8)
    x, tt, labels, w = torch.randn(3, 1, 8, 8), torch.full((3,), 0.6), torch.tensor([0, 1, 2]), 1.5
    unet, sch = t.pipe.unet, t.schedule
    step = torch.full((3,), 0.6 * 1000 - 1)  # VP timestep (t - 1/N) N
    with torch.no_grad():
        got = t.denoiser(w)(x, tt, labels=labels)
        eps_c = unet(x, step, class_labels=labels).sample
        eps_u = unet(x, step, class_labels=torch.full((3,), CLASSES - 1)).sample
    eps = eps_u + (1 + w) * (eps_c - eps_u)  # CFG: (1 + w) cond - w uncond
    want = (x - sch.sigma(tt[0]) * eps) / sch.alpha(tt[0])
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    # without a null class it still teaches (over every id), but refuses guidance before any work
    bare = teacher_from(class_ddpm)
    assert bare.num_classes == CLASSES and bare.null_class is None
    check_guidance(bare, 0.0)
    with pytest.raises(ValueError, match="no null class: pass --null-class K"):
        check_guidance(bare, 1.0)


def test_dmd_of_a_class_unet_exports_a_ddpm_folder_that_plain_diffusers_loads(class_ddpm, tmp_path, one_thread):
    t = teacher_from(class_ddpm, null_class=CLASSES - 1, guidance=True)
    folder = run_dmd(tmp_path, TINY_DMD, name="class-dmd-1", teacher=lambda: t, progress=False)  # real_w = 1
    stock = _stock(folder)
    assert type(stock).__name__ == "DDPMPipeline" and type(stock.scheduler).__name__ == "DDIMScheduler"
    assert stock.unet.config.num_class_embeds == CLASSES
    record = json.loads((folder / "fewstep.json").read_text())
    assert record["null_class"] == CLASSES - 1 and record["num_classes"] == CLASSES - 1
    # DDPMPipeline's call passes no class_labels, which a class-conditional UNet requires
    with pytest.raises(ValueError, match="class_labels"):
        stock(batch_size=1, num_inference_steps=1, output_type="np")
    # so: the saved UNet and scheduler stepped by hand, as DDPMPipeline's loop does, with class labels
    lat, labels = _latents(t), torch.tensor([2, 0])
    sch = stock.scheduler
    sch.set_timesteps(1)
    step = sch.timesteps[0]
    with torch.no_grad():
        out = sch.step(stock.unet(lat, step, class_labels=labels).sample, step, lat).prev_sample
    net = load_student(t, folder)
    x0 = NetX0(net, t.schedule, t.prediction)(lat, t.generator_times(1).expand(2), labels)
    assert (out - x0).abs().max() < 1e-4 * out.abs().max()  # relative: this random pixel UNet's x0 reach hundreds
    assert _trained(net, t)


def test_progressive_students_of_a_class_unet_without_a_null_class(class_ddpm, tmp_path, one_thread):
    t = teacher_from(class_ddpm)  # no null class: its training samples are drawn unguided, over every id
    exports = run_progressive(tmp_path, TINY_PROGRESSIVE, name="class-progressive", teacher=lambda: t, progress=False)
    stock = _stock(exports["class-progressive-4"])
    lat, labels = _latents(t), torch.tensor([3, 1])
    sch = stock.scheduler
    sch.set_timesteps(4)
    x = lat
    with torch.no_grad():
        for step in sch.timesteps:  # DDPMPipeline's loop, with the class labels it cannot pass
            x = sch.step(stock.unet(x, step, class_labels=labels).sample, step, x).prev_sample
    net = load_student(t, exports["class-progressive-4"])
    ours = sample_student(NetX0(net, t.schedule, t.prediction), lat, t.schedule, 4, cond={"labels": labels}).x
    assert (ours - x).abs().max() < 1e-4 * x.abs().max()  # relative: this random pixel UNet's x0 reach ~300


def test_a_bare_unet_folder_with_its_scheduler_beside_it_is_a_teacher(tmp_path, one_thread):
    from diffusers import DDPMScheduler
    unet = tiny_unet(in_channels=1, out_channels=1)
    unet.save_pretrained(tmp_path / "repo" / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(
        tmp_path / "repo" / "scheduler")  # a pipeline layout without model_index.json
    t = teacher_from(tmp_path / "repo" / "unet")
    assert t.kind == "DDPMPipeline" and t.vae is None and t.num_classes is None
    assert t.prediction == "v" and t.image_shape == (1, 8, 8)  # read from the scheduler beside it
    x, tt = torch.randn(2, 1, 8, 8), torch.full((2,), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(t.net(x, tt), unet(x, torch.full((2,), 299.0)).sample)
    # scheduler_config.json inside the folder serves too
    DDPMScheduler(prediction_type="sample").save_pretrained(tmp_path / "repo" / "unet")
    assert teacher_from(tmp_path / "repo" / "unet").prediction == "x0"
    # its student exports as a DDPMPipeline whose stock call runs with no fewstep code
    folder = run_dmd(tmp_path / "run", replace(TINY_DMD, real_w=0.0), name="bare-dmd-1", teacher=lambda: t,
                     progress=False)
    stock = _stock(folder)
    assert type(stock).__name__ == "DDPMPipeline"
    images = stock(batch_size=2, num_inference_steps=1, output_type="np", generator=torch.Generator()).images
    assert images.shape == (2, 8, 8, 1)


# ---------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------

def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_folders_that_are_no_teacher_get_one_line_errors(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a fewstep model folder .* nor a diffusers folder") as e:
        teacher_from(junk)
    _one_line(e)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": [
        "diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ValueError, match="FluxPipeline is not a covered teacher pipeline") as e:
        teacher_from(flux)
    assert "StableDiffusionXLPipeline" in _one_line(e)
    tiny_unet().save_pretrained(tmp_path / "unet-only")
    with pytest.raises(ValueError, match="no scheduler for the UNet2DModel .* looked for .*scheduler_config.json") as e:
        teacher_from(tmp_path / "unet-only")
    assert str(tmp_path / "unet-only" / "scheduler_config.json") in _one_line(e)
    _sdxl_unet().save_pretrained(tmp_path / "sdxl-unet")
    with pytest.raises(ValueError, match="bare UNet2DConditionModel.*pass the pipeline folder") as e:
        teacher_from(tmp_path / "sdxl-unet")
    _one_line(e)


def test_class_ids_prompts_and_null_classes_get_one_line_errors(class_ddpm, sdxl, tmp_path):
    with pytest.raises(ValueError, match="--prompts is for text-to-image pipelines; this class-conditional UNet "
                                         "distills over its 4 class ids: leave --prompts out") as e:
        teacher_from(class_ddpm, PROMPTS)
    _one_line(e)
    with pytest.raises(ValueError, match="^" + NO_NULL_CLASS + "$"):
        teacher_from(class_ddpm, guidance=True)
    with pytest.raises(ValueError, match="class id in 0..3, got 4: pass the id the model was trained with as uncond"):
        teacher_from(class_ddpm, null_class=4)
    with pytest.raises(ValueError, match="--null-class is for class-conditional UNets; a StableDiffusionXLPipeline"):
        teacher_from(sdxl, PROMPTS, null_class=0)
    with pytest.raises(ValueError, match="--null-class is for class-conditional diffusers UNets; mnist-teacher"):
        teacher_from("mnist-teacher", null_class=10)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt; write one prompt per line"):
        read_prompts(empty)


def test_dmd_with_guidance_from_a_class_unet_without_a_null_class_stops_before_any_work(class_ddpm, tmp_path):
    t = teacher_from(class_ddpm)
    with pytest.raises(ValueError, match="null class"):
        run_dmd(tmp_path, TINY_DMD, name="no-null", teacher=lambda: t, progress=False)
    assert not (tmp_path / "regression-set.safetensors").exists()


def test_an_sdxl_unet_needs_its_time_ids_and_pooled_bank():
    unet = _sdxl_unet()
    bank = torch.zeros(2, 3, 32)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*pass time_ids"):
        DiffusersNet(unet, {"num_train_timesteps": 1000}, bank, pooled_context=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"pass pooled_context of shape \(2, 16\)"):
        DiffusersNet(unet, {"num_train_timesteps": 1000}, bank, pooled_context=torch.zeros(2, 8),
                     time_ids=torch.tensor([32.0, 32, 0, 0, 32, 32]))
    with pytest.raises(ValueError, match="time_ids are given, but this model has no SDXL added embedding"):
        DiffusersNet(tiny_unet(), {"num_train_timesteps": 1000}, time_ids=torch.zeros(6))
