"""Distilled students, encoders and DMD generators through fewstep.load / generate and the CLI."""
import subprocess
import sys

import pytest
import torch

import fewstep
from fewstep.api import EncoderModel, GeneratorModel, StudentModel
from fewstep.distill import with_w_input
from fewstep.distill.dmd import generator_times
from fewstep.nets import UNet, UNetConfig
from fewstep.schedules import CosineVP

TINY = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
        "num_classes": 10, "image_size": 28, "groups": 4}
BASE = {"prediction": "v", "schedule": CosineVP().config(), "num_classes": 10, "null_class": 10,
        "image_shape": [1, 28, 28]}


def _net(w_input: bool):
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY))
    net = with_w_input(net) if w_input else net
    for p in net.parameters():  # zero-initialised layers (output, w branch) would hide effects
        p.data.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    _net(True).save(root / "student", extra={**BASE, "kind": "student", "student_steps": 2, "w_input": True})
    _net(True).save(root / "encoder", extra={**BASE, "kind": "encoder", "student_steps": 2, "w_input": True})
    times = [float(t) for t in generator_times(CosineVP(), 2)]
    _net(False).save(root / "gen", extra={**BASE, "kind": "generator", "generator_times": times, "real_w": 1.0})
    return root


def test_student_samples_with_its_own_steps_and_per_sample_seeds(folders):
    m = fewstep.load(folders / "student")
    assert isinstance(m, StudentModel) and m.student_steps == 2 and m.nfe() == 2
    labels = torch.arange(10) % 10
    outs = [fewstep.generate(m, labels, w=2.0, seed=3, batch_size=b) for b in (1, 7, 64)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() < 1e-5  # image i depends on (seed, i) only
    assert outs[0].shape == (10, 1, 28, 28) and outs[0].abs().max() <= 1
    other_w = fewstep.generate(m, labels, w=0.0, seed=3)
    assert (other_w - outs[0]).abs().max() > 1e-4  # w really is an input
    stoch = fewstep.generate(m, labels, w=2.0, seed=3, stochastic=True)
    assert (stoch - outs[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2-step student"):
        fewstep.generate(m, labels, steps=4)
    with pytest.raises(ValueError, match="own DDIM grid"):
        fewstep.generate(m, labels, solver="dpmpp_2m")


def test_generator_and_encoder(folders):
    g = fewstep.load(folders / "gen")
    assert isinstance(g, GeneratorModel) and g.default_steps == 2
    a = fewstep.generate(g, torch.arange(5), seed=1, batch_size=1)
    b = fewstep.generate(g, torch.arange(5), seed=1, batch_size=5)
    assert (a - b).abs().max() < 1e-5 and a.std() > 0
    with pytest.raises(ValueError, match="baked"):
        fewstep.generate(g, torch.arange(5), w=3.0)
    with pytest.raises(ValueError, match="own sampler"):
        fewstep.generate(g, torch.arange(5), solver="ddim")
    e = fewstep.load(folders / "encoder")
    assert isinstance(e, EncoderModel)
    z = e.encode(torch.zeros(2, 1, 28, 28), torch.tensor([1, 2]), w=1.0)
    assert z.shape == (2, 1, 28, 28) and torch.isfinite(z).all()
    with pytest.raises(TypeError, match="encoder"):
        fewstep.generate(e, torch.arange(2))


def test_planned_but_untrained_names_say_how_to_make_them():
    from fewstep.api import CATALOGUE, SHIPPED
    missing = [n for n in CATALOGUE if n not in SHIPPED]
    for name in missing:
        with pytest.raises(FileNotFoundError, match="fewstep distill"):
            fewstep.load(name)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True)


def test_cli_samples_students_and_translates(folders, tmp_path):
    r = _cli("sample", "--model", str(folders / "student"), "--w", "2", "--stochastic", "-n", "10",
             "--out", str(tmp_path / "s.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "NFE 2" in r.stdout and (tmp_path / "s.png").is_file()
    r = _cli("sample", "--model", str(folders / "student"), "--steps", "3", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "2-step student" in r.stderr and "Traceback" not in r.stderr
    r = _cli("translate", "--from", "3", "--to", "8", "--encoder", str(folders / "encoder"), "--decoder",
             str(folders / "student"), "-n", "4", "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    assert "3 -> 8" in r.stdout and "network calls per image: 2 + 2" in r.stdout
    r = _cli("translate", "--from", "3", "--to", "8", "--encoder", str(folders / "student"), "--decoder",
             str(folders / "student"))
    assert r.returncode == 2 and "not a distilled encoder" in r.stderr
