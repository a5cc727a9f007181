"""The test bed with exact answers: Gaussian-mixture and empirical denoisers, the closed-form
single-Gaussian flow and the independent reference ODE solve."""
import math

import pytest
import torch

from fewstep.data.empirical import EmpiricalDistribution
from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.reference import reference_solution
from fewstep.schedules import EDM, CosineVP, DiscreteVP, LinearVP, RectifiedFlow

F64 = torch.float64


def alpha_sigma(schedule, t):
    tt = torch.tensor(t, dtype=F64)
    return float(schedule.alpha(tt)), float(schedule.sigma(tt))


def mixture_1d():
    return GaussianMixture(torch.tensor([[-2.0], [0.5], [3.0]]), torch.tensor([0.3, 1.0, 0.1]),
                           weights=torch.tensor([0.2, 0.5, 0.3]), labels=torch.tensor([0, 1, 0]))


def mixture_2d():
    means = torch.tensor([[-2.0, 1.0], [0.5, -1.5], [3.0, 3.0], [0.0, 0.0]])
    stds = torch.tensor([[0.3, 0.8], [1.0, 0.2], [0.1, 0.1], [0.5, 0.5]])
    return GaussianMixture(means, stds, weights=torch.tensor([1.0, 2.0, 1.0, 0.5]), labels=torch.tensor([0, 1, 0, 2]))


# -- Gaussian mixture: the exact denoiser ----------------------------------------

@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_gmm_denoiser_matches_quadrature_posterior_mean_1d(t):
    # E[x0 | x_t] = int x0 p(x0) N(x_t; alpha x0, sigma^2) dx0 / int p(x0) N(x_t; alpha x0, sigma^2) dx0
    s = LinearVP()
    gmm = mixture_1d()
    alpha, sigma = alpha_sigma(s, t)
    x_t = torch.tensor([-3.0, -0.7, 0.0, 0.4, 1.9, 2.8, 5.0], dtype=F64)
    x0 = torch.linspace(-8, 8, 400001, dtype=F64)
    log_post = gmm.log_prob(x0[:, None])[None, :] - (x_t[:, None] - alpha * x0[None, :]) ** 2 / (2 * sigma ** 2)
    w = torch.softmax(log_post, dim=1)
    expected = (w * x0[None, :]).sum(1)
    got = gmm.denoiser(s)(x_t[:, None], t)[:, 0]
    assert (got - expected).abs().max() < 1e-8


@pytest.mark.parametrize("schedule,t", [(LinearVP(), 0.2), (EDM(), 3.0), (RectifiedFlow(), 0.6),
                                        (DiscreteVP.from_name("scaled_linear", beta_start=0.00085, beta_end=0.012),
                                         0.5)])
def test_gmm_denoiser_is_tweedie_of_the_marginal_2d(schedule, t):
    # Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha
    gmm = mixture_2d()
    alpha, sigma = alpha_sigma(schedule, t)
    x = (torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2.5).requires_grad_(True)
    score, = torch.autograd.grad(gmm.marginal(schedule, t).log_prob(x).sum(), x)
    tweedie = (x + sigma ** 2 * score) / alpha
    got = gmm.denoiser(schedule)(x.detach(), t)
    assert (got - tweedie).abs().max() < 1e-10


