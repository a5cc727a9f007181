"""Recipes of the MNIST text-to-image test bed: ``mnist-vae``, ``mnist-sd`` and ``mnist-sd3``.

Each trains stock diffusers / transformers components (:mod:`fewstep.nets.textbed`) in the one
training loop (``fewstep.train.train``: checkpoints, exact resume, EMA) and exports them with
``save_pretrained``, so plain diffusers loads the result offline. Run folder ``out`` holds:

* ``mnist-vae-train/`` and the export ``mnist-vae/``: an ``AutoencoderKL`` (32x32x1 -> 4x8x8) trained
  on reconstruction (L1, as SD's autoencoder's pixel term) plus a small KL (weight on summed terms, as
  SD's ``kl_weight``). After training, ``scaling_factor`` = 1 / std and ``shift_factor`` = mean of the
  latents z ~ q(z | x) over the training images are measured and written into its config, as the SD
  (1 / std) and SD3 / Flux (shift) recipes do; both come from the posterior means and variances by
  the law of total variance (Var z = Var_x mu(x) + E_x sigma(x)^2), exact rather than one noisy draw.
  ``fewstep.json`` beside it records the training steps and the latent statistics.
* ``mnist-sd-train/`` and ``mnist-sd/``: a ``StableDiffusionPipeline`` folder: the VAE (stage reused
  from ``mnist-vae/`` when finished), a frozen ``CLIPTextModel``, the grammar's ``CLIPTokenizer``, a
  ``UNet2DConditionModel`` trained with SD's ``scaled_linear`` betas (eps- or v-prediction) and a
  ``PNDMScheduler`` configured as Stable Diffusion ships it (50 steps by default in the pipeline call).
* ``mnist-sd3-train/`` and ``mnist-sd3/``: a ``StableDiffusion3Pipeline`` folder: the VAE (with its
  ``shift_factor``), two frozen ``CLIPTextModelWithProjection`` (different seeds), the tokenizer twice,
  no T5 (load with ``text_encoder_3=None, tokenizer_3=None``), an ``SD3Transformer2DModel`` trained by
  rectified flow (x_t = (1 - s) z + s eps, target eps - z) with SD3's logit-normal times shifted by the
  ``FlowMatchEulerDiscreteScheduler`` shift that the pipeline samples with.

The text encoders keep fixed-seed random weights and stay frozen. The prompts form a closed set (91
captions of :mod:`fewstep.data.captions` and the empty prompt): any injective map from caption to
embeddings serves, and the denoiser's cross-attention learns what the words mean, as with SD's frozen
CLIP. A random causal transformer is injective on its inputs in practice, which
:func:`prompt_separation` measures (the smallest distance between two prompts' embeddings, relative to
their typical distance); joint pre-training would add a stage and a way to fail (collapsed embeddings)
for no gain on a closed vocabulary.

The conditioning of every distinct caption is computed once, by the pipeline's own ``encode_prompt``
(so training sees exactly what the stock pipeline call gives the denoiser), and so are the posterior
means and standard deviations of the training images; each step draws z from them. Caption dropout
(``caption_dropout``, 10%) replaces a caption by the empty prompt for classifier-free guidance.
SD3 trains on the 16 CLIP tokens plus one of the pipeline's 256 zero "T5" rows, counted 256 times in
attention (:class:`fewstep.nets.textbed.RepeatedTokenJointAttnProcessor`): the same function as the
full sequence, several times faster.

Data: ``data() -> (images (N, 1, 32, 32) in [-1, 1], captions: list of N strings)``; by default the
MNIST train split padded to 32x32 and captioned by :func:`fewstep.data.captions.caption_images`.
Your own images and captions: ``data=folder_data(DIR, CAPTIONS)`` (``fewstep train ... --data DIR
--captions FILE``): a Hugging Face imagefolder (``DIR/metadata.jsonl`` lines ``{"file_name", "text"}``)
or a CSV with columns file_name,text, images made grayscale 32x32 (:mod:`fewstep.data.folder`). When the
captions use words outside the digit grammar, the pipeline's tokenizer is built from the grammar's words
plus theirs (:func:`fewstep.data.text.tokenizer_for_captions`, written to ``out/<name>-tokenizer`` and saved
in the export), so every caption word is one token; ``fewstep.json`` records the captions' words
(``caption_words``), and ``fewstep.generate`` refuses prompts with other words for that pipeline.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.captions import caption_images, load_mnist32
from ..data.folder import load_captioned_folder
from ..data.text import caption_words, load_tokenizer, tokenizer_for_captions
from ..distributed import on_main
from ..nets.textbed import (SD3_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, RepeatedTokenJointAttnProcessor,
                            build_sd3_transformer, build_text_encoder, build_unet, build_vae, param_count)
from ..train import train
from ._stage import LoopSettings, stage_seconds

INFO = "fewstep.json"


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

@dataclass
class VAESettings(LoopSettings):
    """Settings of ``mnist-vae`` (also the VAE stage of ``mnist-sd`` / ``mnist-sd3``).

    Measured on the 2-core CPU, 2 threads, while other jobs ran (load ~4.4): 1.95 s per step at batch 64
    (0.68M parameters); about half that on an idle machine, so 3,000 steps (38 epochs) take ~50 minutes.
    """
    vae: dict = field(default_factory=lambda: dict(VAE_CONFIG))
    kl_weight: float = 1e-6  # on the KL summed over latents, against the L1 error summed over pixels (SD's)
    lr: float = 1e-3
    warmup: int = 200
    steps: int = 3000


@dataclass
class SDSettings(LoopSettings):
    """Settings of ``mnist-sd``: VP diffusion with SD's scaled_linear betas on the VAE's latents.

    Measured as for :class:`VAESettings` (load ~4.4): 1.94 s per UNet step at batch 64 (2.38M
    parameters); ~1 s idle, so 5,000 steps take ~80 minutes (the VAE stage not counted)."""
    vae: VAESettings = field(default_factory=VAESettings)
    text: dict = field(default_factory=lambda: dict(TEXT_CONFIG))
    text_seed: int = 1
    unet: dict = field(default_factory=lambda: dict(UNET_CONFIG))
    prediction: str = "epsilon"  # diffusers' prediction_type: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    caption_dropout: float = 0.1
    lr: float = 3e-4
    warmup: int = 300
    steps: int = 5000


@dataclass
class SD3Settings(LoopSettings):
    """Settings of ``mnist-sd3``: rectified flow on the VAE's (shifted, scaled) latents.

    Measured as for :class:`VAESettings` (load ~4.4): 1.21 s per transformer step at batch 64 (2.30M
    parameters) with the one-row stand-in for the 256 zero T5 rows, 6.85 s with the full sequence;
    ~0.6 s idle, so 6,000 steps take ~60 minutes (the VAE stage not counted)."""
    vae: VAESettings = field(default_factory=VAESettings)
    text: dict = field(default_factory=lambda: dict(TEXT_CONFIG))
    text_seeds: tuple = (1, 2)
    transformer: dict = field(default_factory=lambda: dict(SD3_CONFIG))
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler's shift, as SD3 ships it
    time_sampling: str = "logit_normal"  # SD3's default; or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t5_tokens: int = 256  # the zero rows the pipeline appends without T5 (its max_sequence_length default)
    caption_dropout: float = 0.1
    lr: float = 3e-4
    warmup: int = 300
    steps: int = 6000


MNIST_VAE = VAESettings()
MNIST_SD = SDSettings()
MNIST_SD3 = SD3Settings()


def _check_settings(s) -> None:
    for key in ("steps", "batch_size"):
        if not isinstance(getattr(s, key), int) or getattr(s, key) < 1:
            raise ValueError(f"{key} must be a positive integer, got {getattr(s, key)!r}")
    if hasattr(s, "caption_dropout") and not 0 <= s.caption_dropout < 1:
        raise ValueError(f"caption_dropout must lie in [0, 1), got {s.caption_dropout!r}")
    if getattr(s, "prediction", "epsilon") not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {s.prediction!r}")
    if getattr(s, "time_sampling", "uniform") not in ("uniform", "logit_normal"):
        raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {s.time_sampling!r}")
    if getattr(s, "shift", 1.0) <= 0:
        raise ValueError(f"shift must be positive, got {s.shift!r}")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def mnist_captioned() -> tuple[torch.Tensor, list[str]]:
    """The MNIST train split padded to 32x32 and its measured captions (the default ``data``)."""
    x, y = load_mnist32("train")
    return x, caption_images(x, y)


def folder_data(root, captions=None, *, need_captions: bool = True) -> Callable:
    """A ``data`` provider of your own image folder and caption file (``DIR/metadata.jsonl`` by default; see
    :func:`fewstep.data.folder.load_captioned_folder`): grayscale 32x32 images in [-1, 1] and their captions
    (``need_captions=False``, for ``mnist-vae``: every image under ``root``, no captions). It reads the
    folder when called, once."""
    loaded = []

    def data():
        if not loaded:
            loaded.append(load_captioned_folder(root, captions, size=32, mode="L", need_captions=need_captions))
        return loaded[0]
    return data


def _tokenizer(captions: list[str], own_data: bool, folder: Path):
    """The grammar's tokenizer for the MNIST captions; for your own captions one under which each of their
    words is one token (the grammar's when they only use its words)."""
    return tokenizer_for_captions(captions, folder) if own_data else load_tokenizer()


def _caption_record(captions: list[str], own_data: bool, tokenizer) -> dict:
    """What fewstep.json records of your own captions: their words (generate checks prompts against them)."""
    return {"caption_words": sorted(caption_words(captions, tokenizer))} if own_data else {}


def _images_and_captions(data, need_captions: bool):
    got = mnist_captioned() if data is None else data()
    images, captions = (got if isinstance(got, (tuple, list)) else (got, None))
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1:] != (1, 32, 32):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"the test bed trains on (N, 1, 32, 32) images in [-1, 1], got {shape}")
    if need_captions and (captions is None or len(captions) != len(images)
                          or not all(isinstance(c, str) for c in captions)):
        raise ValueError(f"need one caption string per image ({len(images)} images), got "
                         f"{'none' if captions is None else len(captions)}")
    return images.float(), (list(captions) if captions is not None else None)


