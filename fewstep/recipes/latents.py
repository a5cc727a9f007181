"""Your own captioned images as the training inputs of a pipeline teacher's guided / progressive distillation:
``fewstep distill guided|progressive --teacher T --data DIR [--captions FILE]``.

The captions are the prompts (each distinct caption one class of the teacher's prompt bank); each image is
encoded once by the pipeline's VAE (the posterior mean, scaled as the pipeline's own latents)
and cached in ``OUT/data-latents.safetensors``, keyed by the VAE's weights and the files' names, sizes and
modification times (rebuilt when stale or corrupt, as DMD's regression set is). Images must already have
the pipeline's pixel size (the UNet's sample size times the VAE's downsampling): a silent resize would
train on other images than the user's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..data.folder import captioned_files, image_size_of, load_image
from ..distill.pairs import cached_tensors, weights_hash
from .teachers import scale_latents

__all__ = ["caption_prompts", "pixel_geometry", "check_image_sizes", "encoded_data", "test_bed_data"]

LATENT_CACHE = "data-latents.safetensors"


def caption_prompts(root, captions=None) -> tuple[list[Path], list[str], torch.Tensor]:
    """(image paths, the distinct captions in order of first use = the prompts, each image's prompt id)."""
    paths, texts = captioned_files(root, captions)
    prompts = list(dict.fromkeys(texts))
    ids = {p: i for i, p in enumerate(prompts)}
    return paths, prompts, torch.tensor([ids[t] for t in texts])


def pixel_geometry(pipe) -> tuple[int, int]:
    """(image channels, image side) a pipeline's denoiser works at: its VAE's input, or the denoiser's own."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    size = module.config.sample_size
    side = size if isinstance(size, int) else size[0]
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return module.config.in_channels, side
    return vae.config.in_channels, side * 2 ** (len(vae.config.block_out_channels) - 1)


def check_image_sizes(paths: list[Path], side: int, root) -> None:
    """Refuse images that are not side x side (one line, naming the first and the size wanted)."""
    for p in dict.fromkeys(paths):
        w, h = image_size_of(p)
        if (w, h) != (side, side):
            raise ValueError(f"{Path(p).relative_to(root)} in {root} is {w}x{h}, but the teacher works at {side}x{side} "
                             f"pixels (its VAE and UNet): resize the images to {side}x{side} first")


def _files_key(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def _encode(pipe, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Pixel images in [-1, 1] as the pipeline's scaled latents (the posterior mean); pixel pipelines: as is."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return images
    dtype = next(vae.parameters()).dtype
    out = [scale_latents(vae.encode(x.to(vae.device, dtype)).latent_dist.mean.float().cpu(), vae.config,
                         type(pipe).__name__) for x in images.split(batch)]
    return torch.cat(out)


def _cached_latents(teacher, out, source: dict, labels: torch.Tensor, images, what: str):
    """(latents, labels) of ``images()`` (pixels in [-1, 1]) encoded by the teacher's VAE, cached in
    ``out/data-latents.safetensors`` under the VAE's weights, ``source`` (what identifies the images) and the side."""
    vae = teacher.vae
    settings = {"vae": weights_hash(vae) if vae is not None else "none", **source,
                "side": pixel_geometry(teacher.pipe)[1]}
    got = cached_tensors(Path(out) / LATENT_CACHE, settings, ("labels", "latents"), len(labels),
                         lambda: {"latents": _encode(teacher.pipe, images()).contiguous(),
                                  "labels": labels.contiguous()}, what)
    return got["latents"], got["labels"]


def encoded_data(teacher, paths: list[Path], labels: torch.Tensor, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt ids) of the images ``paths`` for a :class:`fewstep.recipes.teachers.PipelineTeacher`:
    encoded once by its VAE and cached in ``out/data-latents.safetensors`` (see the module docstring)."""
    mode = "L" if pixel_geometry(teacher.pipe)[0] == 1 else "RGB"
    return _cached_latents(teacher, out, {"files": _files_key(paths),
                                          "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]},
                           labels, lambda: torch.stack([load_image(p, None, mode) for p in paths]),
                           f"the training latents ({len(paths)} images encoded by the teacher's VAE)")


def test_bed_data(teacher, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt ids) of the test bed's own training images for a teacher over its captions grammar
    (``mnist-sd`` / ``mnist-sd3``): the MNIST train split at 32x32 with its measured captions, the images whose
    caption is one of the teacher's prompts, encoded once by its VAE and cached like :func:`encoded_data`."""
    from .textbed import mnist_captioned
    channels, side = pixel_geometry(teacher.pipe)
    if (channels, side) != (1, 32) or not teacher.prompts:
        raise ValueError(f"the test bed's images are 1x32x32 MNIST digits named by prompts, but this teacher works at "
                         f"{channels}x{side}x{side}: pass --data DIR (your captioned images)")
    ids = {p: i for i, p in enumerate(teacher.prompts)}
    images, captions = mnist_captioned()
    keep = torch.tensor([c in ids for c in captions])
    if not keep.any():
        raise ValueError("none of the teacher's prompts is a test-bed caption: pass --data DIR (your captioned images)")
    labels = torch.tensor([ids[c] for c, k in zip(captions, keep.tolist()) if k])
    source = {"files": "mnist-train-captioned",
              "prompts": hashlib.sha256("\n".join(teacher.prompts).encode()).hexdigest()[:16]}
    return _cached_latents(teacher, out, source, labels, lambda: images[keep],
                           f"the test bed's training latents ({len(labels)} captioned MNIST train digits encoded by "
                           "the teacher's VAE)")
