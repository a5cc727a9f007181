"""fewstep.recipes: the presets are the shipped models' settings (their config.json files agree),
the preview samples with the library's solvers, and each recipe runs end to end on a tiny teacher
and tiny data given through its providers."""
import importlib.util
import json
from dataclasses import asdict, replace

import pytest
import torch

import fewstep
from fewstep.api import ASSETS, DiffusionModel
from fewstep.nets import UNet, UNetConfig, read_config
from fewstep.recipes import (DMD_PRESETS, MNIST_CLASSIFIER, MNIST_DMD, MNIST_DMD2_4, MNIST_GUIDED, MNIST_PROGRESSIVE,
                             MNIST_TEACHER, RECIPES, GuidedSettings, Hyper, ProgressiveSettings, run_classifier,
                             run_dmd, run_guided, run_teacher)
from fewstep.recipes.dmd import generator_config
from fewstep.recipes.guided import student_config
from fewstep.recipes.previews import teacher_preview
from fewstep.recipes.teacher import teacher_config
from fewstep.schedules import CosineVP

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
            "num_classes": 10, "groups": 4}
QUIET = dict(batch_size=4, ckpt_every_minutes=None, sample_every_minutes=None, fid_probe=0)  # one preview, at the end
HISTORY = ("arch", "net_config", "train_steps", "train_seconds")  # what a re-run cannot reproduce


def _shipped(name: str) -> dict:
    return read_config(ASSETS / name)


def _tiny_teacher() -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY_NET))
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    cfg = {"kind": "diffusion", "prediction": "v", "schedule": CosineVP().config(), "num_classes": 10,
           "null_class": 10, "image_shape": [1, 28, 28], "data_range": [-1.0, 1.0], "time_input": "continuous"}
    return DiffusionModel(net, cfg, "tiny")


def _tiny_data(n: int = 8):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.arange(n) % 10


# --- the presets are the shipped models' settings --------------------------------------------------------

def test_teacher_preset_reproduces_the_shipped_config():
    shipped = _shipped("mnist-teacher")
    assert {k: shipped["net_config"][k] for k in MNIST_TEACHER.net} == MNIST_TEACHER.net
    assert shipped["train_steps"] == MNIST_TEACHER.steps == 6000
    ours = teacher_config(MNIST_TEACHER, "mnist-teacher", (1, 28, 28), "mnist train (4000)", 6000)
    assert ours == {k: v for k, v in shipped.items() if k not in ("arch", "net_config")}


def test_classifier_preset_matches_the_shipped_classifier():
    shipped = _shipped("mnist-classifier")
    assert {k: shipped["net_config"][k] for k in MNIST_CLASSIFIER.net} == MNIST_CLASSIFIER.net
    assert shipped["train_steps"] == MNIST_CLASSIFIER.steps == 1500


@pytest.mark.parametrize("name, steps, encoder", [("mnist-guided-stage1", None, False), ("mnist-guided-8", 8, False),
                                                  ("mnist-guided-4", 4, False), ("mnist-guided-2", 2, False),
                                                  ("mnist-guided-1", 1, False), ("mnist-guided-encoder-4", 4, True)])
def test_guided_preset_reproduces_each_shipped_student_config(name, steps, encoder):
    shipped, teacher = _shipped(name), _shipped("mnist-teacher")
    rounds = MNIST_GUIDED.encoder_rounds if encoder else MNIST_GUIDED.rounds
    assert shipped["train_steps"] == (MNIST_GUIDED.stage1.steps if steps is None else rounds[steps])
    ours = student_config(teacher, MNIST_GUIDED, "mnist-guided", steps, shipped["train_steps"], 0.0, encoder=encoder)
    assert {k: v for k, v in ours.items() if k not in HISTORY} == {k: v for k, v in shipped.items() if k not in HISTORY}


def test_dmd_preset_reproduces_the_shipped_generator_config_and_its_recorded_preset():
    shipped = _shipped("mnist-dmd-1")
    ours = json.loads(json.dumps(generator_config(_shipped("mnist-teacher"), MNIST_DMD, "mnist-dmd-1",
                                                  shipped["train_steps"], 0.0)))
    assert ours["preset"] == shipped["preset"]  # every hyper-parameter, as recorded at training time
    assert {k: v for k, v in ours.items() if k not in HISTORY} == {k: v for k, v in shipped.items() if k not in HISTORY}