def test_gmm_denoiser_matches_monte_carlo_posterior_mean():
    # self-normalised importance sampling with the prior as proposal: an independent, noisy estimate
    s, t = CosineVP(), 0.5
    gmm = mixture_2d()
    x0, _ = gmm.sample(400_000, generator=torch.Generator().manual_seed(1))
    x0 = x0.to(F64)
    alpha, sigma = alpha_sigma(s, t)
    x_t = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.0, 0.5]], dtype=F64)
    logw = -((x_t[:, None, :] - alpha * x0[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    mc = torch.softmax(logw, dim=1) @ x0
    assert (gmm.denoiser(s)(x_t, t) - mc).abs().max() < 0.02


def test_gmm_conditional_denoiser_is_the_class_submixture():
    s, t = LinearVP(), 0.4
    gmm = mixture_2d()
    class0 = GaussianMixture(gmm.means[[0, 2]], gmm.stds[[0, 2]], gmm.weights[[0, 2]])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    cond = gmm.denoiser(s)(x, t, labels=0)
    assert (cond - class0.denoiser(s)(x, t)).abs().max() < 1e-12
    assert (cond - gmm.denoiser(s)(x, t)).abs().max() > 0.1  # conditioning changes the answer


def test_gmm_unconditional_is_class_posterior_mixture_of_conditionals():
    # E[x0 | x] = sum_c p(c | x) E[x0 | x, c], with p(c | x) from the noised marginal's class densities
    s, t = EDM(), 1.5
    gmm = mixture_2d()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    marg = gmm.marginal(s, t)
    classes = [0, 1, 2]
    prior = torch.stack([gmm.weights[gmm.labels == c].sum() for c in classes])
    log_pc = torch.stack([marg.log_prob(x, labels=c) for c in classes], 1) + prior.log()
    pc = torch.softmax(log_pc, dim=1)
    conds = torch.stack([gmm.denoiser(s)(x, t, labels=c) for c in classes], 1)
    assert ((pc[:, :, None] * conds).sum(1) - gmm.denoiser(s)(x, t)).abs().max() < 1e-12


def test_gmm_per_sample_labels_and_times():
    s = LinearVP()
    gmm = mixture_2d()
    D = gmm.denoiser(s)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=F64)
    y = torch.tensor([0, 1, 2, 0])
    batched = D(x, t, labels=y)
    one_by_one = torch.cat([D(x[i:i + 1], float(t[i]), labels=int(y[i])) for i in range(4)])
    assert torch.equal(batched, one_by_one)


@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP(), EDM(), RectifiedFlow(), DiscreteVP.from_name("linear")],
                         ids=lambda s: type(s).__name__)
def test_gmm_denoiser_at_t_zero_returns_x(schedule):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mixture_2d().denoiser(schedule)(x, 0.0), x)


def test_gmm_denoiser_at_huge_noise_returns_the_data_mean():
    gmm = mixture_2d()
    s = EDM(sigma_max=1e8)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * 1e8
    out = gmm.denoiser(s)(x, 1e8)
    assert torch.isfinite(out).all()
    assert (out - gmm.weights @ gmm.means).abs().max() < 1e-6
    vp = LinearVP(beta_max=200.0)  # alpha(1) ~ e^-50, sigma(1) = 1
    out = gmm.denoiser(vp)((x / 1e8).float(), 1.0)
    assert out.dtype == torch.float32 and (out.double() - gmm.weights @ gmm.means).abs().max() < 1e-6


def test_gmm_denoiser_images_dtype_and_shape():
    d = 2 * 3 * 3
    gmm = GaussianMixture(torch.randn(5, d, generator=torch.Generator().manual_seed(7)), torch.rand(5, d) + 0.1)
    s = LinearVP()
    x = torch.randn(6, 2, 3, 3, dtype=torch.float32)
    out = gmm.denoiser(s)(x, torch.tensor(0.5))
    assert out.shape == x.shape and out.dtype == torch.float32
    flat = gmm.denoiser(s)(x.reshape(6, d).double(), 0.5)
    assert (out.reshape(6, d).double() - flat).abs().max() < 1e-6
    assert gmm.denoiser(s)(x.to(torch.bfloat16), 0.5).dtype == torch.bfloat16


def test_gmm_log_prob_is_a_normalised_density():
    gmm = mixture_1d()
    x = torch.linspace(-10, 10, 200001, dtype=F64)
    p = gmm.log_prob(x[:, None]).exp()
    assert abs(float(torch.trapezoid(p, x)) - 1.0) < 1e-9
    # against torch.distributions in 2-D
    g2 = mixture_2d()
    y = torch.randn(10, 2, dtype=F64)
    comps = torch.distributions.Independent(torch.distributions.Normal(g2.means, g2.stds), 1)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(g2.weights), comps).log_prob(y)
    assert (g2.log_prob(y) - ref).abs().max() < 1e-12


