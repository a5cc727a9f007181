"""Solvers against exact answers: convergence orders, exact NFE counts, per-sample noise,
callbacks, inversion round trips, adaptive step control and the errors bad arguments raise."""
import re

import numpy as np
import pytest
import torch

import fewstep
from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.reference import reference_solution
from fewstep.schedules import LinearVP, time_grid
from fewstep.solvers import SOLVERS

F64 = torch.float64
SCH = LinearVP()  # beta 0.1 -> 20, t from 1 down to t_min = 1e-3
D, B = 64, 8


def rms(a: torch.Tensor) -> float:
    return float(a.to(F64).pow(2).mean().sqrt())


def fitted_order(errors, steps) -> float:
    """Minus the least-squares slope of log(error) against log(steps)."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


class Counter:
    """Our own count of model calls, independent of the solvers' bookkeeping."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.denoiser(x, t, **cond)


# -- the two smooth test problems --------------------------------------------------------------

def _gaussian_params():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=F64) * 0.5
    std = 0.5 + torch.rand(D, generator=g, dtype=F64)
    x_T = torch.randn(B, D, generator=g, dtype=F64)
    return mu, std, x_T


@pytest.fixture(scope="module")
def gauss():
    """One Gaussian N(mu, diag(std^2)) in 64-D: the probability-flow ODE has a closed form."""
    mu, std, x_T = _gaussian_params()
    den = GaussianMixture(mu[None], std[None]).denoiser(SCH)
    return den, x_T, single_gaussian_flow(mu, std, SCH, x_T, SCH.t_max, SCH.t_min)


def _mix_problem(schedule, ref_steps: int):
    """Three wide, overlapping components (means +-0.3 mu and a permuted 0.3 mu, stds 0.35-1.8 per
    axis, weights 0.5/0.3/0.2): a smooth but non-linear denoiser whose responsibilities change along
    the path, judged against the independent RK4 reference. Returns (den, x_T, ref, ref_err) with
    ref_err = |RK4(n) - RK4(2n)|_max, which bounds the returned 2n-step answer's own error ~16x over."""
    mu, std, x_T = _gaussian_params()
    gm = GaussianMixture(torch.stack([0.3 * mu, -0.3 * mu, 0.3 * mu.flip(0)]), torch.stack([std, 0.7 * std, 1.2 * std]),
                         weights=torch.tensor([0.5, 0.3, 0.2]))
    den = gm.denoiser(schedule)
    ref, est = reference_solution(den, schedule, x_T, schedule.t_max, schedule.t_min, steps=ref_steps)
    return den, x_T, ref, est


@pytest.fixture(scope="module")
def mix():
    den, x_T, ref, est = _mix_problem(SCH, 256)
    assert est < 1e-6, est
    return den, x_T, ref


@pytest.fixture(scope="module", params=["linear", "cosine"])
def conv_problem(request):
    """The convergence problem on two schedules: the mixture above on LinearVP and on CosineVP."""
    from fewstep.schedules import CosineVP
    sch = SCH if request.param == "linear" else CosineVP()
    den, x_T, ref, est = _mix_problem(sch, 512)
    assert est < 1e-7, est  # measured 2.2e-8 (LinearVP), 2.6e-8 (CosineVP)
    return sch, den, x_T, ref, est / 15.0  # RK4: the 1024-step answer's error is ~1/15 of est


