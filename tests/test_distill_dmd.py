"""Distribution Matching Distillation: the gradient against exact scores, a 2-D run that keeps
every mode, the regression-set cache, and exact resume of a two-network run."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.data.gmm import GaussianMixture
from fewstep.data.toys import ring8, toy_sampler
from fewstep.distill.dmd import DMDLoss, FakeScore, dm_gradient, dm_loss, generator_sample, regression_distance
from fewstep.distill.pairs import DMDData, regression_pairs
from fewstep.losses import DenoisingLoss
from fewstep.nets import MLP
from fewstep.sampling import sample
from fewstep.schedules import CosineVP
from fewstep.train import latest_checkpoint, train

sys.path.insert(0, str(Path(__file__).parent))
from _exact import ExactNet  # noqa: E402

SCHEDULE = CosineVP()
SPEC = ring8()
GMM = GaussianMixture(**SPEC)


pytestmark = pytest.mark.usefixtures("one_thread")


def Exact(gmm=GMM):  # noqa: N802 - a mixture's exact (unconditional) denoiser as an x0-prediction net
    return ExactNet(gmm, SCHEDULE, conditional=False)


def _score(gmm, x, t):
    """grad_x log p_t(x) of the mixture's marginal at time t, by autograd (independent of the denoiser)."""
    x = x.detach().double().requires_grad_(True)
    gmm.marginal(SCHEDULE, t).log_prob(x).sum().backward()
    return x.grad


def test_dm_gradient_is_the_score_difference_on_exact_mixtures():
    fake_gmm = GaussianMixture(SPEC["means"] * 0.7 + 0.3, SPEC["stds"] * 2)  # a wrong "generator" distribution
    g = torch.Generator().manual_seed(0)
    x = GMM.sample(256, g)[0].double() * 1.1
    for t in (0.2, 0.5, 0.8):
        tt = torch.full((256,), t, dtype=torch.float64)
        a, s = SCHEDULE.alpha(tt)[:, None], SCHEDULE.sigma(tt)[:, None]
        x_t = a * x + s * torch.randn(256, 2, generator=g, dtype=torch.float64)
        x0_real, x0_fake = Exact(GMM)(x_t, tt), Exact(fake_gmm)(x_t, tt)
        grad = dm_gradient(x, x0_real, x0_fake)
        # DMD eq. 7: s_fake - s_real, here through Tweedie x0 = (x_t + sigma^2 s) / alpha
        score_diff = _score(fake_gmm, x_t, t) - _score(GMM, x_t, t)
        norm = (x - x0_real).abs().mean(1, keepdim=True)
        expected = (s ** 2 / a) * score_diff / norm
        assert torch.allclose(grad.double(), expected, rtol=1e-4, atol=1e-5), t
        assert grad.abs().max() > 1e-2
        assert dm_gradient(x, x0_real, x0_real).abs().max() == 0  # same scores: no gradient
    # the surrogate loss's gradient w.r.t. x is grad / (C H W) (here D = 2)
    xg = x.float().clone().requires_grad_(True)
    dm_loss(xg, grad).sum().backward()
    assert torch.allclose(xg.grad, grad / 2, atol=1e-6)
    # the normaliser is guarded: x equal to the real prediction gives a finite gradient
    assert torch.isfinite(dm_gradient(x, x, x0_fake)).all()


def test_regression_distances():
    a, b = torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    assert torch.allclose(regression_distance("l2", a, b), torch.ones(3))
    assert torch.allclose(regression_distance("pseudo_huber", a, b), torch.full((3,), (1 + 0.03 ** 2) ** 0.5 - 0.03))
    with pytest.raises(ValueError, match="LPIPS"):
        regression_distance("lpips", a, b)
    with pytest.raises(ValueError, match="unknown regression distance"):
        regression_distance("l1", a, b)


def _toy_teacher(tmp_path):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=128, depth=3, num_classes=0)
    return train(DenoisingLoss(SCHEDULE, "x0", label_dropout=0), net, toy_sampler(SPEC, labelled=False), steps=1200,
                 out_dir=tmp_path / "teacher", lr=2e-3, batch_size=256, warmup=50, ema_decay=0.99,
                 ckpt_every_minutes=None, progress=False).ema