def _finished(export: Path, steps: int) -> bool:
    try:
        return json.loads((export / INFO).read_text()).get("train_steps") == steps
    except (OSError, ValueError):
        return False


def _write_info(export: Path, info: dict) -> None:
    (export / INFO).write_text(json.dumps(info, indent=1) + "\n")


def _loop(objective, net, data, s, run_dir: Path, resume, progress, sample_fn, info):
    t0 = time.time()
    result = train(objective, net, data, steps=s.steps, out_dir=run_dir, lr=s.lr, batch_size=s.batch_size,
                   warmup=s.warmup, grad_clip=s.grad_clip, ema_decay=s.ema_decay, weight_decay=s.weight_decay,
                   ckpt_every_minutes=s.ckpt_every_minutes, sample_fn=sample_fn,
                   sample_every_minutes=s.sample_every_minutes, resume=resume, seed=s.seed, progress=progress,
                   run_info={**info, "preset": asdict(s)})
    return result, stage_seconds(run_dir, t0)


# ---------------------------------------------------------------------------
# mnist-vae
# ---------------------------------------------------------------------------

class VAELoss:
    """Per-sample L1 reconstruction error summed over pixels plus ``kl_weight`` x KL(q(z|x) || N(0, I))
    summed over latents (SD's autoencoder loss without its perceptual and GAN terms), divided by the
    number of pixels so the loss is a per-pixel mean."""

    def __init__(self, kl_weight: float):
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        self.kl_weight = kl_weight

    def __call__(self, vae, x: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().flatten(1).sum(1)
        return (l1 + self.kl_weight * posterior.kl()) / x[0].numel()


@torch.no_grad()
def posterior_moments(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, standard deviations) of q(z | x) for every image, each (N, C, h, w)."""
    vae = vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(d.mean.float().cpu())
        stds.append(d.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def latent_stats(means: torch.Tensor, stds: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of z ~ q(z | x) pooled over images and latent entries: Var z = Var mu + E sigma^2."""
    mu = means.double()
    m = mu.mean()
    var = (mu - m).square().mean() + stds.double().square().mean()
    return float(m), float(var.sqrt())


def run_vae(out, settings: VAESettings = MNIST_VAE, *, name: str = "mnist-vae", data: Callable | None = None,
            resume: bool = False, progress: bool = True, images: torch.Tensor | None = None) -> Path:
    """Train the autoencoder in ``out/<name>-train`` and export its EMA to ``out/<name>`` (diffusers
    ``AutoencoderKL`` folder, measured ``scaling_factor`` and ``shift_factor``); returns that folder.
    An export already holding ``settings.steps`` steps is returned as is."""
    from diffusers import AutoencoderKL

    out, export = Path(out), Path(out) / name
    _check_settings(settings)
    if _finished(export, settings.steps):
        print(f"{name}: already trained ({settings.steps} steps), reusing {export}")
        return export
    if images is None:
        images = _images_and_captions(data, need_captions=False)[0]
    vae = build_vae(settings.vae, seed=settings.seed)
    result, secs = _loop(VAELoss(settings.kl_weight), vae, images, settings, out / f"{name}-train", resume,
                         progress, _vae_preview(images[:32]), {"recipe": name, "params": param_count(vae)})
    ema = result.ema.eval()
    mean, std = latent_stats(*posterior_moments(ema, images))
    ema.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)

    def save():
        ema.save_pretrained(export)
        with torch.no_grad():
            d = ema.encode(images[:500].to(next(ema.parameters()).device)).latent_dist
            l1 = (ema.decode(d.mode()).sample.clamp(-1, 1).cpu() - images[:500]).abs().mean()
        _write_info(export, {"recipe": name, "train_steps": result.step, "seconds": secs,
                             "params": param_count(ema), "latent_mean": mean, "latent_std": std,
                             "recon_l1_first_500": float(l1), "kl_weight": settings.kl_weight})
    on_main(save)
    AutoencoderKL.from_pretrained(export)  # refuse to report success for a folder diffusers cannot read
    print(f"{name}: {result.step} steps, {secs / 60:.1f} min, scaling_factor {1 / std:.4f}, "
          f"shift_factor {mean:.4f} -> {export}")
    return export