# -- (a) convergence orders ------------------------------------------------------------------------
#
# THE RULE, the same for every ODE solver in fewstep.SOLVERS (nothing below is chosen per solver):
#   problem  the mixture above on LinearVP and on CosineVP, error = RMS difference at t_min from the
#            RK4 reference (final="tmin": no denoising step, which would not be an ODE step);
#   grid     Karras (rho = 7), from t_max to t_min;
#   steps    the ladder CONV_LADDER = 40, 80, 160, 320 grid intervals (a range of 8x). A singlestep
#            solver of order k takes N steps of order k; dpm_solver_fast is driven by its budget,
#            3 N + 2 calls: N order-3 steps and one order-2 step (Sec. 3.4's rule), whose O(h^3)
#            local error keeps global order 3 (budgets 3N and 3N + 1 end with an order-1 step,
#            an O(h^2) term);
#   fit      minus the least-squares slope of log error against log N over all four points, within
#            +-SLOPE_BAND of the theoretical order; and every error must lie in the window
#            [REF_MARGIN x the reference's own error, ERR_MAX] (asserted, not used to pick points):
#            above the reference's own error so that it does not bend the slope, and small enough to
#            be past the pre-asymptotic start. Errors decrease strictly along the ladder.
# Measured (both schedules): every slope within 0.09 of its order; errors 6.2e-8 .. 9.2e-2, reference
# errors ~1.5e-9 (LinearVP) and 1.7e-9 (CosineVP).
# Why not the log-SNR grid or the single Gaussian: on the Gaussian the leading error term of several
# methods nearly cancels (DPM-Solver++(3M) ~4.2 on log-SNR, DPM-Solver-3 5.3 then 2.0 on Karras), so
# the slope there measures the problem, not the method; the mixture does not have that structure.
#
# Warm-up and final steps. A multistep method of order p starts with one step of each order
# 1, ..., p-1 (UniPC-p: predictor of order k plus corrector) and, with lower_order_final, ends
# with lower orders. A fixed number of steps of order k adds O(h^(k+1)) to the global error, so
# the order-1 first step formally caps third-order methods at 2. But its local error is
# ~h^2/2 * alpha * dx0_hat/dlambda at t = 1, where alpha(1) = 6.6e-3 and x0_hat depends on lambda
# through alpha^2 std^2 / (alpha^2 std^2 + sigma^2) ~ e^(2 lambda): the warm-up's share of the final
# error measures < 1% at every N used (asserted < 2% in test_warm_up_share_is_negligible). Final lower
# orders are switched off (lower_order_final=False); dpm_multistep ignores that flag from 15 steps on
# anyway, UniPC does not (asserted below).
#
# UniPC-p with its corrector has order p + 1 (Zhao et al. 2023, Thm 3.3), which is what the
# registry documents and what is asserted; corrector=False (plain UniP-p) has order p.
# Stochastic solvers (ddpm, sde_dpmpp_2m/3m) have weak-order tests in test_solver_sde.py; the
# adaptive ones are checked against their tolerance in section (g).

CONV_LADDER = (40, 80, 160, 320)
CONV_SPACING = "karras"
SLOPE_BAND = 0.3  # the band around the theoretical order
REF_MARGIN = 30.0  # reference error <= 3.3% of every fitted error: moves a slope by < 0.02
ERR_MAX = 0.15

MULTISTEP_FLAGS = ("dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m", "dpmpp_3m", "unipc")

