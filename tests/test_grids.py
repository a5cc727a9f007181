"""Tuned time grids: on a closed-form flow (one Gaussian) the tuned grid beats every fixed spacing
and the tuner's objective decreases; the DP finds the cheapest path; the JSON round-trips; a grid
used with another schedule, solver or model is warned about (or refused when it cannot map)."""
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from fewstep.data.gmm import GaussianMixture, single_gaussian_flow
from fewstep.grids import FORMAT, TunedGrid, TunedGridWarning, find_grid, load_grid
from fewstep.sampling import sample
from fewstep.schedules import EDM, CosineVP, LinearVP, time_grid
from fewstep.tune import (calibration_set, dp_grid, grid_rmse, reference_trajectory, step_costs, tune_grid)

F64 = torch.float64
D = 16


@pytest.fixture(scope="module")
def gaussian():
    """Data N(mu, diag(std^2)) with stds from 0.01 to 1 under LinearVP: exact denoiser and exact flow."""
    g = torch.Generator().manual_seed(0)
    mu, std = torch.randn(D, generator=g, dtype=F64), torch.logspace(-2, 0, D, dtype=F64)
    schedule = LinearVP()
    den = GaussianMixture(mu[None], std[None], torch.ones(1), torch.zeros(1, dtype=torch.long)).denoiser(schedule)

    def exact(x_T):  # the limit of every grid ending in 0: the ODE to t_min, then one denoising call
        x = single_gaussian_flow(mu, std, schedule, x_T, schedule.t_max, schedule.t_min)
        return den(x, torch.full((len(x),), schedule.t_min, dtype=F64))
    cal = calibration_set(32, (D,), seed=1, dtype=F64)
    heldout = torch.randn(128, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    return {"schedule": schedule, "den": den, "exact": exact, "cal": cal, "heldout": heldout}


@pytest.fixture(scope="module")
def tuned(gaussian):
    return tune_grid(gaussian["den"], gaussian["schedule"], solver="dpmpp_2m", nfe=4, calibration=gaussian["cal"],
                     reference_steps=32, candidates=16, max_evals=40)


def test_reference_trajectory_matches_the_exact_flow(gaussian):
    traj = reference_trajectory(gaussian["den"], gaussian["schedule"], gaussian["cal"].x_T, steps=32, candidates=16)
    assert len(traj.xs) == len(traj.times) == 17 and traj.model_calls == 4 * 32 + 1 + 4 * 16 + 1
    err = traj.final - gaussian["exact"](gaussian["cal"].x_T)
    # its own error estimate (the difference from half the steps) bounds the true error; in RK4's asymptotic
    # range, as here, by about the factor 15
    assert 5 * float(err.pow(2).mean().sqrt()) <= traj.error["rmse"] < 3e-3
    assert 5 * float(err.abs().max()) <= traj.error["max_abs"]


def test_tuned_grid_beats_every_fixed_spacing_on_heldout_noise(gaussian, tuned):
    s, den, x = gaussian["schedule"], gaussian["den"], gaussian["heldout"]
    ref = gaussian["exact"](x)
    mine = grid_rmse(den, s, "dpmpp_2m", torch.tensor(tuned.times, dtype=F64), x, None, ref)
    fixed = {sp: grid_rmse(den, s, "dpmpp_2m", time_grid(s, 4, sp), x, None, ref)
             for sp in ("logsnr", "karras", "time_uniform", "time_quadratic")}
    assert mine <= min(fixed.values())
    assert mine < 0.9 * fixed["logsnr"]  # and by a margin over the default spacing
    times = torch.tensor(tuned.times, dtype=F64)
    assert len(times) == 5 and times[0] == s.t_max and times[-1] == 0 and (times[1:] < times[:-1]).all()
    assert times[-2] == s.t_min  # by default the last finite time stays at t_min, as in the fixed spacings


def test_the_tuners_objective_decreases(tuned):
    obj = tuned.calibration["objective"]
    assert all(b <= a for a, b in zip(obj, obj[1:]))
    assert obj[-1] < 0.9 * obj[0]
    assert tuned.calibration["rmse"] == pytest.approx(obj[-1], rel=1e-9)
    assert tuned.calibration["rmse"] <= min(tuned.calibration["fixed_spacings"].values())
    assert tuned.cost["model_calls"] > 0 and tuned.cost["seconds"] >= 0


@pytest.mark.parametrize("free_end", [False, True])
def test_dp_finds_the_cheapest_path(gaussian, free_end):
    traj = reference_trajectory(gaussian["den"], gaussian["schedule"], gaussian["cal"].x_T, steps=16, candidates=8)
    costs = step_costs(traj, gaussian["schedule"], "dpmpp_2m")
    m, nfe = len(traj.times), 4
    paths = [(0, *mid) for mid in itertools.combinations(range(1, m), nfe - 1) if free_end or mid[-1] == m - 1]
    best = min((float(costs["first"][p[1]] + sum(costs["pair"][a, b, c] for a, b, c in zip(p, p[1:], p[2:]))
                      + costs["final"][p[-1]]), p) for p in paths)
    grid, value = dp_grid(traj, costs, nfe, free_end)
    assert value == pytest.approx(best[0], rel=1e-12)
    assert torch.equal(grid[:-1], traj.times[list(best[1])].to(F64)) and grid[-1] == 0
    assert free_end or grid[-2] == gaussian["schedule"].t_min


def test_json_round_trip_and_sampling_with_it(gaussian, tuned, tmp_path):
    path = tuned.save(tmp_path / "grid.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["solver"] == "dpmpp_2m" and doc["nfe"] == 4
    assert {"kind", "sha256", "repr", "lambda_range"} <= set(doc["schedule"])
    back = load_grid(path)
    assert back == tuned
    s, x = gaussian["schedule"], gaussian["heldout"][:8]
    a = sample(gaussian["den"], x, s, solver="dpmpp_2m", grid=back)
    b = sample(gaussian["den"], x, s, solver="dpmpp_2m", grid=torch.tensor(tuned.times, dtype=F64))
    assert torch.equal(a.x, b.x) and a.nfe == 4
    bad = dict(doc, format="something-else")
    with pytest.raises(ValueError, match="not a fewstep tuned grid"):
        TunedGrid.from_dict(bad)


def test_another_schedule_is_mapped_by_logsnr_with_a_warning_or_refused(tuned):
    other = CosineVP()
    with pytest.warns(TunedGridWarning, match="mapped by log-SNR"):
        t = tuned.grid_for(other)
    lam = other.lambda_(t[:-1])
    assert torch.allclose(lam[1:], torch.tensor(tuned.lambdas[1:-1], dtype=F64), atol=1e-9) and t[-1] == 0
    assert tuned.lambdas[-2] > 2.31  # the last finite point is cleaner than EDM(sigma_min=0.1) reaches:
    with pytest.raises(ValueError, match="outside"):
        tuned.grid_for(EDM(sigma_min=0.1, sigma_max=80.0))


def test_another_solver_or_model_is_warned_about(gaussian, tuned):
    with pytest.warns(TunedGridWarning, match="solver 'dpmpp_2m', not 'unipc_bh2_2'"):
        sample(gaussian["den"], gaussian["heldout"][:2], gaussian["schedule"], solver="unipc_bh2_2", grid=tuned)
    g = TunedGrid.from_dict({**tuned.to_dict(), "model": {"name": "a", "fingerprint": "0123", "w": 1.0}})
    with pytest.warns(TunedGridWarning, match="other weights"):
        g.grid_for(gaussian["schedule"], model={"name": "b", "fingerprint": "4567"})
    with pytest.warns(TunedGridWarning, match="w = 1, not w = 2"):
        g.grid_for(gaussian["schedule"], w=2.0)


def test_find_grid_names_what_is_there(tuned, tmp_path):
    tuned.save(tmp_path / "grids" / "a.json")
    assert find_grid(tmp_path, "dpmpp_2m", 4) == tuned
    with pytest.raises(ValueError, match="no tuned grid for solver 'dpmpp_2m', 5 model calls.*dpmpp_2m NFE 4"):
        find_grid(tmp_path, "dpmpp_2m", 5)


def test_only_deterministic_one_call_per_step_solvers_are_tuned(gaussian):
    for solver in ("dpm_solver_3", "heun", "sde_dpmpp_2m"):
        with pytest.raises(ValueError, match="tunes deterministic one-call-per-step solvers"):
            tune_grid(gaussian["den"], gaussian["schedule"], solver=solver, nfe=4, calibration=gaussian["cal"])


def test_scheduler_takes_a_tuned_grid(tuned, tmp_path):
    from fewstep.diffusers import FewstepScheduler
    with pytest.warns(TunedGridWarning):  # fitted on LinearVP; the scheduler's schedule is a DiscreteVP
        sch = FewstepScheduler(solver="dpmpp_2m", grid=tuned)
    sch.set_timesteps(4)
    lam = sch.schedule.lambda_(sch.grid[1:-1])
    assert torch.allclose(lam, torch.tensor(tuned.lambdas[1:-1], dtype=F64), atol=1e-6)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        sch.set_timesteps(5)
    sch.save_pretrained(tmp_path / "s")
    with pytest.warns(TunedGridWarning):
        again = FewstepScheduler.from_pretrained(tmp_path / "s")
    again.set_timesteps(4)
    assert torch.equal(again.grid, sch.grid)
    plain = FewstepScheduler(solver="dpmpp_2m")
    plain.set_timesteps(sigmas=tuned.sigmas)  # the same points through diffusers' sigmas (the start is the
    assert torch.allclose(plain.grid[1:], sch.grid[1:], atol=1e-6)  # fitted schedule's t_max, mapped by log-SNR)


def test_generate_uses_the_models_tuned_grid_by_name(tmp_path):
    import shutil

    from fewstep.api import ASSETS, generate, load
    from fewstep.grids import lambdas_of, model_identity, schedule_identity
    folder = tmp_path / "teacher"
    shutil.copytree(ASSETS / "mnist-teacher", folder, ignore=shutil.ignore_patterns("grids"))
    model = load(folder)
    times = time_grid(model.schedule, 3, "karras")
    TunedGrid("dpmpp_2m", 3, times.tolist(), lambdas_of(model.schedule, times), schedule_identity(model.schedule),
              {**model_identity(model), "w": 1.0}).save(folder / "grids" / "dpmpp_2m-nfe3-w1.json")
    labels = torch.tensor([3, 7])
    tuned = generate(model, labels, w=1.0, solver="dpmpp_2m", steps=3, spacing="tuned")
    assert torch.equal(tuned, generate(model, labels, w=1.0, solver="dpmpp_2m", steps=3, spacing="karras"))
    assert model.nfe("dpmpp_2m", 3, "tuned") == 3
    with pytest.raises(ValueError, match="no tuned grid for solver 'dpmpp_2m', 4 model calls"):
        generate(model, labels, w=1.0, solver="dpmpp_2m", steps=4, spacing="tuned")
    with pytest.warns(TunedGridWarning, match="w = 1, not w = 2"):
        generate(model, labels, w=2.0, solver="dpmpp_2m", steps=3, grid=load_grid(folder / "grids" /
                                                                                    "dpmpp_2m-nfe3-w1.json"))


def test_bench_report_marks_rows_at_the_references_resolution():
    from fewstep.bench.report import UNRANKED, _table, _target_best, best_spacings, floor_of
    row = lambda impl, solver, spacing, nfe, rmse: {"impl": impl, "solver": solver, "spacing": spacing,  # noqa: E731
                                                    "nfe": nfe, "rmse": rmse, "overhead_us_per_step": None}
    rows = [row("fewstep", "a", "logsnr", 5, 2e-3), row("fewstep", "a", "karras", 5, 5e-4),
            row("fewstep", "a", "logsnr", 10, 0.2), row("fewstep", "a", "karras", 10, 0.3),
            row("diffusers", "DPMSolverMultistepScheduler", "default", 5, 0.1),
            row("diffusers", "DPMSolverMultistepScheduler", "default", 10, 0.2)]
    doc = {"reference": {"error_estimate": 1e-3, "unranked_below": 1e-2}, "results": rows}
    floor = floor_of(doc)
    assert best_spacings(rows) == {("fewstep", "a"): "karras", ("diffusers", "DPMSolverMultistepScheduler"): "default"}
    assert best_spacings(rows, floor)[("fewstep", "a")] == "logsnr"  # both NFE-5 errors tie at the floor
    table = "\n".join(_table(rows, [("fewstep", "a", "karras")], (5, 10), floor))
    assert f"5.00e-04 {UNRANKED}" in table and f"3.00e-01 {UNRANKED}" not in table
    best = _target_best(rows, {(r["impl"], r["solver"], r["spacing"], r["nfe"]): r["rmse"] for r in rows}, floor)
    assert UNRANKED in best["lines"][0] and "0.100" in best["lines"][0]  # ratio taken at the floor, not 5e-4


def test_cli_tune_writes_a_grid_and_refuses_misuse(tmp_path):
    import click
    from click.testing import CliRunner

    from fewstep.cli import main
    out = tmp_path / "g.json"
    args = ["tune", "--model", "mnist-teacher", "--nfe", "3", "--w", "1", "--samples", "4", "--reference-steps", "4",
            "--candidates", "2", "--max-evals", "4", "--out", str(out)]
    result = CliRunner().invoke(main, args, standalone_mode=False)
    assert result.exit_code == 0, result.output
    grid = load_grid(out)
    assert grid.solver == "dpmpp_2m" and grid.nfe == 3 and grid.w == 1.0 and grid.model["name"] == "mnist-teacher"
    assert grid.calibration["samples"] == 4 and grid.cost["model_calls"] > 0 and "wrote" in result.output
    bad = CliRunner().invoke(main, ["tune", "--nfe", "3", "--solver", "heun", "--out", str(tmp_path / "h.json")],
                             standalone_mode=False)
    assert isinstance(bad.exception, click.UsageError) and "one-call-per-step" in str(bad.exception)


def test_shipped_teacher_grids_serve_the_demos_tuned_row():
    from fewstep.api import ASSETS, generate, load
    from fewstep.demo import demo_rows
    grid = find_grid(ASSETS / "mnist-teacher", "dpmpp_2m", 5, 1.0)
    # a learned solver (PAS) measured on held-out noise: below its own times alone and every fixed spacing
    assert grid.learned and grid.heldout["rmse"] < min(grid.heldout["grid_alone"], grid.heldout["best_fixed"])
    assert grid.calibration["samples"] >= 64 and grid.model["name"] == "mnist-teacher"
    row = next(r for r in demo_rows() if "tuned" in r.label)
    model = load("mnist-teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedGridWarning)  # the shipped grid fits the shipped model: no warning
        x = generate(model, torch.tensor([1, 2]), w=1.0, **row.options)
    assert x.shape == (2, 1, 28, 28)


def test_cli_sample_takes_a_grid_file_or_the_shipped_grid_by_name(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from fewstep.api import ASSETS, generate, load
    from fewstep.cli import main
    path = ASSETS / "mnist-teacher" / "grids" / "dpmpp_2m-nfe5-w1.json"
    run = lambda *a: CliRunner().invoke(main, ["sample", "--w", "1", "--labels", "3,8", "--no-progress", *a])  # noqa: E731
    by_file = run("--grid", str(path), "--out", str(tmp_path / "a.png"))
    assert by_file.exit_code == 0, by_file.output
    assert "NFE 5" in by_file.output  # solver and model calls come from the grid
    by_name = run("--spacing", "tuned", "--steps", "5", "--out", str(tmp_path / "b.png"))
    assert by_name.exit_code == 0, by_name.output
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert np.array_equal(a, b)  # the same shipped grid either way
    logsnr = generate(load("mnist-teacher"), torch.tensor([3, 8]), w=1.0, solver="dpmpp_2m", steps=5)
    tuned = generate(load("mnist-teacher"), torch.tensor([3, 8]), w=1.0, grid=load_grid(path), steps=5,
                     solver="dpmpp_2m")
    assert not torch.equal(logsnr, tuned)  # the grid changes the samples
    for args, words in [(["--grid", str(path), "--steps", "4"], "tuned for 5 model calls"),
                        (["--grid", str(path), "--spacing", "karras"], "leave out --spacing karras"),
                        (["--grid", str(tmp_path / "none.json")], "no tuned grid file"),
                        (["--spacing", "tuned", "--steps", "7"], "no tuned grid for solver 'dpmpp_2m', 7 model calls")]:
        bad = run(*args, "--out", str(tmp_path / "c.png"))
        assert bad.exit_code == 2 and words in bad.output, (args, bad.output)


def test_cli_eval_takes_a_grid_file(tmp_path):
    from click.testing import CliRunner

    from fewstep.api import ASSETS
    from fewstep.cli import main
    path = ASSETS / "mnist-teacher" / "grids" / "dpmpp_2m-nfe4-w1.json"
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", "--w", "1", "--grid", str(path), "-n", "20", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["spacing"] == "given grid" and doc["solver"] == "dpmpp_2m" and doc["steps"] == 4 and doc["nfe"] == 4
    assert 0.0 <= doc["class_accuracy"] <= 1.0 and doc["fid"] > 0
    bad = CliRunner().invoke(main, ["eval", "--w", "1", "--grid", str(path), "--sweep-steps", "4,5", "--json",
                                    str(tmp_path / "s.json"), "-n", "20"])
    assert bad.exit_code == 2 and "sweep steps with --spacing tuned" in bad.output
