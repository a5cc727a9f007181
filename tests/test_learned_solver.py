"""Learned solvers (fewstep.solvers.learned, fewstep.tune.tune_solver) on closed-form cases: a single Gaussian
under a VP schedule and under rectified flow, where the exact ODE solution is known. The learned solver beats
every fixed solver on held-out noise and its objective decreases; zero coefficients are the base solver
exactly; the JSON round-trips; the diffusers scheduler's loop equals fewstep.sample with it; misuse warns."""
import json
import warnings

import pytest
import torch

from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.grids import LEARNED_FORMAT, TunedGrid, TunedGridWarning, load_grid
from fewstep.reference import rmse
from fewstep.sampling import sample
from fewstep.schedules import CosineVP, LinearVP, RectifiedFlow, time_grid
from fewstep.solvers import get_solver
from fewstep.solvers.learned import learned_sample, pas_basis
from fewstep.tune import calibration_set, reference_trajectory, trajectory_targets, tune_solver

F64 = torch.float64
D = 16
FIXED = ("ddim", "dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "unipc_bh1_3", "unipc_bh2_2", "unipc_bh2_3")
SPACINGS = ("logsnr", "karras", "time_uniform", "time_quadratic")


def gaussian_problem(schedule):
    """Data N(mu, diag(std^2)), stds 0.01 to 1: exact denoiser, exact ODE answer, calibration and held-out noise."""
    g = torch.Generator().manual_seed(0)
    mu, std = torch.randn(D, generator=g, dtype=F64), torch.logspace(-2, 0, D, dtype=F64)
    den = GaussianMixture(mu[None], std[None], torch.ones(1), torch.zeros(1, dtype=torch.long)).denoiser(schedule)
    sigma_max = float(schedule.sigma(torch.tensor(schedule.t_upper, dtype=F64)))  # pure noise on flow matching

    def exact(x_T):  # the limit of every grid ending in 0: the ODE to t_min, then one denoising call
        x = single_gaussian_flow(mu, std, schedule, x_T, schedule.t_max, schedule.t_min)
        return den(x, torch.full((len(x),), schedule.t_min, dtype=F64))
    cal = calibration_set(32, (D,), seed=1, dtype=F64)
    cal.x_T = cal.x_T * sigma_max
    heldout = torch.randn(128, D, generator=torch.Generator().manual_seed(2), dtype=F64) * sigma_max
    return {"schedule": schedule, "den": den, "exact": exact, "cal": cal, "heldout": heldout, "mu": mu, "std": std}


@pytest.fixture(scope="module", params=["vp", "flow"])
def problem(request):
    return gaussian_problem(LinearVP() if request.param == "vp" else RectifiedFlow())


@pytest.fixture(scope="module")
def vp():
    return gaussian_problem(LinearVP())


@pytest.fixture(scope="module")
def learned_vp(vp):
    return tune_solver(vp["den"], vp["schedule"], solver="dpmpp_2m", nfe=4, calibration=vp["cal"],
                       reference_steps=32, candidates=16, conditioning={"w": 0.0})


@pytest.mark.parametrize("nfe", [3, 5, 8])
def test_pas_targets_read_off_the_reference_are_as_exact_as_the_reference(problem, nfe):
    """PAS's per-step targets come from the recorded reference trajectory without model calls (Hermite
    interpolation between candidates): each is within the reference's own error estimate of the exact ODE
    solution at that time, on grids whose times fall between the candidates."""
    s, x_T = problem["schedule"], problem["cal"].x_T
    traj = reference_trajectory(problem["den"], s, x_T, steps=32, candidates=16)
    grid = time_grid(s, nfe, "karras")
    targets = trajectory_targets(traj, s, grid)
    assert len(targets) == nfe
    for t, target in zip(grid[1:-1].tolist(), targets):
        exact = single_gaussian_flow(problem["mu"], problem["std"], s, x_T, s.t_max, t)
        assert rmse(target, exact) <= traj.error["rmse"], t
    assert torch.equal(targets[-1], traj.final.to(F64))  # t = 0: the reference's answer itself


@pytest.mark.parametrize("method", ["coeff", "pas"])
def test_learned_solver_beats_every_fixed_solver_on_heldout_noise(problem, method):
    s, den, x = problem["schedule"], problem["den"], problem["heldout"]
    ref = problem["exact"](x)
    nfe = 4
    tuned = tune_solver(den, s, solver="dpmpp_2m", nfe=nfe, calibration=problem["cal"], method=method,
                        reference_steps=32, candidates=16)
    assert tuned.learned["method"] == method and tuned.nfe == nfe
    mine = sample(den, x, s, grid=tuned)
    assert mine.nfe == nfe
    fixed = {(solver, sp): rmse(sample(den, x, s, solver=solver, grid=time_grid(s, nfe, sp)).x, ref)
             for solver in FIXED for sp in SPACINGS}
    alone = rmse(sample(den, x, s, solver="dpmpp_2m", grid=torch.tensor(tuned.times, dtype=F64)).x, ref)
    assert rmse(mine.x, ref) <= min(fixed.values())
    assert rmse(mine.x, ref) < alone  # the coefficients, not only the times, lower the held-out error
    obj = tuned.calibration["objective"]
    assert all(b <= a for a, b in zip(obj, obj[1:])) and obj[-1] < 0.9 * obj[0]
    assert tuned.calibration["validation_samples"] == 8 and tuned.calibration["fitting_samples"] == 24


@pytest.mark.parametrize("method", ["coeff", "pas"])
def test_fixed_times_fit_the_coefficients_alone_on_the_best_fixed_spacing(problem, method):
    """times='fixed': no grid stage; the grid is the fixed spacing with the lowest fitting-split error, unchanged,
    and the coefficients fitted on it lower the held-out error below that spacing's own, for fewer model calls
    than the fit that moves the times."""
    s, den, x = problem["schedule"], problem["den"], problem["heldout"]
    ref = problem["exact"](x)
    nfe = 4
    tuned = tune_solver(den, s, solver="dpmpp_2m", nfe=nfe, calibration=problem["cal"], method=method,
                        reference_steps=32, candidates=16, times="fixed")
    moving = tune_solver(den, s, solver="dpmpp_2m", nfe=nfe, calibration=problem["cal"], method=method,
                         reference_steps=32, candidates=16)
    start = tuned.calibration["start"]
    assert tuned.calibration["times"] == "fixed" and start in tuned.calibration["fixed_spacings"]
    assert start == min(tuned.calibration["fixed_spacings"], key=tuned.calibration["fixed_spacings"].get)
    kept = time_grid(s, nfe, start) if start in SPACINGS else None
    grid = torch.tensor(tuned.times, dtype=F64)
    if kept is not None:
        assert torch.equal(grid, kept) or torch.equal(grid[1:], kept[1:])  # (flow: the pure-noise top first)
    assert tuned.learned["method"] == method
    alone = rmse(sample(den, x, s, solver="dpmpp_2m", grid=kept if kept is not None else grid).x, ref)
    assert rmse(sample(den, x, s, grid=tuned).x, ref) < alone
    assert tuned.cost["model_calls"] < moving.cost["model_calls"]


def test_auto_times_keep_fitted_times_only_when_they_validate_clearly_better(learned_vp):
    """times='auto' (the default): of the fit on fixed times and the fit with tuned times, the tuned one is kept
    only if its per-sample validation errors are lower by more than one standard error of the paired difference;
    the result records the choice and the cost of both fits."""
    import copy

    from fewstep.tune import _pick_times

    def pair(e_fixed, e_tuned):
        fixed, tuned = copy.deepcopy(learned_vp), copy.deepcopy(learned_vp)
        tuned.times = [*tuned.times[:-2], tuned.times[-2] * 0.9, 0.0]
        for g, e in ((fixed, e_fixed), (tuned, e_tuned)):
            g.calibration["validation_per_sample"] = e
            g.calibration["validation_rmse"] = float(torch.tensor(e).pow(2).mean().sqrt())
        return fixed, tuned

    base = [0.10, 0.12, 0.08, 0.11, 0.09, 0.10, 0.13, 0.07]
    clearly = _pick_times(*pair(base, [0.5 * e for e in base]), log=lambda m: None)  # every sample halved
    assert clearly.calibration["times_choice"]["chosen"] == "tuned" and clearly.times[-2] != learned_vp.times[-2]
    one_flip = [0.5 * e for e in base[:-1]] + [0.2]  # lower mean error, but one sample sent far: within noise
    noisy = _pick_times(*pair(base, one_flip), log=lambda m: None)
    assert float(torch.tensor(one_flip).pow(2).mean()) < float(torch.tensor(base).pow(2).mean())
    assert noisy.calibration["times_choice"]["chosen"] == "fixed" and noisy.times == learned_vp.times
    tie = _pick_times(*pair(base, base), log=lambda m: None)
    assert tie.calibration["times_choice"]["chosen"] == "fixed"
    assert tie.cost["model_calls"] == 2 * learned_vp.cost["model_calls"]
    assert tie.calibration["times"] == "auto" and tie.calibration["times_choice"]["other"]["times"] != tie.times


def test_remembered_model_calls_change_nothing_but_the_cost(vp, monkeypatch):
    """The fit remembers repeated model calls (fewstep.denoisers.MemoDenoiser): the same learned solver as a fit
    that calls the model every time, for well under the model calls (each rerun repeats its first call, each
    Jacobian column the calls before the step whose parameter moved)."""
    import fewstep.tune as tune

    def fit():
        cal = calibration_set(32, (D,), seed=1, dtype=F64)
        cal.x_T = cal.x_T * float(vp["schedule"].sigma(torch.tensor(vp["schedule"].t_max, dtype=F64)))
        return tune_solver(vp["den"], vp["schedule"], solver="dpmpp_2m", nfe=4, calibration=cal, method="pas",
                           reference_steps=32, candidates=16)
    remembered = fit()
    monkeypatch.setattr(tune, "MemoDenoiser", lambda denoiser, size: denoiser)
    every_call = fit()
    assert remembered.times == every_call.times and remembered.learned == every_call.learned
    assert remembered.cost["model_calls"] < 0.75 * every_call.cost["model_calls"]


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "dpm_solver_3m", "unipc_bh1_2", "unipc_bh2_3"])
@pytest.mark.parametrize("method", ["coeff", "pas"])
def test_zero_coefficients_are_the_base_solver_exactly(vp, solver, method):
    s, x = vp["schedule"], vp["heldout"][:8]
    grid = time_grid(s, 6, "logsnr")
    base = get_solver(solver).stepper()
    zero = [[0.0] * (4 if method == "pas" else 1) for _ in range(6)]
    mine = learned_sample(vp["den"], x, grid, s, base=base, method=method, coefficients=zero)
    plain = sample(vp["den"], x, s, solver=solver, grid=grid)
    assert torch.equal(mine.x, plain.x) and mine.nfe == plain.nfe == 6
    one = [list(r) for r in zero]
    one[3][0] = 0.3  # one coefficient moves the answer (step 3 has a high-order term and a history)
    moved = learned_sample(vp["den"], x, grid, s, base=base, method=method, coefficients=one)
    assert (method == "coeff" and solver == "ddim") or not torch.allclose(moved.x, plain.x)


