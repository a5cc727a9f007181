"""Guided distillation (stage 1), progressive distillation and the students' samplers, checked
against exact answers on 2-D Gaussian mixtures."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.denoisers import as_batch_times
from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.data.toys import ring8, toy_sampler
from fewstep.denoisers import ClassifierFreeGuidance
from fewstep.distill import (GuidedDistillLoss, NetX0, ProgressiveLoss, ddim_jump, null_labels, progressive_target,
                             sample_student, student_grid, with_w_input)
from fewstep.nets import MLP, UNet
from fewstep.schedules import CosineVP
from fewstep.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _exact import ExactNet  # noqa: E402

SCHEDULE = CosineVP()
SPEC = ring8(labelling="coarse")  # 2 classes of 4 modes: guidance has a real effect
GMM = GaussianMixture(**SPEC)


pytestmark = pytest.mark.usefixtures("one_thread")


def ExactTeacher(gmm=GMM):  # noqa: N802 - the mixture's exact class-conditional denoiser; class 2 = null
    return ExactNet(gmm, SCHEDULE, null_class=2)


def _noisy_batch(n, seed, t_lo=0.05):
    g = torch.Generator().manual_seed(seed)
    x0, y = GMM.sample(n, g)
    t = t_lo + torch.rand(n, dtype=torch.float64, generator=g) * (SCHEDULE.t_max - t_lo)
    eps = torch.randn(n, 2, generator=g)
    a, s = SCHEDULE.alpha(t)[:, None].float(), SCHEDULE.sigma(t)[:, None].float()
    return a * x0 + s * eps, t, y


def _rms(d):
    return d.pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("make", [lambda: MLP(dim=2, hidden=32, depth=2, num_classes=2),
                                  lambda: UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(),
                                               image_size=8, num_classes=3)])
def test_w_student_equals_the_teacher_at_initialisation(make):
    torch.manual_seed(0)
    teacher = make()
    for p in teacher.parameters():  # the zero-initialised output layers would hide a difference
        nn.init.normal_(p, std=0.2)
    student = with_w_input(teacher)
    shape = (5, 2) if isinstance(teacher, MLP) else (5, 1, 8, 8)
    x, t, labels = torch.randn(shape), torch.rand(5), torch.tensor([0, 1, 1, 0, 2])
    ref = teacher(x, t, labels)
    assert ref.abs().mean() > 1e-3
    for w in (0.0, 1.0, 4.0, torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])):
        assert torch.equal(student(x, t, labels, w), ref)
    # and the w branch is trainable: its last layer gets a gradient
    student(x, t, labels, 2.0).pow(2).sum().backward()
    assert student.w_embed.mlp[-1].weight.grad.abs().sum() > 0


def test_stage1_student_learns_the_guided_teacher_for_every_w(tmp_path):
    torch.manual_seed(0)
    teacher = ExactTeacher()
    student = with_w_input(MLP(dim=2, hidden=128, depth=3, num_classes=2))
    loss = GuidedDistillLoss(teacher, SCHEDULE, "x0", student_prediction="v", w_min=0.0, w_max=4.0, null_class=2)
    result = train(loss, student, toy_sampler(SPEC), steps=600, out_dir=tmp_path, lr=2e-3, batch_size=256,
                   warmup=20, ema_decay=0.98, ckpt_every_minutes=None, progress=False)
    x_t, t, y = _noisy_batch(2000, seed=1)
    guided = lambda x, t, y, w: ClassifierFreeGuidance(NetX0(teacher, SCHEDULE, "x0"), w, null_labels(2))(  # noqa: E731
        x, t, labels=y)
    cond_only = NetX0(teacher, SCHEDULE, "x0")(x_t, t, y)
    for w in (0.0, 1.0, 2.0, 4.0):
        with torch.no_grad():
            target = guided(x_t, t, y, w)
            got = NetX0(result.ema, SCHEDULE, "v")(x_t, t, y, torch.full((2000,), w))
        err = _rms(got - target)
        # measured 0.12 / 0.10 / 0.13 / 0.28 at w = 0 / 1 / 2 / 4 (targets have RMS 1.6-2.0);
        # a student that ignored w would be 0 / 0.26 / 0.53 / 1.06 off
        assert err < (0.2 if w <= 2 else 0.4), (w, err)
        if w >= 2.0:
            assert err < 0.6 * _rms(cond_only - target), (w, err, _rms(cond_only - target))


def test_progressive_target_reproduces_two_teacher_ddim_steps_exactly():
    teacher = ExactTeacher()
    loss = ProgressiveLoss(teacher, SCHEDULE, 4, "x0", w_range=None)
    x_t, _, y = _noisy_batch(64, seed=2)
    i = torch.randint(1, 5, (64,), generator=torch.Generator().manual_seed(3))
    t, t_mid, t_next = loss.step_times(i)
    grid = student_grid(SCHEDULE, 4).flip(0)
    assert torch.equal(t, grid[i]) and torch.equal(t_next, grid[i - 1])
    x_two = loss.two_teacher_steps(x_t.double(), t, t_mid, t_next, y, None)
    target = progressive_target(x_t.double(), x_two, SCHEDULE, t, t_next)
    one = ddim_jump(x_t.double(), target, SCHEDULE, t, t_next)
    assert (one - x_two).abs().max() < 1e-9
    # and it is not trivially the teacher's own one-step prediction
    direct = ddim_jump(x_t.double(), teacher(x_t.double(), t, y), SCHEDULE, t, t_next)
    assert (direct - x_two).abs().max() > 1e-2


def test_one_round_makes_a_one_step_student_match_two_teacher_steps(tmp_path):
    torch.manual_seed(0)
    teacher = ExactTeacher()
    student = MLP(dim=2, hidden=128, depth=3, num_classes=2)
    loss = ProgressiveLoss(teacher, SCHEDULE, 1, "x0", student_prediction="x0", w_range=None)
    result = train(loss, student, toy_sampler(SPEC), steps=800, out_dir=tmp_path, lr=2e-3, batch_size=256,
                   warmup=20, ema_decay=0.98, ckpt_every_minutes=None, progress=False)
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (2000,), generator=g)
    x_T = torch.randn(2000, 2, generator=g)
    cond = {"labels": y}
    den_teacher = lambda x, t, labels: teacher(x, as_batch_times(t, x), labels)  # noqa: E731
    two = sample_student(den_teacher, x_T, SCHEDULE, 2, cond=cond).x
    den_student = lambda x, t, labels: result.ema(x, as_batch_times(t, x), labels)  # noqa: E731
    one = sample_student(den_student, x_T, SCHEDULE, 1, cond=cond).x
    err = _rms(one - two)
    assert err < 0.05, err  # measured 0.006; the two-step outputs have RMS ~1.5


def test_stochastic_sampler_without_noise_is_the_deterministic_one():
    teacher = ExactTeacher()
    den = lambda x, t, labels: teacher(x, as_batch_times(t, x), labels)  # noqa: E731
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    cond = {"labels": torch.randint(0, 2, (50,))}
    det = sample_student(den, x_T, SCHEDULE, 6, cond=cond)
    off = sample_student(den, x_T, SCHEDULE, 6, cond=cond, stochastic=0.0)
    on = sample_student(den, x_T, SCHEDULE, 6, cond=cond, stochastic=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(det.x, off.x) and det.nfe == off.nfe == on.nfe == 6
    assert (on.x - det.x).abs().max() > 1e-2  # the noise is really there
    with pytest.raises(ValueError, match="churn"):
        sample_student(den, x_T, SCHEDULE, 6, cond=cond, stochastic=1.5)


def test_stochastic_sampler_keeps_the_right_marginal_on_a_gaussian():
    """With an ideal student (its DDIM jump lands exactly on the probability-flow solution), every
    grid point of the stochastic sampler has the true marginal variance alpha^2 s^2 + sigma^2."""
    std, steps, n = 0.5, 6, 20000
    grid = student_grid(SCHEDULE, steps)
    jump_to = {float(grid[i]): float(grid[min(i + 2, steps)]) for i in range(steps)}
    jump_to[float(grid[steps - 1])] = 0.0  # the last step is deterministic, to 0

    def ideal(x, t, **cond):  # x0 whose DDIM step from t reaches the exact flow at the sampler's target
        t0 = float(t) if torch.as_tensor(t).ndim == 0 else float(t[0])
        u = torch.full((x.shape[0],), jump_to[t0], dtype=torch.float64)
        tt = torch.full((x.shape[0],), t0, dtype=torch.float64)
        x_u = single_gaussian_flow(0.0, std, SCHEDULE, x.double(), tt, u)
        return progressive_target(x.double(), x_u, SCHEDULE, tt, u).to(x.dtype)

    seen = {}
    cb = lambda info: seen.__setitem__(info["t"], info["x"].double().var().item())  # noqa: E731
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0)).double()
    x_T *= torch.sqrt(SCHEDULE.alpha(grid[0]) ** 2 * std ** 2 + SCHEDULE.sigma(grid[0]) ** 2)
    out = sample_student(ideal, x_T, SCHEDULE, steps, stochastic=True, callback=cb,
                         generator=torch.Generator().manual_seed(1))
    for t, var in seen.items():
        tt = torch.tensor(t, dtype=torch.float64)
        expected = (SCHEDULE.alpha(tt) ** 2 * std ** 2 + SCHEDULE.sigma(tt) ** 2).item()
        assert abs(var / expected - 1) < 0.05, (t, var, expected)  # MC error of a variance: ~1% at n = 20k
    assert abs(out.x.var().item() / std ** 2 - 1) < 0.05
    assert len(seen) == steps


def _tiny_cond_unet():
    from diffusers import UNet2DConditionModel
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                    attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def test_diffusers_unet_runs_stage1_and_a_resumable_progressive_round(tmp_path):
    """A tiny random UNet2DConditionModel: its guidance-embedding student (time_cond_proj_dim) starts
    equal to it, runs stage-1 and progressive steps, and a resumed round equals an uninterrupted one."""
    from fewstep.diffusers import DiffusersNet
    from fewstep.schedules import DiscreteVP
    schedule = DiscreteVP.from_name("linear", 1000)
    context = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))  # 3 classes + the null context
    teacher = DiffusersNet(_tiny_cond_unet(), schedule, label_context=context, null_class=3)
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.05)
    student = with_w_input(teacher)
    assert student.use_w and not teacher.use_w and student.null_class == 3
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.4, 0.7, 1.0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = teacher(x, t, y)
        assert torch.allclose(student(x, t, y, torch.tensor([0.0, 1.0, 2.0, 4.0])), ref, atol=1e-6)
    data = (torch.randn(16, 1, 8, 8).clamp(-1, 1), torch.randint(0, 3, (16,)))
    opts = dict(batch_size=4, lr=1e-3, ckpt_every_minutes=None, progress=False, ema_decay=0.9)
    r1 = train(GuidedDistillLoss(teacher, schedule, "eps", null_class=3), student, data, steps=2,
               out_dir=tmp_path / "s1", **opts)
    assert r1.step == 2 and r1.model.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # w is being learnt

    def round_run(out, steps, **kw):
        torch.manual_seed(0)
        import copy
        loss = ProgressiveLoss(r1.ema, schedule, 2, "eps")
        return train(loss, copy.deepcopy(r1.ema).requires_grad_(True), data, steps=steps, out_dir=out,
                     ckpt_every_steps=2, **{**opts, **kw})
    full = round_run(tmp_path / "full", 4)
    round_run(tmp_path / "part", 2)
    resumed = round_run(tmp_path / "part", 4)
    assert resumed.resumed_from == 2 and resumed.steps_run == 2
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_encoder_round_makes_a_one_step_encoder_match_two_teacher_inversion_steps(tmp_path):
    from fewstep.distill import encode_student
    torch.manual_seed(0)
    teacher = ExactTeacher()
    student = MLP(dim=2, hidden=128, depth=3, num_classes=2)
    # eps or v output: the model's error reaches x0 scaled by sigma_t, so the inversion step stays
    # well-conditioned near t_min (an x0 output would be amplified by sigma_next / sigma_t ~ 600 there)
    loss = ProgressiveLoss(teacher, SCHEDULE, 1, "x0", student_prediction="v", w_range=None, direction="encode")
    result = train(loss, student, toy_sampler(SPEC), steps=800, out_dir=tmp_path, lr=2e-3, batch_size=256,
                   warmup=20, ema_decay=0.98, ckpt_every_minutes=None, progress=False)
    x0, y = GMM.sample(2000, torch.Generator().manual_seed(5))
    cond = {"labels": y}
    den_teacher = lambda x, t, labels: teacher(x, as_batch_times(t, x), labels)  # noqa: E731
    den_student = lambda x, t, labels: NetX0(result.ema, SCHEDULE, "v")(x, as_batch_times(t, x), labels)  # noqa: E731
    two = encode_student(den_teacher, x0, SCHEDULE, 2, cond=cond).x
    one = encode_student(den_student, x0, SCHEDULE, 1, cond=cond).x
    teacher_one = encode_student(den_teacher, x0, SCHEDULE, 1, cond=cond).x
    err = _rms(one - two)
    assert err < 0.3 * _rms(teacher_one - two), (err, _rms(teacher_one - two))


# -- stage 1's target and both objectives' weights against closed forms --------------------------------

def _cosine_snr(t):
    """alpha^2 / sigma^2 of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), written out."""
    import math
    s = 0.008
    a2 = (torch.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
    return a2 / (1 - a2)


class _GuidedOracle(nn.Module):
    """A w-input 'student' that outputs the exact guided x0 of the labelled mixture,
    (1 + w) E[x0 | x_t, y] - w E[x0 | x_t] (Meng et al. 2022, eq. 6 in x0 form), plus ``offset``."""
    use_w = True

    def __init__(self, offset=0.0):
        super().__init__()
        self.d, self.offset, self.seen = GMM.denoiser(SCHEDULE), offset, []

    def forward(self, x, t, labels, w):
        self.seen.append(t.clone())
        w = w.double()[:, None]
        exact = (1 + w) * self.d(x.double(), t, labels) - w * self.d(x.double(), t, None)
        return (exact + self.offset).to(x.dtype)


def test_stage1_target_is_the_exact_guided_denoiser():
    loss = GuidedDistillLoss(ExactTeacher(), SCHEDULE, "x0", w_min=0.5, w_max=4.0, null_class=2)
    batch = GMM.sample(512, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    exact = loss(_GuidedOracle(), batch)
    assert exact.max() < 1e-6, exact.max()  # zero up to float32 round-off
    torch.manual_seed(1)
    unguided = loss(lambda x, t, labels: GMM.denoiser(SCHEDULE)(x, t, labels), batch)  # the conditional model
    assert unguided.mean() > 0.05, unguided.mean()


def test_stage1_weight_is_the_truncated_snr():
    """Loss = max(SNR(t), 1) * mean_CHW (x0_student - x_w)^2 (Salimans & Ho 2022, Sec. 4): a student off
    by a constant 0.1 has loss 0.01 max(SNR, 1) at its own t."""
    loss = GuidedDistillLoss(ExactTeacher(), SCHEDULE, "x0", null_class=2)
    student = _GuidedOracle(offset=0.1)
    torch.manual_seed(2)
    got = loss(student, GMM.sample(512, torch.Generator().manual_seed(0)))
    snr = _cosine_snr(student.seen[0])
    assert (snr > 2).any() and (snr < 0.5).any()  # both sides of the truncation are tested
    assert torch.allclose(got.double(), 0.01 * snr.clamp_min(1.0), rtol=1e-3)


def test_progressive_weight_is_the_truncated_snr():
    """The per-sample weight, isolated by a second difference that cancels the target:
    L(f + c) + L(f - c) - 2 L(f) = 2 c^2 w(t) for every student f (same noise, times and w)."""
    loss = ProgressiveLoss(ExactTeacher(), SCHEDULE, 4, "x0", w_range=None)
    batch = GMM.sample(256, torch.Generator().manual_seed(0))
    seen, c = [], 0.1

    def student(offset):
        def f(x, t, labels=None):
            seen.append(t.clone())
            return 0.3 * x + offset
        return f
    parts = []
    for offset in (c, -c, 0.0):
        torch.manual_seed(3)
        parts.append(loss(student(offset), batch).double())
    weight = (parts[0] + parts[1] - 2 * parts[2]) / (2 * c * c)
    t = seen[0]
    assert torch.equal(seen[1], t) and set(torch.round(t / SCHEDULE.t_max * 4).tolist()) == {1.0, 2.0, 3.0, 4.0}
    snr = _cosine_snr(t)
    assert (snr > 2).any() and (snr < 0.5).any()
    assert torch.allclose(weight, snr.clamp_min(1.0), rtol=1e-3)


def test_classifier_free_guidance_takes_one_weight_per_sample():
    teacher = ExactTeacher()
    x, t, y = _noisy_batch(6, seed=4)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    got = ClassifierFreeGuidance(teacher, w, null_labels(2))(x, t, labels=y)
    d = GMM.denoiser(SCHEDULE)
    expected = (1 + w[:, None]) * d(x, t, y) - w[:, None] * d(x, t, None)
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="null_class"):
        GuidedDistillLoss(lambda x, t, labels=None: x, SCHEDULE, "x0")  # no null class anywhere