# (solver, options, theoretical order): every deterministic, fixed-grid solver in fewstep.SOLVERS
CONVERGENCE = [
    ("ddim", {}, 1),
    ("euler", {}, 1),
    ("dpm_solver_1", {}, 1),
    ("unipc_bh2_1", {"corrector": False}, 1),
    ("heun", {}, 2),
    ("dpm_solver_2", {}, 2),
    ("dpmpp_2s", {}, 2),
    ("dpm_solver_2m", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m", {"solver_type": "taylor"}, 2),
    ("unipc_bh1_2", {"corrector": False}, 2),
    ("unipc_bh1_1", {}, 2),
    ("unipc_bh2_1", {}, 2),
    ("dpm_solver_3", {}, 3),
    ("dpmpp_3s", {}, 3),
    ("dpm_solver_fast", {}, 3),
    ("dpm_solver_fast", {"placement": "logsnr_fractions"}, 3),
    ("dpm_solver_3m", {}, 3),
    ("dpmpp_3m", {}, 3),
    ("unipc_bh1_3", {"corrector": False}, 3),
    ("unipc_bh1_2", {}, 3),
    ("unipc_bh2_2", {}, 3),
    ("unipc_bh1_3", {}, 4),
    ("unipc_bh2_3", {}, 4),
]


def test_convergence_cases_cover_every_ode_solver():
    covered = {c[0] for c in CONVERGENCE}
    ode = {n for n, s in SOLVERS.items() if not s.stochastic and s.kind != "adaptive"}
    assert covered == ode, ode ^ covered


def _run_convergence(problem, solver, options):
    sch, den, x_T, target, _ = problem
    opts = dict(options)
    if solver.startswith(MULTISTEP_FLAGS):
        opts["lower_order_final"] = False
    errors = []
    for n in CONV_LADDER:
        if solver == "dpm_solver_fast":  # driven by its budget of calls (see the rule above)
            out = fewstep.sample(den, x_T, sch, solver=solver, steps=3 * n + 2, spacing=CONV_SPACING,
                                 final="tmin", **opts)
            assert out.grid.numel() == n + 2
        else:
            out = fewstep.sample(den, x_T, sch, solver=solver, grid=time_grid(sch, n, CONV_SPACING, final="tmin"),
                                 **opts)
        errors.append(rms(out.x - target))
    return errors


def _case_id(case):
    solver, options, order = case
    return solver + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", CONVERGENCE, ids=[_case_id(c) for c in CONVERGENCE])
def test_convergence_order(case, conv_problem):
    solver, options, order = case
    errors = _run_convergence(conv_problem, solver, options)
    slope = fitted_order(errors, CONV_LADDER)
    print(f"{_case_id(case)}: order {order}, slope {slope:.2f}, errors {errors}")  # -s shows it
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert REF_MARGIN * conv_problem[4] <= min(errors) and max(errors) <= ERR_MAX, errors
    assert abs(slope - order) <= SLOPE_BAND, f"{solver} {options}: slope {slope:.2f}, errors {errors}"
    if "corrector" not in options:  # the registry documents the same order (UniP-p alone is order p)
        assert SOLVERS[solver].order == order


@pytest.mark.parametrize("solver", ["dpmpp_3m", "dpm_solver_3m", "unipc_bh2_2", "unipc_bh2_3"])
def test_warm_up_share_is_negligible(gauss, solver):
    # The first order-1 steps are the only part of a grid where these methods run below their
    # order. Run only the warm-up steps (grid[:p]), carry their error to t_min with the exact
    # (affine) flow, and compare with the whole run's error: < 2% means the fitted slopes above
    # are those of the full-order steps (a 2% contamination moves a slope by < 0.03).
    # For UniPC the truncated run ends on an uncorrected prediction, which overstates the share.
    den, x_T, target = gauss
    mu, std, _ = _gaussian_params()
    p = SOLVERS[solver].options["order"]
    for n in (40, 160):
        grid = time_grid(SCH, n, "karras", final="tmin")
        whole = fewstep.sample(den, x_T, SCH, solver=solver, grid=grid, lower_order_final=False).x
        warm = fewstep.sample(den, x_T, SCH, solver=solver, grid=grid[:p], lower_order_final=False).x
        t_w = float(grid[p - 1])
        exact_w = single_gaussian_flow(mu, std, SCH, x_T, SCH.t_max, t_w)
        carried = (single_gaussian_flow(mu, std, SCH, warm, t_w, SCH.t_min)
                   - single_gaussian_flow(mu, std, SCH, exact_w, t_w, SCH.t_min))
        assert rms(carried) < 0.02 * rms(whole - target), (n, rms(carried), rms(whole - target))


def test_lower_order_final_semantics(gauss):
    den, x_T, _ = gauss

    def run(solver, n, lof):
        return fewstep.sample(den, x_T, SCH, solver=solver, grid=time_grid(SCH, n, "karras", final="tmin"),
                              lower_order_final=lof).x

    # "differs" thresholds sit far above float64 round-off (~1e-15) and below the measured
    # differences (0.02-0.5 at 14 steps, 3e-4 for UniPC at 40)
    for solver in ("dpmpp_3m", "dpm_solver_3m"):  # diffusers' rule: only below 15 steps
        assert torch.equal(run(solver, 15, True), run(solver, 15, False))
        assert not torch.allclose(run(solver, 14, True), run(solver, 14, False), atol=1e-6)
    # UniPC (as diffusers' UniPC) lowers the final orders at any number of steps
    assert not torch.allclose(run("unipc_bh2_3", 40, True), run("unipc_bh2_3", 40, False), atol=1e-8)


@pytest.mark.parametrize("a,b", [(("ddim", {}), ("euler", {})), (("ddim", {}), ("dpm_solver_1", {})),
                                 (("ddim", {}), ("unipc_bh2_1", {"corrector": False})),
                                 (("dpmpp_2m", {}), ("unipc_bh2_2", {"corrector": False})),
                                 (("dpmpp_3m", {}), ("unipc_bh2_3", {"corrector": False}))])
def test_identities_between_solvers(gauss, a, b):
    # Euler in EDM variables and first-order DPM-Solver are DDIM; UniP-p with B(h) = e^h - 1 is
    # DPM-Solver++(pM) (UniPC paper, Sec. 3.2).
    den, x_T, _ = gauss
    grid = time_grid(SCH, 12, "logsnr", final="tmin")
    xa = fewstep.sample(den, x_T, SCH, solver=a[0], grid=grid, **a[1]).x
    xb = fewstep.sample(den, x_T, SCH, solver=b[0], grid=grid, **b[1]).x
    assert torch.allclose(xa, xb, rtol=1e-12, atol=1e-12)  # float64: same update written differently


# -- (b) NFE ----------------------------------------------------------------------------------------

def small_problem():
    g = torch.Generator().manual_seed(5)
    gm = GaussianMixture(torch.randn(3, 4, generator=g), torch.tensor([0.5, 0.8, 0.6]))
    return gm.denoiser(SCH), torch.randn(2, 4, generator=g)


def budget_formula(name: str, steps: int) -> int:
    """Model calls for ``steps`` with final="zero", from the documented budget rules alone."""
    kind = SOLVERS[name].kind
    if kind == "heun":  # steps intervals, two calls each but one for the final step to 0
        return 2 * steps - 1
    return steps  # multistep: one call per interval; singlestep: steps is the NFE budget


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nfe_counts_are_exact(name, steps):
    den, x_T = small_problem()
    counter = Counter(den)
    grid, extra = fewstep.solver_grid(SCH, name, steps)
    out = fewstep.sample(counter, x_T, SCH, solver=name, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.nfe == counter.calls
    assert torch.equal(out.grid, grid)
    if SOLVERS[name].kind == "adaptive":
        assert fewstep.expected_nfe(name, grid, extra) is None
        assert counter.calls >= 3  # it integrates the ODE (error control) before the final denoising call
    else:
        assert fewstep.expected_nfe(name, grid, extra) == counter.calls == budget_formula(name, steps)


@pytest.mark.parametrize("final", ["tmin", "denoise"])
@pytest.mark.parametrize("name", ["ddim", "heun", "dpm_solver_3", "dpm_solver_fast", "dpmpp_2s", "dpmpp_3m",
                                  "unipc_bh2_3", "sde_dpmpp_2m"])
def test_nfe_with_other_final_steps(name, final):
    den, x_T = small_problem()
    for steps in (2, 3, 5, 10):
        counter = Counter(den)
        grid, extra = fewstep.solver_grid(SCH, name, steps, final=final)
        out = fewstep.sample(counter, x_T, SCH, solver=name, steps=steps, final=final,
                             generator=torch.Generator().manual_seed(0))
        assert out.nfe == counter.calls == fewstep.expected_nfe(name, grid, extra)
        assert float(grid[-1]) == (0.0 if final == "denoise" else SCH.t_min)


def test_dpm_solver_fast_splits_the_budget_into_orders():
    den, x_T = small_problem()
    # DPM-Solver paper, Sec. 3.4: K = NFE // 3 + 1 steps, order-3 steps then a 2/1 tail
    for steps, orders in [(6, [3, 2, 1]), (7, [3, 3, 1]), (9, [3, 3, 2, 1]), (11, [3, 3, 3, 2])]:
        grid, extra = fewstep.solver_grid(SCH, "dpm_solver_fast", steps, final="tmin")
        assert extra["order"] == orders and grid.numel() == len(orders) + 1
        assert fewstep.sample(Counter(den), x_T, SCH, solver="dpm_solver_fast", steps=steps, final="tmin").nfe == steps


def test_adaptive_grid_only_fixes_the_ends():
    # solver_grid documents that for adaptive solvers "the grid only fixes the ends": with the
    # default final="zero" the ends are t_max and 0 whatever `steps` is, so the answer must not
    # depend on `steps`.
    den, x_T = small_problem()
    outs = {s: fewstep.sample(den, x_T, SCH, solver="dpm_solver_12", steps=s) for s in (1, 2, 5)}
    assert outs[1].nfe == outs[2].nfe == outs[5].nfe, {s: o.nfe for s, o in outs.items()}
    assert torch.equal(outs[1].x, outs[2].x)


@pytest.mark.parametrize("name,calls", [("dpm_solver_12", 2), ("dpm_solver_23", 3)])
def test_adaptive_step_shares_model_calls(name, calls):
    # DPM-Solver-12 / -23 (arXiv 2206.00927, Alg. 4-5): the lower- and higher-order updates share
    # their model evaluations, so one attempted step costs 2 (orders 1 and 2) or 3 (orders 2 and 3)
    # calls. A huge first step (h_init) with huge tolerances is one accepted attempt over the whole
    # interval, and final="tmin" adds no denoising call.
    den, x_T = small_problem()
    out = fewstep.sample(den, x_T, SCH, solver=name, steps=2, final="tmin", rtol=1e9, atol=1e9, h_init=100.0)
    assert out.nfe == calls


# -- (c) per-sample generators --------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["sde_dpmpp_2m", "sde_dpmpp_3m", "ddpm"])
def test_per_sample_generators_make_samples_independent_of_the_batch(solver):
    g = torch.Generator().manual_seed(6)
    den = GaussianMixture(torch.randn(3, 8, generator=g), torch.tensor([0.3, 0.5, 0.4])).denoiser(SCH)
    x_T = torch.randn(4, 8, generator=g)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = fewstep.sample(den, x_T, SCH, solver=solver, steps=10, generator=gens([10, 11, 12, 13])).x
    for i in range(4):
        alone = fewstep.sample(den, x_T[i:i + 1], SCH, solver=solver, steps=10, generator=gens([10 + i])).x
        # row-wise float32 math: batched kernels may only reorder round-off; other noise would differ by O(1)
        assert torch.allclose(alone[0], batch[i], rtol=0, atol=1e-6), i
    # the noise matters (the check above is not vacuous) ...
    other = fewstep.sample(den, x_T, SCH, solver=solver, steps=10, generator=gens([20, 21, 22, 23])).x
    assert (other - batch).abs().max() > 0.05
    # ... and one shared generator does not give this guarantee
    shared = fewstep.sample(den, x_T, SCH, solver=solver, steps=10, generator=torch.Generator().manual_seed(1)).x
    alone = fewstep.sample(den, x_T[1:2], SCH, solver=solver, steps=10, generator=torch.Generator().manual_seed(1)).x
    assert (shared[1] - alone[0]).abs().max() > 0.05
    with pytest.raises(ValueError, match="got 3 generators for a batch of 4"):
        fewstep.sample(den, x_T, SCH, solver=solver, steps=10, generator=gens([1, 2, 3]))


# -- (d) callback and progress ----------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm_solver_2", "dpm_solver_fast", "dpmpp_2m", "dpmpp_3m",
                                    "sde_dpmpp_2m", "unipc_bh2_3", "dpm_solver_12"])
