"""`fewstep demo`: the comparison image, the table (markdown + JSON) and the CLI's refusals."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from fewstep.api import SHIPPED
from fewstep.demo import DemoRow, demo_rows, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_on_reduced_rows_writes_image_and_table(tmp_path):
    rows = [DemoRow("teacher DDIM 4 steps", "mnist-teacher", {"solver": "ddim", "steps": 4}),
            DemoRow("teacher DPM-Solver++ 2 steps", "mnist-teacher", {"solver": "dpmpp_2m", "steps": 2}),
            DemoRow("guided student, 4 steps", "mnist-guided-4"),
            DemoRow("not shipped", "mnist-guided-3")]
    doc = run_demo(tmp_path, fid_n=20, budget_seconds=600, rows=rows, progress=False)
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == [r.label for r in rows[:3]]
    assert [r["network_evals"] for r in table["rows"]] == [8, 4, 4]  # guided teacher steps cost two evaluations
    assert table["rows"][0]["speedup"] == pytest.approx(1.0)
    assert all(r["seconds_per_image"] > 0 and r["fid"] > 0 and 0 <= r["class_accuracy"] <= 1 for r in table["rows"])
    assert any("mnist-guided-3" in s for s in table["skipped"])
    md = (tmp_path / "table.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 3 and "Skipped" in md  # header + rows
    with Image.open(doc["files"]["image"]) as im:
        assert im.size[0] > 600 and im.size[1] > 3 * 60  # three rows of ten digits with labels


def test_demo_plan_covers_the_shipped_routes():
    plan = demo_rows()
    assert plan[0].options == {"solver": "ddim", "steps": 50}
    models = {r.model for r in plan}
    assert {"mnist-teacher", "mnist-guided-4", "mnist-guided-1", "mnist-dmd-1"} <= models
    assert {"mnist-teacher", "mnist-guided-4", "mnist-dmd-1"} <= set(SHIPPED)


@pytest.mark.parametrize("args, message", [
    (["--out", "/proc/fewstep-demo"], "cannot write to /proc/fewstep-demo"),
    (["--fid-n", "-3"], "--fid-n"),
])
def test_demo_misuse_exits_2_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "fewstep", "demo", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_demo_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "table.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "fewstep", "demo", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (tmp_path / "table.json").read_text() == "{}"
