"""Distribution Matching Distillation: DMD (Yin et al. 2023, arXiv 2311.18828) and the DMD2
options (Yin et al. 2024, arXiv 2405.14867).

A generator G (the teacher's architecture, initialised from it, evaluated at fixed times)
is trained with the distribution-matching gradient, the difference of a frozen "real"
denoiser (the teacher, optionally with classifier-free guidance) and a "fake" denoiser
trained online on G's samples, plus a regression loss onto noise -> image pairs made once
by the teacher's ODE (DMD) and/or a GAN loss on the fake denoiser's bottleneck (DMD2).

:class:`DMDLoss` is a several-network objective for :func:`fewstep.train.train`: networks
``generator`` and ``fake`` (a :class:`FakeScore`: the fake denoiser plus the optional GAN
head), ``phases(step)`` gives the two-time-scale update ratio.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import ClassifierFreeGuidance
from ..losses import noised, prediction_target
from ..schedules import NoiseSchedule
from ._common import NetX0, check_prediction, guidance_null_class, null_labels, teacher_mode
from .times import DM_FRACTIONS, dm_time_range, dm_times, generator_times, training_times

__all__ = ["DMDLoss", "FakeScore", "GANHead", "dm_gradient", "dm_loss", "regression_distance",
           "generator_times", "generator_sample", "DISTANCES"]

DISTANCES = ("l2", "pseudo_huber", "lpips")


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Distribution-matching gradient (DMD eq. 7-8): (x0_fake - x0_real) / mean_CHW |x - x0_real|, per
    sample; the normaliser is floored at ``eps`` so a perfect real prediction gives no division by zero."""
    norm = (x.float() - x0_real.float()).abs().flatten(1).mean(1).clamp_min(eps)
    return (x0_fake.float() - x0_real.float()) / norm.reshape(-1, *([1] * (x.ndim - 1)))


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mean_CHW (x - stopgrad(x - grad))^2 per sample: its gradient w.r.t. x is grad / CHW."""
    return 0.5 * (x.float() - (x.float() - grad).detach()).pow(2).flatten(1).mean(1)


def regression_distance(kind: str, a: torch.Tensor, b: torch.Tensor, lpips_net=None, c: float = 0.03):
    """Per-sample distance for the regression loss: 'l2' (mean squared error), 'pseudo_huber'
    (sqrt(|a - b|^2 / d + c^2) - c, Song & Dhariwal 2023) or 'lpips' (needs ``lpips_net``)."""
    if kind == "l2":
        return (a.float() - b.float()).pow(2).flatten(1).mean(1)
    if kind == "pseudo_huber":
        return torch.sqrt((a.float() - b.float()).pow(2).flatten(1).mean(1) + c * c) - c
    if kind == "lpips":
        if lpips_net is None:
            raise ValueError("the lpips distance needs an LPIPS network (see fewstep.distill.dmd.load_lpips)")
        rgb = (lambda v: v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v)
        return lpips_net(rgb(a.float()), rgb(b.float())).flatten()
    raise ValueError(f"unknown regression distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def load_lpips(weights: str | None, net: str = "vgg"):
    """An LPIPS network from the ``lpips`` package with backbone + linear weights from local files only.

    ``weights``: path of a state dict holding the backbone and the linear layers (as ``lpips.LPIPS``
    names them). Nothing is downloaded: without the file this raises with how to supply it.
    """
    try:
        import lpips
    except ImportError:
        raise ValueError("the lpips distance needs the 'lpips' package: pip install lpips; or use "
                         "--distance pseudo_huber / l2") from None
    if weights is None:
        raise ValueError("LPIPS needs local weights (this machine does not download them): save "
                         "lpips.LPIPS(net='vgg').state_dict() to a file where a network is available and pass "
                         "its path as lpips_weights; or use the pseudo_huber / l2 distance")
    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


class GANHead(nn.Module):
    """DMD2's discriminator head: conv-GroupNorm-SiLU, global average pool, one logit, on the
    fake denoiser's bottleneck features."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                  nn.SiLU(), nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features).mean((2, 3))).flatten()