def test_callback_once_per_step_with_x_t_and_x0(solver):
    den, x_T = small_problem()
    seen = []
    out = fewstep.sample(den, x_T, SCH, solver=solver, steps=8, callback=seen.append,
                         generator=torch.Generator().manual_seed(0))
    assert [s["i"] for s in seen] == list(range(len(seen)))
    assert all(set(s) >= {"x", "t", "x0"} for s in seen)
    ts = [float(s["t"]) for s in seen]
    if SOLVERS[solver].kind == "adaptive":
        assert len(seen) >= 2 and all(a > b for a, b in zip(ts, ts[1:])) and ts[0] == SCH.t_max
    else:  # one call per step of the grid, at the step's start time
        assert len(seen) == out.grid.numel() - 1
        assert ts == out.grid[:-1].tolist()
    for s in seen:  # x0 is the model's answer at (x, t), exactly as reported
        assert s["x"].shape == x_T.shape
        assert torch.allclose(s["x0"], den(s["x"], s["t"]), rtol=1e-6, atol=1e-6)  # float32 round-off


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "dpm_solver_3", "dpm_solver_23"])
def test_progress_bar_draws_and_leaves_the_result_unchanged(solver, capsys):
    den, x_T = small_problem()
    plain = fewstep.sample(den, x_T, SCH, solver=solver, steps=6)
    capsys.readouterr()
    shown = fewstep.sample(den, x_T, SCH, solver=solver, steps=6, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(plain.x, shown.x) and plain.nfe == shown.nfe
    assert re.search(r"\d+%|\d+/\d+", err), err  # tqdm wrote a bar to stderr


# -- (e) inversion round trip ---------------------------------------------------------------------------

@pytest.mark.parametrize("solver,tol50", [("ddim", 0.12), ("dpmpp_2m", 5e-4)])
def test_inversion_round_trip_error_shrinks_with_steps(solver, tol50):
    # x0 -> invert (t_min -> t_max) -> sample(final="tmin") (t_max -> t_min); relative RMS error.
    # Measured at 10/20/50 steps: ddim 0.31/0.17/0.073 (first order), dpmpp_2m 0.039/0.0020/0.00014;
    # other seeds of this mixture gave up to 0.086 and 0.0003 at 50 steps, hence the tolerances.
    # (Narrow components make the round trip much less accurate: with stds ~0.6 ddim's error at 50
    # steps is ~0.15, dominated by samples near the boundary between components.)
    g = torch.Generator().manual_seed(7)
    gm = GaussianMixture(torch.randn(3, 16, generator=g, dtype=F64), torch.tensor([1.0, 1.2, 0.9]))
    den = gm.denoiser(SCH)
    x0 = gm.sample(8, generator=g)[0].to(F64)
    errors = []
    for steps in (10, 20, 50):
        enc = fewstep.invert(den, x0, SCH, solver=solver, steps=steps)
        assert enc.nfe == steps and float(enc.grid[0]) == SCH.t_min and float(enc.grid[-1]) == SCH.t_max
        dec = fewstep.sample(den, enc.x, SCH, solver=solver, steps=steps, final="tmin")
        errors.append(rms(dec.x - x0) / rms(x0))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < tol50, errors
    # the encoding reached noise: alpha(1) = 6.6e-3, so x_T is ~N(0, I) whatever x0 was
    assert 0.8 < float(enc.x.std()) < 1.2


def test_inversion_refuses_solvers_that_cannot_run_backwards():
    den, x_T = small_problem()
    with pytest.raises(ValueError, match="solver 'heun' cannot run backwards; use one of ddim, .*dpmpp_2m"):
        fewstep.invert(den, x_T, SCH, solver="heun")


# -- (f) errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    den, x_T = small_problem()
    with pytest.raises(ValueError, match=re.escape(f"steps must be an integer >= 1, got {steps!r}")):
        fewstep.sample(den, x_T, SCH, steps=steps)


def test_unknown_solver_lists_the_known_ones():
    den, x_T = small_problem()
    with pytest.raises(ValueError) as info:
        fewstep.sample(den, x_T, SCH, solver="dpmpp2m")
    msg = str(info.value)
    assert "unknown solver 'dpmpp2m'" in msg and "did you mean dpmpp_2m" in msg
    assert all(name in msg for name in SOLVERS)


def test_unknown_spacing():
    den, x_T = small_problem()
    with pytest.raises(ValueError, match="unknown spacing 'cosine'; choose one of logsnr, time_uniform, "
                                         "time_quadratic, karras"):
        fewstep.sample(den, x_T, SCH, spacing="cosine")


@pytest.mark.parametrize("solver,order", [("dpmpp_2m", 4), ("dpm_solver_3m", 0), ("dpm_solver_3", 4),
                                          ("dpm_solver_fast", 4), ("unipc_bh2_2", 4), ("sde_dpmpp_2m", 5)])
def test_order_out_of_range(solver, order):
    den, x_T = small_problem()
    with pytest.raises(ValueError, match=f"order must be an integer from 1 to 3, got {order}"):
        fewstep.sample(den, x_T, SCH, solver=solver, steps=6, order=order)


def test_adaptive_order_out_of_range():
    den, x_T = small_problem()
    with pytest.raises(ValueError, match=r"adaptive DPM-Solver has order 2 \(DPM-Solver-12\) or 3 .*, got 4"):
        fewstep.sample(den, x_T, SCH, solver="dpm_solver_23", steps=6, order=4)


@pytest.mark.parametrize("grid,what", [([1.5, 0.5, 0.0], r"must lie in \[0, 1.0\].*got values in \[0.0, 1.5\]"),
                                       ([1.0, 0.5, -0.1], r"must lie in \[0, 1.0\]")])
def test_time_outside_the_schedule(grid, what):
    den, x_T = small_problem()
    with pytest.raises(ValueError, match="grid " + what):
        fewstep.sample(den, x_T, SCH, grid=torch.tensor(grid, dtype=F64))
    with pytest.raises(ValueError, match=r"t_min/t_max must lie in \[0, 1.0\]"):
        time_grid(SCH, 3, t_max=2.0)


@pytest.mark.parametrize("grid", [[1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.0], [1.0, 0.0, 0.5]])
def test_grid_must_strictly_decrease(grid):
    den, x_T = small_problem()
    with pytest.raises(ValueError, match="strictly decreasing with no repeated time"):
        fewstep.sample(den, x_T, SCH, grid=torch.tensor(grid, dtype=F64))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "dpm_solver_3", "unipc_bh2_3", "dpm_solver_12"])
