"""The bad-input catalogue: every case gets a clear error (an exception type a user expects, and a
message that names the problem), never a traceback from deep inside, a NaN image or a lost file.

``CASES`` is the single list: this test runs it, and ``benchmarks/bad_input.py`` runs it again to
write the table in docs/bad-input.md and the count in BENCHMARKS.md's reliability section.
Each case: (area, what a user did, callable(tmp_path), exception type, words the message must hold).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import fewstep
from fewstep.distill.dmd import DMDLoss, FakeScore
from fewstep.schedules import CosineVP

SCH = CosineVP()


def _den(x, t, **cond):  # a well-behaved toy denoiser
    return 0.5 * x


def _sample(**kw):
    opts = dict(solver="dpmpp_2m", steps=4)
    opts.update(kw)
    x = opts.pop("x", torch.randn(2, 3))
    den = opts.pop("den", _den)
    return fewstep.sample(den, x, SCH, **opts)


def _teacher_copy(tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(fewstep.api.ASSETS / "mnist-teacher", folder)
    return folder


def _truncate(tmp_path):
    folder = _teacher_copy(tmp_path)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return fewstep.load(folder)


def _corrupt(tmp_path):
    folder = _teacher_copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    return fewstep.load(folder)


def _wrong_arch(tmp_path):
    folder = _teacher_copy(tmp_path)
    shutil.copy(fewstep.api.ASSETS / "mnist-classifier" / "model.safetensors", folder / "model.safetensors")
    return fewstep.load(folder)


def _config_edit(tmp_path, edit):
    folder = _teacher_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return fewstep.load(folder)


def _empty_folder(tmp_path):
    from fewstep.data.folder import find_images
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    return find_images(tmp_path / "imgs")


def _unreadable_image(tmp_path):
    from fewstep.data.folder import load_image
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    return load_image(bad)


def _diffusers_config(cfg):
    from fewstep.diffusers import FewstepScheduler
    return FewstepScheduler.from_config(cfg, solver="dpmpp_2m")


def _nan_model(x, t, **cond):
    return torch.full_like(x, float("nan"))


def _wrong_shape_model(x, t, **cond):
    return x[:, :2]


def _resume_other_networks(tmp_path):
    from fewstep.losses import DenoisingLoss
    from fewstep.nets import MLP
    from fewstep.train import train
    data = torch.randn(64, 2)
    train(DenoisingLoss(SCH, "eps"), MLP(dim=2, hidden=8, depth=1), data, steps=1, out_dir=tmp_path / "run",
          batch_size=8, progress=False, ckpt_every_minutes=None)
    return train(DenoisingLoss(SCH, "eps"), MLP(dim=2, hidden=16, depth=1), data, steps=2, out_dir=tmp_path / "run",
                 batch_size=8, progress=False, ckpt_every_minutes=None)


CASES = [
    # -- solvers and grids ---------------------------------------------------------------------
    ("solvers", "steps = 0", lambda p: _sample(steps=0), ValueError, ["steps", ">= 1"]),
    ("solvers", "steps = 2.5 (not an integer)", lambda p: _sample(steps=2.5), ValueError, ["steps", "integer"]),
    ("solvers", "order 4 for a singlestep solver", lambda p: _sample(solver="dpm_solver_fast", steps=6, order=4),
     ValueError, ["order"]),
    ("solvers", "order 0 for a singlestep solver", lambda p: _sample(solver="dpm_solver_fast", steps=6, order=0),
     ValueError, ["order"]),
    ("solvers", "unknown solver name", lambda p: _sample(solver="dpmpp_9m"), ValueError, ["unknown solver"]),
    ("solvers", "unknown spacing name", lambda p: _sample(spacing="cosine"), ValueError, ["spacing"]),
    ("solvers", "custom grid not strictly decreasing",
     lambda p: _sample(grid=torch.tensor([0.9, 0.5, 0.6, 0.0])), ValueError, ["decreasing"]),
    ("solvers", "custom grid outside the schedule's range",
     lambda p: _sample(grid=torch.tensor([1.5, 0.5, 0.0])), ValueError, ["grid must lie in"]),
    ("solvers", "t_min >= t_max", lambda p: fewstep.time_grid(SCH, 4, t_max=0.2, t_min=0.5), ValueError,
     ["t_min", "t_max"]),
    ("solvers", "labels for 3 samples, batch of 2",
     lambda p: _sample(den=fewstep.load("mnist-teacher").denoiser(1.0), x=torch.randn(2, 1, 28, 28),
                       cond={"labels": torch.tensor([1, 2, 3])}), ValueError, ["'labels' has 3 rows", "batch of 2"]),
    ("solvers", "model returns the wrong shape", lambda p: _sample(den=_wrong_shape_model), ValueError,
     ["shape"]),
    ("solvers", "model returns NaN", lambda p: _sample(den=_nan_model), FloatingPointError, ["NaN", "model call"]),
    # -- files ---------------------------------------------------------------------------------
    ("files", "model folder that does not exist", lambda p: fewstep.load(p / "nowhere"), FileNotFoundError,
     ["nowhere"]),
    ("files", "truncated weights file", _truncate, ValueError, ["model.safetensors", "corrupt"]),
    ("files", "corrupt weights file", _corrupt, ValueError, ["model.safetensors", "corrupt"]),
    ("files", "weights of another architecture", _wrong_arch, ValueError, ["weights", "do not match the network config"]),
    ("files", "config.json with an unknown key",
     lambda p: _config_edit(p, lambda c: c.update(colour="blue")), ValueError, ["unknown key", "colour"]),
    ("files", "config.json missing a key",
     lambda p: _config_edit(p, lambda c: c.pop("prediction")), ValueError, ["lacks", "prediction"]),
    ("files", "image folder with no images", _empty_folder, ValueError, ["no images"]),
    ("files", "unreadable image file", _unreadable_image, ValueError, ["bad.png"]),
    ("files", "resume a run folder with another network", _resume_other_networks, ValueError,
     ["does not fit network", "new out_dir"]),
    # -- diffusers scheduler configs ---------------------------------------------------------------
    ("configs", "flow config with invert_sigmas",
     lambda p: _diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                  "invert_sigmas": True}), ValueError, ["invert_sigmas"]),
    ("configs", "flow config with stochastic_sampling",
     lambda p: _diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}),
     ValueError, ["stochastic_sampling"]),
    ("configs", "unknown scheduler class",
     lambda p: _diffusers_config({"_class_name": "MadeUpScheduler", "num_train_timesteps": 1000}), ValueError,
     ["MadeUpScheduler"]),
    ("configs", "unknown prediction_type",
     lambda p: _diffusers_config({"_class_name": "DDIMScheduler", "prediction_type": "score"}), ValueError,
     ["prediction_type"]),
    # -- diffusers models (helpers in tests/_diffusers_cases.py) -----------------------------------
    ("diffusers", "pipeline_denoiser on a pipeline whose scheduler is None",
     lambda p: __import__("_diffusers_cases").pipeline_without_scheduler(), ValueError,
     ["scheduler is None", "pipe.scheduler"]),
    ("diffusers", "class label >= the UNet's number of class embeddings",
     lambda p: __import__("_diffusers_cases").class_label_out_of_range(), ValueError,
     ["class 10", "10 class embeddings", "0..9"]),
    ("diffusers", "label_context width differs from the UNet's cross-attention width",
     lambda p: __import__("_diffusers_cases").label_context_of_the_wrong_width(), ValueError,
     ["label_context", "(4, 3, 10)", "12"]),
    # -- distillation ------------------------------------------------------------------------------
    ("distill", "DMD generator GAN loss against a head nobody trains",
     lambda p: DMDLoss(_den, SCH, "x0", gan_weight_g=0.1), ValueError, ["gan_weight_d > 0"]),
    ("distill", "DMD GAN weights with a fake network without a GAN head",
     lambda p: DMDLoss(_den, SCH, "x0", gan_weight_g=0.1, gan_weight_d=0.1).check_networks(
         {"generator": torch.nn.Linear(2, 2), "fake": FakeScore(torch.nn.Linear(2, 2))}), ValueError, ["gan_head=True"]),
    ("distill", "DMD regression targets of another size than the generator's output",
     lambda p: (lambda net: DMDLoss(net, SCH, "x0").generator_loss(net, net, {
         "z": torch.randn(2, 3), "x_ref": torch.randn(2, 4), "labels": torch.zeros(2, dtype=torch.long)}))(
         lambda x, t, labels=None: 0.5 * x),
     ValueError, ["x_ref", "generator outputs", "rebuild"]),
    ("distill", "DMD with a score-predicting teacher", lambda p: DMDLoss(_den, SCH, "score"), ValueError,
     ["unknown prediction", "flow"]),
    ("distill", "guided distillation without a null class",
     lambda p: fewstep.distill.GuidedDistillLoss(_den, SCH, "x0"), ValueError, ["null_class="]),
    ("distill", "distillation times on a schedule without defined fractions",
     lambda p: fewstep.distill.student_grid(fewstep.schedules.NoiseSchedule(), 2), ValueError,
     ["distillation times", "NoiseSchedule"]),
    ("distill", "a teacher folder that is neither a fewstep model nor a diffusers pipeline",
     lambda p: __import__("fewstep.recipes.teachers").recipes.teachers.teacher_from(p / "nothing"), FileNotFoundError,
     ["no model named", "no such folder"]),
    ("distill", "prompts for a class-conditional teacher",
     lambda p: __import__("fewstep.recipes.teachers").recipes.teachers.teacher_from("mnist-teacher", ["a seven"]),
     ValueError, ["--prompts is for text-to-image", "leave --prompts out"]),
    ("distill", "an empty prompts file",
     lambda p: ((p / "prompts.txt").write_text("\n\n"),
                __import__("fewstep.recipes.teachers").recipes.teachers.read_prompts(p / "prompts.txt")),
     ValueError, ["holds no prompt"]),
    ("distill", "mixed precision fp16 on the CPU (it would silently train in float32)",
     lambda p: __import__("fewstep.train").train.check_mixed_precision("fp16", cpu=True), ValueError,
     ["fp16 needs a CUDA GPU", "bf16"]),
    ("text-to-image", "a prompt outside the test bed's grammar",
     lambda p: fewstep.generate("mnist-sd", prompts=["a blue seven"], steps=1), ValueError, ["unknown word"]),
    ("text-to-image", "class labels for a text-to-image pipeline",
     lambda p: fewstep.generate("mnist-sd", labels=torch.tensor([7]), steps=1), ValueError, ["prompts="]),
]


@pytest.mark.parametrize("area, what, call, error, words", CASES, ids=[c[1] for c in CASES])
def test_bad_input_gets_a_clear_error(tmp_path, area, what, call, error, words):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    missing = [w for w in words if w.lower() not in message.lower()]
    assert not missing, f"{what}: the message {message!r} does not name {missing}"
    assert "\n" not in message.strip(), f"{what}: the message should be one line: {message!r}"


# -- the command line: exit status 2, one line, no traceback, nothing overwritten ---------------------

def _existing(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    return str(out)


CLI_CASES = [
    ("unknown model", lambda p: ["sample", "--model", "mnist-teachr"], ["no model named"]),
    ("unknown solver", lambda p: ["sample", "--solver", "dpmpp_9m"], ["unknown solver"]),
    ("steps 0", lambda p: ["sample", "--steps", "0"], ["--steps"]),
    ("negative guidance weight", lambda p: ["sample", "--w", "-3"], ["--w", "w must be >= 0"]),
    ("--device cuda without CUDA (or a GPU index that is not there)",
     lambda p: ["sample", "--device", "cuda:99"], ["--device cuda:99"]),
    ("sample --out /proc/x.png", lambda p: ["sample", "--steps", "1", "--out", "/proc/x.png"], ["cannot write"]),
    ("sample over an existing file without --force",
     lambda p: ["sample", "--steps", "1", "-n", "1", "--out", _existing(p)], ["--force"]),
    ("train mnist --out /proc/xx", lambda p: ["train", "mnist", "--out", "/proc/xx"], ["cannot write"]),
    ("distill dmd --out /proc/xx", lambda p: ["distill", "dmd", "--out", "/proc/xx"], ["cannot write"]),
    ("demo into an existing demo folder without --force",
     lambda p: ((p / "table.json").write_text("{}"), ["demo", "--out", str(p)])[1], ["--force"]),
    ("bench solvers on a UNet folder without its scheduler",
     lambda p: ["bench", "solvers", "--model", _unet_folder_without_scheduler(p)], ["without its scheduler"]),
    ("bench solvers on a text-to-image pipeline folder",
     lambda p: ["bench", "solvers", "--model", _text_to_image_pipeline_folder(p)], ["needs prompts", "FewstepScheduler"]),
    ("distill --prompts without a text-to-image --teacher",
     lambda p: ["distill", "dmd", "--prompts", _prompts_file(p), "--out", str(p / "run")], ["--teacher"]),
    ("distill a class-conditional teacher with --prompts",
     lambda p: ["distill", "dmd", "--teacher", "mnist-teacher", "--prompts", _prompts_file(p), "--out", str(p / "r")],
     ["--prompts is for text-to-image"]),
    ("distill --lora-rank 0", lambda p: ["distill", "dmd", "--lora-rank", "0", "--out", str(p / "run")],
     ["--lora-rank"]),
    ("distill --gradient-checkpointing on a fewstep model teacher",
     lambda p: ["distill", "dmd", "--gradient-checkpointing", "--out", str(p / "run")], ["--gradient-checkpointing"]),
    ("distill dmd --init with the teacher instead of a trained generator",
     lambda p: ["distill", "dmd", "--teacher", "mnist-sd", "--init", "mnist-sd", "--out", str(p / "r")],
     ["is not a 1-step eps generator"]),
    ("distill dmd --init with a LoRA run",
     lambda p: ["distill", "dmd", "--preset", "mnist-sd-dmd-1-lora", "--init", "mnist-sd-dmd-1", "--out", str(p / "r")],
     ["leave init (--init) out"]),
    ("distill --captions without --data",
     lambda p: ["distill", "guided", "--teacher", "mnist-sd", "--captions", "c.jsonl", "--out", str(p / "r")],
     ["--captions goes with --data"]),
    ("distill --data with a fewstep class-conditional teacher",
     lambda p: ["distill", "guided", "--teacher", "mnist-teacher", "--data", _captioned_folder(p), "--out",
                str(p / "r")], ["leave --prompts out"]),
    ("distill --data images of another size than the pipeline's",
     lambda p: ["distill", "guided", "--teacher", "mnist-sd", "--data", _captioned_folder(p, 28), "--out",
                str(p / "r")], ["is 28x28", "resize the images to 32x32"]),
    ("distill dmd --data (DMD trains from noise)",
     lambda p: ["distill", "dmd", "--teacher", "mnist-sd", "--data", _captioned_folder(p), "--out", str(p / "r")],
     ["leave --data / --captions out"]),
    ("distill --w-range with LO > HI",
     lambda p: ["distill", "guided", "--w-range", "4,1", "--out", str(p / "r")], ["--w-range", "LO <= HI"]),
    ("distill dmd --learning-rate that is not a positive number",
     lambda p: ["distill", "dmd", "--learning-rate", "2e-4,-1", "--out", str(p / "r")],
     ["--learning-rate", "one positive learning rate"]),
    ("distill --gen-prediction x0 for a flow teacher",
     lambda p: ["distill", "dmd", "--teacher", "mnist-sd3", "--gen-prediction", "x0", "--out", str(p / "r")],
     ["exports for VP teachers only"]),
    ("sample a class model with --prompt",
     lambda p: ["sample", "--model", "mnist-teacher", "--prompt", "a thick seven"], ["--labels"]),
    ("train mnist-sd on a --data folder that does not exist",
     lambda p: ["train", "mnist-sd", "--data", str(p / "nowhere"), "--out", str(p / "r")], ["does not exist"]),
    ("tune a fewstep class model with --prompts",
     lambda p: ["tune", "--model", "mnist-teacher", "--prompts", _existing(p), "--steps", "5", "--out",
                str(p / "t.json")], ["--prompts is for diffusers pipeline folders"]),
    ("sample a pipeline with --spacing tuned at a budget nothing was tuned for",
     lambda p: ["sample", "--model", "mnist-sd", "--prompt", "a thick seven", "--w", "1", "--steps", "3",
                "--spacing", "tuned", "--out", str(p / "s.png")], ["no tuned grid", "fewstep tune"]),
]


def _prompts_file(p: Path) -> str:
    (p / "prompts.txt").write_text("a thick seven\n")
    return str(p / "prompts.txt")


def _captioned_folder(p: Path, side: int = 32) -> str:
    """Two captioned grayscale images of side x side pixels (metadata.jsonl)."""
    import json

    from PIL import Image
    root = p / f"imgs{side}"
    root.mkdir()
    for i in range(2):
        Image.new("L", (side, side), 40 * i).save(root / f"{i}.png")
    rows = [json.dumps({"file_name": f"{i}.png", "text": "a thick seven"}) for i in range(2)]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(root)


def _unet_folder_without_scheduler(p: Path) -> str:
    from _tiny_models import tiny_unet
    tiny_unet().save_pretrained(p / "unet-only")
    return str(p / "unet-only")


def _text_to_image_pipeline_folder(p: Path) -> str:
    """The layout of a StableDiffusionPipeline folder (configs only: the bench refuses it before loading weights)."""
    import json
    root = p / "sd-pipe"
    for sub, cfg in {"unet": {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 8},
                     "scheduler": {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}}.items():
        (root / sub).mkdir(parents=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (root / sub / name).write_text(json.dumps(cfg))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    return str(root)


@pytest.mark.parametrize("what, args, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_misuse_exits_2_with_one_line(tmp_path, what, args, words):
    from click.testing import CliRunner

    from fewstep.cli import main
    argv = args(tmp_path)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    r = CliRunner().invoke(main, argv)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, (what, r.output)
    assert len(lines) == 1 and all(w in lines[0] for w in words) and "Traceback" not in r.output, (what, r.output)
    assert {f: f.read_bytes() for f in before} == before, f"{what}: an existing file was changed"
