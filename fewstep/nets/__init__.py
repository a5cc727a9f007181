"""Small networks: a UNet for images, an MLP for 2-D data, a CNN classifier.

Each saves as ``model.safetensors`` + ``config.json`` (``net.save(folder, extra=...)``);
:func:`load_net` rebuilds any of them from a folder and :func:`read_config` returns the JSON.
"""
from ._io import read_config
from .classifier import ClassifierConfig, CNNClassifier
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

ARCHS = {UNet.arch: UNet, MLP.arch: MLP, CNNClassifier.arch: CNNClassifier}

__all__ = ["UNet", "UNetConfig", "MLP", "MLPConfig", "CNNClassifier", "ClassifierConfig", "load_net",
           "read_config", "ARCHS"]


def load_net(folder):
    """Rebuild the network saved in ``folder`` (any arch in ARCHS) with its weights."""
    arch = read_config(folder)["arch"]
    if arch not in ARCHS:
        raise ValueError(f"{folder}/config.json names unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch].load(folder)
