"""Learned solvers fitted to diffusers text-to-image pipelines (`fewstep tune --model <pipeline folder>`): the
prompt split (held-out prompts never seen in fitting), the tuned solver used by the stock pipeline call through
FewstepScheduler equal to fewstep's sampler with it, the `tuned:<json>` scheduler of the evaluation, the
shipped tuned solvers looked up by name, and one-line errors. Tiny random pipelines, offline."""
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_text import tiny_sd, tiny_sd3  # noqa: E402

import fewstep  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.evaluate import check_scheduler_name, make_scheduler  # noqa: E402
from fewstep.grids import load_grid  # noqa: E402
from fewstep.recipes.teachers import teacher_from  # noqa: E402
from fewstep.tune import calibration_set, prompt_split  # noqa: E402

PROMPTS = ["a thin 1", "a thick 2", "a 3 slanted left", "a 4", "a thin 5", "a thick 6", "a 7", "an 8"]
FAST = ["--samples", "4", "--heldout", "2", "--reference-steps", "4", "--candidates", "2", "--max-evals", "6"]


@pytest.fixture(scope="module", params=["sd", "sd3"])
def tuned(request, tmp_path_factory):
    """(pipeline folder, prompts file, tuned solver JSON) of a tiny SD / SD3 pipeline, fitted by the CLI."""
    root = tmp_path_factory.mktemp(f"tune-{request.param}")
    folder = root / request.param
    (tiny_sd if request.param == "sd" else tiny_sd3)().save_pretrained(folder)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "tuned.json"
    args = ["tune", "--model", str(folder), "--prompts", str(prompts), "--w", "1", "--steps", "3", "--method", "coeff",
            *FAST, "--out", str(out)]
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, args, standalone_mode=False)
    assert result.exit_code == 0, result.output
    return folder, prompts, out


def test_every_fourth_prompt_is_held_out_and_the_sets_are_disjoint():
    cal, held = prompt_split(8)
    assert held == [3, 7] and cal == [0, 1, 2, 4, 5, 6]
    assert prompt_split(2) == ([0], [1])  # too few for every 4th: the last one
    with pytest.raises(ValueError, match="at least 2 prompts"):
        prompt_split(1)
    labels = calibration_set(200, (2,), seed=0, num_classes=8, classes=cal).cond["labels"]
    assert set(labels.tolist()) == set(cal)  # every calibration prompt drawn, no held-out one


def test_validation_samples_get_calibration_prompts_the_fitting_samples_never_see():
    from fewstep.tune import _validation_prompts
    cal_ids, _ = prompt_split(90)
    cal, drawn = _validation_prompts(calibration_set(48, (2,), seed=0, classes=cal_ids), cal_ids, 0.25, seed=0)
    fit, val = cal.cond["labels"][:36].tolist(), cal.cond["labels"][36:].tolist()
    assert len(val) == 12 and not set(fit) & set(val) and set(fit) | set(val) <= set(cal_ids) and drawn == val
    assert set(val) <= {cal_ids[i] for i in prompt_split(len(cal_ids))[1]}


def test_the_json_records_both_prompt_sets_and_the_heldout_error(tuned):
    folder, _, out = tuned
    grid = load_grid(out)
    doc = json.loads(out.read_text())
    cal, held = grid.model["calibration_prompts"], grid.model["heldout_prompts"]
    assert sorted(cal + held) == sorted(PROMPTS) and not set(cal) & set(held) and held == [PROMPTS[3], PROMPTS[7]]
    # the validation split's prompts: calibration prompts that the fitting samples never use (every 4th of them)
    assert grid.model["validation_prompts"] == [PROMPTS[4]]
    assert grid.w == 1.0 and grid.nfe == 3 and grid.model["fingerprint"]
    # coeff as asked, unless it did not beat the times alone on the validation split (then it says so)
    assert doc["learned"].get("method") == "coeff" or grid.calibration.get("fell_back_to_grid")
    assert grid.heldout["samples"] == 2 and grid.heldout["rmse"] >= 0 and grid.cost["model_calls"] > 0


