"""Fully sharded (FSDP) training with two real CPU processes over gloo.

torch 2.13's FSDP2 (``fully_shard``) runs on CPU tensors over gloo, so every test here trains for real
(FSDP1, ``FullyShardedDataParallel``, refuses CPU-only machines). The toy trainers of
tests/_train_child.py run sharded through tests/_fsdp_child.py: FULL_SHARD with every MLP block its own
shard group, SHARD_GRAD_OP, and accelerate's ``--use_fsdp`` launcher settings. Two sharded processes
are compared with one unsharded process on the same global batch (grad_accum=2) to float tolerance, and a
killed-and-resumed sharded run with an uninterrupted one bitwise.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewstep.distributed import fsdp_plan
from fewstep.train import _sharding_plan, latest_checkpoint, load_checkpoint_weights, train

sys.path.insert(0, str(Path(__file__).parent))
import _fsdp_child as fc  # noqa: E402

STEPS = 24  # checkpoints at 10, 20 and 24 (the last two kept)
KINDS = ("teacher", "guided", "progressive", "dmd")
NESTED = {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_MIN_NUM_PARAMS": "500"}  # each MLP block a group
CHILD = str(Path(__file__).parent / "_fsdp_child.py")
RTOL, ATOL = 1e-5, 1e-6  # two processes against one: the same sums in another order

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, kinds, option: str = "", env: dict | None = None, steps: int = STEPS):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), CHILD, str(out), str(steps), ",".join(kinds)]
    cmd += [option] if option else []
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_"))}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})


def _ranks(out: Path, kind: str) -> list[dict]:
    """The full weights both processes ended with; they must be identical."""
    ranks = [load_file(str(out / f"{kind}-rank{r}.safetensors")) for r in (0, 1)]
    assert [int(r.pop("world_size")) for r in ranks] == [2, 2]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{kind}: process 0 and process 1 end with different {key}"
    return ranks


def _assert_close_to(single: dict, sharded: dict, what: str) -> None:
    assert sorted(single) == sorted(sharded)
    for key, value in single.items():
        assert torch.allclose(sharded[key], value, rtol=RTOL, atol=ATOL), \
            f"{what}: {key} differs from one process by {(sharded[key] - value).abs().max():.2e}"


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = _torchrun(out, KINDS, env=NESTED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_sharded_processes_equal_one_process_with_the_same_global_batch(sharded_run, tmp_path, kind):
    run = json.loads((sharded_run / kind / "run.json").read_text())["sharding"]
    assert run["processes"] == 2 and run["reshard_after_forward"] is True
    assert min(run["groups"].values()) >= 3, f"the blocks were not sharded one by one: {run['groups']}"
    sharded = _ranks(sharded_run, kind)[0]
    single = fc.run(kind, tmp_path, STEPS, grad_accum=2, ckpt_every_steps=None)
    start = fc.child.build(kind)[1]
    start = start if isinstance(start, dict) else {"model": start}
    assert any(not torch.equal(v, start[name].state_dict()[k]) for name, net in single.models.items()
               for k, v in net.state_dict().items()), "training changed nothing: the comparison would be empty"
    _assert_close_to(fc.full_weights(single), sharded, kind)


def test_checkpoints_hold_one_shard_per_process_and_load_as_full_weights(sharded_run, tmp_path):
    ckpt = latest_checkpoint(sharded_run / "dmd")
    assert ckpt.name == f"ckpt-{STEPS:08d}" and json.loads((ckpt / "state.json").read_text())["sharding"]["world"] == 2
    for stem in ("generator", "generator.ema", "generator.optimizer", "fake", "fake.ema", "fake.optimizer"):
        assert not (ckpt / f"{stem}.safetensors").exists(), "a sharded run wrote a full file"
        parts = [safe_open(str(ckpt / f"{stem}.shard-{r}-of-2.safetensors"), "pt") for r in (0, 1)]
        split = json.loads(parts[0].metadata()["fewstep.sharded"])
        assert split, f"{stem}: no tensor is sharded"
        for key in split:
            rows = [p.get_slice(key).get_shape()[0] for p in parts]
            assert rows[0] == -(-sum(rows) // 2) and rows[1] == sum(rows) - rows[0], (stem, key, rows)
    final = _ranks(sharded_run, "dmd")[0]
    fresh = fc.child.build("dmd")[1]
    for name in ("generator", "fake"):
        ema = load_checkpoint_weights(ckpt, "ema", name)
        assert all(torch.equal(v, final[f"ema.{name}.{k}"]) for k, v in ema.items())
        fresh[name].load_state_dict(ema)  # strict: the full tensors of the plain (unsharded) network
    fc.run("dmd", tmp_path, 2, grad_accum=2)  # an unsharded run's checkpoint: the same tensors, whole
    plain = load_checkpoint_weights(latest_checkpoint(tmp_path), "ema", "generator")
    full = load_checkpoint_weights(ckpt, "ema", "generator")
    assert {k: (v.shape, v.dtype) for k, v in plain.items()} == {k: (v.shape, v.dtype) for k, v in full.items()}


def test_the_preview_function_gets_the_full_ema(sharded_run):
    ema_20 = load_checkpoint_weights(sharded_run / "teacher" / "ckpt-00000020", "ema")
    preview = load_file(str(sharded_run / "teacher" / "preview-20.safetensors"))
    assert sorted(preview) == sorted(ema_20) and all(torch.equal(v, ema_20[k]) for k, v in preview.items())
    last = load_file(str(sharded_run / "teacher" / f"preview-{STEPS}.safetensors"))
    final = _ranks(sharded_run, "teacher")[0]
    assert all(torch.equal(v, final[f"ema.model.{k}"]) for k, v in last.items())


def test_a_sharded_checkpoint_resumes_in_one_unsharded_process(sharded_run, tmp_path):
    run = tmp_path / "dmd"
    shutil.copytree(sharded_run / "dmd", run)
    shutil.rmtree(run / f"ckpt-{STEPS:08d}")
    (run / "latest.json").unlink()
    resumed = fc.run("dmd", run, STEPS, grad_accum=2)
    assert resumed.resumed_from == 20 and resumed.steps_run == STEPS - 20
    _assert_close_to(fc.full_weights(resumed), _ranks(sharded_run, "dmd")[0], "resumed in one process")


@pytest.mark.parametrize("where", ["between", "in-save"])
def test_kill_9_then_resume_of_a_sharded_run_is_exact(sharded_run, tmp_path, where):
    option = "die-at=15" if where == "between" else "die-in-save=20"
    killed = _torchrun(tmp_path, ["dmd"], option, env=NESTED)
    assert killed.returncode != 0
    run = tmp_path / "dmd"
    assert latest_checkpoint(run).name == "ckpt-00000010"
    if where == "in-save":  # some shards of step 20 were written, the checkpoint was never completed
        assert list((run / "ckpt-00000020.tmp").glob("*.shard-*")) and not (run / "ckpt-00000020").exists()
    resumed = _torchrun(tmp_path, ["dmd"], env=NESTED)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and not list(run.glob("*.tmp"))
    uninterrupted = _ranks(sharded_run, "dmd")[0]
    for key, value in _ranks(tmp_path, "dmd")[0].items():
        assert torch.equal(value, uninterrupted[key]), key


def test_full_shard_stops_with_an_error_when_processes_call_a_network_differently(tmp_path):
    """DMD2's backward simulation draws a rollout depth per slice: under FULL_SHARD the processes would
    gather different blocks at once; the loop stops with the fix instead of hanging."""
    proc = _torchrun(tmp_path, ["dmd2"], env=NESTED, steps=6)
    assert proc.returncode != 0
    assert "diverged" in proc.stderr and "SHARD_GRAD_OP" in proc.stderr


def test_shard_grad_op_trains_dmd2_like_one_process(tmp_path):
    env = {**NESTED, "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    proc = _torchrun(tmp_path, ["dmd2"], env=env, steps=12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "dmd2" / "run.json").read_text())["sharding"]["reshard_after_forward"] is False
    single = fc.run("dmd2", tmp_path / "single", 12, grad_accum=2, ckpt_every_steps=None)
    _assert_close_to(fc.full_weights(single), _ranks(tmp_path, "dmd2")[0], "dmd2")


def test_methods_other_than_forward_train_when_declared_and_are_explained_when_not(tmp_path):
    """DMD2's GAN head runs the fake score through ``logits``: declared in ``fsdp_forward_methods`` it gathers
    its shards and trains like one process; undeclared, the run stops with the fix in one line."""
    proc = _torchrun(tmp_path, ["gan", "gan-undeclared"], env=NESTED, steps=4)
    assert proc.returncode != 0 and "fsdp_forward_methods = ('logits',)" in proc.stderr
    single = fc.run("gan", tmp_path / "single", 4, grad_accum=2, ckpt_every_steps=None)
    _assert_close_to(fc.full_weights(single), _ranks(tmp_path, "gan")[0], "gan")


def test_accelerate_launch_use_fsdp_shards_a_diffusers_unet_by_its_settings(tmp_path):
    """No sharding argument: the loop follows accelerate's --use_fsdp settings (FSDP1-style flags, SHARD_GRAD_OP,
    the UNet's own _no_split_modules as blocks)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "1",
           "--fsdp_sharding_strategy", "SHARD_GRAD_OP", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", CHILD, str(tmp_path), "8", "pipeline-dmd", "launcher"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**clean, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "pipeline-dmd" / "run.json").read_text())["sharding"]
    assert run["reshard_after_forward"] is False and run["wrap"] == "TRANSFORMER_BASED_WRAP"
    assert min(run["groups"].values()) > 5, run["groups"]
    single = fc.run("pipeline-dmd", tmp_path / "single", 8, grad_accum=2, ckpt_every_steps=None)
    _assert_close_to(fc.full_weights(single), _ranks(tmp_path, "pipeline-dmd")[0], "pipeline-dmd")