@pytest.mark.parametrize("name", ["mnist-sd-dmd-1", "mnist-sd-dmd-1-lora", "mnist-sd-dmd-1-cooldown",
                                  "mnist-sd-dmd-1-ttur", "mnist-sd-dmd-1-anneal", "mnist-sd3-dmd-1"])
def test_the_test_beds_dmd_presets_are_what_the_shipped_generators_recorded(name):
    """Each shipped pipeline generator's fewstep.json records the hyper-parameters it was trained with: the preset
    (mnist-sd-dmd-1's fake-score rate, 3.9999999999999996e-4 from --learning-rate 2e-4 at the former 2:1 ratio,
    is one ulp below the preset's 4e-4)."""
    recorded = json.loads((ASSETS / name / "fewstep.json").read_text())["preset"]
    ours = json.loads(json.dumps({k: v for k, v in asdict(DMD_PRESETS[name]).items() if k in recorded}))
    assert set(recorded) <= set(asdict(DMD_PRESETS[name]))
    assert recorded["lr"] == pytest.approx(ours.pop("lr"), rel=1e-12)
    assert {k: v for k, v in recorded.items() if k != "lr"} == ours


def test_dmd2_and_progressive_presets_are_replacements_of_their_recipe():
    assert {k: DMD_PRESETS[k] for k in ("mnist-dmd-1", "mnist-dmd2-4")} == {"mnist-dmd-1": MNIST_DMD,
                                                                             "mnist-dmd2-4": MNIST_DMD2_4}
    # the text-to-image test bed's generators: the same recipe on pipeline teachers, batch and rates of their own
    # (mnist-sd's keeps the recipe's EMA decay of 0.999, mnist-sd3's has its own)
    for name, teacher, own in (("mnist-sd-dmd-1", "mnist-sd", set()), ("mnist-sd3-dmd-1", "mnist-sd3", {"ema_decay"})):
        changed = {k for k, v in asdict(DMD_PRESETS[name]).items() if asdict(MNIST_DMD)[k] != v}
        assert changed == {"teacher", "steps", "lr"} | own and DMD_PRESETS[name].teacher == teacher
    # mnist-sd-dmd-1-cooldown: mnist-sd-dmd-1's generator trained on at half its learning rates, fake score first
    cool, base = DMD_PRESETS["mnist-sd-dmd-1-cooldown"], DMD_PRESETS["mnist-sd-dmd-1"]
    changed = {k for k, v in asdict(cool).items() if asdict(base)[k] != v}
    assert changed == {"init", "steps", "fake_warmup", "lr"} and cool.init == "mnist-sd-dmd-1"
    assert {k: 2 * v for k, v in cool.lr.items()} == base.lr
    # mnist-sd-dmd-1-ttur: the cooldown's generator trained on at its rates, 3 fake-score updates per generator update
    ttur = DMD_PRESETS["mnist-sd-dmd-1-ttur"]
    changed = {k for k, v in asdict(ttur).items() if asdict(cool)[k] != v}
    assert changed == {"init", "steps", "fake_warmup", "fake_updates"} and ttur.init == "mnist-sd-dmd-1-cooldown"
    assert (ttur.fake_updates, ttur.lr) == (3, cool.lr)
    # mnist-sd-dmd-1-anneal: the ttur run on past its last step, the generator's learning rate dropped there
    anneal = DMD_PRESETS["mnist-sd-dmd-1-anneal"]
    assert {k for k, v in asdict(anneal).items() if asdict(ttur)[k] != v} == {"steps", "lr_drops"}
    assert anneal.lr_drops == {ttur.steps: {"generator": 0.3, "fake": 1.0}} and anneal.steps > ttur.steps
    changed = {k for k, v in asdict(MNIST_DMD2_4).items() if asdict(MNIST_DMD)[k] != v}
    assert changed == {"lambda_reg", "fake_updates", "gan_weight_g", "gan_weight_d", "gen_steps", "steps"}
    assert (MNIST_DMD2_4.gen_steps, MNIST_DMD2_4.steps, MNIST_DMD2_4.fake_updates) == (4, 6000, 5)
    assert MNIST_PROGRESSIVE.rounds == {16: 600, 8: 600, 4: 1000}
    same = ("teacher", "batch_size", "start_steps", "round_lr", "round_warmup", "round_ema_decay", "grad_clip",
            "ckpt_every_minutes", "sample_every_minutes", "seed")
    assert all(getattr(MNIST_PROGRESSIVE, k) == getattr(MNIST_GUIDED, k) for k in same)


