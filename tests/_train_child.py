"""Toy training runs of every fewstep trainer, shared by the kill -9 resume tests.

Run as a script it trains one of them in this process and can be made to hang in the middle
of a checkpoint write so the parent test can ``kill -9`` it there:

    python tests/_train_child.py KIND OUT_DIR STEPS [HANG_AT_CHECKPOINT]
"""
import copy
import sys
from pathlib import Path

import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.data.toys import ring8, toy_sampler
from fewstep.distill import GuidedDistillLoss, ProgressiveLoss, with_w_input
from fewstep.distill.dmd import DMDLoss, FakeScore
from fewstep.distill.pairs import DMDData
from fewstep.losses import DenoisingLoss
from fewstep.nets import MLP
from fewstep.schedules import CosineVP
from fewstep.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _exact import ExactNet  # noqa: E402

SCHEDULE = CosineVP()
SPEC = ring8(labelling="coarse")
KINDS = ("teacher", "guided", "progressive", "dmd", "pipeline-dmd")
CKPT_EVERY = 10


def ExactTeacher():  # noqa: N802 - the toy's exact class-conditional denoiser; class 2 = null
    return ExactNet(GaussianMixture(**SPEC), SCHEDULE, null_class=2)


def build(kind: str):
    """(objective, model or {name: model}, data, extra train kwargs) of a toy run; seeded."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, num_classes=2)
    if kind == "teacher":
        return DenoisingLoss(SCHEDULE, "v"), net, toy_sampler(SPEC), {}
    if kind == "guided":
        return GuidedDistillLoss(ExactTeacher(), SCHEDULE, "x0", "v", null_class=2), with_w_input(net), toy_sampler(SPEC), {}
    if kind == "progressive":
        teacher = with_w_input(copy.deepcopy(net))
        return ProgressiveLoss(teacher, SCHEDULE, 4, "v"), with_w_input(net), toy_sampler(SPEC), {}
    if kind == "dmd":
        pairs = {"z": torch.randn(64, 2), "labels": torch.randint(0, 2, (64,)), "x_ref": torch.randn(64, 2)}
        models = {"generator": net, "fake": FakeScore(copy.deepcopy(net))}
        return DMDLoss(ExactTeacher(), SCHEDULE, "v", fake_updates=2), models, DMDData(pairs), \
            {"lr": {"generator": 1e-4, "fake": 1e-3}}
    if kind == "pipeline-dmd":  # DMD of a diffusers UNet2DConditionModel with a prompt-embedding bank, on latents
        teacher = _tiny_text_unet()
        pairs = {"z": torch.randn(64, 4, 8, 8), "labels": torch.randint(0, 3, (64,)), "x_ref": torch.randn(64, 4, 8, 8)}
        models = {"generator": copy.deepcopy(teacher).requires_grad_(True),
                  "fake": FakeScore(copy.deepcopy(teacher).requires_grad_(True))}
        return DMDLoss(teacher, teacher.schedule, teacher.prediction, real_w=1.0, null_class=3), models, \
            DMDData(pairs), {"lr": {"generator": 1e-4, "fake": 1e-3}, "batch_size": 8}
    raise ValueError(kind)


def _tiny_text_unet():
    """A tiny SD-style UNet as fewstep.diffusers.DiffusersNet: SD's scaled_linear VP config, eps, a bank of
    three prompt contexts plus the empty one (row 3) standing for a pipeline teacher's prompt embeddings."""
    from diffusers import UNet2DConditionModel

    from fewstep.diffusers import DiffusersNet
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    return DiffusersNet(unet, config, torch.randn(4, 5, 8), null_class=3)


def run(kind: str, out_dir, steps: int, **kw):
    objective, model, data, extra = build(kind)
    opts = dict(batch_size=64, lr=1e-3, warmup=5, ema_decay=0.9, ckpt_every_minutes=None,
                ckpt_every_steps=CKPT_EVERY, progress=False, log_every=5, seed=3)
    opts.update(extra)
    opts.update(kw)
    return train(objective, model, data, steps=steps, out_dir=out_dir, **opts)


def _hang_in_checkpoint(number: int) -> None:
    """Make the ``number``-th checkpoint write hang after its first file (the parent kills us there)."""
    import time

    import safetensors.torch as st
    real, calls = st.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if path.endswith("rng.safetensors"):
            calls["n"] += 1
        if calls["n"] == number - 1 and "ckpt-" in path and path.endswith("optimizer.safetensors"):
            print("SAVING", path, flush=True)
            time.sleep(600)
    st.save_file = save_file


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        _hang_in_checkpoint(int(sys.argv[4]))
    run(kind, out, steps, on_step=lambda step, loss: print("STEP", step, flush=True))
