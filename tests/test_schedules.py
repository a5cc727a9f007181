"""Schedules and time grids: round trips, exact discrete values, grid shapes and errors."""
import math

import pytest
import torch

from fewstep.schedules import (
    EDM, SPACINGS, CosineVP, DiscreteVP, LinearVP, RectifiedFlow, betas_by_name, custom_grid,
    schedule_from_config, time_grid,
)

BETA_NAMES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def all_schedules():
    return ([DiscreteVP.from_name(n) for n in BETA_NAMES]
            + [LinearVP(), CosineVP(), EDM(), RectifiedFlow()])


SCHEDULES = all_schedules()
IDS = [f"{type(s).__name__}-{i}" for i, s in enumerate(SCHEDULES)]
VP_SCHEDULES = [s for s in SCHEDULES if isinstance(s, (DiscreteVP, LinearVP, CosineVP))]


def times(s, n=2001):
    return torch.linspace(s.t_min, s.t_max, n, dtype=torch.float64)


# -- alpha, sigma, lambda ------------------------------------------------------

@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_t_lambda_round_trip(s):
    t = times(s)
    lam = s.lambda_(t)
    assert lam.dtype == torch.float64
    assert (lam[1:] < lam[:-1]).all(), "lambda must decrease strictly with t"
    assert (s.t_of_lambda(lam) - t).abs().max() < 1e-10
    lam_grid = torch.linspace(float(lam[-1]), float(lam[0]), 501, dtype=torch.float64)
    assert (s.lambda_(s.t_of_lambda(lam_grid)) - lam_grid).abs().max() < 1e-9


@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_lambda_is_log_alpha_over_sigma(s):
    t = times(s, 101)
    assert torch.allclose(s.lambda_(t), torch.log(s.alpha(t) / s.sigma(t)), rtol=0, atol=1e-12)
    assert torch.allclose(s.edm_sigma(t), s.sigma(t) / s.alpha(t), rtol=1e-12, atol=0)


@pytest.mark.parametrize("s", VP_SCHEDULES, ids=[type(s).__name__ for s in VP_SCHEDULES])
def test_vp_alpha_sq_plus_sigma_sq_is_one(s):
    t = times(s)
    assert (s.alpha(t) ** 2 + s.sigma(t) ** 2 - 1).abs().max() < 1e-12


@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_t_zero_is_clean_data(s):
    t0 = torch.zeros(1, dtype=torch.float64)
    assert float(s.alpha(t0)) == 1.0
    assert float(s.sigma(t0)) == 0.0
    assert float(s.lambda_(t0)) == math.inf
    assert float(s.t_of_lambda(torch.tensor([math.inf], dtype=torch.float64))) == 0.0


def test_edm_and_rectified_flow_definitions():
    t = torch.tensor([0.002, 0.5, 1.0, 79.0], dtype=torch.float64)
    assert torch.equal(EDM().alpha(t), torch.ones(4, dtype=torch.float64))
    assert torch.equal(EDM().sigma(t), t)
    u = torch.tensor([0.001, 0.25, 0.5, 0.999], dtype=torch.float64)
    assert torch.allclose(RectifiedFlow().alpha(u), 1 - u, rtol=1e-15, atol=0)
    assert torch.equal(RectifiedFlow().sigma(u), u)


def test_linear_vp_matches_closed_form():
    # log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (Song et al. 2021)
    s = LinearVP(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.001, 0.3, 1.0], dtype=torch.float64)
    expected = torch.exp(-(19.9) * t ** 2 / 4 - 0.1 * t / 2)
    assert torch.allclose(s.alpha(t), expected, rtol=1e-14, atol=0)


# -- discrete schedules --------------------------------------------------------

@pytest.mark.parametrize("name", BETA_NAMES)
def test_discrete_vp_reproduces_alphas_cumprod_at_knots(name):
    s = DiscreteVP.from_name(name)
    expected = torch.cumprod(1 - betas_by_name(name), 0)
    t_n = (torch.arange(s.N, dtype=torch.float64) + 1) / s.N
    assert torch.allclose(s.alpha(t_n) ** 2, expected, rtol=1e-13, atol=0)
    assert torch.allclose(s.model_timestep(t_n), torch.arange(s.N, dtype=torch.float64), rtol=0, atol=1e-9)