def test_registry_names_every_shipped_recipe_and_no_second_cli():
    assert set(RECIPES) == {"mnist-teacher", "mnist-classifier", "mnist-guided", "mnist-progressive", "mnist-dmd-1",
                            "mnist-dmd2-4", "mnist-vae", "mnist-sd", "mnist-sd3",  # these three: the text test bed
                            "mnist-sd-guided", "mnist-sd-dmd-1", "mnist-sd-dmd-1-lora", "mnist-sd-dmd-1-cooldown",
                            "mnist-sd-dmd-1-ttur", "mnist-sd-dmd-1-anneal", "mnist-sd3-dmd-1"}  # students
    assert RECIPES["mnist-dmd2-4"].settings is MNIST_DMD2_4
    assert importlib.util.find_spec("fewstep.recipes.__main__") is None  # `fewstep train|distill` is the one way
    assert not hasattr(fewstep.recipes, "main")


@pytest.mark.parametrize("settings, words", [
    (lambda: GuidedSettings(rounds={16: 5, 4: 5}), "rounds must halve the steps from 32 (16 -> 8)"),
    (lambda: GuidedSettings(encoder_rounds={8: 5}), "encoder_rounds must halve"),
    (lambda: GuidedSettings(rounds={16: 0}), "rounds must halve"),
    (lambda: GuidedSettings(w_range=(2.0, 1.0)), "w_range"),
    (lambda: ProgressiveSettings(start_steps=4, rounds={2: 1, 1: 1, 0: 1}), "rounds must halve"),
])
def test_bad_settings_are_refused_in_one_line(settings, words):
    with pytest.raises(ValueError) as e:
        settings()
    assert words in str(e.value) and "\n" not in str(e.value)


# --- previews through the library's samplers ------------------------------------------------------------