# -- the switch and its settings, without processes -------------------------------------------------------

@pytest.fixture
def fsdp_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    return monkeypatch


@pytest.mark.parametrize("env, reshard", [({}, True), ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False),
                                          ({"FSDP_SHARDING_STRATEGY": "2"}, False),
                                          ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, False),
                                          ({"FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, True)])
def test_the_plan_reads_accelerates_strategy_as_accelerate_does(fsdp_env, env, reshard):
    for key, value in env.items():
        fsdp_env.setenv(key, value)
    assert fsdp_plan(None, 2).reshard_after_forward is reshard
    assert fsdp_plan("none", 2) is None


@pytest.mark.parametrize("env, match", [
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD.*FULL_SHARD or SHARD_GRAD_OP"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "offloading.*--fsdp_offload_params false"),
    ({"FSDP_AUTO_WRAP_POLICY": "LAYER_WRAP"}, "LAYER_WRAP.*--fsdp_auto_wrap_policy"),
    ({"FSDP_MIN_NUM_PARAMS": "1e8"}, "whole number.*--fsdp_min_num_params"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--gradient-checkpointing")])
def test_settings_the_loop_cannot_honour_are_refused_in_one_line(fsdp_env, env, match):
    for key, value in env.items():
        fsdp_env.setenv(key, value)
    with pytest.raises(ValueError, match=match) as err:
        fsdp_plan(None, 2)
    assert "\n" not in str(err.value)


def test_bad_sharding_values_are_refused(fsdp_env):
    with pytest.raises(ValueError, match="sharding must be 'fsdp', 'none' or None"):
        fsdp_plan("zero3", 2)
    with pytest.raises(ValueError, match="fp16.*bf16"):
        _sharding_plan("fsdp", SimpleNamespace(num_processes=2), "fp16")


def test_one_process_asked_to_shard_trains_unsharded_and_says_so(fsdp_env, tmp_path):
    data = torch.randn(64, 3)

    def objective(net, x):
        return (net(x) - x.flip(1)).pow(2).mean(1)

    runs = {}
    for sharding in ("fsdp", "none"):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[sharding] = train(objective, net, data, steps=5, out_dir=tmp_path / sharding, batch_size=8,
                                   lr=1e-2, progress=False, ckpt_every_minutes=None, sharding=sharding)
        assert any("one process" in str(w.message) for w in caught) == (sharding == "fsdp")
    assert "sharding" not in json.loads((tmp_path / "fsdp" / "run.json").read_text())
    for k, v in runs["none"].model.state_dict().items():
        assert torch.equal(v, runs["fsdp"].model.state_dict()[k])
