"""Singlestep DPM-Solver placement: the official DPM-Solver code's output reproduced by an
independent implementation written here from the paper, fewstep's two placements, and parity
with diffusers' DPMSolverSinglestepScheduler where the two conventions agree.

Placements (``fewstep.solvers.dpm_solver.PLACEMENTS``), for a budget of ``steps`` model calls split
into per-step orders (DPM-Solver-fast, arXiv 2206.00927 Sec. 3.4):
  official          time_uniform / time_quadratic / karras: the step ends are the ``steps``-interval
                    grid of the spacing taken at the cumulative orders, and a step's inner points are
                    its own order-interval grid of the same spacing; logsnr: uniform outer steps in
                    lambda with uniform inner fractions.
  logsnr_fractions  one interval of the spacing per step, inner points at lambda fractions
                    1/2 (order 2) or 1/3, 2/3 (order 3).
"""
import math
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.data.gmm import GaussianMixture
from fewstep.schedules import DiscreteVP, LinearVP

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

F64 = torch.float64
B0, B1, T0 = 0.1, 20.0, 1e-3  # the official code's continuous linear VP (beta 0.1 -> 20) and eps = 1e-3


# -- an independent implementation of the official singlestep DPM-Solver -----------------------
# Written from arXiv 2206.00927 (Alg. 1, App. A/B eqs. for DPM-Solver-2/3, Sec. 3.4 for the
# "fast" orders, App. D for the linear-VP lambda inverse) and 2211.01095 (Alg. 1 for ++); it uses
# the paper's expm1 forms of the phi functions, not fewstep's weights, and nothing from fewstep
# except the exact mixture denoiser (the model).

def log_alpha(t):
    return -0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0


def alpha_sigma_lambda(t):
    la = log_alpha(t)
    sigma = math.sqrt(-math.expm1(2.0 * la))
    return math.exp(la), sigma, la - math.log(sigma)


def t_of_lambda(lam):  # App. D: closed-form inverse of lambda(t) for the linear schedule
    tmp = 2.0 * (B1 - B0) * math.log1p(math.exp(-2.0 * lam))
    return tmp / (math.sqrt(B0 ** 2 + tmp) + B0) / (B1 - B0)


def skip_times(kind, t_T, t_0, n):
    if kind == "logSNR":
        l_T, l_0 = alpha_sigma_lambda(t_T)[2], alpha_sigma_lambda(t_0)[2]
        return [t_of_lambda(l_T + (l_0 - l_T) * i / n) for i in range(n + 1)]
    if kind == "time_uniform":
        return [t_T + (t_0 - t_T) * i / n for i in range(n + 1)]
    assert kind == "time_quadratic"
    return [(math.sqrt(t_T) + (math.sqrt(t_0) - math.sqrt(t_T)) * i / n) ** 2 for i in range(n + 1)]


def official_orders(steps, order):
    """Sec. 3.4: K = steps // 3 + 1 steps of order 3 with a (2, 1), (1) or (2) tail; order 2 likewise."""
    if order == 3:
        k = steps // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def official_outer(kind, steps, orders):
    if kind == "logSNR":  # the official code keeps the paper's K uniform steps in lambda here
        return skip_times(kind, 1.0, T0, len(orders))
    fine = skip_times(kind, 1.0, T0, steps)
    cum = [0]
    for o in orders:
        cum.append(cum[-1] + o)
    return [fine[c] for c in cum]