class FakeScore(nn.Module):
    """The online-trained fake denoiser (a copy of the teacher) and the optional GAN head."""

    fsdp_forward_methods = ("logits",)  # entry points besides forward that FSDP must gather for (fewstep.train)

    def __init__(self, net: nn.Module, gan_head: bool = False):
        super().__init__()
        self.net = net
        if gan_head and not hasattr(net, "feature_channels"):
            raise ValueError(f"the GAN head reads bottleneck features, which {type(net).__name__} does not "
                             "expose (return_features=True); use fewstep's UNet or gan_weight=0")
        if gan_head:
            channels = net.feature_channels
            self.head = GANHead(channels, math.gcd(channels, getattr(getattr(net, "config", None), "groups", 8)))
        else:
            self.head = None
        self.null_class = getattr(net, "null_class", None)

    def forward(self, x, t, labels=None, logits: bool = False):
        """The fake denoiser's output; ``logits=True``: the GAN head's logits instead (see :meth:`logits`)."""
        if logits:
            return self.logits(x, t, labels)
        return self.net(x, t, labels)

    def logits(self, x, t, labels) -> torch.Tensor:
        """Real-vs-generated logits of noisy images x at t."""
        if self.head is None:
            raise ValueError("this FakeScore has no GAN head: build it as FakeScore(net, gan_head=True)")
        return self.head(self.net(x, t, labels, return_features=True)[1])


