"""The training loop and the denoising objective."""
import json
import math

import pytest
import torch

from fewstep.data.toys import ring8, toy_sampler
from fewstep.losses import DenoisingLoss, drop_labels, prediction_target
from fewstep.nets import MLP
from fewstep.schedules import CosineVP, DiscreteVP
from fewstep.train import latest_checkpoint, make_batch_source, save_image_grid, train

SCHEDULE = CosineVP()


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_run(out_dir, steps, **kw):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=64, depth=2, num_classes=8)
    opts = dict(batch_size=128, lr=2e-3, warmup=10, ema_decay=0.99, ckpt_every_minutes=None, log_every=10,
                progress=False, seed=0)
    opts.update(kw)
    return train(DenoisingLoss(SCHEDULE, prediction="eps"), net, toy_sampler(ring8()), steps=steps,
                 out_dir=out_dir, **opts)


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _ring_denoiser_error(net, t):
    """RMS distance between the net's x0 estimate and the exact posterior mean at time t."""
    from fewstep.data.gmm import GaussianMixture
    gm = GaussianMixture(**ring8())
    g = torch.Generator().manual_seed(1)
    x0, _ = gm.sample(2000, g)
    tt = torch.full((2000,), t, dtype=torch.float64)
    a, s = SCHEDULE.alpha(tt)[:, None], SCHEDULE.sigma(tt)[:, None]
    xt = a * x0.double() + s * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x0_hat = (xt - s * net(xt.float(), tt).double()) / a  # eps-prediction -> x0
    exact = gm.denoiser(SCHEDULE)(xt, tt)
    rms = lambda d: d.pow(2).sum(1).mean().sqrt().item()  # noqa: E731
    return rms(x0_hat - exact), rms(exact - x0.double())


def test_loop_learns_the_ring_denoiser(tmp_path):
    result = _toy_run(tmp_path, 400, ckpt_every_steps=None)
    log = _log(tmp_path)
    assert log[0]["loss"] > 0.4  # starts near the eps-prediction loss of a zero output (~1)
    late = sum(r["loss"] for r in log[-5:]) / 5
    assert late < 0.2, f"eps-prediction loss after 400 steps is {late:.3f}, expected < 0.2"
    # at moderate and high noise the learned denoiser is close to the exact one, relative to
    # how uncertain x0 still is there
    for t in (0.5, 0.8):
        err, spread = _ring_denoiser_error(result.ema, t)
        assert err < 0.3 and err < 0.35 * spread, (t, err, spread)


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    full = _toy_run(tmp_path / "full", 120, ckpt_every_steps=40)

    def crash(step, loss):
        if step == 100:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "killed", 120, ckpt_every_steps=40, on_step=crash)
    assert latest_checkpoint(tmp_path / "killed").name == "ckpt-00000080"
    resumed = _toy_run(tmp_path / "killed", 120, ckpt_every_steps=40, resume=True)
    assert resumed.step == 120
    assert resumed.resumed_from == 80 and resumed.steps_run == 40  # it really resumed (not a rerun from 0)
    assert full.resumed_from is None and full.steps_run == 120
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    steps_logged = [r["step"] for r in _log(tmp_path / "killed")]
    assert steps_logged == list(range(10, 121, 10))  # the killed run's lines past step 80 were dropped
    assert [r["loss"] for r in _log(tmp_path / "killed")][:8] == [r["loss"] for r in _log(tmp_path / "full")][:8]


def test_lr_drops_change_the_rate_after_their_step_and_resume_exactly(tmp_path):
    full = _toy_run(tmp_path / "full", 120, lr_drops={60: 0.25})
    rates = {r["step"]: r["lr"] for r in _log(tmp_path / "full")}
    assert rates[20] == rates[60] == pytest.approx(2e-3) and rates[70] == rates[120] == pytest.approx(5e-4)
    # a run of 60 steps at the first rate, continued with the drop: the same weights as the run with it from step 0
    _toy_run(tmp_path / "later", 60)
    later = _toy_run(tmp_path / "later", 120, lr_drops={60: 0.25}, resume=True)
    assert later.resumed_from == 60
    for a, b in zip(full.model.state_dict().values(), later.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="positive factor"):
        _toy_run(tmp_path / "bad", 5, lr_drops={3: 0.0})