def _toy_pairs(n=2000):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g)
    sigma_max = float(SCHEDULE.sigma(torch.tensor(SCHEDULE.t_max)))
    x_ref = sample(Exact(), z * sigma_max, SCHEDULE, solver="dpmpp_2m", steps=40).x
    return {"z": z, "labels": torch.zeros(n, dtype=torch.long), "x_ref": x_ref}


def _modes(x):
    d = torch.cdist(x.double(), SPEC["means"])
    near = d.min(1).values < 0.5
    return torch.bincount(d.argmin(1)[near], minlength=8), near.float().mean().item()


def _dmd_run(teacher, pairs, out, steps, **kw):
    torch.manual_seed(0)
    gen = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = FakeScore(copy.deepcopy(teacher).requires_grad_(True).train())
    loss = DMDLoss(Exact(), SCHEDULE, "x0", **kw)
    res = train(loss, {"generator": gen, "fake": fake}, DMDData(pairs), steps=steps, out_dir=out,
                lr={"generator": 1e-4, "fake": 1e-3}, batch_size=256, grad_clip=10.0,
                ema_decay={"generator": 0.0, "fake": 0.0}, ckpt_every_minutes=None, progress=False, log_every=20)
    return loss, res


def test_a_short_2d_run_with_regression_recovers_every_mode(tmp_path):
    teacher = _toy_teacher(tmp_path)
    loss, res = _dmd_run(teacher, _toy_pairs(), tmp_path / "dmd", 600, lambda_reg=0.25)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = generator_sample(loss.gen_x0(res.models["generator"]), z * SCHEDULE.sigma(loss.times[0]).float(), None,
                             SCHEDULE, loss.times)[1]
    counts, near = _modes(x)
    share = counts.float() / 4000
    assert (share > 0.06).all(), share  # every mode of 8 (1/8 = 0.125) is really there
    assert near > 0.5, near
    log = [json.loads(line) for line in (tmp_path / "dmd" / "log.jsonl").read_text().splitlines()]
    assert {"loss/generator", "loss/fake", "generator/dm", "generator/reg"} <= set(log[-1])


def test_the_fake_denoiser_learns_the_generator_distribution(tmp_path):
    """With the generator held fixed (a net far from the data), fake updates alone drive the fake
    denoiser's loss on the generator's samples well below the teacher's (its starting point)."""
    torch.manual_seed(0)
    teacher = _toy_teacher(tmp_path)
    gen = MLP(dim=2, hidden=32, depth=2, num_classes=0)
    for p in gen.parameters():
        nn.init.normal_(p, std=0.3)
    fake = FakeScore(copy.deepcopy(teacher).requires_grad_(True).train())
    loss = DMDLoss(Exact(), SCHEDULE, "x0")
    loss.phases = lambda step: ["fake"]
    res = train(loss, {"generator": gen, "fake": fake}, DMDData(_toy_pairs(256)), steps=300,
                out_dir=tmp_path / "fake", lr=1e-3, batch_size=256, ema_decay=0.0, ckpt_every_minutes=None,
                progress=False, log_every=20)
    assert torch.equal(res.models["generator"].state_dict()["inp.weight"], gen.state_dict()["inp.weight"])
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4000, 2, generator=g)
    with torch.no_grad():
        x = loss.generated(gen, z, None)
        t = torch.rand(4000, dtype=torch.float64, generator=g) * SCHEDULE.t_max
        x_t = SCHEDULE.alpha(t)[:, None].float() * x + SCHEDULE.sigma(t)[:, None].float() * torch.randn(4000, 2, generator=g)
        trained = (res.models["fake"](x_t, t) - x).pow(2).sum(1).mean().item()
        start = (teacher(x_t, t) - x).pow(2).sum(1).mean().item()
    assert trained < 0.5 * start, (trained, start)
    log = [json.loads(line)["loss/fake"] for line in (tmp_path / "fake" / "log.jsonl").read_text().splitlines()]
    assert log[-1] < 0.5 * log[0], log