def _vae_preview(x: torch.Tensor):
    def preview(vae, step):
        with torch.no_grad():
            d = vae.encode(x.to(next(vae.parameters()).device)).latent_dist
            return torch.cat([x, vae.decode(d.mode()).sample.clamp(-1, 1).cpu()]), 8
    return preview


# ---------------------------------------------------------------------------
# Conditioning and latents, cached once
# ---------------------------------------------------------------------------

def caption_table(captions: list[str]) -> tuple[list[str], torch.Tensor, int]:
    """(the distinct captions with "" last if absent, each caption's index (N,), the index of "")."""
    distinct = sorted(set(captions))
    if "" not in distinct:
        distinct.append("")
    where = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([where[c] for c in captions], dtype=torch.int64), where[""]


def prompt_separation(embeddings: torch.Tensor) -> float:
    """Smallest distance between two prompts' (flattened) embeddings over their median distance: 0 when two
    prompts collide, near 1 when all are equally far apart."""
    flat = embeddings.flatten(1).double()
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    off = d[~torch.eye(len(flat), dtype=torch.bool)]
    return float(off.min() / off.median())


class _Latents:
    """z = (mu + sigma * eps - shift) * scale, drawn per step from the cached posterior moments."""

    def __init__(self, scale: float, shift: float):
        self.scale, self.shift = scale, shift

    def draw(self, mu, sigma):
        return (mu + sigma * torch.randn_like(mu) - self.shift) * self.scale