def test_nan_from_the_model_names_the_call(solver):
    den, x_T = small_problem()
    calls = []

    def broken(x, t):
        calls.append(1)
        out = den(x, t)
        return out * float("nan") if len(calls) == 3 else out

    with pytest.raises(FloatingPointError, match=r"the model returned NaN or inf at model call 3 \(t = "):
        fewstep.sample(broken, x_T, SCH, solver=solver, steps=8)
    assert len(calls) == 3  # stopped at once


def test_wrong_shaped_model_output_through_model_denoiser():
    den, x_T = small_problem()
    model = fewstep.ModelDenoiser(lambda x, t: torch.cat([x, x], 1), SCH, "eps")
    with pytest.raises(ValueError, match=r"model output shape \(2, 8\) does not match the input \(2, 4\)"):
        fewstep.sample(model, x_T, SCH, steps=4)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc_bh2_3", "heun"])
def test_wrong_shaped_denoiser_output_is_an_error(solver):
    # A plain denoiser callable whose output broadcasts against x ((1, D) for a batch of 2) must not
    # silently collapse the batch, and a non-broadcastable one must fail with a message about shapes.
    den, x_T = small_problem()
    for bad in (lambda x, t: den(x, t)[:1], lambda x, t: den(x, t)[:, :2]):
        with pytest.raises(ValueError, match="shape"):
            fewstep.sample(bad, x_T, SCH, solver=solver, steps=4)