def test_checkpoints_are_complete_and_pruned(tmp_path):
    _toy_run(tmp_path, 50, ckpt_every_steps=10, keep_checkpoints=2)
    ckpts = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert ckpts == ["ckpt-00000040", "ckpt-00000050"]
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 50
    names = {p.name for p in (tmp_path / "ckpt-00000050").iterdir()}
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors",
            "state.json"} <= names


def test_resume_false_refuses_existing_run(tmp_path):
    _toy_run(tmp_path, 5)
    with pytest.raises(ValueError, match="already holds checkpoint"):
        _toy_run(tmp_path, 10, resume=False)


def test_objective_must_return_per_sample_loss(tmp_path):
    net = MLP(dim=2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="per-sample loss"):
        train(lambda m, b: m(b, torch.zeros(b.shape[0])).pow(2).mean(), net, torch.randn(64, 2), steps=2,
              batch_size=8, out_dir=tmp_path, progress=False)


def test_bad_arguments_are_reported(tmp_path):
    net = MLP(dim=2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="steps must be"):
        train(DenoisingLoss(SCHEDULE), net, torch.randn(64, 2), steps=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(DenoisingLoss(SCHEDULE), net, torch.randn(4, 2), steps=1, batch_size=8, out_dir=tmp_path)


def test_sample_fn_writes_grid_without_changing_training(tmp_path):
    def sample_fn(ema, step):
        torch.randn(100)  # consumes RNG: must not change the training run
        return torch.zeros(6, 1, 4, 4), 3

    plain = _toy_run(tmp_path / "a", 20)
    sampled = _toy_run(tmp_path / "b", 20, sample_fn=sample_fn, sample_every_steps=5)
    for a, b in zip(plain.model.parameters(), sampled.model.parameters()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "b" / "samples").iterdir())[0] == "step-00000005.png"


def test_save_image_grid_layout(tmp_path):
    from PIL import Image
    path = save_image_grid(torch.ones(5, 1, 4, 6), tmp_path / "g.png", nrow=3, pad=1)
    im = Image.open(path)
    assert im.size == (3 * 7 + 1, 2 * 5 + 1)
    with pytest.raises(ValueError, match="shape"):
        save_image_grid(torch.ones(2, 4, 4), tmp_path / "bad.png")


def test_indexed_batches_resume_mid_epoch():
    data = torch.arange(10).float()
    a = make_batch_source(data, 3, seed=1)
    first = [a.next() for _ in range(5)]  # crosses an epoch boundary (3 full batches per epoch)
    state = a.state_dict()
    rest_a = [a.next() for _ in range(4)]
    b = make_batch_source(data, 3, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest_a, [b.next() for _ in range(4)]))
    assert sorted(torch.cat(first[:3]).tolist()) == sorted(set(torch.cat(first[:3]).tolist()))  # no repeats


def test_prediction_targets_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    a, s = SCHEDULE.alpha(t)[:, None].float(), SCHEDULE.sigma(t)[:, None].float()
    xt = a * x0 + s * eps
    v = prediction_target("v", x0, eps, a, s)
    torch.testing.assert_close(a * xt - s * v, x0)  # x0 = alpha x_t - sigma v (VP)
    torch.testing.assert_close(s * xt + a * v, eps)
    assert torch.equal(prediction_target("eps", x0, eps, a, s), eps)
    with pytest.raises(ValueError, match="unknown prediction"):
        prediction_target("score", x0, eps, a, s)