def test_two_network_run_resumes_exactly(tmp_path):
    teacher = MLP(dim=2, hidden=32, depth=2, num_classes=0)
    pairs = {"z": torch.randn(64, 2), "labels": torch.zeros(64, dtype=torch.long), "x_ref": torch.randn(64, 2)}
    kw = dict(lambda_reg=0.25, fake_updates=2)
    _, full = _dmd_run(teacher, pairs, tmp_path / "full", 30, **kw)

    class Crash(Exception):
        pass

    def crash_at_25(loss_obj):
        orig = loss_obj.phases

        def phases(step):
            if step == 25:
                raise Crash()
            return orig(step)
        loss_obj.phases = phases

    torch.manual_seed(0)
    gen = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = FakeScore(copy.deepcopy(teacher).requires_grad_(True).train())
    loss = DMDLoss(Exact(), SCHEDULE, "x0", **kw)
    crash_at_25(loss)
    with pytest.raises(Crash):
        train(loss, {"generator": gen, "fake": fake}, DMDData(pairs), steps=30, out_dir=tmp_path / "killed",
              lr={"generator": 1e-4, "fake": 1e-3}, batch_size=256, grad_clip=10.0,
              ema_decay={"generator": 0.0, "fake": 0.0}, ckpt_every_steps=10, progress=False, log_every=20)
    assert latest_checkpoint(tmp_path / "killed").name == "ckpt-00000020"
    _, resumed = _dmd_run(teacher, pairs, tmp_path / "killed", 30, **kw)
    assert resumed.resumed_from == 20 and resumed.steps_run == 10
    for name in ("generator", "fake"):
        for a, b in zip(full.models[name].state_dict().values(), resumed.models[name].state_dict().values()):
            assert torch.equal(a, b), name
    names = {p.name for p in latest_checkpoint(tmp_path / "killed").iterdir()}
    assert {"generator.safetensors", "generator.ema.safetensors", "generator.optimizer.safetensors",
            "fake.safetensors", "fake.optimizer.safetensors"} <= names


def test_fake_warmup_trains_the_fake_score_alone_first(tmp_path):
    """fake_warmup=K: the first K steps update only the fake score (the generator keeps its starting weights),
    then the generator updates every fake_updates steps counted from K."""
    loss = DMDLoss(Exact(), SCHEDULE, "x0", fake_updates=2, fake_warmup=3)
    assert [s for s in range(10) if "generator" in loss.phases(s)] == [3, 5, 7, 9]
    assert all("fake" in loss.phases(s) for s in range(10))
    teacher = _toy_teacher(tmp_path)
    start = copy.deepcopy(teacher).state_dict()
    _, res = _dmd_run(teacher, _toy_pairs(), tmp_path / "warm", 5, lambda_reg=0.25, fake_warmup=5)
    assert all(torch.equal(a, b) for a, b in zip(res.models["generator"].state_dict().values(), start.values()))
    assert any(not torch.equal(a, b) for a, b in zip(res.models["fake"].net.state_dict().values(), start.values()))
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="fake_warmup must be an integer"):
            DMDLoss(Exact(), SCHEDULE, "x0", fake_warmup=bad)


def test_update_ratio_and_guards():
    loss = DMDLoss(Exact(), SCHEDULE, "x0", fake_updates=5)
    assert [p for s in range(10) for p in loss.phases(s)].count("generator") == 2
    assert [p for s in range(10) for p in loss.phases(s)].count("fake") == 10
    with pytest.raises(ValueError, match="fake_updates"):
        DMDLoss(Exact(), SCHEDULE, "x0", fake_updates=0)
    with pytest.raises(ValueError, match="lpips"):
        DMDLoss(Exact(), SCHEDULE, "x0", distance="lpips")
    with pytest.raises(ValueError, match="lambda_reg=0"):
        DMDLoss(Exact(), SCHEDULE, "x0", gen_steps=4)
    with pytest.raises(ValueError, match="GAN head"):
        FakeScore(MLP(dim=2), gan_head=True)


def _tiny_model():
    from fewstep.api import DiffusionModel
    from fewstep.nets import UNet
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), image_size=8, num_classes=3)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    cfg = {"schedule": SCHEDULE.config(), "prediction": "v", "num_classes": 3, "null_class": 3,
           "image_shape": [1, 8, 8]}
    return DiffusionModel(net.eval(), cfg)


