"""Data: MNIST (``mnist``), image folders (``folder``), 2-D toys (``toys``) and exact-denoiser distributions.

Submodules are imported explicitly, e.g. ``from fewstep.data.mnist import load_mnist``.
"""