def test_pas_basis_is_orthonormal_inside_the_trajectorys_span_and_signed_by_the_reference():
    g = torch.Generator().manual_seed(5)
    hist = [torch.randn(3, 40, generator=g, dtype=F64) for _ in range(3)]
    d = torch.randn(3, 40, generator=g, dtype=F64)
    ref = torch.randn(3, 40, generator=g, dtype=F64)
    u = pas_basis(d, hist, ref, 4)
    assert u.shape == (3, 4, 40)
    assert torch.allclose(u @ u.transpose(1, 2), torch.eye(4, dtype=F64).expand(3, 4, 4), atol=1e-10)
    assert torch.allclose(u[:, 0], d / d.norm(dim=1, keepdim=True), atol=1e-12)  # u_1 is the direction itself
    span = torch.stack(hist + [d], 1)  # every basis row lies in the span of the history and d
    q, _ = torch.linalg.qr(span.transpose(1, 2))
    inside = (q @ (q.transpose(1, 2) @ u.transpose(1, 2))).transpose(1, 2)
    assert torch.allclose(inside, u, atol=1e-10)
    assert bool(((u[:, 1:] * ref[:, None]).sum(2) >= 0).all())
    short = pas_basis(d, hist[:1], ref, 4)  # two directions span two dimensions: the other rows are zero
    assert torch.allclose(short[:, 2:], torch.zeros_like(short[:, 2:])) and short[:, 1].norm(dim=1).min() > 0.99


