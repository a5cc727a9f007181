"""Distilling a pipeline teacher on your own captioned images (``--data DIR [--captions FILE]``): the captions
become the prompt bank, the images are encoded once by the teacher's VAE and cached (rebuilt when a file
changes), guided distillation trains on them, and bad folders are refused in one line before any work."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_distill_pipelines import TINY_GUIDED  # noqa: E402
from test_textbed import TINY_SD, TINY_VAE, tiny_data  # noqa: E402

from fewstep.cli import main  # noqa: E402
from fewstep.recipes.guided import run_guided  # noqa: E402
from fewstep.recipes.latents import LATENT_CACHE, caption_prompts, encoded_data  # noqa: E402
from fewstep.recipes.teachers import teacher_from  # noqa: E402
from fewstep.recipes.textbed import run_sd, run_vae  # noqa: E402

CAPTIONS = ["a thick seven", "a thin two slanted left", "a thick seven", "a handwritten zero"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_vae(out, TINY_VAE, data=tiny_data, progress=False)
    return run_sd(out, TINY_SD, data=tiny_data, progress=False)


def _folder(root: Path, side: int = 32, captions=CAPTIONS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L").save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_captions_become_the_prompt_bank_and_images_the_vae_latents_cached_once(sd, tmp_path, one_thread, capsys):
    paths, prompts, labels = caption_prompts(_folder(tmp_path / "imgs"))
    assert prompts == ["a thick seven", "a thin two slanted left", "a handwritten zero"]
    assert labels.tolist() == [0, 1, 0, 2]
    t = teacher_from(sd, prompts)
    lat, lab = encoded_data(t, paths, labels, tmp_path / "run")
    assert lat.shape == (4, *t.image_shape) and torch.equal(lab, labels)
    # the latents are the VAE's posterior means, scaled as the pipeline's own latents
    from fewstep.data.folder import load_image
    x = load_image(paths[1], None, "L")[None]
    vae = t.pipe.vae
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(lat[1:2], ref)
    assert "building the training latents" in capsys.readouterr().err
    # reused while nothing changed; rebuilt (with the reason) when an image changes
    encoded_data(t, paths, labels, tmp_path / "run")
    assert "building" not in capsys.readouterr().err
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(paths[1])
    again, _ = encoded_data(t, paths, labels, tmp_path / "run")
    assert "other settings (files)" in capsys.readouterr().err
    assert not torch.equal(again[1], lat[1]) and torch.equal(again[0], lat[0])
    # a corrupt cache is rebuilt, not trusted
    (tmp_path / "run" / LATENT_CACHE).write_bytes(b"not a safetensors file")
    torch.testing.assert_close(encoded_data(t, paths, labels, tmp_path / "run")[0], again)


def test_guided_distillation_trains_on_the_encoded_images(sd, tmp_path, one_thread):
    paths, prompts, labels = caption_prompts(_folder(tmp_path / "imgs"))
    t = teacher_from(sd, prompts)
    settings = replace(TINY_GUIDED, rounds={4: 1})
    exports = run_guided(tmp_path / "run", settings, name="tiny-guided", teacher=lambda: t, progress=False, until=4,
                         data=lambda: encoded_data(t, paths, labels, tmp_path / "run"))
    assert (exports["tiny-guided-4"] / "model_index.json").is_file()
    assert not (tmp_path / "run" / "teacher-samples.safetensors").exists()  # the images, not the teacher's samples
    assert (tmp_path / "run" / LATENT_CACHE).is_file()


@pytest.mark.parametrize("args, message", [
    (["--captions", "x.jsonl"], "--captions goes with --data DIR"),
    (["--prompts", "PROMPTS"], "leave --prompts out"),
    (["SIZE"], "is 28x28, but the teacher works at 32x32 pixels"),
])
def test_bad_data_is_refused_in_one_line_before_any_work(sd, tmp_path, args, message):
    good, small = _folder(tmp_path / "good"), _folder(tmp_path / "small", side=28)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a thick seven\n")
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    data = ["--data", str(small if args == ["SIZE"] else good)] if "--captions" not in args else []
    args = [] if args == ["SIZE"] else args
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["distill", "guided", "--teacher", str(sd), "--out", str(out), *data, *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (out / "stage1").exists()


def test_dmd_refuses_data(sd, tmp_path):
    r = CliRunner().invoke(main, ["distill", "dmd", "--teacher", str(sd), "--out", str(tmp_path / "o"),
                                  "--data", str(_folder(tmp_path / "imgs"))])
    assert r.exit_code == 2 and "leave --data / --captions out" in r.output


def test_max_train_steps_caps_stage_one_and_until_32_stops_after_it(sd, tmp_path, one_thread):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["distill", "guided", "--teacher", str(sd), "--out", str(out), "--data",
                                  str(_folder(tmp_path / "imgs", captions=CAPTIONS * 16)), "--until", "32", "--max-train-steps", "3",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    steps = [json.loads(line)["step"] for line in (out / "stage1" / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert max(steps) == 3  # the preset's 2,000 capped at 3
    assert not (out / "round-16").exists()  # 32 steps are stage 1's own: no round ran
    assert (out / "export").is_dir() and "stage1" in r.output


def test_dmd2_gan_term_trains_on_the_encoded_images_of_a_pipeline_teacher(sd, tmp_path, one_thread):
    """DMD2 (4 steps, GAN term) on a pipeline teacher: the GAN's real images are the --data folder's VAE latents
    with their caption ids; the head and the generator train, and the export is a stock pipeline."""
    from fewstep.recipes.dmd import run_dmd
    from test_distill_pipelines import TINY_DMD
    paths, prompts, labels = caption_prompts(_folder(tmp_path / "imgs"))
    t = teacher_from(sd, prompts)
    settings = replace(TINY_DMD, gen_steps=4, lambda_reg=0.0, fake_updates=2, gan_weight_g=3e-3, gan_weight_d=1e-2)
    with pytest.raises(ValueError, match="GAN term needs real images"):
        run_dmd(tmp_path / "none", settings, teacher=lambda: t, progress=False)
    real = encoded_data(t, paths, labels, tmp_path / "run")
    folder = run_dmd(tmp_path / "run", settings, name="tiny-dmd2-4", teacher=lambda: t, progress=False,
                     data=lambda: real)
    assert (folder / "model_index.json").is_file()
    from fewstep.train import latest_checkpoint, load_checkpoint_weights
    fake = load_checkpoint_weights(latest_checkpoint(tmp_path / "run" / "run"), "model", "fake")
    assert any(k.startswith("head.") for k in fake), "the GAN head is part of the trained fake score"
    logs = [json.loads(line) for line in (tmp_path / "run" / "run" / "log.jsonl").read_text().splitlines()
            if '"loss/generator"' in line]
    assert logs and all(math.isfinite(r["loss/generator"]) for r in logs)
    assert any("gan" in k for r in logs for k in r), "the GAN terms are logged"


def test_dmd_data_without_the_gan_term_is_refused_and_named(sd, tmp_path):
    r = CliRunner().invoke(main, ["distill", "dmd", "--teacher", str(sd), "--preset", "mnist-dmd2-4", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code != 0 and "GAN term needs real images" in r.output and "Traceback" not in r.output


def test_init_starts_the_generator_from_a_trained_one_and_refuses_other_kinds(sd, tmp_path, one_thread,
                                                                             monkeypatch):
    """--init: the generator starts from an exported generator's weights (not the teacher's), and a folder that is
    not a generator of this kind (the teacher itself, a 1-step generator for a 4-step run, a LoRA run) is refused
    in one line before any work."""
    from fewstep.recipes.dmd import initial_generator, run_dmd
    from test_distill_pipelines import TINY_DMD
    t = teacher_from(sd)
    first = run_dmd(tmp_path / "a", replace(TINY_DMD, steps=3), name="tiny-dmd-1", teacher=lambda: t, progress=False)
    net = initial_generator(t, replace(TINY_DMD, init=str(first)))
    from diffusers import UNet2DConditionModel
    exported = UNet2DConditionModel.from_pretrained(first / "unet").state_dict()
    got = net.unet.state_dict()
    assert all(torch.equal(got[k], exported[k]) for k in exported)
    assert any(not torch.equal(got[k], t.net.unet.state_dict()[k]) for k in exported), "not the teacher's weights"
    for settings, message in ((replace(TINY_DMD, init=str(sd)), "is not a 1-step eps generator"),
                              (replace(TINY_DMD, init=str(first), gen_steps=4, lambda_reg=0.0),
                               "is not a 4-step eps generator"),
                              (replace(TINY_DMD, init=str(first), lora_rank=2), "leave init")):
        with pytest.raises(ValueError, match=message) as e:
            run_dmd(tmp_path / "b", settings, teacher=lambda: t, progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "b" / "run").exists()
    folder = run_dmd(tmp_path / "c", replace(TINY_DMD, init=str(first)), name="tiny-dmd-1", teacher=lambda: t,
                     progress=False)
    assert json.loads((folder / "fewstep.json").read_text())["preset"]["init"] == str(first)
    # its EMA keeps the full decay from the first update (no warm-up that would forget the trained start)
    from fewstep.train import latest_checkpoint, load_checkpoint_weights
    raw = load_checkpoint_weights(latest_checkpoint(tmp_path / "c" / "run"), "model", "generator")
    ema = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    moved = lambda w: sum(float((w[k].float() - exported[k.removeprefix("unet.")].float()).pow(2).sum())  # noqa: E731
                          for k in w if k.removeprefix("unet.") in exported) ** 0.5
    assert 0 < moved({f"unet.{k}": v for k, v in ema.items()}) < 0.01 * moved(raw)
    from fewstep.recipes.dmd import MNIST_DMD  # the preset the command runs for a pipeline folder
    # the command: --init alone gives the fake score its warm-up; --fake-warmup 0 is heard, not dropped as "unset".
    # That one runs through to its export; the others (400 warm-up steps each) stop where the command hands its
    # settings to the run
    import fewstep.cli
    handed = []
    for extra, warm in (([], 400), (["--fake-warmup", "0"], None), (["--w", "0"], 400),
                        (["--fake-updates", "2", "--batch-size", "3"], 400)):
        if warm is not None:
            monkeypatch.setattr(fewstep.cli, "_run_recipe", lambda preset, out, threads, settings, **kw:
                                handed.append(settings) or Path(out))
        else:
            monkeypatch.undo()
        out = tmp_path / f"cli{'-'.join(extra)}"
        r = CliRunner().invoke(main, ["distill", "dmd", "--teacher", str(sd), "--init", str(first), "--out", str(out),
                                      "--train-steps", "1", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        if warm is None:
            preset = json.loads(next((out / "export").glob("*/fewstep.json")).read_text())["preset"]
            got = (preset["init"], preset.get("fake_warmup"), preset["real_w"], preset["fake_updates"],
                   preset["batch_size"])
        else:
            st = handed.pop()
            got = (st.init, st.fake_warmup, st.real_w, st.fake_updates, st.batch_size)
        assert got == (str(first), warm, 0.0 if "--w" in extra else 1.0,
                       *((2, 3) if "--fake-updates" in extra else (MNIST_DMD.fake_updates, MNIST_DMD.batch_size)))


def test_the_test_beds_gan_data_are_its_captioned_digits_encoded_by_its_vae(tmp_path, one_thread, capsys):
    """The shipped mnist-sd's DMD2 GAN term needs no --data: its real images are the captioned MNIST train digits
    as its VAE's latents (decoding them gives the digits back), labelled by their caption's prompt id, cached."""
    from fewstep.data.captions import parse_caption
    from fewstep.recipes.latents import test_bed_data
    from fewstep.recipes.textbed import mnist_captioned
    from fewstep.recipes.teachers import trained_on_test_bed
    t = teacher_from("mnist-sd")
    assert trained_on_test_bed(t.folder)
    latents, labels = test_bed_data(t, tmp_path)
    images, captions = mnist_captioned()
    assert latents.shape == (len(images), 4, 8, 8) and len(labels) == len(images)
    digits = torch.tensor([parse_caption(t.prompts[i])[0] for i in labels[:500].tolist()])
    assert torch.equal(digits, torch.tensor([parse_caption(c)[0] for c in captions[:500]]))
    # the VAE reconstructs them to MSE 0.0044; latents scaled 1.5x too large or small decode to 0.010 / 0.011
    assert (t.decode(latents[:64]) - images[:64]).pow(2).mean() < 0.007, "the latents decode to the digits"
    capsys.readouterr()
    again, _ = test_bed_data(t, tmp_path)
    assert torch.equal(again, latents) and "building" not in capsys.readouterr().err