def test_regression_set_is_deterministic_cached_and_rebuilt_when_bad(tmp_path, capsys):
    model = _tiny_model()
    kw = dict(n=6, steps=3, w=1.0, seed=7, batch_size=4)
    a = regression_pairs(model, tmp_path / "a.safetensors", **kw)
    b = regression_pairs(model, tmp_path / "b.safetensors", **kw)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.isfinite(a["x_ref"]).all() and a["x_ref"].std() > 0
    capsys.readouterr()
    again = regression_pairs(model, tmp_path / "a.safetensors", **kw)  # reused: nothing is built
    assert "building" not in capsys.readouterr().err and torch.equal(again["x_ref"], a["x_ref"])
    other = regression_pairs(model, tmp_path / "a.safetensors", **{**kw, "steps": 4})
    assert "other settings (steps)" in capsys.readouterr().err and not torch.equal(other["x_ref"], a["x_ref"])
    path = tmp_path / "a.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    rebuilt = regression_pairs(model, path, **{**kw, "steps": 4})
    assert "unreadable" in capsys.readouterr().err and torch.equal(rebuilt["x_ref"], other["x_ref"])


def test_multi_step_generator_with_backward_simulation(tmp_path):
    """DMD2's 4-step generator: its training input at step j > 0 comes from its own rollout
    (re-noised x0 of the previous step), and the sampler spends one call per step."""
    teacher = MLP(dim=2, hidden=32, depth=2, num_classes=0)
    loss = DMDLoss(Exact(), SCHEDULE, "x0", gen_steps=4, lambda_reg=0.0, fake_updates=5)
    assert torch.allclose(loss.times, SCHEDULE.t_max * torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    seen = []

    class Spy(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, labels=None):
            seen.append(float(t[0]))
            return self.net(x, t, labels)
    gen = Spy(teacher)
    torch.manual_seed(3)
    for _ in range(8):
        seen.clear()
        loss.generated(gen, torch.randn(4, 2), None)
        j = len(seen) - 1  # rollout calls (no gradient) then the trained call at times[j]
        assert seen == [pytest.approx(float(t)) for t in loss.times[: j + 1]]
    pairs = {"z": torch.randn(16, 2), "labels": torch.zeros(16, dtype=torch.long), "x_ref": torch.zeros(16, 2)}
    res = train(loss, {"generator": copy.deepcopy(teacher), "fake": FakeScore(copy.deepcopy(teacher))},
                DMDData(pairs), steps=10, out_dir=tmp_path, batch_size=8, lr=1e-3, ckpt_every_minutes=None,
                progress=False, ema_decay=0.0, log_every=5)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert res.step == 10 and "loss/generator" in log[-1] and "generator/reg" not in log[-1]
    x0 = generator_sample(loss.gen_x0(res.models["generator"]), torch.randn(5, 2), None, SCHEDULE, loss.times)[1]
    assert x0.shape == (5, 2) and torch.isfinite(x0).all()


def test_diffusers_unet_runs_generator_and_fake_steps(tmp_path):
    from diffusers import UNet2DConditionModel

    from fewstep.diffusers import DiffusersNet
    from fewstep.schedules import DiscreteVP
    schedule = DiscreteVP.from_name("linear", 1000)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    context = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    teacher = DiffusersNet(unet, schedule, label_context=context)
    gen = copy.deepcopy(teacher).requires_grad_(True)
    fake = FakeScore(copy.deepcopy(teacher).requires_grad_(True))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    fake_before = {k: v.clone() for k, v in fake.state_dict().items()}
    pairs = {"z": torch.randn(8, 1, 8, 8), "labels": torch.randint(0, 2, (8,)), "x_ref": torch.randn(8, 1, 8, 8)}
    loss = DMDLoss(teacher, schedule, "eps", real_w=1.0, null_class=2)
    res = train(loss, {"generator": gen, "fake": fake}, DMDData(pairs), steps=1, out_dir=tmp_path, batch_size=4,
                lr=1e-3, ckpt_every_minutes=None, progress=False, ema_decay=0.0)
    assert res.step == 1
    moved = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert moved(before, res.models["generator"].state_dict())
    assert moved(fake_before, res.models["fake"].state_dict())
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert all(torch.isfinite(torch.tensor(log[k])) for k in ("loss/generator", "loss/fake", "generator/dm"))


# -- DMD2's GAN: guards, losses and which network each loss reaches ---------------------------------

def _tiny_unet(seed=0):
    from fewstep.nets import UNet
    torch.manual_seed(seed)
    net = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(), image_size=8, num_classes=3)
    for p in net.parameters():  # zero-initialised output layers would hide gradients
        nn.init.normal_(p, std=0.05)
    return net