def official_step(model, x, s, t, order, r1, r2, data):
    """One singlestep update of the given order from s to t ('dpmsolver' solver type)."""
    a_s, sg_s, l_s = alpha_sigma_lambda(s)
    a_t, sg_t, l_t = alpha_sigma_lambda(t)
    h = l_t - l_s

    def at_lambda(lam):
        u = t_of_lambda(lam)
        return (u, *alpha_sigma_lambda(u)[:2])

    m_s = model(x, s, data)
    if data:  # DPM-Solver++ (2211.01095): data prediction, phi's of -h
        p1 = math.expm1(-h)
        if order == 1:
            return sg_t / sg_s * x - a_t * p1 * m_s
        u1, a1, g1 = at_lambda(l_s + r1 * h)
        x1 = g1 / sg_s * x - a1 * math.expm1(-r1 * h) * m_s
        m1 = model(x1, u1, data)
        if order == 2:  # Alg. 1 of 2211.01095 with general r1
            return sg_t / sg_s * x - a_t * p1 * m_s - 0.5 / r1 * a_t * p1 * (m1 - m_s)
        u2, a2, g2 = at_lambda(l_s + r2 * h)
        p22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
        x2 = g2 / sg_s * x - a2 * math.expm1(-r2 * h) * m_s + r2 / r1 * a2 * p22 * (m1 - m_s)
        m2 = model(x2, u2, data)
        p2 = p1 / h + 1.0
        return sg_t / sg_s * x - a_t * p1 * m_s + 1.0 / r2 * a_t * p2 * (m2 - m_s)
    p1 = math.expm1(h)  # DPM-Solver (2206.00927): noise prediction, phi's of +h
    if order == 1:  # eq. (3.7), DDIM
        return a_t / a_s * x - sg_t * p1 * m_s
    u1, a1, g1 = at_lambda(l_s + r1 * h)
    x1 = a1 / a_s * x - g1 * math.expm1(r1 * h) * m_s
    m1 = model(x1, u1, data)
    if order == 2:  # Alg. 4 (DPM-Solver-2, general r1)
        return a_t / a_s * x - sg_t * p1 * m_s - 0.5 / r1 * sg_t * p1 * (m1 - m_s)
    u2, a2, g2 = at_lambda(l_s + r2 * h)
    p22 = math.expm1(r2 * h) / (r2 * h) - 1.0
    x2 = a2 / a_s * x - g2 * math.expm1(r2 * h) * m_s - r2 / r1 * g2 * p22 * (m1 - m_s)
    m2 = model(x2, u2, data)
    p2 = p1 / h - 1.0
    return a_t / a_s * x - sg_t * p1 * m_s - 1.0 / r2 * sg_t * p2 * (m2 - m_s)  # Alg. 5 (DPM-Solver-3)


def official_singlestep(model, x, steps, order, kind, data):
    orders = official_orders(steps, order)
    outer = official_outer(kind, steps, orders)
    calls = 0
    for o, s, t in zip(orders, outer[:-1], outer[1:]):
        inner = [alpha_sigma_lambda(u)[2] for u in skip_times(kind, s, t, o)]  # the step's own grid
        h = inner[-1] - inner[0]
        r1 = (inner[1] - inner[0]) / h if o > 1 else None
        r2 = (inner[2] - inner[0]) / h if o > 2 else None
        x = official_step(model, x, s, t, o, r1, r2, data)
        calls += o
    assert calls == steps
    return x


def mixture_problem():
    g = torch.Generator().manual_seed(3)
    gm = GaussianMixture(torch.randn(3, 16, generator=g, dtype=F64), torch.tensor([0.6, 0.9, 1.2], dtype=F64))
    return gm, torch.randn(4, 16, generator=g, dtype=F64)


def rel(a, b):
    """The largest per-sample relative L2 difference."""
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


SPACING = {"logSNR": "logsnr", "time_uniform": "time_uniform", "time_quadratic": "time_quadratic"}


@pytest.mark.parametrize("solver,order,data", [("dpm_solver_fast", 3, False), ("dpmpp_3s", 3, True),
                                               ("dpm_solver_2", 2, False)])
@pytest.mark.parametrize("kind", list(SPACING))
def test_official_placement_reproduces_the_official_dpm_solver(solver, order, data, kind):
    """placement="official" with final="tmin" (the official code without denoise_to_zero) equals the
    independent implementation above: budgets 10, 11, 12 cover the three order tails of Sec. 3.4."""
    sch = LinearVP(beta_min=B0, beta_max=B1, t_min=T0)
    gm, x_T = mixture_problem()
    den = gm.denoiser(sch)

    def model(x, t, want_data):
        x0 = den(x, t)
        if want_data:
            return x0
        a, s, _ = alpha_sigma_lambda(t)
        return (x - a * x0) / s

    for steps in (10, 11, 12):
        want = official_singlestep(model, x_T, steps, order, kind, data)
        got = fewstep.sample(den, x_T, sch, solver=solver, steps=steps, spacing=SPACING[kind], final="tmin",
                             placement="official")
        assert got.nfe == steps
        assert rel(got.x, want) < 1e-10, (steps, rel(got.x, want))  # float64: measured <= 1e-13
        other = fewstep.sample(den, x_T, sch, solver=solver, steps=steps, spacing=SPACING[kind], final="tmin",
                               placement="logsnr_fractions").x
        if kind == "logSNR":  # both placements are the paper's uniform lambda steps there
            assert rel(other, want) < 1e-10
        else:  # and elsewhere the comparison above can tell them apart
            assert rel(other, want) > 1e-3, rel(other, want)