def _drop_captions(index: torch.Tensor, null: int, p: float) -> torch.Tensor:
    drop = torch.rand(index.shape, device=index.device) < p
    return torch.where(drop, torch.full_like(index, null), index)


def _latent_data(vae, images, captions):
    distinct, index, null = caption_table(captions)
    means, stds = posterior_moments(vae, images)
    return distinct, null, (means, stds, index)


# ---------------------------------------------------------------------------
# mnist-sd
# ---------------------------------------------------------------------------

class VPLatentLoss:
    """Denoising loss of a UNet2DConditionModel on latents with discrete VP times (DDPM, as SD trains):
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, t uniform in 0..N-1, target eps or
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) z; per-sample mean squared error."""

    def __init__(self, alphas_cumprod, prompt_embeds, null: int, caption_dropout: float, prediction: str, latents):
        self.abar, self.embeds, self.null = alphas_cumprod.float(), prompt_embeds, null
        self.p, self.prediction, self.latents = caption_dropout, prediction, latents

    def __call__(self, unet, batch) -> torch.Tensor:
        mu, sigma, index = batch
        z = self.latents.draw(mu, sigma)
        t = torch.randint(0, len(self.abar), (len(z),), device=z.device)
        a = self.abar.to(z.device)[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(z)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        index = _drop_captions(index, self.null, self.p)
        pred = unet(z_t, t, self.embeds[index.cpu()].to(z.device)).sample
        target = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z
        return (pred.float() - target).square().flatten(1).mean(1)


def sd_scheduler(settings: SDSettings):
    """SD's PNDM scheduler (skip_prk_steps, steps_offset 1, set_alpha_to_one False) over scaled_linear betas."""
    from diffusers import PNDMScheduler
    return PNDMScheduler(num_train_timesteps=settings.num_train_timesteps, beta_start=settings.beta_start,
                         beta_end=settings.beta_end, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False, prediction_type=settings.prediction)


def _load_vae(out: Path, settings, data_images, vae, resume, progress):
    from diffusers import AutoencoderKL
    if vae is not None:
        got = vae()
        return got if isinstance(got, torch.nn.Module) else AutoencoderKL.from_pretrained(got)
    folder = run_vae(out, settings.vae, data=None, resume=resume, progress=progress, images=data_images)
    return AutoencoderKL.from_pretrained(folder)


def run_sd(out, settings: SDSettings = MNIST_SD, *, name: str = "mnist-sd", data: Callable | None = None,
           vae: Callable | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train ``mnist-sd`` (the VAE stage first unless ``vae()`` provides an AutoencoderKL or its folder) and
    save the StableDiffusionPipeline to ``out/<name>``; returns that folder."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    _check_settings(settings)
    images, captions = _images_and_captions(data, need_captions=True)
    autoencoder = _load_vae(out, settings, images, vae, resume, progress)
    autoencoder.register_to_config(shift_factor=None)  # SD's pipeline decodes z / scaling_factor, no shift
    tokenizer = _tokenizer(captions, data is not None, out / f"{name}-tokenizer")
    text_encoder = build_text_encoder(tokenizer, settings.text, seed=settings.text_seed)
    scheduler = sd_scheduler(settings)
    unet = build_unet(settings.unet, cross_attention_dim=text_encoder.config.hidden_size, seed=settings.seed)
    pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    distinct, null, tensors = _latent_data(autoencoder, images, captions)
    with torch.no_grad():
        embeds = pipe.encode_prompt(distinct, "cpu", 1, False)[0].float()
    loss = VPLatentLoss(scheduler.alphas_cumprod, embeds, null, settings.caption_dropout, settings.prediction,
                        _Latents(autoencoder.config.scaling_factor, 0.0))
    info = {"recipe": name, "params": param_count(unet), "prompt_separation": prompt_separation(embeds),
            **_caption_record(captions, data is not None, tokenizer)}
    result, secs = _loop(loss, unet, tensors, settings, out / f"{name}-train", resume, progress,
                         _pipeline_preview(pipe, "unet"), info)
    return _save_pipeline(pipe, "unet", result, out / name, {**info, "seconds": secs,
                                                              "captions": len(distinct)})


# ---------------------------------------------------------------------------
# mnist-sd3
# ---------------------------------------------------------------------------

def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's time shift: s = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


class FlowLatentLoss:
    """Rectified-flow loss of an SD3Transformer2DModel on latents: x_s = (1 - s) z + s eps, target
    eps - z (the velocity the pipeline integrates), s = shift(u) with u logit-normal or uniform (SD3's
    training times), the model's timestep 1000 s; per-sample mean squared error."""

    def __init__(self, prompt_embeds, pooled, null, caption_dropout, latents, shift, sampling, m=0.0, s=1.0):
        self.embeds, self.pooled, self.null, self.p = prompt_embeds, pooled, null, caption_dropout
        self.latents = latents
        self.shift, self.sampling, self.m, self.s = shift, sampling, m, s

    def __call__(self, transformer, batch) -> torch.Tensor:
        mu, sigma, index = batch
        z = self.latents.draw(mu, sigma)
        n = len(z)
        u = (torch.sigmoid(self.m + self.s * torch.randn(n, device=z.device)) if self.sampling == "logit_normal"
             else torch.rand(n, device=z.device))
        s = shift_sigmas(u, self.shift).view(-1, 1, 1, 1)
        eps = torch.randn_like(z)
        index = _drop_captions(index, self.null, self.p).cpu()
        pred = transformer(hidden_states=(1 - s) * z + s * eps, timestep=1000 * s.flatten(),
                           encoder_hidden_states=self.embeds[index].to(z.device),
                           pooled_projections=self.pooled[index].to(z.device)).sample
        return (pred.float() - (eps - z)).square().flatten(1).mean(1)


def run_sd3(out, settings: SD3Settings = MNIST_SD3, *, name: str = "mnist-sd3", data: Callable | None = None,
            vae: Callable | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train ``mnist-sd3`` (the VAE stage first unless ``vae()`` provides one) and save the
    StableDiffusion3Pipeline (no T5) to ``out/<name>``; returns that folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    out = Path(out)
    _check_settings(settings)
    if len(settings.text_seeds) != 2:
        raise ValueError(f"text_seeds needs two seeds (SD3's two CLIP encoders), got {settings.text_seeds!r}")
    images, captions = _images_and_captions(data, need_captions=True)
    autoencoder = _load_vae(out, settings, images, vae, resume, progress)
    if autoencoder.config.shift_factor is None:
        raise ValueError("the SD3 pipeline needs a VAE with a measured shift_factor (train it with mnist-vae)")
    tokenizer = _tokenizer(captions, data is not None, out / f"{name}-tokenizer")
    encoders = [build_text_encoder(tokenizer, settings.text, seed=k, projection=True) for k in settings.text_seeds]
    width = sum(e.config.hidden_size for e in encoders)
    pooled_width = sum(e.config.projection_dim for e in encoders)
    transformer = build_sd3_transformer(settings.transformer, joint_attention_dim=width,
                                        pooled_projection_dim=pooled_width, seed=settings.seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=settings.shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=autoencoder,
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    distinct, null, tensors = _latent_data(autoencoder, images, captions)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(distinct, None, None, device="cpu", do_classifier_free_guidance=False,
                                                  max_sequence_length=settings.t5_tokens)
    clip_tokens = embeds.shape[1] - settings.t5_tokens
    if embeds[:, clip_tokens:].abs().max() > 0:
        raise ValueError("the pipeline's T5 rows are not zero; only a pipeline without T5 trains here")
    embeds = embeds[:, :clip_tokens + 1].float()  # + one zero row standing for all of them
    transformer.set_attn_processor(RepeatedTokenJointAttnProcessor(settings.t5_tokens))
    loss = FlowLatentLoss(embeds, pooled.float(), null, settings.caption_dropout,
                          _Latents(autoencoder.config.scaling_factor, autoencoder.config.shift_factor),
                          settings.shift, settings.time_sampling, settings.logit_mean, settings.logit_std)
    info = {"recipe": name, "params": param_count(transformer), "prompt_separation": prompt_separation(pooled),
            **_caption_record(captions, data is not None, tokenizer)}
    result, secs = _loop(loss, transformer, tensors, settings, out / f"{name}-train", resume, progress,
                         _pipeline_preview(pipe, "transformer"), info)
    return _save_pipeline(pipe, "transformer", result, out / name, {**info, "seconds": secs,
                                                                     "captions": len(distinct)})


# ---------------------------------------------------------------------------
# Packaging and previews
# ---------------------------------------------------------------------------

def _with_denoiser(pipe, role: str, net):
    """A pipeline sharing ``pipe``'s components, with ``net`` as ``role`` (an SD3 transformer gets diffusers'
    own joint attention back: the training processor is for the shortened training sequence only)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    net = net.eval()
    if role == "transformer":
        net.set_attn_processor(JointAttnProcessor2_0())
    extra = {"requires_safety_checker": False} if "safety_checker" in pipe.components else {}
    return type(pipe)(**{**pipe.components, role: net}, **extra)


def _save_pipeline(pipe, role: str, result, export: Path, info: dict) -> Path:
    final = _with_denoiser(pipe, role, result.ema)

    def save():
        final.save_pretrained(export)
        _write_info(export, {**info, "train_steps": result.step, "pipeline": type(final).__name__})
    on_main(save)
    print(f"{export.name}: {result.step} steps, {info['seconds'] / 60:.1f} min -> {export}")
    return export


PREVIEW_PROMPTS = [f"a handwritten {d}" for d in
                   ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def _pipeline_preview(pipe, role: str, steps: int = 20, guidance_scale: float = 3.0):
    """The loop's sample_fn: the stock pipeline call on one prompt per digit (images in [-1, 1], one row)."""
    def preview(net, step):
        p = _with_denoiser(pipe, role, net).to(next(net.parameters()).device)
        p.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        images = p(PREVIEW_PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                   generator=g).images
        return images.cpu() * 2 - 1, len(PREVIEW_PROMPTS)
    return preview
