"""`fewstep demo`: the comparison image, the table (markdown + JSON), the text-to-image section (on stand-in
students: untrained copies of mnist-sd exported as students are) and the CLI's refusals."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewstep.api import ASSETS, SHIPPED
from fewstep.data.captions import parse_caption
from fewstep.demo import (TEXT_STUDENTS, DemoRow, TextMethod, demo_prompts, demo_rows, run_demo, run_text_section,
                          text_plan)

pytestmark = pytest.mark.usefixtures("one_thread")



def stand_in_students(out: Path) -> Path:
    """``out``/mnist-sd-dmd-1-anneal and ``out``/mnist-sd-guided-4: copies of mnist-sd laid out as exported students
    (recipes.teachers.export_student): DDIM with trailing spacing, set_alpha_to_one, fewstep.json with
    student_steps; the guided one's UNet has a zero-initialised guidance input (time_cond_proj_dim), so its
    output is the teacher's conditional output whatever w."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    for name, steps in (("mnist-sd-dmd-1-anneal", 1), ("mnist-sd-guided-4", 4)):
        folder = out / name
        shutil.copytree(ASSETS / "mnist-sd", folder)
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True,
                                  clip_sample=False).save_pretrained(folder / "scheduler")
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]}))
        info = {"student_steps": steps, "teacher": "mnist-sd"}
        if "guided" in name:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet")
            unet.time_embedding.cond_proj = torch.nn.Linear(256, unet.time_embedding.linear_1.in_features, bias=False)
            torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
            unet.register_to_config(time_cond_proj_dim=256)
            unet.save_pretrained(folder / "unet")
            info["w_input"] = True
        else:
            info["real_w"] = 1.0
        (folder / "fewstep.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    # the text-to-image section needs the shipped teacher pipeline; it ships in the package, so its absence is a failure
    assert (ASSETS / "mnist-sd" / "model_index.json").is_file(), "fewstep/assets/mnist-sd is missing"
    return stand_in_students(tmp_path_factory.mktemp("students"))


def test_demo_on_reduced_rows_writes_image_and_table(tmp_path, students):
    rows = [DemoRow("teacher DDIM 4 steps", "mnist-teacher", {"solver": "ddim", "steps": 4}),
            DemoRow("teacher DPM-Solver++ 2 steps", "mnist-teacher", {"solver": "dpmpp_2m", "steps": 2}),
            DemoRow("guided student, 4 steps", "mnist-guided-4"),
            DemoRow("not shipped", "mnist-guided-3")]
    text_rows = text_plan(students=students, teacher_steps=3)
    doc = run_demo(tmp_path / "demo", fid_n=20, budget_seconds=600, rows=rows, progress=False, text_rows=text_rows)
    tmp_path = tmp_path / "demo"
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == [r.label for r in rows[:3]]
    assert [r["network_evals"] for r in table["rows"]] == [8, 4, 4]  # guided teacher steps cost two evaluations
    assert table["rows"][0]["speedup"] == pytest.approx(1.0)
    assert all(r["seconds_per_image"] > 0 and r["fid"] > 0 and 0 <= r["class_accuracy"] <= 1 for r in table["rows"])
    assert any("mnist-guided-3" in s for s in table["skipped"])
    md = (tmp_path / "table.md").read_text()
    class_part, text_part = md.split("## Text-to-image")
    assert sum(line.startswith("| ") for line in class_part.splitlines()) == 1 + 3 and "Skipped" in md  # header + rows
    with Image.open(doc["files"]["image"]) as im:
        assert im.size[0] > 600 and im.size[1] > 3 * 60  # three rows of ten digits with labels
    # the text-to-image section: teacher (stock 3 steps, fewstep 5 steps) and both stand-in students
    text = table["text_to_image"]
    assert [r["model"] for r in text["rows"]] == ["mnist-sd", "mnist-sd", "mnist-sd-guided-4", "mnist-sd-dmd-1-anneal"]
    assert text["prompts"] == demo_prompts() and not text["not_shipped"]
    evals = [r["network_evals"] for r in text["rows"]]
    assert evals[0] >= 2 * 3 and evals[1:] == [10, 4, 1]  # guided teacher steps count two; students one per step
    assert [r["guidance_scale"] for r in text["rows"]] == [3.0, 3.0, 3.0, 1.0]  # w = 2; the DMD has w baked in
    assert text["rows"][0]["speedup"] == pytest.approx(1.0) and all(r["seconds_per_image"] > 0 for r in text["rows"])
    assert text["rows"][1]["prompted_digit_accuracy"] >= 0.9  # the shipped teacher at 5 fewstep steps draws the digits
    assert all(0 <= r["prompted_digit_accuracy"] <= 1 for r in text["rows"])
    assert sum(line.startswith("| ") for line in text_part.splitlines()) == 1 + 4 and "w = 1 baked in" in text_part
    with Image.open(doc["files"]["text_image"]) as im:
        assert im.size[0] > 600 and im.size[1] > 4 * 60  # four rows of ten digits under the prompts


def test_demo_plan_covers_the_shipped_routes():
    plan = demo_rows()
    assert plan[0].options == {"solver": "ddim", "steps": 50}
    models = {r.model for r in plan}
    assert {"mnist-teacher", "mnist-guided-4", "mnist-guided-1", "mnist-dmd-1"} <= models
    assert {"mnist-teacher", "mnist-guided-4", "mnist-dmd-1"} <= set(SHIPPED)


def test_demo_prompts_name_every_digit_in_order_with_mixed_attributes():
    parsed = [parse_caption(p) for p in demo_prompts()]
    assert [p[0] for p in parsed] == list(range(10))
    assert {p[1] for p in parsed} == {"thin", None, "thick"} and {p[2] for p in parsed} == {"left", None, "right"}


def test_text_plan_includes_only_the_shipped_students(tmp_path, students):
    absent = text_plan(students=tmp_path)
    assert [r.model for r in absent] == ["mnist-sd", "mnist-sd", *TEXT_STUDENTS]
    assert [r.steps for r in absent[:2]] == [50, 5]
    assert [r.scheduler for r in absent[:2]] == ["stock", "fewstep:unipc_bh2_3"]
    assert absent[0].label.startswith("teacher, stock PNDM 50 steps")
    assert [r.folder is None for r in absent] == [False, False, True, True]
    assert [r.steps for r in absent[2:]] == [4, 1]  # from the names when the folders are not there
    present = {r.model: r for r in text_plan(students=students)}
    guided, dmd = present["mnist-sd-guided-4"], present["mnist-sd-dmd-1-anneal"]
    assert (guided.steps, guided.guidance_scale(1.5), guided.scheduler) == (4, 2.5, "own")  # w: the UNet's input
    assert (dmd.steps, dmd.guidance_scale(1.5)) == (1, 1.0) and "w = 1 baked in" in dmd.label
    section, images = run_text_section(absent[1:], prompts=["a thick seven"], progress=False)  # fewstep 5 steps
    assert len(images) == 1 and [s.split(" (")[1] for s in section["not_shipped"]] == [f"{n})" for n in TEXT_STUDENTS]


def test_text_rows_share_prompts_and_seeds(students):
    """Every row starts from the same latents: the stand-in guided student (zero guidance input) at one step
    draws exactly what the stand-in DMD copy of the teacher draws, whatever w."""
    rows = [TextMethod("dmd", "mnist-sd-dmd-1-anneal", 1, "own", False, students / "mnist-sd-dmd-1-anneal"),
            TextMethod("guided at 1 step", "mnist-sd-guided-4", 1, "own", True, students / "mnist-sd-guided-4")]
    section, (a, b) = run_text_section(rows, w=3.0, prompts=["a thick seven", "a thin two slanted left"], seed=3,
                                       progress=False)
    assert [r["guidance_scale"] for r in section["rows"]] == [1.0, 4.0]
    assert a.shape == (2, 1, 32, 32) and a.std() > 0.1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    _, (c,) = run_text_section(rows[:1], prompts=["a thick seven", "a thin two slanted left"], seed=4, progress=False)
    assert (c - a).abs().max() > 0.1  # another seed, other images


def test_student_folder_without_steps_is_a_one_line_error(tmp_path):
    folder = tmp_path / "mnist-sd-dmd-1-anneal"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="no student_steps"):
        text_plan(students=tmp_path)


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
