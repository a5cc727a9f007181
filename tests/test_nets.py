"""Networks: shapes, conditioning, the zero-initialised w input, save/load and its errors."""
import json

import pytest
import torch

from fewstep.nets import MLP, CNNClassifier, UNet, load_net, read_config

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(14,),
                 num_classes=3, image_size=28)


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 28, 28, generator=g)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    return x, t


def _randomise(net, seed=1):
    """Give every parameter random values (zero-initialised output layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def test_unet_output_shape_and_labels_none_is_null_class():
    net = _randomise(UNet(**TINY_UNET))
    x, t = _inputs()
    out_none = net(x, t)
    out_null = net(x, t, torch.full((3,), 3))
    assert out_none.shape == x.shape
    torch.testing.assert_close(out_none, out_null)
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2])), out_null)


def test_unet_time_input_matters():
    net = _randomise(UNet(**TINY_UNET))
    x, t = _inputs()
    assert (net(x, t) - net(x, t + 0.1)).abs().max() > 1e-4


def test_unet_rejects_out_of_range_labels_and_bad_t():
    net = UNet(**TINY_UNET)
    x, t = _inputs()
    with pytest.raises(ValueError, match="labels must lie in"):
        net(x, t, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        net(x, torch.rand(5))


def test_w_input_starts_as_teacher_and_is_required():
    teacher = _randomise(UNet(**TINY_UNET))
    from fewstep.distill import with_w_input
    student = with_w_input(teacher)
    x, t = _inputs()
    labels = torch.tensor([0, 1, 3])
    ref = teacher(x, t, labels)
    for w in (0.0, 1.0, 4.0):
        torch.testing.assert_close(student(x, t, labels, w=w), ref)
    with pytest.raises(ValueError, match="use_w=True"):
        student(x, t, labels)
    with pytest.raises(ValueError, match="no w input"):
        teacher(x, t, labels, w=1.0)
    # once the w branch has weights, w changes the output
    _randomise(student.w_embed, seed=5)
    assert (student(x, t, labels, w=0.0) - student(x, t, labels, w=3.0)).abs().max() > 1e-4


def test_unet_save_load_round_trip(tmp_path):
    net = _randomise(UNet(**TINY_UNET))
    net.save(tmp_path / "m", extra={"prediction": "v", "null_class": 3})
    cfg = read_config(tmp_path / "m")
    assert cfg["arch"] == "unet" and cfg["prediction"] == "v" and cfg["null_class"] == 3
    assert cfg["net_config"] == net.config.to_dict()
    loaded = load_net(tmp_path / "m")
    assert isinstance(loaded, UNet) and loaded.config == net.config
    x, t = _inputs()
    torch.testing.assert_close(loaded(x, t, torch.tensor([0, 2, 1])), net(x, t, torch.tensor([0, 2, 1])),
                               rtol=0, atol=0)


def test_truncated_weights_give_clear_error(tmp_path):
    UNet(**TINY_UNET).save(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt or truncated"):
        UNet.load(tmp_path)


def test_garbage_weights_give_clear_error(tmp_path):
    UNet(**TINY_UNET).save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_net(tmp_path)


def test_key_mismatch_gives_clear_error(tmp_path):
    UNet(**TINY_UNET).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["net_config"]["num_res_blocks"] = 2  # the weights no longer fit the config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors do not match.*missing keys"):
        UNet.load(tmp_path)


def test_missing_config_and_wrong_arch(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_net(tmp_path)
    MLP(num_classes=2).save(tmp_path)
    with pytest.raises(ValueError, match="'mlp' network, not a 'unet'"):
        UNet.load(tmp_path)


def test_mlp_round_trip_and_conditioning(tmp_path):
    net = _randomise(MLP(dim=2, hidden=32, depth=2, num_classes=4))
    x = torch.randn(5, 2)
    t = torch.full((5,), 0.5, dtype=torch.float64)
    assert net(x, t).shape == (5, 2)
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((5,), 4)))
    net.save(tmp_path)
    torch.testing.assert_close(load_net(tmp_path)(x, t, torch.arange(5) % 4), net(x, t, torch.arange(5) % 4),
                               rtol=0, atol=0)


def test_mlp_w_branch_is_zero_initialised():
    net = MLP(dim=2, hidden=16, depth=1, use_w=True)
    x, t = torch.randn(4, 2), torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(net(x, t, w=0.0), net(x, t, w=7.0))


def test_classifier_features_logits_and_round_trip(tmp_path):
    net = CNNClassifier(width=8, feature_dim=16).eval()
    x, _ = _inputs(4)
    assert net.features(x).shape == (4, 16)
    assert net(x).shape == (4, 10)
    net.save(tmp_path, extra={"heldout_accuracy": 0.5})
    loaded = load_net(tmp_path)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert read_config(tmp_path)["heldout_accuracy"] == 0.5