def test_json_round_trip_applies_the_coefficients(vp, learned_vp, tmp_path):
    path = learned_vp.save(tmp_path / "solver.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == LEARNED_FORMAT and doc["learned"]["method"] == learned_vp.learned["method"]
    assert len(doc["learned"]["coefficients"]) == 4 and doc["calibration"]["validation_rmse"] > 0
    assert {"kind", "sha256", "repr", "lambda_range"} <= set(doc["schedule"]) and doc["model"] == {"w": 0.0}
    back = load_grid(path)
    assert back == learned_vp and back.method == learned_vp.method
    s, x = vp["schedule"], vp["heldout"][:16]
    a, b = sample(vp["den"], x, s, grid=back), sample(vp["den"], x, s, grid=learned_vp)
    times_only = sample(vp["den"], x, s, solver="dpmpp_2m", grid=torch.tensor(learned_vp.times, dtype=F64))
    assert torch.equal(a.x, b.x) and not torch.allclose(a.x, times_only.x)
    bad = dict(doc, learned={**doc["learned"], "coefficients": doc["learned"]["coefficients"][:2]})
    with pytest.raises(ValueError, match="rows"):
        TunedGrid.from_dict(bad)


def _eps_model(den, family):
    """A diffusers-style eps model from a fewstep denoiser. It takes the scheduler's exact time rather than its
    float32 timestep, so that the comparison is of the solver alone."""
    def model(x, t):
        t = torch.as_tensor(t, dtype=F64).expand(len(x))
        a, s = family.schedule.alpha(t)[:, None], family.schedule.sigma(t)[:, None]
        return (x - a * den(x, t)) / s
    return model


def _flow_model(den, family):
    """A diffusers-style flow model: v = (x - x0) / sigma (x = (1 - sigma) x0 + sigma noise, v = noise - x0)."""
    def model(x, t):
        t = torch.as_tensor(t, dtype=F64).expand(len(x))
        return (x - den(x, t)) / t[:, None]
    return model


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_scheduler_loop_equals_fewstep_sample_with_a_learned_solver(family):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from fewstep.diffusers import FewstepScheduler
    cfg = (FlowMatchEulerDiscreteScheduler(shift=3.0) if family == "flow" else DPMSolverMultistepScheduler()).config
    schedule = FewstepScheduler.from_config(cfg).schedule
    p = gaussian_problem(schedule)
    tuned = tune_solver(p["den"], schedule, solver="unipc_bh2_2", nfe=5, calibration=p["cal"], reference_steps=32,
                        candidates=16)
    assert tuned.learned  # a learned solver, not the times alone
    assert tuned.times[0] == schedule.t_upper  # flow: from pure noise, where the pipeline draws it
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedGridWarning)  # the solver comes from the grid: no mismatch
        sched = FewstepScheduler.from_config(cfg, grid=tuned)
    assert sched.config.solver == "unipc_bh2_2"
    model = (_flow_model if family == "flow" else _eps_model)(p["den"], sched.family)
    x_T = p["heldout"][:16]
    sched.set_timesteps(5)
    x = x_T.clone()
    for i, t in enumerate(sched.timesteps):  # a pipeline's denoising loop
        x = sched.step(model(x, sched.grid[i]), t, x).prev_sample
    ref = sample(p["den"], x_T, schedule, grid=tuned)
    assert torch.allclose(x, ref.x, atol=1e-9, rtol=0)
    plain = FewstepScheduler.from_config(cfg, solver="unipc_bh2_2", grid={**tuned.to_dict(), "learned": {}})
    plain.set_timesteps(5)
    y = x_T.clone()
    for i, t in enumerate(plain.timesteps):
        y = plain.step(model(y, plain.grid[i]), t, y).prev_sample
    assert not torch.allclose(x, y, atol=1e-6)  # the scheduler applies the coefficients, not only the times