def test_non_finite_guidance_weight():
    den, _ = small_problem()
    for w in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance weight w must be finite"):
            fewstep.ClassifierFreeGuidance(den, w, uncond={})


def test_other_bad_options():
    den, x_T = small_problem()
    with pytest.raises(ValueError, match="final must be 'zero', 'tmin' or 'denoise', got 'end'"):
        fewstep.sample(den, x_T, SCH, final="end")
    for eta in (1.5, 1.0001, -0.0001):  # the bounds themselves are allowed (eta = 1 is DDPM)
        with pytest.raises(ValueError, match=rf"eta must lie in \[0, 1\], got {eta}"):
            fewstep.sample(den, x_T, SCH, solver="ddim", eta=eta)
    fewstep.sample(den, x_T, SCH, solver="ddim", eta=1.0, steps=2)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'taylor', got 'heun'"):
        fewstep.sample(den, x_T, SCH, solver="dpmpp_2m", solver_type="heun")
    with pytest.raises(ValueError, match="third_order must be 'exact' or 'legacy'"):
        fewstep.sample(den, x_T, SCH, solver="dpmpp_3m", third_order="diffusers")
    with pytest.raises(ValueError, match="UniPC variant must be 'bh1' or 'bh2'"):
        fewstep.sample(den, x_T, SCH, solver="unipc_bh2_2", variant="bh3")
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        fewstep.sample(den, x_T, SCH, solver="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="the starting sample x contains NaN or inf"):
        fewstep.sample(den, torch.full_like(x_T, float("nan")), SCH)


# -- (g) adaptive step size -----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["dpm_solver_12", "dpm_solver_23"])
def test_adaptive_tighter_rtol_gives_smaller_error_and_more_nfe(mix, solver):
    # atol = 1e-4 so that rtol is the binding tolerance. Measured (RMS error, NFE) at rtol 0.05/0.01/0.002:
    # DPM-Solver-12 2.3e-2/52, 4.6e-3/76, 2.2e-3/114; DPM-Solver-23 3.1e-2/56, 8.4e-4/84, 4.1e-4/104.
    den, x_T, ref = mix
    runs = [fewstep.sample(den, x_T, SCH, solver=solver, steps=2, final="tmin", rtol=r, atol=1e-4)
            for r in (0.05, 0.01, 0.002)]
    errors = [rms(o.x - ref) for o in runs]
    nfes = [o.nfe for o in runs]
    assert errors[0] > errors[1] > errors[2], errors
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert errors[2] < 0.2 * errors[0]  # a 25x tighter rtol buys a >= 5x smaller error (measured 10x, 75x)


ADAPTIVE_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
ADAPTIVE_ERR_PER_TOL = (0.1, 5.0)  # the stated multiple: tol / 10 <= error <= 5 tol


@pytest.mark.parametrize("solver", ["dpm_solver_12", "dpm_solver_23"])
def test_adaptive_error_tracks_the_tolerance(conv_problem, solver):
    """rtol = atol = tol from 1e-2 to 1e-5: the global error to the converged reference stays within
    [tol / 10, 5 tol] and scales like tol (fitted slope of log error against log tol in 1 +- 0.25),
    while the NFE grows. Measured error / tol on both schedules: DPM-Solver-12 1.7-3.3 (slope 0.90),
    DPM-Solver-23 0.4-0.9 (slope 0.95); NFE 37 -> 771 and 35 -> 207."""
    sch, den, x_T, ref, _ = conv_problem
    runs = [fewstep.sample(den, x_T, sch, solver=solver, steps=2, final="tmin", rtol=tol, atol=tol)
            for tol in ADAPTIVE_TOLS]
    errors, nfes = [rms(o.x - ref) for o in runs], [o.nfe for o in runs]
    lo, hi = ADAPTIVE_ERR_PER_TOL
    assert all(lo * tol <= e <= hi * tol for e, tol in zip(errors, ADAPTIVE_TOLS)), (errors, nfes)
    assert abs(fitted_order(errors, ADAPTIVE_TOLS) + 1.0) <= 0.25, errors  # error ~ tol^1: "order" -1 in tol
    assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
