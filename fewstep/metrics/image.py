"""FID, KID and Inception Score via torchmetrics, with fewstep's MNIST classifier (or any
network with ``features`` and ``forward``) as the feature extractor, or Inception-v3 from a
local weights file.

Images are float tensors in [-1, 1], shape (N, C, H, W).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["FeatureNet", "image_metrics", "real_vs_real", "class_accuracy"]


class FeatureNet(nn.Module):
    """Expose a classifier's penultimate features (``mode="features"``) or logits (``"logits"``)
    in the form torchmetrics expects (``num_features`` and a forward on raw images)."""

    def __init__(self, classifier: nn.Module, mode: str = "features", scale: float = 1.0):
        super().__init__()
        if mode not in ("features", "logits"):
            raise ValueError(f"mode must be 'features' or 'logits', got {mode!r}")
        self.classifier, self.mode, self.scale = classifier.eval(), mode, float(scale)
        with torch.no_grad():
            probe = torch.zeros(1, *_input_shape(classifier))
            self.num_features = int(self._run(probe).shape[-1])

    def _run(self, x):
        return self.classifier.features(x) if self.mode == "features" else self.classifier(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x.float()).double() / self.scale


def _input_shape(classifier) -> tuple:
    cfg = getattr(classifier, "config", None)
    if cfg is not None and hasattr(cfg, "in_channels") and hasattr(cfg, "image_size"):
        return (cfg.in_channels, cfg.image_size, cfg.image_size)
    return (1, 28, 28)


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{what} must be a (N, C, H, W) tensor")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x.float()


warnings.filterwarnings("ignore", message=r"Metric `(Kernel Inception Distance|InceptionScore)` will save")


def _feature_metrics(feature, kid_feature, inception_weights: str | None, kid_subset: int, n: int):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    kw = {} if isinstance(feature, nn.Module) else {"feature_extractor_weights_path": inception_weights}
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, **kw)
    kid = KernelInceptionDistance(feature=kid_feature, subset_size=max(2, min(kid_subset, n // 2)),
                                  reset_real_features=False, **kw)
    return fid, kid


def _batches(x: torch.Tensor, size: int = 500):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


def image_metrics(fake: torch.Tensor, real: torch.Tensor, classifier: nn.Module | None = None, *,
                  inception_weights: str | None = None, kid_subset: int = 1000,
                  labels: torch.Tensor | None = None) -> dict:
    """FID, KID (mean, std), Inception Score (mean, std) and, given ``labels`` and a
    classifier, class accuracy of ``fake`` against ``real``.

    Features: the classifier's penultimate layer (FID/KID) and logits (IS); or, with
    ``inception_weights`` (a local torch-fidelity Inception-v3 file), Inception-v3 on
    images resized to 299x299 (needs `pip install torch-fidelity`).
    """
    fake, real = _check_images(fake, "fake images"), _check_images(real, "real images")
    if classifier is None and inception_weights is None:
        raise ValueError("pass a classifier (e.g. fewstep.load('mnist-classifier')) or inception_weights=PATH")
    if classifier is not None:
        feat, logits = FeatureNet(classifier, "features"), FeatureNet(classifier, "logits")
        # KID's cubic kernel (x.y / d + 1)^3 wants features of unit RMS per dimension
        rms = float(torch.cat([feat(xb) for xb in _batches(real)]).pow(2).mean().sqrt())
        kid_feat = FeatureNet(classifier, "features", scale=rms)
        prep = lambda x: x  # noqa: E731  the classifier takes [-1, 1] images
    else:
        feat = kid_feat = 2048
        logits = "logits_unbiased"
        prep = _to_inception_input
    fid, kid = _feature_metrics(feat, kid_feat, inception_weights, kid_subset, min(len(fake), len(real)))
    from torchmetrics.image.inception import InceptionScore
    is_metric = InceptionScore(feature=logits) if classifier is not None else \
        InceptionScore(feature=logits, feature_extractor_weights_path=inception_weights)
    for xb in _batches(real):
        fid.update(prep(xb), real=True)
        kid.update(prep(xb), real=True)
    for xb in _batches(fake):
        fid.update(prep(xb), real=False)
        kid.update(prep(xb), real=False)
        is_metric.update(prep(xb))
    kid_m, kid_s = kid.compute()
    is_m, is_s = is_metric.compute()
    out = {"fid": float(fid.compute()), "kid": float(kid_m), "kid_std": float(kid_s),
           "is": float(is_m), "is_std": float(is_s), "n_fake": len(fake), "n_real": len(real)}
    if labels is not None and classifier is not None:
        out["class_accuracy"] = class_accuracy(classifier, fake, labels)
    return out


def _to_inception_input(x: torch.Tensor) -> torch.Tensor:
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier labels as the class they were generated for."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    classifier = classifier.eval()
    pred = torch.cat([classifier(xb.float()).argmax(1) for xb in _batches(images)])
    return float((pred == labels.to(pred.device)).float().mean())


def real_vs_real(real_a: torch.Tensor, real_b: torch.Tensor, classifier: nn.Module | None = None, **kw) -> dict:
    """The same metrics between two disjoint real sets of the same size: the floor that
    generated samples' numbers should be read against."""
    return image_metrics(real_a, real_b, classifier, **kw)