def test_mismatch_warnings_fire(vp, learned_vp):
    s, x = vp["schedule"], vp["heldout"][:2]
    with pytest.warns(TunedGridWarning, match="solver 'dpmpp_2m', not 'unipc_bh2_2'"):
        sample(vp["den"], x, s, solver="unipc_bh2_2", grid=learned_vp)
    other = TunedGrid.from_dict({**learned_vp.to_dict(), "model": {"name": "a", "fingerprint": "0123", "w": 1.0}})
    with pytest.warns(TunedGridWarning, match="other weights"):
        other.for_use(s, model={"name": "b", "fingerprint": "4567"})
    with pytest.warns(TunedGridWarning, match="w = 1, not w = 2"):
        other.for_use(s, w=2.0)
    with pytest.warns(TunedGridWarning, match="mapped by log-SNR"):
        moved = learned_vp.for_use(CosineVP())
    assert moved.learned == learned_vp.learned and moved.times[0] == CosineVP().t_max
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedGridWarning)  # checked once: passing it on warns no more
        sample(vp["den"], x, CosineVP(), grid=moved)


def test_bad_arguments_are_refused_in_one_line(vp):
    kw = dict(calibration=vp["cal"], reference_steps=32, candidates=16)
    for args, words in [({"method": "magic"}, "method must be one of"),
                        ({"solver": "heun"}, "one-call-per-step"),
                        ({"solver": "ddim", "method": "coeff"}, "first order"),
                        ({"validation": 1.5}, "validation must be a share"),
                        ({"basis": 0}, "basis must be"),
                        ({"times": "frozen"}, "times must be 'tuned'"),
                        ({"times": "fixed", "method": "grid"}, "nothing to fit")]:
        with pytest.raises(ValueError, match=words):
            tune_solver(vp["den"], vp["schedule"], **{"nfe": 4, **kw, **args})