def test_gmm_sample_moments_labels_and_seed():
    gmm = mixture_2d()
    x, y = gmm.sample(200_000, generator=torch.Generator().manual_seed(8))
    assert x.dtype == torch.float32 and x.shape == (200_000, 2)
    mean = gmm.weights @ gmm.means
    second = gmm.weights @ (gmm.means ** 2 + gmm.stds ** 2)
    assert (x.double().mean(0) - mean).abs().max() < 0.02
    assert (x.double().pow(2).mean(0) - second).abs().max() < 0.05
    class_freq = torch.bincount(y, minlength=3).double() / len(y)
    assert (class_freq - torch.tensor([2.0, 2.0, 0.5], dtype=F64) / 4.5).abs().max() < 0.01
    xc, yc = gmm.sample(1000, generator=torch.Generator().manual_seed(9), labels=2)
    assert (yc == 2).all() and (xc.double() - gmm.means[3]).abs().max() < 2.5  # 5 stds of the one class-2 component
    a, _ = gmm.sample(10, generator=torch.Generator().manual_seed(10))
    b, _ = gmm.sample(10, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b)


def test_gmm_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\)"):
        GaussianMixture(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"stds must have shape \(2,\) or \(2, 3\)"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="weights must be finite, non-negative"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), weights=torch.tensor([1.0, -1.0]))
    gmm = mixture_2d()
    D = gmm.denoiser(LinearVP())
    with pytest.raises(ValueError, match=r"labels \[7\] are not classes"):
        D(torch.zeros(2, 2), 0.5, labels=7)
    with pytest.raises(ValueError, match="no class labels"):
        GaussianMixture(torch.zeros(1, 2), torch.ones(1)).denoiser(LinearVP())(torch.zeros(2, 2), 0.5, labels=0)
    with pytest.raises(ValueError, match=r"2 values per sample; got shape \(2, 3\)"):
        D(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1.0\]"):
        D(torch.zeros(2, 2), 1.5)
    with pytest.raises(ValueError, match=r"shape \(2,\) to match the batch"):
        D(torch.zeros(2, 2), torch.tensor([0.1, 0.2, 0.3]))


# -- empirical distribution ------------------------------------------------------

