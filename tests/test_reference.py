"""The one reference ODE solve (fewstep.reference) against closed forms where tune and the solvers'
bench use it: whole recorded trajectories (sampling and encoding), a batch whose rows have
different classes, classifier-free guidance, the half-precision-input path of tuning; and `rmse`.

Closed form used: for data N(m, diag(s^2)) the probability-flow ODE keeps
z = (x_t - alpha_t m) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant (``single_gaussian_flow``), and
the exact denoiser is m + alpha s^2 (x - alpha m) / (alpha^2 s^2 + sigma^2), which is affine in m
with a slope independent of m. So classifier-free guidance between N(m_c, s^2) and N(m_u, s^2)
(same s) is exactly the denoiser of N((1 + w) m_c - w m_u, s^2).
"""
import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.denoisers import ClassifierFreeGuidance, CountingDenoiser
from fewstep.reference import reference_path, reference_solution, rmse
from fewstep.schedules import EDM, CosineVP, LinearVP, RectifiedFlow
from fewstep.tune import reference_trajectory

F64 = torch.float64
D = 5
G = torch.Generator().manual_seed(31)
MU = torch.randn(D, generator=G, dtype=F64)
STD = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0], dtype=F64)


def _exact_x0(mu, std, schedule, x, t):
    """E[x0 | x_t = x] for N(mu, diag(std^2)), written out (independent of fewstep's GaussianMixture)."""
    tt = torch.tensor(float(t), dtype=F64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    return mu + a * std ** 2 * (x - a * mu) / (a ** 2 * std ** 2 + s ** 2)


def _lam(schedule, t):
    return float(schedule.lambda_(torch.tensor(float(t), dtype=F64)))


@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP(), EDM(), RectifiedFlow()], ids=lambda s: type(s).__name__)
def test_recorded_sampling_path_is_the_exact_flow_at_every_recorded_time(schedule):
    den = CountingDenoiser(GaussianMixture(MU[None], STD[None]).denoiser(schedule))
    x_T = torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=F64) * float(
        schedule.sigma(torch.tensor(schedule.t_max, dtype=F64)))
    path = reference_path(den, schedule, x_T, schedule.t_max, 0.0, steps=128, every=16)
    assert den.nfe == 4 * 128 + 1  # RK4 stages plus the final denoising call
    assert len(path.times) == len(path.xs) == len(path.x0s) == 9
    assert path.times[0] == schedule.t_max and path.times[-1] == schedule.t_min
    lams = torch.tensor([_lam(schedule, t) for t in path.times], dtype=F64)
    assert torch.allclose(lams.diff(), lams.diff()[:1].expand(8), rtol=1e-9)  # uniform in log-SNR
    for t, x, x0 in zip(path.times.tolist(), path.xs, path.x0s):
        exact = single_gaussian_flow(MU, STD, schedule, x_T, schedule.t_max, t)
        assert (x - exact).abs().max() < 1e-5 * (1 + exact.abs().max()), t  # measured <= 5e-6 (RF at t_min)
        assert (x0 - _exact_x0(MU, STD, schedule, x, t)).abs().max() < 1e-10  # x0 recorded at the recorded x
    end = single_gaussian_flow(MU, STD, schedule, x_T, schedule.t_max, schedule.t_min)
    assert (path.x - _exact_x0(MU, STD, schedule, end, schedule.t_min)).abs().max() < 5e-5  # measured <= 1.8e-5
    assert torch.equal(path.x, path.x0s[-1])


