"""Every trainer under two real processes (torchrun, gloo on CPU): the world size is 2, both ranks
end with identical parameters, and the result equals one process with the same global batch
(grad_accum=2), to float tolerance."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import _train_child as child  # noqa: E402

STEPS, BATCH = 6, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).parent / "_ddp_child.py"), str(out),
           str(STEPS), str(BATCH)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no GPU: the loop picks CPU processes over gloo itself
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", child.KINDS)
def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run, tmp_path, kind, one_thread):
    ranks = [load_file(str(two_process_run / f"{kind}-rank{r}.safetensors")) for r in (0, 1)]
    assert int(ranks[0].pop("world_size")) == 2 and int(ranks[1].pop("world_size")) == 2
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{kind}: rank 0 and rank 1 differ in {key}"
    single = child.run(kind, tmp_path / kind, STEPS, batch_size=BATCH, grad_accum=2, ckpt_every_steps=None)
    initial = child.build(kind)[1]
    initial = initial if isinstance(initial, dict) else {"model": initial}
    assert any(not torch.equal(v, initial[name].state_dict()[k]) for name, m in single.models.items()
               for k, v in m.state_dict().items()), "training changed nothing: the comparison would be empty"

    for name, model in single.models.items():
        for k, v in model.state_dict().items():
            ddp = ranks[0][f"{name}.{k}"]
            assert torch.allclose(ddp, v, rtol=1e-5, atol=1e-6), \
                f"{kind}: {name}.{k} differs from the one-process run by {(ddp - v).abs().max():.2e}"
    # only the main process wrote the run folder (one log, checkpoints once)
    assert (two_process_run / kind / "log.jsonl").is_file()


def test_generation_split_over_two_processes_gives_the_one_process_images(two_process_run, one_thread):
    import fewstep
    from _ddp_child import GENERATE
    alone = fewstep.generate("mnist-teacher", **GENERATE)
    for r in (0, 1):
        split = load_file(str(two_process_run / f"generate-rank{r}.safetensors"))["images"]
        assert split.shape == alone.shape
        torch.testing.assert_close(split, alone, rtol=0, atol=1e-5)


def test_accelerate_launch_runs_a_trainer_on_two_processes(tmp_path, one_thread):
    """The same trainer under `accelerate launch` (the launcher most users have): world size 2, ranks equal,
    equal to the torchrun run of the same settings."""
    # accelerate's --cpu flag means one process; --multi_gpu without GPUs gives CPU processes (the loop
    # sees WORLD_SIZE > 1 and no CUDA, and asks accelerate for CPU over gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(_free_port()), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(Path(__file__).parent / "_ddp_child.py"), str(tmp_path), str(STEPS), str(BATCH), "dmd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"dmd-rank{r}.safetensors")) for r in (0, 1)]
    assert int(ranks[0].pop("world_size")) == 2 and int(ranks[1].pop("world_size")) == 2
    single = child.run("dmd", tmp_path / "single", STEPS, batch_size=BATCH, grad_accum=2, ckpt_every_steps=None)
    for name, model in single.models.items():
        for k, v in model.state_dict().items():
            assert torch.equal(ranks[0][f"{name}.{k}"], ranks[1][f"{name}.{k}"])
            assert torch.allclose(ranks[0][f"{name}.{k}"], v, rtol=1e-5, atol=1e-6), \
                (f"{name}.{k}", float((ranks[0][f"{name}.{k}"] - v).abs().max()))
