"""Writing images: PNG grids and single PNGs from tensors in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["save_image_grid", "save_captioned_rows", "save_images", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_image_grid(images: torch.Tensor, path, nrow: int | None = None, pad: int = 2) -> Path:
    """Save (N, C, H, W) images in [-1, 1] (C = 1 or 3) as one PNG grid with ``nrow`` images per row."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)
    return path


def save_captioned_rows(captions: list[str], images: list[torch.Tensor], path, titles: list[str] | None = None) -> Path:
    """One row of images (N, 1 or 3, H, W) in [-1, 1] per caption (written left of the row), ``titles`` above
    the columns; a PNG (matplotlib)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = images[0].shape[0]
    top = 0.4 if titles else 0.0
    fig, axes = plt.subplots(len(images), cols, figsize=(0.62 * cols + 3.4, 0.72 * len(images) + 0.3 + top),
                             squeeze=False)
    for r, (caption, imgs) in enumerate(zip(captions, images)):
        for c in range(cols):
            ax = axes[r][c]
            img = ((imgs[c].detach().float().cpu() + 1) / 2).clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(caption, rotation=0, ha="right", va="center", fontsize=7)
    for c, title in enumerate(titles or []):
        axes[0][c].set_title(textwrap.fill(title, 14), fontsize=5.5)
    fig.subplots_adjust(left=0.3, right=0.99, top=0.99 - top / fig.get_size_inches()[1], bottom=0.01, wspace=0.04,
                        hspace=0.06)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_images(images: torch.Tensor, folder, prefix: str = "img") -> list[Path]:
    """Save each image of (N, C, H, W) in [-1, 1] as ``folder/<prefix>-<i>.png``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images).numpy()):
        p = folder / f"{prefix}-{i:05d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(p)
        paths.append(p)
    return paths