def test_recorded_encoding_path_runs_up_the_exact_flow():
    s = CosineVP()
    den = GaussianMixture(MU[None], STD[None]).denoiser(s)
    x_start = MU + STD * torch.randn(4, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_start = single_gaussian_flow(MU, STD, s, x_start, 0.0, 0.05)  # data moved to t = 0.05
    path = reference_path(den, s, x_start, 0.05, 0.9, steps=64, every=16)
    assert path.times.tolist()[0] == 0.05 and path.times.tolist()[-1] == 0.9
    assert (path.times.diff() > 0).all()
    for t, x in zip(path.times.tolist(), path.xs):
        assert (x - single_gaussian_flow(MU, STD, s, x_start, 0.05, t)).abs().max() < 2e-6, t  # measured <= 4e-7
    assert torch.equal(path.x, path.xs[-1])  # no denoising at a t_to > 0


def _guided_setup(schedule, w):
    """Three classes N(m_c, s^2) with one isotropic s, and the null class 3: N(m_u, s^2)."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, D, generator=g, dtype=F64) * 2
    s = 0.3
    cond_gmm = GaussianMixture(means[:3], torch.full((3,), s, dtype=F64), labels=torch.arange(3))
    null_gmm = GaussianMixture(means[3:], torch.full((1,), s, dtype=F64))
    d_cond, d_null = cond_gmm.denoiser(schedule), null_gmm.denoiser(schedule)
    rows = []

    def net(x, t, labels):  # one batched call: rows with the null class get the unconditional model
        rows.append(x.shape[0])
        out = torch.empty_like(x)
        null = labels == 3
        t = torch.as_tensor(t, dtype=F64).expand(x.shape[0])
        if null.any():
            out[null] = d_null(x[null], t[null]).to(x.dtype)
        if (~null).any():
            out[~null] = d_cond(x[~null], t[~null], labels[~null]).to(x.dtype)
        return out

    den = ClassifierFreeGuidance(net, w, lambda c: {"labels": torch.full_like(c["labels"], 3)})
    guided_means = (1 + w) * means[:3] - w * means[3]
    return den, guided_means, s, rows


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_guided_batch_of_mixed_classes_matches_the_guided_gaussian_flow(w):
    s = LinearVP()
    den, gm, std, rows = _guided_setup(s, w)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    x_T = torch.randn(6, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    x, err = reference_solution(den, s, x_T, s.t_max, 0.0, steps=128, cond={"labels": labels})
    assert all(r == (12 if w else 6) for r in rows)  # cond and uncond halves in one call per stage
    for i, c in enumerate(labels.tolist()):
        xi = single_gaussian_flow(gm[c], std, s, x_T[i:i + 1], s.t_max, s.t_min)
        exact = _exact_x0(gm[c], torch.tensor(std, dtype=F64), s, xi, s.t_min)
        assert (x[i] - exact[0]).abs().max() < 1e-6, (i, c)
    assert err < 1e-4
    # the guided answer really differs from the unguided one (the test would notice guidance being dropped)
    if w:
        unguided = _guided_setup(s, 0.0)[1][labels[0]]
        plain = single_gaussian_flow(unguided, std, s, x_T[:1], s.t_max, s.t_min)
        assert (plain[0] - x[0]).abs().max() > 0.1


def test_tuning_reference_is_the_verified_solve_and_matches_the_closed_form_from_float32():
    """tune.reference_trajectory (which the solvers' bench also uses) is this module's solve: on float32
    calibration noise with guidance it equals reference_path exactly and the closed form to float32 round-off."""
    s = CosineVP()
    den, gm, std, _ = _guided_setup(s, 1.5)
    labels = torch.tensor([1, 0, 2, 1])
    x_T = torch.randn(4, D, generator=torch.Generator().manual_seed(5))  # float32, as calibration_set makes
    traj = reference_trajectory(den, s, x_T, {"labels": labels}, steps=128, candidates=8)
    path = reference_path(den, s, x_T, s.t_max, 0.0, steps=128, every=16, cond={"labels": labels})
    assert torch.equal(traj.final, path.x) and torch.equal(traj.times, path.times)
    assert all(torch.equal(a, b.float()) for a, b in zip(traj.xs, path.xs))
    assert traj.model_calls == (4 * 128 + 1) + (4 * 64 + 1)
    for i, c in enumerate(labels.tolist()):
        xi = single_gaussian_flow(gm[c], std, s, x_T[i:i + 1].double(), s.t_max, s.t_min)
        exact = _exact_x0(gm[c], torch.tensor(std, dtype=F64), s, xi, s.t_min)
        assert (traj.final[i] - exact[0]).abs().max() < 2e-5  # measured 6.5e-6 (float32 inputs add ~3e-7)
    half = reference_path(den, s, x_T, s.t_max, 0.0, steps=64, cond={"labels": labels}).x
    assert traj.error["rmse"] == pytest.approx(float((path.x - half).pow(2).mean().sqrt()), rel=1e-12)


def test_rmse_is_the_root_mean_square_over_all_values_in_float64():
    a = torch.zeros(2, 2)
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert rmse(a, b) == pytest.approx(math.sqrt((9 + 16) / 4), rel=1e-15)
    # float32 inputs are subtracted in float64: 1 + 2^-23 vs 1 differ by exactly 2^-23
    assert rmse(torch.tensor([1.0 + 2 ** -23]), torch.tensor([1.0], dtype=F64)) == 2 ** -23
    with pytest.raises(ValueError, match="one shape"):
        rmse(torch.zeros(3), torch.zeros(1, 3))


def test_reference_path_refuses_a_bad_every():
    s = LinearVP()
    den = GaussianMixture(MU[None], STD[None]).denoiser(s)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        reference_path(den, s, torch.zeros(1, D, dtype=F64), 1.0, 0.0, steps=4, every=0)