def test_zero_snr_discrete_vp_values_at_knots_and_on_its_last_interval():
    from fewstep.schedules import ZeroSNRDiscreteVP, rescale_zero_terminal_snr
    betas = rescale_zero_terminal_snr(betas_by_name("scaled_linear", 1000, 0.00085, 0.012))
    ac = torch.cumprod(1 - betas, 0)
    s = ZeroSNRDiscreteVP(betas=betas)
    t_n = (torch.arange(s.N - 1, dtype=torch.float64) + 1) / s.N  # every knot with finite log-SNR
    assert torch.allclose(s.alpha(t_n) ** 2, ac[:-1], rtol=1e-12, atol=0)
    assert torch.allclose(s.sigma(t_n) ** 2, 1 - ac[:-1], rtol=1e-12, atol=0)
    assert float(s.alpha(torch.tensor(1.0, dtype=torch.float64))) == 0.0  # pure noise at the top
    last = torch.linspace(s.t_max, 1.0, 7, dtype=torch.float64)  # alpha falls linearly to 0 there
    expected = float(ac[-2].sqrt()) * (1.0 - last) / (1.0 - s.t_max)
    assert torch.allclose(s.alpha(last), expected, rtol=1e-12, atol=1e-15)
    t = torch.cat([torch.linspace(s.t_min, s.t_max, 501, dtype=torch.float64), last[1:-1]])
    assert torch.allclose(s.t_of_lambda(s.lambda_(t)), t, rtol=0, atol=1e-9)


def test_discrete_vp_from_alphas_cumprod_equals_from_betas():
    betas = betas_by_name("scaled_linear", 100, 0.00085, 0.012)
    a = DiscreteVP(betas=betas)
    b = DiscreteVP(alphas_cumprod=torch.cumprod(1 - betas, 0))
    t = torch.linspace(0.0, 1.0, 333, dtype=torch.float64)
    assert torch.equal(a.log_alpha(t), b.log_alpha(t))
    assert (a.t_min, a.t_max) == (0.01, 1.0)


def test_named_beta_schedules_match_diffusers_formulas():
    assert torch.allclose(betas_by_name("linear", 1000)[[0, -1]],
                          torch.tensor([1e-4, 0.02], dtype=torch.float64), rtol=0, atol=1e-15)
    sl = betas_by_name("scaled_linear", 1000, 0.00085, 0.012)
    assert torch.allclose(sl[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64), rtol=1e-12, atol=0)
    cos = betas_by_name("squaredcos_cap_v2", 1000)
    assert float(cos.max()) == 0.999 and float(cos[0]) < 1e-4