def test_loss_is_zero_for_an_oracle_x0_net():
    x0 = torch.randn(16, 2)

    def oracle(x_t, t, labels=None):
        return x0  # knows the clean data: x0-prediction loss must be exactly 0

    loss = DenoisingLoss(SCHEDULE, prediction="x0")(oracle, x0)
    assert loss.shape == (16,) and loss.abs().max() == 0


def test_discrete_time_training_uses_the_n_grid():
    sched = DiscreteVP.from_name("linear", num_train_timesteps=50)
    t = DenoisingLoss(sched).sample_t(5000, "cpu")
    n = t * 50 - 1
    assert torch.allclose(n, n.round(), atol=1e-9) and n.min() >= 0 and n.max() <= 49
    assert len(n.round().unique()) == 50


def test_continuous_t_range_and_label_dropout_rate():
    t = DenoisingLoss(SCHEDULE).sample_t(10000, "cpu")
    assert t.min() >= SCHEDULE.t_min and t.max() <= SCHEDULE.t_max and t.dtype == torch.float64
    torch.manual_seed(0)
    dropped = (drop_labels(torch.zeros(20000, dtype=torch.long), 10, 0.15) == 10).float().mean().item()
    assert math.isclose(dropped, 0.15, abs_tol=0.01)
    with pytest.raises(ValueError, match="label_dropout"):
        DenoisingLoss(SCHEDULE, label_dropout=1.5)


def test_bf16_autocast_and_grad_accum_train(tmp_path):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=1, num_classes=8)
    before = [p.detach().clone() for p in net.parameters()]
    result = train(DenoisingLoss(SCHEDULE), net, toy_sampler(ring8()), steps=10, batch_size=32, grad_accum=2,
                   mixed_precision="bf16", out_dir=tmp_path, progress=False, log_every=5)
    assert math.isfinite(result.last_loss)
    assert next(result.model.parameters()).dtype == torch.float32  # weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, result.model.parameters()))


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(net, batch):
        calls["n"] += 1
        loss = DenoisingLoss(SCHEDULE, prediction="eps")(net, batch)
        return loss * float("nan") if calls["n"] == 25 else loss

    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, num_classes=8)
    with pytest.raises(FloatingPointError, match=r"step 25 \(model\).*last good checkpoint is .*ckpt-00000020"):
        train(poisoned, net, toy_sampler(ring8()), steps=40, out_dir=tmp_path, ckpt_every_steps=10,
              ckpt_every_minutes=None, progress=False, batch_size=32)
    assert latest_checkpoint(tmp_path).name == "ckpt-00000020"  # no poisoned checkpoint was written


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import errno

    import fewstep.train as loop

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(loop, "open", full, raising=False)  # the loop's own file writes see a full disk
    with pytest.raises(ValueError, match="cannot write to the run folder .*No space left"):
        _toy_run(tmp_path, 5)
    assert not list(tmp_path.glob("ckpt-*"))