def test_cli_tune_writes_a_learned_solver_that_sample_uses(tmp_path):
    from click.testing import CliRunner

    from fewstep.cli import main
    out = tmp_path / "s.json"
    args = ["tune", "--model", "mnist-teacher", "--steps", "3", "--w", "1", "--method", "coeff", "--samples", "4",
            "--heldout", "2", "--reference-steps", "4", "--candidates", "2", "--max-evals", "8", "--out", str(out)]
    result = CliRunner().invoke(main, args, standalone_mode=False)
    assert result.exit_code == 0, result.output
    tuned = load_grid(out)
    assert tuned.nfe == 3 and tuned.w == 1.0 and tuned.model["name"] == "mnist-teacher" and tuned.model["fingerprint"]
    assert tuned.calibration["method"] == "coeff" and tuned.heldout["samples"] == 2 and tuned.heldout["rmse"] >= 0
    assert tuned.cost["model_calls"] > 0 and "wrote" in result.output
    png = tmp_path / "a.png"
    used = CliRunner().invoke(main, ["sample", "--grid", str(out), "--w", "1", "--labels", "3,8", "--no-progress",
                                     "--out", str(png)])
    assert used.exit_code == 0, used.output
    assert "NFE 3" in used.output and png.is_file()


def test_flow_calibration_starts_from_pure_noise_on_the_exact_ode():
    from fewstep.schedules import FlowMatching
    from fewstep.tune import from_pure_noise
    schedule = FlowMatching()
    g = torch.Generator().manual_seed(3)
    mu, std = torch.randn(D, generator=g, dtype=F64), torch.logspace(-2, 0, D, dtype=F64)
    den = GaussianMixture(mu[None], std[None], torch.ones(1), torch.zeros(1, dtype=torch.long)).denoiser(schedule)
    x = torch.randn(8, D, generator=g, dtype=F64)
    exact = single_gaussian_flow(mu, std, schedule, x, schedule.t_upper, schedule.t_max)
    assert torch.allclose(from_pure_noise(den, schedule, x), exact, atol=1e-9, rtol=0)
    assert (x - exact).abs().max() > 1e-4  # the step it takes is not negligible