def _gan_batch(b=4):
    g = torch.Generator().manual_seed(0)
    return {"z": torch.randn(b, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (b,), generator=g),
            "x_ref": torch.randn(b, 1, 8, 8, generator=g), "x_real": torch.randn(b, 1, 8, 8, generator=g).clamp(-1, 1),
            "labels_real": torch.randint(0, 3, (b,), generator=g)}


def test_gan_settings_that_cannot_train_are_refused_before_step_one(tmp_path):
    with pytest.raises(ValueError, match="gan_weight_d > 0"):  # a head nobody trains
        DMDLoss(Exact(), SCHEDULE, "x0", gan_weight_g=0.1, gan_weight_d=0.0)
    teacher = _tiny_unet()
    loss = DMDLoss(teacher, SCHEDULE, "v", gan_weight_g=0.1, gan_weight_d=0.1, lambda_reg=0.0, null_class=3)
    models = {"generator": copy.deepcopy(teacher), "fake": FakeScore(copy.deepcopy(teacher))}  # no head
    calls = []
    loss.phases = lambda step: calls.append(step) or ["generator"]
    with pytest.raises(ValueError, match="FakeScore\\(net, gan_head=True\\)"):
        train(loss, models, DMDData({k: v for k, v in _gan_batch().items() if k in ("z", "labels", "x_ref")}),
              steps=1, out_dir=tmp_path, batch_size=2, progress=False, ckpt_every_minutes=None)
    assert calls == []  # refused before the first step


def _loss_parts(loss_obj, fn, gen, fake, batch, seed=0):
    torch.manual_seed(seed)
    return fn(gen, fake, batch)


def test_gan_losses_are_the_softplus_terms_of_the_head_logits():
    """DMD2 eq. 5 (non-saturating): head loss softplus(-D(real)) + softplus(D(fake)), generator loss
    softplus(-D(G(z))); each term isolated as the difference of the losses with and without the GAN."""
    teacher = _tiny_unet()
    gen, fake = copy.deepcopy(teacher), FakeScore(copy.deepcopy(teacher), gan_head=True)
    batch = _gan_batch()
    logits = []
    fake.head.register_forward_hook(lambda m, i, out: logits.append(out.detach().double()))
    with_gan = DMDLoss(teacher, SCHEDULE, "v", lambda_reg=0.0, gan_weight_g=0.3, gan_weight_d=0.7, null_class=3)
    plain = DMDLoss(teacher, SCHEDULE, "v", lambda_reg=0.0, null_class=3)
    softplus = lambda v: torch.log1p(torch.exp(v))  # noqa: E731 - log(1 + e^v), written out

    d_head = _loss_parts(with_gan, with_gan.fake_loss, gen, fake, batch) - \
        _loss_parts(plain, plain.fake_loss, gen, fake, batch)
    real_logits, fake_logits = logits
    assert real_logits.abs().max() > 1e-3 and (real_logits - fake_logits).abs().max() > 1e-4
    assert torch.allclose(d_head.double(), 0.7 * (softplus(-real_logits) + softplus(fake_logits)), atol=1e-5)
    logits.clear()
    d_gen = _loss_parts(with_gan, with_gan.generator_loss, gen, fake, batch) - \
        _loss_parts(plain, plain.generator_loss, gen, fake, batch)
    (g_logits,) = logits
    assert torch.allclose(d_gen.double(), 0.3 * softplus(-g_logits), atol=1e-5)


def test_generator_gan_loss_reaches_the_generator_and_head_loss_reaches_the_head():
    teacher = _tiny_unet()
    gen, fake = copy.deepcopy(teacher), FakeScore(copy.deepcopy(teacher), gan_head=True)
    batch = _gan_batch()
    loss = DMDLoss(teacher, SCHEDULE, "v", lambda_reg=0.0, gan_weight_g=1.0, gan_weight_d=1.0, null_class=3)
    grads = lambda m: [p.grad for p in m.parameters()]  # noqa: E731

    torch.manual_seed(0)
    # the GAN term alone: with the DM term's gradient (of G's output) left out by zeroing it
    loss.real_and_fake_x0 = lambda f, x_t, t, labels: (x_t, x_t)
    loss.generator_loss(gen, fake, batch).sum().backward()
    assert all(g is None for g in grads(fake))  # the discriminator is not trained by G's loss
    assert sum(float(g.abs().sum()) for g in grads(gen) if g is not None) > 0
    gen.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    loss.fake_loss(gen, fake, batch).sum().backward()
    assert all(g is None for g in grads(gen))  # the head's loss sees generated images as constants
    assert sum(float(g.abs().sum()) for g in grads(fake.head)) > 0