@pytest.mark.parametrize("warm", [{"a": True, "b": True}, {"a": True, "b": False}])
def test_each_networks_ema_steps_with_its_own_updates(tmp_path, warm):
    """Two networks, 'b' updated every 5th loop step (as DMD's generator with fake_updates=5): each EMA
    moves only when its network steps, ema_k = d_k ema_{k-1} + (1 - d_k) theta_k with the warm-up decay
    d_k = min(decay, (1 + k) / (10 + k)) counted in that network's own updates k; with ema_warmup False
    (a network that starts trained) the full decay from its first update."""
    torch.manual_seed(0)
    nets = {"a": MLP(dim=2, hidden=8, depth=1), "b": MLP(dim=2, hidden=8, depth=1)}

    class TwoRates:
        def phases(self, step):
            return ["a"] + (["b"] if step % 5 == 0 else [])

        def __call__(self, models, batch, name):
            x = batch
            return (models[name](x, torch.full((x.shape[0],), 0.5)) - 1.0).pow(2).mean(1)

    start = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    after = []  # parameters of both networks after every loop step
    res = train(TwoRates(), nets, torch.randn(64, 2), steps=12, out_dir=tmp_path, batch_size=8, lr=1e-2,
                ema_decay={"a": 0.999, "b": 0.999 if warm["b"] else 0.9}, ema_warmup=warm,
                ckpt_every_minutes=None, progress=False,
                on_step=lambda step, loss: after.append({k: [p.detach().clone() for p in n.parameters()]
                                                         for k, n in nets.items()}))
    for name, update_steps in (("a", range(12)), ("b", (0, 5, 10))):
        ema = [p.clone() for p in start[name]]
        for k, s in enumerate(update_steps, 1):
            d = min(0.999, (1 + k) / (10 + k)) if warm[name] else 0.9
            ema = [d * e + (1 - d) * p for e, p in zip(ema, after[s][name])]
        got = list(res.emas[name].parameters())
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, ema)), name
        assert any((g - p).abs().max() > 1e-4 for g, p in zip(got, after[-1][name]))  # an average, not a copy


@pytest.mark.parametrize("warmup, scale", [(0, 1.0), (4, 0.25)])
def test_first_step_moves_each_weight_by_the_warmed_up_lr(tmp_path, warmup, scale):
    """AdamW's first step is lr * g / (|g| + eps) (Kingma & Ba 2015, Alg. 1 with bias correction): every
    weight with a gradient moves by the step's lr, lr * min(1, 1 / warmup) at the first step."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=8, depth=1)
    before = [p.detach().clone() for p in net.parameters()]
    res = train(DenoisingLoss(SCHEDULE), net, torch.randn(64, 2), steps=1, batch_size=16, lr=1e-3, warmup=warmup,
                out_dir=tmp_path, ckpt_every_minutes=None, progress=False)
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(res.model.parameters(), before)])
    moved = moved[moved > 0]
    assert moved.numel() > 50 and abs(float(moved.median()) / (1e-3 * scale) - 1) < 1e-3  # |g| >> eps: exactly lr
    assert float(moved.max()) < 1e-3 * scale * (1 + 1e-3)  # (weights with |g| ~ eps move less)


def test_periodic_actions_fall_due_by_steps_or_minutes():
    from fewstep.train import _due
    assert _due(10, 5, 0.0, None) and not _due(11, 5, 0.0, None)
    assert not _due(3, None, 119.0, 2.0) and _due(3, None, 121.0, 2.0)  # every 2 minutes = 120 s
    assert not _due(3, None, 1e6, None) and not _due(3, 0, 1e6, 0)


@pytest.mark.parametrize("t_min, t_max", [(0.5, 0.5), (0.0, 0.5), (0.6, 0.5)])
def test_denoising_loss_refuses_an_empty_or_reversed_time_range(t_min, t_max):
    with pytest.raises(ValueError, match="t_min < t_max"):
        DenoisingLoss(SCHEDULE, t_min=t_min, t_max=t_max)
    assert DenoisingLoss(SCHEDULE, t_min=0.4, t_max=0.5).t_max == 0.5


def test_indexed_batches_cover_each_epoch_once_and_count_epochs():
    """Tensor data of 10 items in batches of 5: every epoch visits each item exactly once (a batch
    never straddles two epochs), the recorded epoch counts the wrap-arounds, and a source restored
    from that state continues with the same batches."""
    from fewstep.train import make_batch_source
    data = torch.arange(10)
    src = make_batch_source(data, 5, seed=3)
    batches = [src.next() for _ in range(3)]
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(10))
    assert src.state_dict()["epoch"] == 1 and src.state_dict()["pos"] == 5
    twin = make_batch_source(data, 5, seed=3)
    twin.load_state_dict(src.state_dict())
    a, b = src.next(), twin.next()
    assert torch.equal(a, b) and sorted(torch.cat([batches[2], a]).tolist()) == list(range(10))
