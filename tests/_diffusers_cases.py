"""Misuses of the diffusers adapters for the bad-input catalogue (tests/test_bad_input.py's CASES)."""
import types

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from fewstep.diffusers import DiffusersDenoiser, DiffusersNet, pipeline_denoiser
from fewstep.schedules import DiscreteVP
from _tiny_models import tiny_unet


def pipeline_without_scheduler():
    return pipeline_denoiser(types.SimpleNamespace(unet=tiny_unet(), scheduler=None))


def class_label_out_of_range():
    """A 10-class UNet (classes 0..9) asked for class 10."""
    den = DiffusersDenoiser(tiny_unet(num_class_embeds=10), DDPMScheduler().config)
    return den(torch.randn(2, 3, 8, 8), 0.5, class_labels=torch.tensor([3, 10]))


def label_context_of_the_wrong_width():
    """A UNet with 12-wide cross-attention given a bank of 10-wide contexts."""
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=4)
    return DiffusersNet(unet, DiscreteVP.from_name("linear", 1000), label_context=torch.randn(4, 3, 10))
