"""Data: the fixed MNIST split, 2-D toys and the image-folder dataset's errors."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import toys
from fewstep.data.folder import ImageFolder, load_image
from fewstep.data.mnist import load_mnist, split_indices


@pytest.fixture(scope="module")
def mnist():
    return {s: load_mnist(s) for s in ("train", "heldout")}


def test_mnist_split_sizes_types_and_range(mnist):
    (x, y), (xh, yh) = mnist["train"], mnist["heldout"]
    assert x.shape == (4000, 1, 28, 28) and xh.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0 and xh.min() >= -1 and xh.max() <= 1
    assert torch.bincount(y).tolist() == [400] * 10
    assert torch.bincount(yh).tolist() == [100] * 10


def test_mnist_split_is_disjoint_and_fixed():
    y = np.repeat(np.arange(10), 500)
    tr, ho = split_indices(y, "train"), split_indices(y, "heldout")
    assert len(set(tr) & set(ho)) == 0 and len(tr) + len(ho) == 5000
    assert tr[:3].tolist() == [0, 1, 2] and ho[:3].tolist() == [400, 401, 402]
    with pytest.raises(ValueError, match="unknown MNIST split"):
        split_indices(y, "test")


def test_mnist_train_and_heldout_images_differ(mnist):
    x, xh = mnist["train"][0].flatten(1), mnist["heldout"][0].flatten(1)
    # no held-out digit is an exact copy of a train digit
    d = torch.cdist(xh[:200], x).min(1).values
    assert d.min() > 0


def test_ring8_spec():
    spec = toys.ring8(radius=2.0, std=0.1)
    assert spec["means"].shape == (8, 2) and spec["means"].dtype == torch.float64
    torch.testing.assert_close(spec["means"].norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(spec["weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert spec["labels"].tolist() == list(range(8))
    assert toys.ring8(labelling="coarse")["labels"].tolist() == [0, 1] * 4


def test_grid25_spec_and_sampling():
    spec = toys.grid25(spacing=1.0, std=0.05, labelling="coarse")
    assert spec["means"].shape == (25, 2) and toys.num_classes(spec) == 5
    assert sorted(set(spec["means"][:, 0].tolist())) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    x, y = toys.sample_toy(spec, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and y.shape == (4000,)
    # each point lies within 5 std of its own row's y coordinate, and classes are balanced
    assert ((x[:, 1].double() - (y.double() - 2)).abs() < 5 * 0.05).all()
    assert torch.bincount(y, minlength=5).min() > 700


def test_toy_spec_wraps_as_gaussian_mixture():
    from fewstep.data.gmm import GaussianMixture
    gm = GaussianMixture(**toys.ring8())
    assert gm.dim == 2 and gm.num_components == 8


def test_toy_sampler_is_reproducible():
    s = toys.toy_sampler(toys.ring8())
    a = s(torch.Generator().manual_seed(3), 16)
    b = s(torch.Generator().manual_seed(3), 16)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="unknown labelling"):
        toys.ring8(labelling="quadrant")


def _png(path, size=(10, 8), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(value, value, value) if mode == "RGB" else value).save(path)


def test_folder_flat_loads_in_range(tmp_path):
    _png(tmp_path / "a.png", value=0)
    _png(tmp_path / "b.png", value=255)
    ds = ImageFolder(tmp_path)
    assert len(ds) == 2 and ds.labels is None and ds.shape == (3, 8, 10)
    x = ds.load_all()
    assert x.shape == (2, 3, 8, 10)
    assert x[0].max() == -1.0 and x[1].min() == 1.0


def test_folder_with_class_subfolders_and_resize(tmp_path):
    _png(tmp_path / "cat" / "1.png", size=(40, 20))
    _png(tmp_path / "cat" / "2.jpg", size=(20, 40))
    _png(tmp_path / "dog" / "1.jpeg", size=(30, 30))
    ds = ImageFolder(tmp_path, size=16, mode="L")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    x, y = ds.load_all()
    assert x.shape == (3, 1, 16, 16) and y.tolist() == [0, 0, 1]
    assert abs(x.mean().item() - (128 / 127.5 - 1)) < 0.02


def test_folder_empty_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_folder_unreadable_file_is_named(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolder(tmp_path)


def test_folder_truncated_image_is_named_on_load(tmp_path):
    _png(tmp_path / "ok.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        ImageFolder(tmp_path).load_all()


def test_folder_mixed_sizes_need_resize(tmp_path):
    _png(tmp_path / "a.png", size=(10, 10))
    _png(tmp_path / "b.png", size=(12, 10))
    with pytest.raises(ValueError, match="differ in size.*b.png is 12x10"):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, size=8).load_all().shape == (2, 3, 8, 8)


def test_folder_mixed_layout_rejected(tmp_path):
    _png(tmp_path / "loose.png")
    _png(tmp_path / "cls" / "a.png")
    with pytest.raises(ValueError, match="mixes loose images"):
        ImageFolder(tmp_path)


def test_center_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255  # a white middle third
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", size=10, mode="L")
    assert x.shape == (1, 10, 10) and x.mean() > 0.9 and math.isfinite(x.sum().item())