def generator_sample(gen_x0, x_T: torch.Tensor, labels, schedule: NoiseSchedule, times: torch.Tensor,
                     upto: int | None = None, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a generator over its times (DMD2's multi-step sampler, also its backward simulation).

    Start from x_T (noise at times[0], i.e. sigma(t_0) z); at each time t_i predict x0 = G(x, t_i),
    then re-noise it to t_{i+1} with fresh noise. Stops at input time ``upto`` (default: after the
    last time) and returns (the input x at that time, the last x0; for upto=0 x0 is None).
    ``noise(like)`` draws the re-noising noise shaped like ``like`` (default torch.randn_like).
    """
    k = len(times) if upto is None else upto
    x, x0 = x_T, None
    for i in range(k):
        t = times[i].expand(x_T.shape[0]).to(x_T.device)
        x0 = gen_x0(x, t, labels)
        if i + 1 < len(times):
            eps = noise(x0) if noise is not None else torch.randn_like(x0)
            x = noised(schedule, x0, times[i + 1].expand(x_T.shape[0]).to(x_T.device), eps)[0]
    return x, x0


class DMDLoss:
    """The DMD / DMD2 objective over networks ``generator`` and ``fake``.

    teacher: the frozen net ``teacher(x, t, labels)`` of output type ``prediction`` ('eps', 'v',
      'x0' or 'flow'); the generator and the fake denoiser are copies of it with the same output
      type. The teacher is only called (no grad, eval mode), never modified.
    real_w: classifier-free guidance weight of the real score (x_w = (1 + w) x_c - w x_u; 0 = none);
      null_class: the teacher's unconditional class (needed when real_w > 0).
    dm_t: the DM noise range as fractions (lo, hi) of the training range (DMD: 0.02, 0.98); the
      times follow :func:`fewstep.distill.times.dm_times` (rho-spaced sigmas for EDM).
    lambda_reg: weight of the regression loss (0 = none, as in DMD2); ``distance`` its metric.
    fake_updates: fake-denoiser updates per generator update (DMD: 1, DMD2: 5).
    fake_warmup: steps of fake-denoiser updates alone before the generator's first update: for a generator that
      starts trained (``--init``), whose fake denoiser starts as the teacher and must first learn the
      generator's samples (until then the DM gradient is the guided minus the unguided teacher, which only
      drags a good generator off).
    gan_weight_g / gan_weight_d: GAN loss weights for the generator / the head (0 = no GAN); the
      generator's GAN term needs a head that is trained (gan_weight_d > 0, FakeScore(gan_head=True)).
    gen_steps: generator steps (1 = one-step DMD; > 1 = DMD2's multi-step generator trained with
      backward simulation, which then uses no regression loss), at :func:`fewstep.distill.times.generator_times`
      (or ``times``: e.g. a flow pipeline's first time 1, pure noise, where its stock scheduler starts).
    gen_prediction: the generator's output type (default: the teacher's). 'x0' for an eps teacher whose
      first generator time is near pure noise: there eps -> x0 divides by alpha(t_0) (1/0.068 = 14.7 for
      SD's t = 999), so every eps error is amplified that much in the sample; an x0 output is not.
    Batches are dicts with ``z``, ``labels`` (the paired set's noise and classes), ``x_ref`` (the
    teacher's ODE output from z) and, for the GAN, ``x_real`` / ``labels_real``.
    """

    def __init__(self, teacher, schedule: NoiseSchedule, prediction: str, *, real_w: float = 0.0,
                 dm_t: tuple[float, float] = DM_FRACTIONS, lambda_reg: float = 0.25, distance: str = "l2",
                 fake_updates: int = 1, gan_weight_g: float = 0.0, gan_weight_d: float = 0.0, gen_steps: int = 1,
                 null_class: int | None = None, lpips_net=None, use_fake: bool = True,
                 times: torch.Tensor | None = None, gen_prediction: str | None = None, fake_warmup: int = 0):
        if not isinstance(fake_warmup, int) or fake_warmup < 0:
            raise ValueError(f"fake_warmup must be an integer >= 0 (steps of fake updates alone), got {fake_warmup!r}")
        self.fake_warmup = fake_warmup
        _check_options(distance, fake_updates, lambda_reg, gan_weight_g, gan_weight_d, real_w, gen_steps, lpips_net)
        dm_time_range(schedule, dm_t)  # validates the fractions and the schedule
        self.teacher, self.schedule, self.prediction = teacher, schedule, check_prediction(prediction)
        self.gen_prediction = check_prediction(gen_prediction or prediction, "gen_prediction")
        self.real_w = float(real_w)
        real = NetX0(teacher, schedule, prediction)
        if self.real_w > 0:
            null = guidance_null_class(teacher, null_class, "DMDLoss with real_w > 0")
            real = ClassifierFreeGuidance(real, self.real_w, null_labels(null))
        self.real_x0 = real
        self.dm_t, self.lambda_reg, self.distance, self.lpips_net = tuple(dm_t), float(lambda_reg), distance, lpips_net
        self.fake_updates, self.gan_g, self.gan_d = fake_updates, float(gan_weight_g), float(gan_weight_d)
        self.times = generator_times(schedule, gen_steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
        if len(self.times) != gen_steps:
            raise ValueError(f"times has {len(self.times)} entries but gen_steps is {gen_steps}")
        self.use_fake = use_fake  # False: the "real score only" ablation (DMD Fig. 3), fake score taken as 0
        self.last_metrics: dict = {}

    def phases(self, step: int) -> list[str]:
        """A generator update every ``fake_updates`` steps (none in the first ``fake_warmup``), then one
        fake-denoiser update each step."""
        if not self.use_fake:
            return ["generator"]
        gen = step >= self.fake_warmup and (step - self.fake_warmup) % self.fake_updates == 0
        return (["generator"] if gen else []) + ["fake"]

    def check_networks(self, models: dict) -> None:
        """Refuse networks this objective cannot train (called by :func:`fewstep.train.train` before step 1)."""
        missing = {"generator", "fake"} - set(models)
        if missing:
            raise ValueError(f"DMD trains networks 'generator' and 'fake'; missing {sorted(missing)}")
        if (self.gan_g > 0 or self.gan_d > 0) and getattr(_module(models["fake"]), "head", None) is None:
            raise ValueError("gan_weight_g / gan_weight_d > 0 need the GAN head: build the fake network as "
                             "FakeScore(net, gan_head=True), or set both GAN weights to 0")

    def __call__(self, models: dict, batch: dict, name: str) -> torch.Tensor:
        self.last_metrics = {}
        self.check_networks(models)
        if name == "generator":
            return self.generator_loss(models["generator"], models["fake"], batch)
        if name == "fake":
            return self.fake_loss(models["generator"], models["fake"], batch)
        raise ValueError(f"DMD trains 'generator' and 'fake', not {name!r}")

    # -- pieces -------------------------------------------------------------------
    def gen_x0(self, generator):
        return NetX0(generator, self.schedule, self.gen_prediction)

    def generated(self, generator, z, labels) -> torch.Tensor:
        """G's sample from z: one step, or (multi-step) the output at a random step of its rollout,
        whose input comes from the generator's own backward simulation (no gradient)."""
        z = z * self.schedule.sigma(self.times[0]).to(z.dtype)
        if len(self.times) == 1:
            return generator_sample(self.gen_x0(generator), z, labels, self.schedule, self.times)[1]
        j = int(torch.randint(0, len(self.times), ()))
        with torch.no_grad():
            x_in, _ = generator_sample(self.gen_x0(generator), z, labels, self.schedule, self.times, upto=j)
        t = self.times[j].expand(z.shape[0]).to(z.device)
        return self.gen_x0(generator)(x_in, t, labels)

    def dm_times(self, b: int, device) -> torch.Tensor:
        return dm_times(self.schedule, b, device, self.dm_t)

    def real_and_fake_x0(self, fake, x_t, t, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """The real (teacher, guided at real_w) and fake denoisers' x0 at x_t, without gradients."""
        with teacher_mode(self.teacher):
            x0_real = self.real_x0(x_t, t, labels=labels)
        with torch.no_grad():
            if self.use_fake:
                x0_fake = NetX0(fake, self.schedule, self.prediction)(x_t, t, labels)
            else:  # a zero fake score: x0 = x_t / alpha
                x0_fake = x_t / self.schedule.alpha(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x0_real, x0_fake

    def generator_loss(self, generator, fake, batch) -> torch.Tensor:
        z, labels = batch["z"], batch["labels"]
        x = self.generated(generator, torch.randn_like(z), labels)
        t = self.dm_times(x.shape[0], x.device)
        x_t = noised(self.schedule, x.detach(), t, torch.randn_like(x))[0]
        grad = dm_gradient(x, *self.real_and_fake_x0(fake, x_t, t, labels))
        loss = dm_loss(x, grad)
        metrics = {"dm": loss.mean().item()}
        if self.lambda_reg > 0:
            x_reg = self.generated(generator, batch["z"], labels)
            if batch["x_ref"].shape != x_reg.shape:
                raise ValueError(f"the regression targets x_ref have shape {tuple(batch['x_ref'].shape)} but the "
                                 f"generator outputs {tuple(x_reg.shape)}: rebuild the regression set for this teacher")
            reg = regression_distance(self.distance, x_reg, batch["x_ref"], self.lpips_net)
            loss = loss + self.lambda_reg * reg
            metrics["reg"] = reg.mean().item()
        if self.gan_g > 0:  # DMD2 eq. 5, generator side: softplus(-D(G(z))), through a frozen head
            t_g = training_times(self.schedule, x.shape[0], x.device)
            logits = _frozen_logits(_module(fake), noised(self.schedule, x, t_g, torch.randn_like(x))[0], t_g, labels)
            loss = loss + self.gan_g * F.softplus(-logits)
            metrics["gan"] = F.softplus(-logits).mean().item()
        self.last_metrics = metrics
        return loss

    def fake_loss(self, generator, fake, batch) -> torch.Tensor:
        """The fake denoiser's ordinary denoising loss on (stop-gradient) generator samples, t over the
        whole training range; plus the head's GAN loss on noisy real vs generated images (DMD2 eq. 5)."""
        labels = batch["labels"]
        with torch.no_grad():
            x = self.generated(generator, torch.randn_like(batch["z"]), labels)
        t = training_times(self.schedule, x.shape[0], x.device)
        eps = torch.randn_like(x)
        x_t, alpha, sigma = noised(self.schedule, x, t, eps)
        target = prediction_target(self.prediction, x, eps, alpha, sigma)
        loss = (fake(x_t, t, labels).float() - target.float()).pow(2).flatten(1).mean(1)
        if self.gan_d > 0:
            if "x_real" not in batch:
                raise ValueError("the GAN loss needs real images: build the data with real=(x, labels)")
            head = _module(fake)
            x_r, y_r = batch["x_real"], batch["labels_real"]
            t_r = training_times(self.schedule, x_r.shape[0], x_r.device)
            real_logits = head.logits(noised(self.schedule, x_r, t_r, torch.randn_like(x_r))[0], t_r, y_r)
            fake_logits = head.logits(x_t, t, labels)
            loss = loss + self.gan_d * (F.softplus(-real_logits) + F.softplus(fake_logits))
        return loss


def _check_options(distance, fake_updates, lambda_reg, gan_weight_g, gan_weight_d, real_w, gen_steps, lpips_net):
    """DMDLoss's one-line refusals of settings that cannot train."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown regression distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    if not isinstance(fake_updates, int) or fake_updates < 1:
        raise ValueError(f"fake_updates must be an integer >= 1, got {fake_updates!r}")
    if min(lambda_reg, gan_weight_g, gan_weight_d, real_w) < 0:
        raise ValueError("lambda_reg, gan weights and real_w must be >= 0")
    if gan_weight_g > 0 and gan_weight_d == 0:
        raise ValueError("gan_weight_g > 0 trains the generator against a GAN head that only gan_weight_d > 0 "
                         "trains: set gan_weight_d > 0 too (DMD2), or gan_weight_g = 0")
    if gen_steps > 1 and lambda_reg > 0:
        raise ValueError("the regression pairs map noise to an image in one step; a multi-step generator "
                         f"(gen_steps={gen_steps}) is trained without them (DMD2): set lambda_reg=0")
    if distance == "lpips" and lambda_reg > 0 and lpips_net is None:
        raise ValueError("distance='lpips' needs lpips_net (fewstep.distill.dmd.load_lpips)")


def _frozen_logits(fake: FakeScore, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    """The head's logits of x with the fake network's weights detached: the gradient reaches x (the
    generator) and never the discriminator, which the generator's loss must not train."""
    frozen = {k: v.detach() for k, v in fake.named_parameters()}
    return torch.func.functional_call(fake, frozen, (x, t, labels), {"logits": True})


def _module(net):
    """The module under a DDP wrapper."""
    return getattr(net, "module", net)
