"""Toy trainers under FSDP sharding, run by ``torchrun --nproc_per_node 2`` (or ``accelerate launch``) with
CPU processes over gloo; every process writes the full weights it ends with for the parent test.

    torchrun --nproc_per_node 2 tests/_fsdp_child.py OUT_DIR STEPS KIND[,KIND...] [OPTION]

The main process stores the EMA that the preview function gets every CKPT_EVERY steps
(``KIND/preview-<step>.safetensors``). OPTION: ``die-at=S`` (every process kills itself with SIGKILL
after step S), ``die-in-save=S`` (every process kills itself in the middle of writing the checkpoint of
step S, after its first shard file), ``launcher`` (sharding=None: follow accelerate's FSDP variables
instead of passing sharding="fsdp").
KIND: a kind of tests/_train_child.py; "dmd2" (a 4-step DMD2 generator: backward simulation draws a
random rollout depth per slice, so the processes call the generator a different number of times); "gan"
/ "gan-undeclared" (DMD2's GAN head on a tiny UNet, its ``logits`` method declared to FSDP or not).
"""
import copy
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import _train_child as child  # noqa: E402

from fewstep.distill.dmd import DMDLoss, FakeScore  # noqa: E402
from fewstep.distill.pairs import DMDData  # noqa: E402
from fewstep.nets import MLP  # noqa: E402

BATCH, CKPT_EVERY = 8, 10


def build_dmd2():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, num_classes=2)
    pairs = {"z": torch.randn(64, 2), "labels": torch.randint(0, 2, (64,)), "x_ref": torch.randn(64, 2)}
    loss = DMDLoss(child.ExactTeacher(), child.SCHEDULE, "v", gen_steps=4, lambda_reg=0.0, fake_updates=2)
    return loss, {"generator": net, "fake": FakeScore(copy.deepcopy(net))}, DMDData(pairs), \
        {"lr": {"generator": 1e-4, "fake": 1e-3}}


class DeclaredFakeScore(FakeScore):
    """DMD2's fake score whose GAN head (``logits``, called without ``forward``) is declared to FSDP."""
    fsdp_forward_methods = ("logits",)


class UndeclaredFakeScore(FakeScore):
    fsdp_forward_methods = ()


def build_gan(fake_class):
    """DMD2 with the GAN head on a tiny fewstep UNet (one-step generator)."""
    from torch import nn

    from fewstep.nets import UNet
    torch.manual_seed(0)
    teacher = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), image_size=8, num_classes=3)
    for p in teacher.parameters():  # zero-initialised output layers would hide gradients
        nn.init.normal_(p, std=0.05)
    loss = DMDLoss(teacher, child.SCHEDULE, "v", gan_weight_g=0.1, gan_weight_d=0.1, lambda_reg=0.0, null_class=3,
                   fake_updates=2)
    models = {"generator": copy.deepcopy(teacher), "fake": fake_class(copy.deepcopy(teacher), gan_head=True)}
    pairs = {"z": torch.randn(32, 1, 8, 8), "labels": torch.randint(0, 3, (32,)), "x_ref": torch.randn(32, 1, 8, 8)}
    real = (torch.randn(32, 1, 8, 8).clamp(-1, 1), torch.randint(0, 3, (32,)))
    return loss, models, DMDData(pairs, real=real), {"lr": {"generator": 1e-3, "fake": 1e-3}, "batch_size": 4}


BUILDERS = {"dmd2": build_dmd2, "gan": lambda: build_gan(DeclaredFakeScore),
            "gan-undeclared": lambda: build_gan(UndeclaredFakeScore)}


def run(kind: str, out_dir, steps: int, **kw):
    """A toy run of ``kind`` with the settings of tests/_train_child.py (batch BATCH, a checkpoint every
    CKPT_EVERY steps); keyword arguments override them."""
    if kind not in BUILDERS:
        return child.run(kind, out_dir, steps, **{"batch_size": BATCH, "ckpt_every_steps": CKPT_EVERY, **kw})
    objective, model, data, extra = BUILDERS[kind]()
    opts = dict(batch_size=BATCH, lr=1e-3, warmup=5, ema_decay=0.9, ckpt_every_minutes=None,
                ckpt_every_steps=CKPT_EVERY, progress=False, log_every=5, seed=3)
    opts.update(extra)
    opts.update(kw)
    return child.train(objective, model, data, steps=steps, out_dir=out_dir, **opts)


def full_weights(result) -> dict:
    """``model.<net>.<key>`` and ``ema.<net>.<key>`` of a TrainResult's (full) networks."""
    out = {}
    for which, nets in (("model", result.models), ("ema", result.emas)):
        for name, net in nets.items():
            out.update({f"{which}.{name}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    return out


def _die_at(step_to_die: int):
    def on_step(step, loss):
        if step == step_to_die:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


def _die_in_save(step: int) -> None:
    """Kill this process right after it wrote its first shard file of checkpoint ``step``."""
    import safetensors.torch as st
    real = st.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if f"ckpt-{step:08d}.tmp" in path and ".shard-" in path:
            os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = save_file


def _previews(out_dir: Path):
    """A sample_fn that stores the EMA it is given (the parent checks it is the full, unsharded EMA)."""
    def sample_fn(ema, step):
        save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()},
                  str(out_dir / f"preview-{step}.safetensors"))
        return torch.zeros(1, 1, 2, 2)
    return sample_fn


def main(argv) -> None:
    torch.set_num_threads(1)
    out, steps, kinds = Path(argv[0]), int(argv[1]), argv[2].split(",")
    option = argv[3] if len(argv) > 3 else ""
    kw = {"sample_every_steps": CKPT_EVERY, "sample_every_minutes": None}
    if option != "launcher":
        kw["sharding"] = "fsdp"
    if option.startswith("die-at="):
        kw["on_step"] = _die_at(int(option.split("=")[1]))
    if option.startswith("die-in-save="):
        _die_in_save(int(option.split("=")[1]))
    for kind in kinds:
        result = run(kind, out / kind, steps, sample_fn=_previews(out / kind), **kw)
        rank = torch.distributed.get_rank()
        weights = full_weights(result)
        weights["world_size"] = torch.tensor(torch.distributed.get_world_size())
        save_file(weights, str(out / f"{kind}-rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