# -- parity with diffusers' DPMSolverSinglestepScheduler -----------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
from test_parity_diffusers import REL_TOL, exact_model, mixture, relative, x_T  # noqa: E402


def _diffusers_singlestep(order, algorithm, steps, **kw):
    from diffusers import DPMSolverSinglestepScheduler
    sch = DPMSolverSinglestepScheduler(solver_order=order, algorithm_type=algorithm, lower_order_final=True, **kw)
    schedule = DiscreteVP(alphas_cumprod=sch.alphas_cumprod)
    model = exact_model(mixture(), schedule, "eps")
    sch.set_timesteps(steps)
    x = x_T()
    for t in sch.timesteps:
        x = sch.step(model(x, t), t, x).prev_sample
    return x, sch, schedule, model


@pytest.mark.filterwarnings("ignore:.*algorithm_type.*dpmsolver.*deprecated.*:FutureWarning")
@pytest.mark.parametrize("steps", [9, 27])
@pytest.mark.parametrize("solver,algorithm", [("dpm_solver_2", "dpmsolver"), ("dpmpp_2s", "dpmsolver++")])
def test_second_order_singlestep_matches_diffusers(solver, algorithm, steps):
    """diffusers' singlestep scheduler spends one model call per timestep and a step of order k spans k
    consecutive timesteps, its inner points ON its timestep list: the official placement with that
    list as the fine grid. With 9 or 27 steps its "linspace" timesteps (999, 888, ..., 111 and
    999, 962, ..., 37) are exactly uniform in t = (n + 1) / 1000, so they are fewstep's time_uniform
    grid from t = 1 to t_min = the last timestep, and the order lists agree (four/thirteen order-2
    steps, then one order-1 step to sigma = 0). Its second-order update is DPM-Solver-2 /
    DPM-Solver++(2S) with the midpoint weight, as fewstep's.

    Third order does not match, by construction of diffusers' update: diffusers builds a 3S step
    from its 2S update, so the second inner point x_s2 is the midpoint-type second-order update
    (weight 0.5 phi_1 on D1), where the paper's DPM-Solver-3 (Alg. 5, and the official code) and
    fewstep use the h phi_2 weight (r2 / r1 * phi_22 in the paper). Measured relative difference
    (DPM-Solver++(3S), the same grids): 3.9e-3 at 9 steps, 3.6e-4 at 27; with that one inner update
    swapped for diffusers' midpoint 2S one inside fewstep (a throw-away patch), 2e-7 at both. With solver_type="heun" diffusers uses the h phi_2 inner weight but then the
    Taylor-type final update (phi_2 D1 + phi_3 D2, the official code's solver_type="taylor"), which
    fewstep does not implement. Its order lists also differ from Sec. 3.4's when steps - 1 is a
    multiple of 3 (diffusers ends 3, 1; the paper's fast rule ends 2, 1, 1).
    """
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers refuses "zero" for dpmsolver
    want, sch, schedule, model = _diffusers_singlestep(2, algorithm, steps, final_sigmas_type=final)
    ts = (sch.timesteps.to(F64) + 1.0) / 1000.0
    assert torch.allclose(ts[:-1] - ts[1:], torch.full((steps - 1,), float(ts[0] - ts[1]), dtype=F64))
    orders = [2] * ((steps - 1) // 2) + [1]
    if final == "zero":  # fewstep's own grid for this budget is diffusers' timesteps at the step ends
        grid, extra = fewstep.solver_grid(schedule, solver, steps, "time_uniform", "zero", "official",
                                          t_min=float(ts[-1]))
        assert extra == {"order": orders, "inner": "time_uniform"}
        assert torch.allclose(grid[:-1], ts[::2], rtol=0, atol=1e-12) and float(grid[-1]) == 0.0
    else:  # the last step goes to timestep 0, t = 1 / 1000
        grid = torch.cat([ts[::2], torch.tensor([1e-3], dtype=F64)])
    den = fewstep.ModelDenoiser(model, schedule, "eps", time_input="discrete")
    out = fewstep.sample(den, x_T(), schedule, solver=solver, grid=grid, order=orders, spacing="time_uniform",
                         placement="official")
    assert out.nfe == steps and out.x.dtype == torch.float32
    err = relative(out.x, want)
    assert err <= REL_TOL, err  # measured ~1e-7: float32 round-off
    # the log-SNR fractions put the inner calls elsewhere, which the tolerance sees
    other = fewstep.sample(den, x_T(), schedule, solver=solver, grid=grid, order=orders,
                           placement="logsnr_fractions").x
    assert relative(other, want) > 10 * REL_TOL


@pytest.mark.parametrize("steps", [9, 27])
def test_third_order_singlestep_differs_from_diffusers_as_documented(steps):
    """See the docstring above: diffusers' 3S inner update is the 2S midpoint one, the paper's is not."""
    want, sch, schedule, model = _diffusers_singlestep(3, "dpmsolver++", steps)
    ts = (sch.timesteps.to(F64) + 1.0) / 1000.0
    grid, extra = fewstep.solver_grid(schedule, "dpmpp_3s", steps, "time_uniform", "zero", "official",
                                      t_min=float(ts[-1]))
    den = fewstep.ModelDenoiser(model, schedule, "eps", time_input="discrete")
    out = fewstep.sample(den, x_T(), schedule, solver="dpmpp_3s", grid=grid, **extra)
    assert out.nfe == steps and extra["order"] == [3] * ((steps - 3) // 3) + [2, 1]  # same orders as diffusers
    assert relative(out.x, want) > 3 * REL_TOL  # measured 3.9e-3 and 3.6e-4


# -- the default placement --------------------------------------------------------------------------

def test_default_placement_is_the_measured_better_one_per_prediction_type():
    """The default follows fewstep.solvers.dpm_solver's measurements (PLACEMENTS comment), here its
    decisive cases on the 64-D mixture of test_solvers (RK4 reference). DPM-Solver++(3S) defaults to
    "official": on LinearVP time-uniform grids, RMS error official vs fractions at budgets 10, 12, 15
    measured 0.058 vs 0.272, 0.068 vs 0.223, 0.042 vs 0.161 (asserted: at least 2x better).
    DPM-Solver-fast (noise prediction) defaults to "logsnr_fractions": on CosineVP time-uniform
    grids official is 25-50x worse (asserted: at least 5x)."""
    from fewstep.schedules import CosineVP
    from fewstep.solvers.dpm_solver import default_placement
    from test_solvers import SCH, _mix_problem, rms
    assert default_placement("dpmpp_3s") == "official" and default_placement("dpm_solver_fast") == "logsnr_fractions"
    for solver, sch, better, worse in (("dpmpp_3s", SCH, "official", "logsnr_fractions"),
                                       ("dpm_solver_fast", CosineVP(), "logsnr_fractions", "official")):
        den, x_T, ref, _ = _mix_problem(sch, 128)
        for steps in (10, 12, 15):
            run = lambda **kw: fewstep.sample(den, x_T, sch, solver=solver, steps=steps, spacing="time_uniform",  # noqa: E731
                                              final="tmin", **kw).x
            default, good, bad = run(), run(placement=better), run(placement=worse)
            assert torch.equal(default, good)
            assert (2 if solver == "dpmpp_3s" else 5) * rms(good - ref) < rms(bad - ref), (solver, steps)


def test_placement_errors():
    gm, x_T = mixture_problem()
    sch = LinearVP()
    den = gm.denoiser(sch)
    with pytest.raises(ValueError, match="placement must be one of 'official', 'logsnr_fractions', got 'paper'"):
        fewstep.sample(den, x_T, sch, solver="dpm_solver_fast", steps=6, placement="paper")
    with pytest.raises(ValueError, match="placement applies to singlestep solvers only, not 'dpmpp_2m'"):
        fewstep.sample(den, x_T, sch, solver="dpmpp_2m", steps=6, placement="official")
    with pytest.raises(ValueError, match="inner must be None or a spacing"):
        fewstep.sample(den, x_T, sch, solver="dpm_solver_3", steps=6, inner="cosine")