def test_discrete_vp_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVP()
    with pytest.raises(ValueError, match="betas must lie"):
        DiscreteVP(betas=torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteVP(alphas_cumprod=torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="unknown beta schedule 'cubic'"):
        betas_by_name("cubic")


@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_config_round_trip(s):
    t = times(s, 57)
    again = schedule_from_config(s.config())
    assert type(again) is type(s)
    assert torch.equal(again.lambda_(t), s.lambda_(t))


# -- time grids ----------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_grid_shapes_and_ends(s, spacing):
    for steps in (1, 2, 7):
        zero = time_grid(s, steps, spacing, final="zero")
        assert len(zero) == steps + 1 and zero[0] == s.t_max and zero[-1] == 0
        if steps > 1:  # 0 takes t_min's place: the last real point is above it (tests/test_defaults.py)
            assert zero[-2] > s.t_min
            given = time_grid(s, steps, spacing, t_min=s.t_min, final="zero")  # an explicit t_min is kept
            assert given[-2] == s.t_min and given[-1] == 0 and len(given) == steps + 1
        tmin = time_grid(s, steps, spacing, final="tmin")
        assert len(tmin) == steps + 1 and tmin[0] == s.t_max and tmin[-1] == s.t_min
        den = time_grid(s, steps, spacing, final="denoise")
        assert len(den) == steps + 2 and torch.equal(den[:-1], tmin) and den[-1] == 0
        for g in (zero, tmin, den):
            assert g.dtype == torch.float64
            assert (g[1:] < g[:-1]).all(), f"{spacing} grid not strictly decreasing: {g}"


@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_logsnr_grid_is_uniform_in_lambda(s):
    g = time_grid(s, 12, "logsnr", final="tmin")
    steps = s.lambda_(g).diff()
    assert (steps - steps.mean()).abs().max() < 1e-9
    assert steps.mean() > 0


@pytest.mark.parametrize("s", SCHEDULES, ids=IDS)
def test_karras_grid_is_uniform_in_edm_sigma_to_one_seventh(s):
    g = time_grid(s, 12, "karras", final="tmin")
    steps = (s.edm_sigma(g) ** (1 / 7)).diff()
    assert (steps - steps.mean()).abs().max() < 1e-9 * steps.abs().mean()


def test_time_uniform_and_quadratic_grids():
    s = LinearVP()
    g = time_grid(s, 4, "time_uniform", final="tmin")
    assert torch.allclose(g, torch.linspace(1.0, 1e-3, 5, dtype=torch.float64), rtol=0, atol=1e-15)
    q = time_grid(s, 4, "time_quadratic", final="tmin")
    assert torch.allclose(q.sqrt().diff(), torch.full((4,), (1e-3 ** 0.5 - 1) / 4, dtype=torch.float64),
                          rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
@pytest.mark.parametrize("final", ["zero", "tmin", "denoise"])
def test_cosine_schedule_with_karras_and_logsnr_grids(spacing, final):
    s = CosineVP()
    g = time_grid(s, 10, spacing, final=final)
    assert torch.isfinite(g).all()
    assert g[0] == s.t_max and (g[1:] < g[:-1]).all()


def test_grid_with_custom_ends():
    s = EDM()
    g = time_grid(s, 5, "karras", t_max=10.0, t_min=0.01, final="tmin")
    assert g[0] == 10.0 and g[-1] == 0.01


def test_custom_grid_accepts_valid_and_returns_float64():
    g = custom_grid(LinearVP(), [1.0, 0.5, 0.1, 0.0])
    assert g.dtype == torch.float64 and torch.equal(g, torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=torch.float64))


# -- errors --------------------------------------------------------------------

@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_steps_below_one_or_not_int_raise(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        time_grid(LinearVP(), steps)


def test_unknown_spacing_and_final_raise():
    with pytest.raises(ValueError, match="unknown spacing 'linear'.*logsnr"):
        time_grid(LinearVP(), 10, "linear")
    with pytest.raises(ValueError, match="final must be"):
        time_grid(LinearVP(), 10, final="end")


def test_times_outside_schedule_raise():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1.0\]"):
        time_grid(LinearVP(), 10, t_max=1.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 80.0\]"):
        custom_grid(EDM(), [100.0, 1.0])
    with pytest.raises(ValueError, match="must lie in"):
        custom_grid(LinearVP(), [0.5, -0.1])
    with pytest.raises(ValueError, match="NaN or inf"):
        custom_grid(LinearVP(), [0.5, float("nan")])
    with pytest.raises(ValueError, match="must be smaller than t_max"):
        time_grid(LinearVP(), 10, t_max=0.1, t_min=0.2)


def test_repeated_or_misordered_times_in_custom_grid_raise():
    with pytest.raises(ValueError, match=r"strictly decreasing.*t\[1\]=0.5 then t\[2\]=0.5"):
        custom_grid(LinearVP(), [1.0, 0.5, 0.5, 0.1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        custom_grid(LinearVP(), [0.1, 0.5])
    with pytest.raises(ValueError, match="at least two points"):
        custom_grid(LinearVP(), [0.5])