def _old_ddim_preview(net, schedule, labels, w, steps, x):
    """The recipe's former private loop: DDIM (eta = 0) on v-predictions under CFG, x0 clipped."""
    ts = torch.linspace(schedule.t_max, 0.0, steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((2 * len(x),), float(t_cur), dtype=torch.float64)
        v_c, v_u = net(torch.cat([x, x]), tt, torch.cat([labels, torch.full_like(labels, net.null_class)])).chunk(2)
        v = (1 + w) * v_c - w * v_u
        a, s = float(schedule.alpha(t_cur)), float(schedule.sigma(t_cur))
        x0 = (a * x - s * v).clamp(-1, 1)
        eps = (x - a * x0) / s
        x = float(schedule.alpha(t_next)) * x0 + float(schedule.sigma(t_next)) * eps
    return x.clamp(-1, 1)


@torch.no_grad()
def test_teacher_preview_equals_the_closed_form_ddim_loop():
    t = _tiny_teacher()
    images, nrow = teacher_preview(t.schedule, "v", (1, 28, 28), 10, 10, per_class=1, w=1.5, steps=6)(t.net, 0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(10, 1, 28, 28, generator=g) * float(t.schedule.sigma(torch.tensor(t.schedule.t_max)))
    ref = _old_ddim_preview(t.net, t.schedule, torch.arange(10), 1.5, 6, x_T)
    assert nrow == 1 and images.shape == (10, 1, 28, 28)
    assert (images - ref).abs().max() < 1e-4
    assert ref.std() > 0.05 and (ref.abs() < 0.99).float().mean() > 0.1  # not trivially equal (e.g. all clipped)


# --- each recipe end to end on tiny inputs --------------------------------------------------------------

def test_teacher_recipe_exports_a_loadable_model_with_previews(tmp_path):
    settings = replace(MNIST_TEACHER, net=TINY_NET, steps=2, warmup=1, batch_size=4, ckpt_every_minutes=None,
                       sample_every_minutes=None)  # one preview, at the end
    folder = run_teacher(tmp_path, settings, data=_tiny_data, progress=False)
    assert folder == tmp_path / "model"
    m = fewstep.load(tmp_path)  # a run folder loads through its model/ export
    assert m.config["train_steps"] == 2 and m.config["train_split"] == "provided (8 images)"
    assert m.prediction == "v" and m.num_classes == 10
    assert [p.name for p in (tmp_path / "samples").glob("step-*.png")] == ["step-00000002.png"]
    info = json.loads((tmp_path / "run.json").read_text())["info"]
    assert info["recipe"] == "mnist-teacher" and info["preset"]["net"] == TINY_NET and info["preset"]["steps"] == 2


def test_classifier_recipe_reports_heldout_accuracy(tmp_path, capsys):
    settings = replace(MNIST_CLASSIFIER, steps=2, warmup=1, batch_size=4, ckpt_every_minutes=None)
    x, y = _tiny_data(20)
    acc = run_classifier(tmp_path, settings, data=lambda: (x, y), heldout=lambda: (x[:10], y[:10]), progress=False)
    cfg = read_config(tmp_path / "model")
    assert cfg["heldout_accuracy"] == acc and 0.0 <= acc <= 1.0 and cfg["heldout_split"] == "provided (10 images)"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout_accuracy"] == acc


def test_guided_recipe_runs_stage1_rounds_and_encoder_then_reuses_them(tmp_path, capsys):
    settings = replace(MNIST_GUIDED, stage1=Hyper(steps=2, lr=1e-4, warmup=1, ema_decay=0.9), rounds={16: 1, 8: 1},
                       encoder_rounds={16: 1}, round_warmup=1, **QUIET)
    teacher = _tiny_teacher()
    exports = run_guided(tmp_path, settings, teacher=lambda: teacher, data=_tiny_data, progress=False)
    assert list(exports) == ["mnist-guided-stage1", "mnist-guided-16", "mnist-guided-8", "mnist-guided-encoder-16"]
    student = fewstep.load(exports["mnist-guided-8"])
    assert student.student_steps == 8 and student.w_input and student.config["train_steps"] == 1
    assert fewstep.load(exports["mnist-guided-encoder-16"]).config["kind"] == "encoder"
    info = json.loads((tmp_path / "round-8" / "run.json").read_text())["info"]
    assert (info["stage"], info["teacher_steps"], info["preset"]["rounds"]) == ("round-8", 16, {"16": 1, "8": 1})
    capsys.readouterr()
    again = run_guided(tmp_path, settings, teacher=lambda: teacher, data=_tiny_data, progress=False, until=8,
                       part="decoder")
    assert again == {k: v for k, v in exports.items() if "encoder" not in k}
    assert capsys.readouterr().out.count("already trained") == 3  # stage 1 and both rounds reused, not retrained
    with pytest.raises(ValueError, match="part must be"):
        run_guided(tmp_path, settings, teacher=lambda: teacher, data=_tiny_data, part="both")


def test_dmd_recipe_exports_a_generator(tmp_path):
    settings = replace(MNIST_DMD, steps=2, warmup=1, pairs=replace(MNIST_DMD.pairs, n=4, steps=2), **QUIET)
    folder = run_dmd(tmp_path, settings, name="tiny-dmd", teacher=_tiny_teacher, progress=False)
    gen = fewstep.load(folder)
    assert folder == tmp_path / "tiny-dmd" and gen.config["recipe"] == "tiny-dmd"
    assert gen.config["preset"]["pairs"] == {"n": 4, "solver": "dpmpp_2m", "steps": 2, "seed": 1234}
    assert (tmp_path / "regression-set.safetensors").is_file()
    x = fewstep.generate(gen, torch.arange(2), seed=0)
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


def test_init_of_a_fewstep_teacher_loads_its_shipped_generator_and_refuses_a_multi_step_run():
    """--init on fewstep's own MNIST teacher: the shipped one-step generator's weights, and a one-line refusal
    when the run trains another number of generator steps."""
    from fewstep.recipes.dmd import initial_generator
    teacher = fewstep.load("mnist-teacher")
    net = initial_generator(teacher, replace(MNIST_DMD, init="mnist-dmd-1"))
    shipped = fewstep.load("mnist-dmd-1").net.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="is not a 4-step"):
        initial_generator(teacher, replace(MNIST_DMD2_4, init="mnist-dmd-1"))


def test_the_cli_offers_every_dmd_preset():
    """The CLI lists the preset names literally (it imports the recipes only when a command runs)."""
    from fewstep.cli import main
    dmd = main.commands["distill"].commands["dmd"]
    (preset,) = [p for p in dmd.params if p.name == "preset"]
    assert list(preset.type.choices) == list(DMD_PRESETS)