def brute_force_empirical(points, x, alpha, sigma):
    d2 = ((x[:, None, :] - alpha * points[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=1) @ points


def test_empirical_with_one_point_returns_it():
    p = torch.tensor([[[0.25, -1.0], [2.0, 0.5]]])
    D = EmpiricalDistribution(p).denoiser(LinearVP())
    x = torch.randn(5, 2, 2)
    for t in (0.0, 0.01, 0.5, 1.0):
        assert torch.equal(D(x, t), p.expand(5, 2, 2))


@pytest.mark.parametrize("t", [0.02, 0.1, 0.4, 0.99])
def test_empirical_matches_brute_force_softmax_across_chunks(t):
    g = torch.Generator().manual_seed(11)
    pts = torch.randn(37, 6, generator=g, dtype=F64)
    s = CosineVP()
    alpha, sigma = alpha_sigma(s, t)
    x = alpha * pts[torch.randint(0, 37, (9,), generator=g)] + sigma * torch.randn(9, 6, generator=g, dtype=F64)
    expected = brute_force_empirical(pts, x, alpha, sigma)
    for chunk in (1, 5, 37, 1000):
        got = EmpiricalDistribution(pts, chunk_size=chunk).denoiser(s)(x, t)
        assert (got - expected).abs().max() < 1e-10, chunk


def test_empirical_agrees_with_gmm_of_tiny_stds():
    pts = torch.randn(6, 3, generator=torch.Generator().manual_seed(12), dtype=F64)
    gmm = GaussianMixture(pts, torch.full((6,), 1e-4))
    s = EDM()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(13), dtype=F64)
    for t in (0.3, 1.0, 10.0):
        diff = EmpiricalDistribution(pts).denoiser(s)(x, t) - gmm.denoiser(s)(x, t)
        assert diff.abs().max() < 1e-6


def test_empirical_conditional_and_nearest_point_at_t_zero():
    g = torch.Generator().manual_seed(14)
    pts = torch.randn(20, 4, generator=g, dtype=F64)
    labels = torch.arange(20) % 3
    emp = EmpiricalDistribution(pts, labels, chunk_size=6)
    s, t = LinearVP(), 0.3
    alpha, sigma = alpha_sigma(s, t)
    x = torch.randn(8, 4, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    got = emp.denoiser(s)(x, t, labels=y)
    for i in range(8):
        members = pts[labels == y[i]]
        assert (got[i] - brute_force_empirical(members, x[i:i + 1], alpha, sigma)[0]).abs().max() < 1e-10
    near = emp.denoiser(s)(x, 0.0)
    assert torch.equal(near, pts[torch.cdist(x, pts).argmin(1)])
    near_c = emp.denoiser(s)(x, 0.0, labels=1)
    members = pts[labels == 1]
    assert torch.equal(near_c, members[torch.cdist(x, members).argmin(1)])
    with pytest.raises(ValueError, match=r"labels \[5\] are not classes"):
        emp.denoiser(s)(x, t, labels=5)


def test_empirical_mnist_sized_batch_is_finite_and_float32():
    pts = torch.rand(5000, 1, 28, 28, generator=torch.Generator().manual_seed(15)) * 2 - 1
    emp = EmpiricalDistribution(pts, torch.arange(5000) % 10)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(16))
    out = emp.denoiser(DiscreteVP.from_name("linear"))(x, 0.05, labels=torch.arange(64) % 10)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    x0, y = emp.sample(3, generator=torch.Generator().manual_seed(17), labels=4)
    assert x0.shape == (3, 1, 28, 28) and (y == 4).all()


# -- the closed-form flow and the reference solver --------------------------------

MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
STD = torch.tensor([0.3, 1.0, 0.5], dtype=F64)


def noise_at(schedule, t, n=4, seed=18):
    eps = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    tt = torch.tensor(t, dtype=F64)
    return schedule.alpha(tt) * (MU + STD * eps) + schedule.sigma(tt) * eps


def test_single_gaussian_flow_keeps_z_and_round_trips():
    s = LinearVP()
    x_T = noise_at(s, 1.0)
    x_mid = single_gaussian_flow(MU, STD, s, x_T, 1.0, 0.3)

    def z(x, t):
        alpha, sigma = alpha_sigma(s, t)
        return (x - alpha * MU) / torch.sqrt(alpha ** 2 * STD ** 2 + sigma ** 2)

    assert (z(x_mid, 0.3) - z(x_T, 1.0)).abs().max() < 1e-12
    assert (single_gaussian_flow(MU, STD, s, x_mid, 0.3, 1.0) - x_T).abs().max() < 1e-12
    x0 = single_gaussian_flow(MU, STD, s, x_T, 1.0, 0.0)
    assert (x0 - (MU + STD * z(x_T, 1.0))).abs().max() < 1e-12


@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP(), EDM(), RectifiedFlow(),
                                      DiscreteVP.from_name("squaredcos_cap_v2")], ids=lambda s: type(s).__name__)
def test_reference_solution_matches_single_gaussian_flow(schedule):
    gmm = GaussianMixture(MU[None], STD[None])
    x_T = noise_at(schedule, schedule.t_max)
    x, err = reference_solution(gmm.denoiser(schedule), schedule, x_T, schedule.t_max, schedule.t_min,
                                steps=128, denoise=False)
    exact = single_gaussian_flow(MU, STD, schedule, x_T, schedule.t_max, schedule.t_min)
    assert (x - exact).abs().max() < 1e-6
    assert (x - exact).abs().max() <= err  # the N-vs-2N estimate bounds the true error


