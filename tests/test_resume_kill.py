"""Every trainer survives ``kill -9``: between checkpoints and in the middle of a checkpoint write
the previous checkpoint stays loadable, and the resumed run shows it resumed (from which step,
how many steps it ran) and ends with exactly the parameters of an uninterrupted run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.train import latest_checkpoint, load_checkpoint_weights

sys.path.insert(0, str(Path(__file__).parent))
import _train_child as child  # noqa: E402

STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def _kill_when(out_dir, kind, marker, hang_at=None):
    """Start a training subprocess and kill -9 it when it prints a line starting with ``marker``."""
    cmd = [sys.executable, str(Path(__file__).parent / "_train_child.py"), kind, str(out_dir), str(STEPS)]
    if hang_at:
        cmd.append(str(hang_at))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.startswith(marker):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed (status {proc.returncode})"


def _networks(result):
    return result.models


@pytest.mark.parametrize("kind", child.KINDS)
@pytest.mark.parametrize("where", ["between", "in-save"])
def test_kill_9_then_resume_is_exact(tmp_path, kind, where):
    full = child.run(kind, tmp_path / "full", STEPS)
    out = tmp_path / "killed"
    if where == "between":
        _kill_when(out, kind, "STEP 25")
        expect_from = 20
    else:  # killed while writing the checkpoint of step 30: the one of step 20 must survive
        _kill_when(out, kind, "SAVING", hang_at=3)
        assert list(out.glob("*.tmp")), "the child was not killed inside a checkpoint write"
        expect_from = 20
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"ckpt-{expect_from:08d}"
    name = "generator" if kind.endswith("dmd") else "model"
    assert load_checkpoint_weights(ckpt, "ema", network=name)  # loadable
    resumed = child.run(kind, out, STEPS)
    assert resumed.resumed_from == expect_from and resumed.steps_run == STEPS - expect_from
    for net_name, net in _networks(full).items():
        for (k, a), b in zip(net.state_dict().items(), _networks(resumed)[net_name].state_dict().values()):
            assert torch.equal(a, b), (net_name, k)
    assert not list(out.glob("*.tmp")), "the stale temporary checkpoint was not cleaned up"