def test_the_stock_pipeline_call_with_the_tuned_solver_equals_fewstep_sample(tuned):
    """pipe.scheduler = FewstepScheduler.from_config(config, grid=tuned); pipe(prompt, num_inference_steps=3,
    guidance_scale=2) from given latents gives fewstep.sample's result with that tuned solver, to 1e-4."""
    from fewstep.diffusers import FewstepScheduler
    from fewstep.sampling import sample
    folder, _, out = tuned
    grid = load_grid(out)
    pipe = fewstep.load(folder)  # DiffusionPipeline.from_pretrained, SD3's absent T5 left None
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, grid=str(out))
    teacher = teacher_from(folder, PROMPTS)
    x_T = torch.randn((2, *teacher.image_shape), generator=torch.Generator().manual_seed(5))
    prompts = [PROMPTS[3], PROMPTS[7]]  # held-out prompts
    with torch.no_grad():
        stock = pipe(prompts, num_inference_steps=3, guidance_scale=2.0, latents=x_T.clone(),
                     output_type="latent").images
        ours = sample(teacher.denoiser(1.0), x_T, teacher.schedule,
                      grid=grid.for_use(teacher.schedule), cond={"labels": torch.tensor([3, 7])}).x
    assert stock.shape == ours.shape
    assert torch.allclose(stock.float(), ours.float(), atol=1e-4, rtol=0), (stock - ours).abs().max()


def test_the_evaluation_takes_a_tuned_scheduler_by_its_json(tuned, tmp_path):
    from fewstep.diffusers import FewstepScheduler
    folder, _, out = tuned
    source = fewstep.load(folder).scheduler
    sched = make_scheduler(f"tuned:{out}", source)
    assert isinstance(sched, FewstepScheduler) and sched.config.grid["nfe"] == 3
    with pytest.raises(ValueError, match="tuned:<path"):
        check_scheduler_name(f"tuned:{tmp_path / 'missing.json'}")


def test_shipped_tuned_solvers_are_found_by_model_name_and_steps():
    for name in ("mnist-teacher", "mnist-sd", "mnist-sd3"):
        for steps in (4, 5, 6, 8):
            grid = fewstep.shipped_solver(name, steps)
            assert grid.nfe == steps and grid.heldout.get("rmse") is not None
    with pytest.raises(ValueError, match="no tuned grid .* 3 model calls"):
        fewstep.shipped_solver("mnist-sd", 3)


def test_of_several_solvers_shipped_for_a_budget_the_lowest_held_out_error_is_the_default(tmp_path):
    from fewstep.api import _resolve
    from fewstep.grids import load_grid
    src = load_grid(_resolve("mnist-sd") / "grids" / "dpmpp_2m-nfe5-w1.json")
    for solver, err in (("dpmpp_2m", 0.05), ("unipc_bh2_2", 0.03), ("ddim", None)):
        g = load_grid(_resolve("mnist-sd") / "grids" / "dpmpp_2m-nfe5-w1.json")
        g.solver, g.heldout = solver, ({} if err is None else {**src.heldout, "rmse": err})
        g.save(tmp_path / "grids" / f"{solver}-nfe5-w1.json")
    assert fewstep.shipped_solver(tmp_path, 5).solver == "unipc_bh2_2"
    assert fewstep.shipped_solver(tmp_path, 5, solver="dpmpp_2m").solver == "dpmpp_2m"


def test_prompts_for_a_fewstep_model_and_a_bad_prompts_file_are_refused_in_one_line(tmp_path):
    out = str(tmp_path / "t.json")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a 1\n")
    r = CliRunner().invoke(main, ["tune", "--model", "mnist-teacher", "--prompts", str(prompts), "--steps", "3",
                                  "--out", out])
    assert r.exit_code == 2 and "--prompts is for diffusers pipeline folders" in r.output
    r = CliRunner().invoke(main, ["tune", "--model", "mnist-sd", "--prompts", str(tmp_path / "none.txt"), "--steps",
                                  "3", "--out", out])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["tune", "--model", "mnist-sd", "--prompts", str(prompts), "--steps", "3", "--w",
                                  "1", "--out", out, *FAST])
    assert r.exit_code == 2 and "at least 2 prompts" in r.output


def test_generate_with_a_tuned_solver_is_the_stock_call_with_it(tuned):
    """fewstep.generate(pipe, prompts, grid=tuned.json) (what `fewstep sample --model PIPE --grid` runs) gives the
    stock pipeline call's images with FewstepScheduler(grid=tuned.json), from the same per-image noise."""
    from fewstep.api import sample_generators
    from fewstep.diffusers import FewstepScheduler
    folder, _, out = tuned
    pipe = fewstep.load(folder)
    pipe.set_progress_bar_config(disable=True)
    texts = [PROMPTS[3], PROMPTS[7]]
    ours = fewstep.generate(pipe, prompts=texts, w=1.0, grid=str(out), seed=4)
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, grid=str(out))
    stock = pipe(texts, num_inference_steps=3, guidance_scale=2.0, generator=sample_generators(4, 0, 2),
                 output_type="pt").images
    assert torch.allclose(ours, stock * 2 - 1, atol=1e-3, rtol=0), (ours - (stock * 2 - 1)).abs().max()
    with pytest.raises(ValueError, match="fitted for 3 model calls"):
        fewstep.generate(pipe, prompts=texts, w=1.0, grid=str(out), steps=5)