def test_reference_error_estimate_shrinks_at_fourth_order():
    s = EDM()
    gmm = GaussianMixture(MU[None], STD[None])
    x_T = noise_at(s, s.t_max)
    exact = single_gaussian_flow(MU, STD, s, x_T, s.t_max, 1.0)
    errs, true = [], []
    for steps in (4, 8, 16):
        x, e = reference_solution(gmm.denoiser(s), s, x_T, s.t_max, 1.0, steps=steps)
        errs.append(e)
        true.append(float((x - exact).abs().max()))
    for a, b in zip(errs, errs[1:]):
        assert 8 < a / b < 32, errs  # RK4: ratio 16 per halving of the step
    assert all(t < e for t, e in zip(true, errs))


def test_reference_to_zero_is_ode_to_t_min_then_denoise():
    s = LinearVP()
    gmm = mixture_2d()
    D = gmm.denoiser(s)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(19), dtype=F64)
    to_zero, e0 = reference_solution(D, s, x_T, 1.0, 0.0, steps=32)
    explicit, e1 = reference_solution(D, s, x_T, 1.0, s.t_min, steps=32, denoise=True)
    assert torch.equal(to_zero, explicit) and e0 == e1
    ode, _ = reference_solution(D, s, x_T, 1.0, s.t_min, steps=32)
    assert torch.equal(D(ode, s.t_min), to_zero)
    # for one Gaussian: exact flow to t_min, then the exact denoiser
    one = GaussianMixture(MU[None], STD[None])
    x3 = noise_at(s, 1.0)
    ref, _ = reference_solution(one.denoiser(s), s, x3, 1.0, 0.0, steps=128)
    exact = one.denoiser(s)(single_gaussian_flow(MU, STD, s, x3, 1.0, s.t_min), s.t_min)
    assert (ref - exact).abs().max() < 1e-6


def test_reference_encodes_and_decodes_back():
    s = RectifiedFlow()
    gmm = mixture_2d()
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(20), dtype=F64)
    x_mid, _ = reference_solution(gmm.denoiser(s), s, x_T, 0.9, 0.2, steps=128)
    back, _ = reference_solution(gmm.denoiser(s), s, x_mid, 0.2, 0.9, steps=128)
    assert (back - x_T).abs().max() < 1e-6


def test_reference_passes_cond_and_keeps_dtype():
    s = LinearVP()
    gmm = mixture_2d()
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(21))
    x, _ = reference_solution(gmm.denoiser(s), s, x_T, 1.0, 0.0, steps=16, cond={"labels": 2})
    assert x.dtype == torch.float32
    assert (x.double() - gmm.means[3]).norm(dim=1).max() < 2.5  # class 2 is one component near (0, 0)


def test_reference_tol_doubles_steps_until_met_or_raises():
    s = EDM()
    gmm = GaussianMixture(MU[None], STD[None])
    x_T = noise_at(s, s.t_max)
    _, err = reference_solution(gmm.denoiser(s), s, x_T, s.t_max, 1.0, steps=4, tol=1e-7)
    assert err <= 1e-7
    with pytest.raises(RuntimeError, match="did not converge.*raise max_steps"):
        reference_solution(gmm.denoiser(s), s, x_T, s.t_max, 1.0, steps=4, tol=1e-12, max_steps=32)


def test_reference_errors_say_what_is_wrong():
    s = LinearVP()
    D = mixture_2d().denoiser(s)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="t_from must be > 0"):
        reference_solution(D, s, x, 0.0, 0.5)
    with pytest.raises(ValueError, match="pass denoise=True"):
        reference_solution(D, s, x, 1.0, 0.0, denoise=False)
    with pytest.raises(ValueError, match="must lie in"):
        reference_solution(D, s, x, 2.0, 0.5)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        reference_solution(D, s, x, 1.0, 0.5, steps=0)
    with pytest.raises(FloatingPointError, match="NaN or inf at t ="):
        reference_solution(lambda x, t: x * math.nan, s, x, 1.0, 0.5, steps=2)
    with pytest.raises(ValueError, match="nothing to solve"):
        reference_solution(D, s, x, 0.5, 0.5)