# -- DMD2's multi-step generator: backward simulation re-noises the generator's own x0 ----------------

def test_backward_simulation_renoises_the_generators_own_prediction():
    """x at step i + 1 = alpha(t_{i+1}) x0_i + sigma(t_{i+1}) eps_i, with x0_i the generator's output at
    step i (DMD2 Sec. 4.5), both in the sampler and in the training input of DMDLoss.generated."""
    inputs, outputs = [], []

    def gen(x, t, labels=None):
        inputs.append((x.clone(), float(t[0])))
        out = 0.5 * x + 1.0 + t[:, None].float()  # a made-up x0 prediction, different at every step
        outputs.append(out.clone())
        return out
    loss = DMDLoss(Exact(), SCHEDULE, "x0", gen_steps=4, lambda_reg=0.0)
    eps = [torch.randn(6, 2, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    noise = iter(eps)
    z = torch.randn(6, 2)
    generator_sample(gen, z, None, SCHEDULE, loss.times, noise=lambda like: next(noise))
    assert len(inputs) == 4 and torch.equal(inputs[0][0], z)
    for i in range(3):
        t_next = loss.times[i + 1]
        expected = SCHEDULE.alpha(t_next).float() * outputs[i] + SCHEDULE.sigma(t_next).float() * eps[i]
        assert torch.allclose(inputs[i + 1][0], expected, atol=1e-6), i
    # in training: the input at the chosen step j is the same rollout, replayed here from the same seed
    js = set()
    for seed in range(8):
        torch.manual_seed(seed)
        j = int(torch.randint(0, 4, ()))
        x = z * SCHEDULE.sigma(loss.times[0]).float()
        for i in range(j):
            x0 = 0.5 * x + 1.0 + float(loss.times[i])
            a, s = SCHEDULE.alpha(loss.times[i + 1]).float(), SCHEDULE.sigma(loss.times[i + 1]).float()
            x = a * x0 + s * torch.randn(6, 2)
        inputs.clear()
        torch.manual_seed(seed)
        loss.generated(gen, z, None)
        assert len(inputs) == j + 1 and torch.allclose(inputs[-1][0], x, atol=1e-5), seed
        js.add(j)
    assert len(js) >= 3  # several rollout depths were checked


# -- prediction types, regression targets, the caller's teacher --------------------------------------

def test_flow_prediction_trains_the_generator_and_the_fake_denoiser(tmp_path):
    from fewstep.denoisers import to_x0
    from fewstep.losses import prediction_target
    from fewstep.schedules import RectifiedFlow
    sch = RectifiedFlow()
    x0, eps = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    u = prediction_target("flow", x0, eps, a, s)
    assert torch.allclose(u, eps - x0)  # rectified-flow velocity dx_t/dt = eps - x0
    assert torch.allclose(to_x0("flow", u, a * x0 + s * eps, a, s), x0)  # and the denoiser reads x0 back
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, num_classes=0)
    loss = DMDLoss(net, sch, "flow", lambda_reg=0.25)
    pairs = {"z": torch.randn(32, 2), "labels": torch.zeros(32, dtype=torch.long), "x_ref": torch.randn(32, 2)}
    res = train(loss, {"generator": copy.deepcopy(net), "fake": FakeScore(copy.deepcopy(net))}, DMDData(pairs),
                steps=3, out_dir=tmp_path, batch_size=8, lr=1e-3, ckpt_every_minutes=None, progress=False)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert res.step == 3 and all(torch.isfinite(torch.tensor(log[k])) for k in ("loss/generator", "loss/fake"))
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        DMDLoss(net, sch, "score")


def test_regression_targets_of_another_size_are_refused():
    loss = DMDLoss(Exact(), SCHEDULE, "x0", lambda_reg=0.25)
    gen = MLP(dim=2, hidden=16, depth=1, num_classes=0)
    batch = {"z": torch.randn(4, 2), "labels": torch.zeros(4, dtype=torch.long), "x_ref": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"x_ref have shape \(4, 3\) but the generator outputs \(4, 2\)"):
        loss.generator_loss(gen, FakeScore(copy.deepcopy(gen)), batch)


def test_the_callers_teacher_is_not_modified():
    from fewstep.distill import GuidedDistillLoss, ProgressiveLoss
    teacher = MLP(dim=2, hidden=16, depth=1, num_classes=2)
    teacher.train()
    DMDLoss(teacher, SCHEDULE, "x0", real_w=1.0, null_class=2)
    guided = GuidedDistillLoss(teacher, SCHEDULE, "x0", null_class=2)
    ProgressiveLoss(teacher, SCHEDULE, 2, "x0", w_range=None)
    student = copy.deepcopy(teacher)  # e.g. the student of the next stage, copied after the loss was made
    assert all(p.requires_grad for p in student.parameters()) and all(p.requires_grad for p in teacher.parameters())
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(m.training))
    guided(student, (torch.randn(8, 2), torch.randint(0, 2, (8,)))).mean().backward()
    assert modes and not any(modes)  # the teacher runs in eval mode ...
    assert teacher.training and all(p.grad is None for p in teacher.parameters())  # ... and is left as it was


