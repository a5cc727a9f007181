"""Tiny random diffusers models built from configs (offline), shared by the diffusers tests."""
import torch
from diffusers import UNet2DModel


def tiny_unet(**overrides) -> UNet2DModel:
    """A 3-channel 8x8 UNet2DModel with fixed random weights (seed 0)."""
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
               norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DModel(**{**cfg, **overrides}).eval()
