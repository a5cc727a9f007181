"""`fewstep sample`, `fewstep eval`, `fewstep train`, `fewstep solvers` on a tiny model folder."""
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fewstep.cli import main
from fewstep.nets import UNet, UNetConfig
from fewstep.schedules import CosineVP
from fewstep.solvers import SOLVERS


def invoke(*args):
    return CliRunner().invoke(main, list(args), standalone_mode=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[],
                          num_classes=10, image_size=28, groups=4))
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny-teacher")
    net.save(folder, extra={"kind": "diffusion", "prediction": "v", "schedule": CosineVP().config(),
                            "num_classes": 10, "null_class": 10, "image_shape": [1, 28, 28]})
    return folder


def test_sample_writes_a_grid_and_reports_nfe(tiny, tmp_path):
    out = tmp_path / "grid.png"
    r = invoke("sample", "--model", str(tiny), "--w", "1", "--solver", "dpmpp_2m", "--steps", "3", "-n", "20",
               "--out", str(out), "--singles", str(tmp_path / "one"), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "NFE 3" in r.output and "s/image" in r.output
    grid = Image.open(out)
    assert grid.size == (10 * 30 + 2, 2 * 30 + 2)  # 10 per row (one per class), 2 px padding
    assert len(list((tmp_path / "one").glob("*.png"))) == 20


@pytest.mark.parametrize("args, words", [
    (["sample", "--model", "no-such-model"], "no model named"),
    (["sample", "--model", "mnist-classifier"], "not a generative model"),
    (["sample", "--solver", "dpm_solver_9"], "unknown solver"),
    (["sample", "--w", "inf"], "finite"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--labels", "1,a"], "class ids"),
    (["eval", "--model", "no-such-model"], "no model named"),
    (["train", "mnist"], "--out"),
    (["train", "cifar", "--out", "x"], "cifar"),
    (["sample", "--device", "cuda:99", "--steps", "1"], "--device cuda:99"),  # no CUDA, or not that many GPUs
    (["sample", "--device", "tpu-ish"], "unknown device"),
    (["sample", "--dtype", "int8"], "--dtype"),
    (["sample", "--steps", "1", "--out", "/proc/x.png"], "cannot write /proc/x.png"),
    (["train", "mnist", "--out", "/proc/xx"], "cannot write to /proc/xx"),
    (["distill", "guided", "--out", "/proc/xx"], "cannot write to /proc/xx"),
    (["distill", "dmd", "--out", "/proc/xx"], "cannot write to /proc/xx"),
    (["eval", "--json", "/proc/e.json", "-n", "20"], "cannot write /proc/e.json"),
    (["sample", "--w", "-3"], "guidance weight w must be >= 0 (x_w = (1 + w) x_cond - w x_uncond"),
    (["eval", "--w", "-0.5"], "w must be >= 0"),
    (["tune", "--w", "-1", "--steps", "3", "--out", "g.json"], "w must be >= 0"),
    (["translate", "--from", "1", "--to", "2", "--w", "-1"], "w must be >= 0"),
    (["bench", "speed", "--w", "-1"], "w must be >= 0"),
    (["eval", "--sweep-w", "0,-1", "--json", "x.json"], "expected numbers >= 0, got '0,-1'"),
    (["eval", "--sweep-steps", "2,0", "--json", "x.json"], "expected integers >= 1, got '2,0'"),
    (["eval", "--sweep-steps", "2,b", "--json", "x.json"], "expected comma-separated integers"),
    (["bench", "solvers", "--nfe", "5,1001"], "expected integers from 1 to 1000"),
    (["sample", "--labels", ","], "expected one or more finite class ids"),
    (["tune", "--out", "g.json"], "missing option --steps"),
    (["tune", "--steps", "3", "--times", "fixed", "--method", "dp", "--out", "g.json"], "--times fixed keeps the times"),
    (["distill", "dmd", "--out", "x", "--train-steps", "0"], "--train-steps"),
])
def test_misuse_exits_2_with_one_line(args, words):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.output


def test_labels_out_of_range_is_misuse(tiny):
    r = invoke("sample", "--model", str(tiny), "--labels", "12", "--steps", "1")
    assert r.exit_code == 2 and "labels must lie" in r.output


def test_solvers_lists_every_solver():
    r = invoke("solvers")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.output.splitlines()] == list(SOLVERS)


def test_eval_json(tiny, tmp_path):
    out = tmp_path / "e.json"
    r = invoke("eval", "--model", str(tiny), "--steps", "1", "-n", "20", "--json", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for key in ("fid", "kid", "is", "class_accuracy", "nfe", "seconds_per_image", "baseline"):
        assert key in res
    assert res["nfe"] == 1 and res["n"] == 20
    assert res["fid"] > res["baseline"]["fid"]  # a random network is far from real digits


def test_sample_refuses_to_overwrite_without_force_and_before_sampling(tiny, tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    r = invoke("sample", "--model", str(tiny), "--steps", "1", "-n", "2", "--out", str(out), "--no-progress")
    assert r.exit_code == 2 and "--force" in r.output and out.read_bytes() == b"keep me"
    r = invoke("sample", "--model", str(tiny), "--steps", "1", "-n", "2", "--out", str(out), "--no-progress", "--force")
    assert r.exit_code == 0 and out.read_bytes() != b"keep me"


def test_sample_under_bf16_autocast_is_close_to_float32(tiny, tmp_path):
    """--dtype bf16: the network runs under autocast, the solver math stays float32/64. bf16 keeps 8
    mantissa bits (relative round-off 2^-8 ~ 0.004 per network output); guidance (1 + 2w = 3x) and a few
    steps amplify it, so the stated tolerance in [-1, 1] pixel units is RMS < 0.02 and max < 0.1."""
    import fewstep
    from fewstep.api import generate
    m = fewstep.load(tiny)
    ref = generate(m, torch.arange(4), w=1.0, solver="dpmpp_2m", steps=4, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = generate(m, torch.arange(4), w=1.0, solver="dpmpp_2m", steps=4, seed=0)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    diff = low - ref
    assert 0 < diff.pow(2).mean().sqrt() < 0.02 and diff.abs().max() < 0.1, (diff.pow(2).mean().sqrt(), diff.abs().max())
    r = invoke("sample", "--model", str(tiny), "--steps", "2", "-n", "2", "--dtype", "bf16", "--out",
               str(tmp_path / "b.png"), "--no-progress")
    assert r.exit_code == 0, r.output


def test_eval_sweep_writes_json_markdown_and_plot(tiny, tmp_path):
    out = tmp_path / "sweep.json"
    r = invoke("eval", "--model", str(tiny), "--sweep-steps", "1,2", "--sweep-w", "0,1", "-n", "20",
               "--json", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert [(row["w"], row["steps"], row["nfe"]) for row in doc["rows"]] == [(0, 1, 1), (0, 2, 2), (1, 1, 1), (1, 2, 2)]
    assert "| 1 | dpmpp_2m | 2 | 2 |" in out.with_suffix(".md").read_text()
    assert Image.open(out.with_suffix(".png")).size[0] > 300


@pytest.mark.parametrize("args, words", [(["--sweep-steps", "1,a", "--json", "x.json"], "--sweep-steps"),
                                         (["--sweep-w", "nan", "--json", "x.json"], "--sweep-w"),
                                         (["--sweep-steps", "2"], "--json")])
def test_eval_sweep_misuse(tiny, args, words):
    r = invoke("eval", "--model", str(tiny), "-n", "20", *args)
    assert r.exit_code == 2 and words in r.output, r.output


def test_sample_eval_and_tune_share_one_budget_flag():
    for cmd in ("sample", "eval", "tune"):
        r = invoke(cmd, "--help")
        assert "--steps" in r.output and "--nfe" not in r.output, (cmd, r.output)


def test_tune_keeps_nfe_as_a_deprecated_alias_of_steps(monkeypatch, tmp_path):
    import fewstep.tune

    def fake_tune_model(model, **kw):
        raise ValueError(f"reached tune_model with nfe={kw['nfe']}")
    monkeypatch.setattr(fewstep.tune, "tune_model", fake_tune_model)
    out = str(tmp_path / "g.json")
    r = invoke("tune", "--nfe", "3", "--out", out)
    assert r.exit_code == 2 and "reached tune_model with nfe=3" in r.stderr, r.output
    assert "--nfe is deprecated; use --steps" in r.stderr
    r = invoke("tune", "--steps", "4", "--out", out)
    assert "reached tune_model with nfe=4" in r.stderr and "deprecated" not in r.stderr
    r = invoke("tune", "--nfe", "3", "--steps", "4", "--out", out)
    assert r.exit_code == 2 and "--nfe 3 and --steps 4 disagree" in r.stderr and "reached" not in r.stderr


@pytest.fixture
def recorded_recipes(monkeypatch):
    """Replace every recipe's run function by one that records its call."""
    from dataclasses import replace

    import fewstep.recipes as recipes
    calls = []

    def fake_run(out, settings, **kw):
        calls.append((out, settings, kw))
        if out.name == "refused":
            raise ValueError(f"{out} already holds checkpoint step-00000002; pass resume=True")
        return {"export": out / "x"} if kw["name"] in ("mnist-guided", "mnist-progressive") else out / kw["name"]
    for name, r in recipes.RECIPES.items():
        monkeypatch.setitem(recipes.RECIPES, name, replace(r, run=fake_run))
    return calls


@pytest.mark.parametrize("args, name, options", [
    (["train", "mnist"], "mnist-teacher", {}),
    (["train", "mnist-classifier", "--resume"], "mnist-classifier", {"resume": True}),
    (["distill", "guided", "--until", "4", "--part", "decoder"], "mnist-guided", {"until": 4, "part": "decoder"}),
    (["distill", "progressive"], "mnist-progressive", {"until": None}),
    (["distill", "dmd", "--preset", "mnist-dmd2-4"], "mnist-dmd2-4", {}),
])
def test_train_and_distill_run_recipes_through_one_runner(recorded_recipes, tmp_path, args, name, options):
    import fewstep.recipes as recipes
    r = invoke(*args, "--out", str(tmp_path / "run"), "--no-progress")
    assert r.exit_code == 0, r.output
    ((out, settings, kw),) = recorded_recipes
    assert out == tmp_path / "run" and out.is_dir()  # checked (and made) before the recipe runs
    assert settings is recipes.RECIPES[name].settings and kw["name"] == name and kw["progress"] is False
    assert {k: kw[k] for k in options} == options


def test_distill_dmd_steps_replaces_only_the_training_steps(recorded_recipes, tmp_path):
    from dataclasses import asdict

    from fewstep.recipes import MNIST_DMD, MNIST_DMD2_4
    r = invoke("distill", "dmd", "--preset", "mnist-dmd2-4", "--train-steps", "7", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert asdict(recorded_recipes[0][1]) == {**asdict(MNIST_DMD2_4), "steps": 7}
    r = invoke("distill", "dmd", "--steps", "9", "--out", str(tmp_path))  # the old name still works, with a warning
    assert r.exit_code == 0 and "--steps is deprecated; use --train-steps" in r.stderr, r.output
    assert asdict(recorded_recipes[1][1]) == {**asdict(MNIST_DMD), "steps": 9}
    assert "--train-steps" in invoke("distill", "dmd", "--help").output


def test_a_recipe_refusal_is_one_line(recorded_recipes, tmp_path):
    for args in (["train", "mnist"], ["distill", "guided"]):
        r = invoke(*args, "--out", str(tmp_path / "refused"))
        assert r.exit_code == 2 and r.output.strip().splitlines() == [
            f"fewstep: error: {tmp_path / 'refused'} already holds checkpoint step-00000002; pass resume=True"], r.output