def test_regression_pairs_from_a_bare_net_and_a_denoiser(tmp_path):
    from fewstep.denoisers import ClassifierFreeGuidance, ModelDenoiser
    from fewstep.distill import null_labels
    from fewstep.distributed import sample_generators
    net = _tiny_unet()
    kw = dict(n=4, steps=3, seed=5, batch_size=3, schedule=SCHEDULE, image_shape=(1, 8, 8))
    a = regression_pairs(net, tmp_path / "net.safetensors", prediction="v", num_classes=3, null_class=3, w=1.5, **kw)
    # an independent oracle: the same seeds, the guided denoiser, fewstep.sample
    z = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in sample_generators(5, 0, 4)])
    den = ClassifierFreeGuidance(ModelDenoiser(lambda x, t, labels=None: net(x, t, labels), SCHEDULE, "v"), 1.5,
                                 null_labels(3))
    ref = sample(den, z * SCHEDULE.sigma(torch.tensor(SCHEDULE.t_max)).float(), SCHEDULE, solver="dpmpp_2m", steps=3,
                 cond={"labels": torch.arange(4) % 3}).x
    assert torch.equal(a["z"], z) and a["labels"].tolist() == [0, 1, 2, 0]
    assert torch.allclose(a["x_ref"], ref, atol=1e-6) and ref.std() > 0
    # a denoiser that always predicts x0 = 0.25: every ODE solver lands exactly on it
    b = regression_pairs(lambda x, t, labels=None: torch.full_like(x, 0.25), tmp_path / "den.safetensors",
                         teacher_id="quarter", **kw)
    assert torch.allclose(b["x_ref"], torch.full((4, 1, 8, 8), 0.25), atol=1e-6) and torch.equal(b["z"], z)
    with pytest.raises(ValueError, match="teacher_id="):
        regression_pairs(lambda x, t, labels=None: x, tmp_path / "c.safetensors", **kw)
    with pytest.raises(ValueError, match="prediction="):
        regression_pairs(net, tmp_path / "d.safetensors", **kw)


def test_without_a_fake_network_the_fake_x0_is_x_over_alpha_per_sample():
    """use_fake=False (the zero fake score): x0_fake = x_t / alpha(t), each sample at its own t, for
    image-shaped batches whose size differs from the channel count."""
    teacher = lambda x, t, labels=None: torch.zeros_like(x)  # noqa: E731 - an x0 net
    loss = DMDLoss(teacher, SCHEDULE, "x0", use_fake=False, null_class=None)
    x_t = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    _, x0_fake = loss.real_and_fake_x0(None, x_t, t, None)
    for i in range(5):
        assert torch.allclose(x0_fake[i], x_t[i] / float(SCHEDULE.alpha(t[i:i + 1])), rtol=1e-12)
