"""Metrics: FID/KID/IS with the shipped classifier, real-vs-real baseline, toy metrics."""
import pytest
import torch

import fewstep
from fewstep.evaluate import balanced_labels, reference_sets
from fewstep.metrics import image_metrics, mode_stats, real_vs_real, sliced_wasserstein


@pytest.fixture(scope="module")
def clf():
    return fewstep.load("mnist-classifier")


@pytest.fixture(scope="module")
def sets():
    return reference_sets(300)


def test_reference_sets_are_disjoint_and_balanced(sets):
    a, b = sets
    assert a.shape == b.shape == (300, 1, 28, 28)
    assert not any(torch.equal(a[i], b[j]) for i in range(0, 300, 37) for j in range(300))
    assert torch.equal(balanced_labels(12), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))


def test_real_vs_real_is_far_below_corrupted_images(clf, sets):
    a, b = sets
    base = real_vs_real(b, a, clf)
    noisy = (b + 0.6 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    bad = image_metrics(noisy, a, clf, labels=balanced_labels(300))
    assert bad["fid"] > 10 * base["fid"]
    assert bad["kid"] > base["kid"] + 10 * max(base["kid_std"], 1e-3)
    assert base["is"] > 8.0 > bad["is"]  # ten well-separated classes give IS near 10
    assert abs(base["kid"]) < 0.05  # same distribution: KID near 0 on unit-RMS features


def test_class_accuracy_counts_mislabelled_images(clf, sets):
    a, _ = sets
    from fewstep.data.mnist import load_mnist
    x, y = load_mnist("heldout")
    right = image_metrics(x[:200], a, clf, labels=y[:200])["class_accuracy"]
    wrong = image_metrics(x[:200], a, clf, labels=(y[:200] + 1) % 10)["class_accuracy"]
    assert right >= 0.97 and wrong <= 0.03


def test_metrics_reject_bad_input(clf, sets):
    a, _ = sets
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(torch.full_like(a, float("nan")), a, clf)
    with pytest.raises(ValueError, match="classifier"):
        image_metrics(a, a)


def test_mode_stats_and_sliced_wasserstein():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    stds = torch.tensor([0.5, 0.5])
    g = torch.Generator().manual_seed(0)
    one_mode = 0.5 * torch.randn(200, 2, generator=g)
    both = torch.cat([one_mode[:100], means[1] + 0.5 * torch.randn(100, 2, generator=g)])
    s1, s2 = mode_stats(one_mode, means, stds), mode_stats(both, means, stds)
    assert s1["coverage"] == 0.5 and s2["coverage"] == 1.0
    assert s2["within_3sigma"] > 0.95  # 2-D Gaussian: P(r <= 3 sigma) = 1 - exp(-4.5) = 0.989
    far = mode_stats(torch.full((10, 2), 5.0), means, stds)
    assert far["within_3sigma"] == 0.0
    assert sliced_wasserstein(both, both) == 0.0
    assert sliced_wasserstein(one_mode, both) > 1.0
