"""The `fewstep` command: misuse exits 2 with one clear line, and a tiny `bench solvers`
run writes the JSON the issue specifies."""
import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fewstep.cli import main
from fewstep.solvers import SOLVERS

ROW_KEYS = {"impl", "solver", "spacing", "nfe", "rmse", "overhead_us_per_step"}


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model"], ["unknown model", "gmm-mnist"]),
    (["--model", "/no/such/folder/anywhere"], ["unknown model", "diffusers model folder"]),
    (["--w", "nan"], ["--w", "finite"]),
    (["--w", "inf"], ["--w", "finite"]),
    (["--nfe", "5,x"], ["--nfe", "integers"]),
    (["--nfe", "0"], ["--nfe", "from 1 to 1000"]),
    (["--samples", "0"], ["--samples"]),
    (["--threads", "0"], ["--threads"]),
])
def test_misuse_exits_2_with_one_line(args, words):
    result = invoke("bench", "solvers", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fewstep: error:")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_model_folder_without_configs_is_misuse(tmp_path):
    result = invoke("bench", "solvers", "--model", str(tmp_path))
    assert result.exit_code == 2
    assert "neither a diffusers model folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_command_and_option_are_one_line():
    for args in (["nosuch"], ["bench", "solvers", "--bogus"]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_module_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "bench", "solvers", "--nfe", "abc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "--nfe" in proc.stderr


def test_help_lists_bench_solvers():
    assert "bench" in invoke("--help").output
    assert "--quick" in invoke("bench", "solvers", "--help").output


def test_tiny_bench_run_writes_the_json_schema(tmp_path):
    out = tmp_path / "results.json"
    result = invoke("bench", "solvers", "--quick", "--model", "gmm-mnist", "--nfe", "5", "--samples", "4",
                    "--out-dir", str(tmp_path), "--json", str(out))
    assert result.exit_code == 0, result.output + result.stderr
    doc = json.loads(out.read_text())
    assert {"model", "reference", "machine", "results"} <= set(doc)  # (+ "defaults_check" where the bench adds it)
    assert {"cpu", "torch", "diffusers", "date"} <= set(doc["machine"])
    assert doc["reference"]["max_abs_diff_vs_half_steps"] < 1e-2
    rows = doc["results"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    assert all(r["impl"] in ("fewstep", "diffusers") and math.isfinite(r["rmse"]) and r["rmse"] >= 0 for r in rows)
    default = [r for r in rows if (r["impl"], r["solver"], r["spacing"])
               == ("diffusers", "DPMSolverMultistepScheduler", "default")]
    assert len(default) == 1 and default[0]["nfe"] == 5 and default[0]["overhead_us_per_step"] > 0
    multistep = [r for r in rows if (r["impl"] == "fewstep" and SOLVERS[r["solver"]].kind == "multistep")
                 or (r["impl"] == "diffusers" and r["solver"] != "HeunDiscreteScheduler")]
    assert multistep and all(r["nfe"] == 5 for r in multistep)
    assert {r["solver"] for r in rows if r["impl"] == "fewstep"} >= {"dpmpp_2m", "ddim"}
    # fewstep dpmpp_2m on diffusers' own grid is the same algorithm: the same error
    same = [r["rmse"] for r in rows if (r["solver"], r["spacing"]) == ("dpmpp_2m", "diffusers_default")]
    assert same and same[0] == pytest.approx(default[0]["rmse"], rel=1e-3)
    assert (tmp_path / "results.md").read_text().count("diffusers") > 3
    assert (tmp_path / "results.png").stat().st_size > 10_000


def _commands(group, prefix=()):
    import click
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_has_help_with_defaults():
    from click.testing import CliRunner

    from fewstep.cli import main
    paths = list(_commands(main))
    assert {("demo",), ("sample",), ("eval",), ("train",), ("distill", "guided"), ("distill", "progressive"),
            ("distill", "dmd"), ("translate",), ("tune",), ("bench", "solvers"), ("bench", "speed")} <= set(paths)
    for path in paths:
        r = CliRunner().invoke(main, [*path, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, (path, r.output)
        assert len(r.output.split("Usage:")[1].strip().splitlines()[0]) > 0
