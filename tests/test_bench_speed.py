"""`fewstep bench speed`: one row per shipped model and sampler, every batch size, in one run."""
import json

import pytest
from click.testing import CliRunner

from fewstep.bench.speed import run_speed, speed_rows
from fewstep.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_speed_rows_cover_the_shipped_models():
    labels = [r["label"] for r in speed_rows()]
    assert labels[0] == "mnist-teacher ddim 50 steps"
    assert {"mnist-guided-4", "mnist-dmd-1"} <= set(labels)


def test_run_speed_writes_every_row_and_batch(tmp_path):
    rows = [{"label": "teacher ddim 2", "model": "mnist-teacher", "options": {"solver": "ddim", "steps": 2}, "w": 1.0},
            {"label": "dmd", "model": "mnist-dmd-1", "options": {}, "w": 1.0}]
    doc = run_speed(tmp_path, batches=(1, 3), rows=rows, log=lambda m: None)
    table = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["label"], r["batch"]) for r in table["rows"]] == [("teacher ddim 2", 1), ("teacher ddim 2", 3),
                                                                 ("dmd", 1), ("dmd", 3)]
    assert [r["network_evals"] for r in table["rows"]] == [4, 4, 1, 1]  # a guided teacher step costs two
    assert all(r["images_per_second"] > 0 for r in doc["rows"])
    md = (tmp_path / "speed.md").read_text()
    assert "| teacher ddim 2 | 4 |" in md and "| dmd | 1 |" in md


@pytest.mark.parametrize("args, words", [(["--batches", "1,x"], "--batches"), (["--batches", "0"], "--batches"),
                                         (["--device", "cuda:99"], "--device cuda:99"),
                                         (["--out-dir", "/proc/speed"], "cannot write")])
def test_bench_speed_misuse(args, words):
    r = CliRunner().invoke(main, ["bench", "speed", *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_bench_speed_times_named_pipelines_a_teacher_and_its_exported_student(tmp_path):
    """--model takes diffusers pipeline folders: the shipped mnist-sd (fewstep's default solver, guided) and its
    one-step DMD student (its own stock call, w baked in: timed at w = 0, one network evaluation)."""
    out = tmp_path / "speed"
    r = CliRunner().invoke(main, ["bench", "speed", "--model", "mnist-sd", "--model", "mnist-sd3-dmd-1",
                                  "--batches", "1,2", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert [(x["label"], x["batch"]) for x in rows] == [("mnist-sd", 1), ("mnist-sd", 2), ("mnist-sd3-dmd-1", 1),
                                                        ("mnist-sd3-dmd-1", 2)]
    teacher, student = rows[0], rows[2]
    assert teacher["w"] == 1.0 and teacher["network_evals"] == 40  # 20 guided calls, each cond + uncond
    assert student["w"] == 0.0 and student["network_evals"] == 1
    assert all(x["images_per_second"] > 0 for x in rows)


def test_bench_speed_refuses_a_model_that_is_not_there(tmp_path):
    r = CliRunner().invoke(main, ["bench", "speed", "--model", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no model named" in r.output and "Traceback" not in r.output
