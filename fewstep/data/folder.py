"""Images from a folder (PNG / JPEG), optionally one sub-folder per class.

Layouts:
  root/*.png                      unlabelled
  root/<class_name>/*.png         labelled; classes are the sorted sub-folder names

With ``size`` set, each image is resized (shorter side -> size, bicubic) and
centre-cropped to size x size; with ``size=None`` all images must already share
one size. Items are float32 tensors (C, H, W) in [-1, 1] (C = 3 for ``mode="RGB"``,
1 for ``mode="L"``), paired with an int label when the folder has classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".png", ".jpg", ".jpeg")
MODES = {"RGB": 3, "L": 1}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def find_images(root) -> tuple[list[Path], list[int] | None, list[str]]:
    """(paths, labels or None, class names) for a flat or class-sub-folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    loose = _images_in(root)
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _images_in(d)]
    if loose and class_dirs:
        raise ValueError(f"{root} mixes loose images ({loose[0].name}, ...) with class sub-folders "
                         f"({class_dirs[0].name}, ...); use one layout")
    if class_dirs:
        paths, labels = [], []
        for i, d in enumerate(class_dirs):
            files = _images_in(d)
            paths += files
            labels += [i] * len(files)
        return paths, labels, [d.name for d in class_dirs]
    if not loose:
        raise ValueError(f"no images ({', '.join(EXTENSIONS)}) found in {root} or its sub-folders")
    return loose, None, []


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; ValueError naming the file if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def resize_center_crop(im, size: int):
    """Resize the shorter side to ``size`` (bicubic), then crop the centre size x size."""
    from PIL import Image
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_image(path, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """One image as float32 (C, H, W) in [-1, 1]; ValueError naming the file if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None:
                im = resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    x = torch.from_numpy(arr.copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    """Map-style dataset over an image folder; see the module docstring.

    Every file's header is checked when the dataset is built, so unreadable files
    and (with ``size=None``) mixed sizes are reported at once, naming the files.
    """

    def __init__(self, root, size: int | None = None, mode: str = "RGB"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        self.root, self.size, self.mode = Path(root), size, mode
        self.paths, self.labels, self.classes = find_images(root)
        sizes = [image_size_of(p) for p in self.paths]
        if size is None and len(set(sizes)) > 1:
            other = next(i for i, s in enumerate(sizes) if s != sizes[0])
            raise ValueError(f"images differ in size and no resize was asked for: {self.paths[0].name} is "
                             f"{sizes[0][0]}x{sizes[0][1]}, {self.paths[other].name} is "
                             f"{sizes[other][0]}x{sizes[other][1]}; pass size=... to resize and crop")
        w, h = sizes[0] if size is None else (size, size)
        self.shape = (MODES[mode], h, w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = load_image(self.paths[i], self.size, self.mode)
        return x if self.labels is None else (x, self.labels[i])

    def load_all(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every image stacked (N, C, H, W) (and labels (N,) int64 when the folder has classes)."""
        x = torch.stack([load_image(p, self.size, self.mode) for p in self.paths])
        return x if self.labels is None else (x, torch.tensor(self.labels, dtype=torch.int64))
