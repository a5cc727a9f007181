"""`fewstep app`: the comparison as a plain function, the real Gradio server driven through its HTTP API,
and the CLI's refusal when gradio is missing. Few steps and few images keep it fast."""
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_demo import stand_in_students  # noqa: E402

from fewstep import app  # noqa: E402
from fewstep.app import (MAX_IMAGES, TEXT_STUDENTS, app_models, compare, compare_text, launch,  # noqa: E402
                         parse_classes, parse_prompt_lines, text_methods)


pytestmark = pytest.mark.usefixtures("one_thread")

REF = 2  # teacher reference steps for the tests (the page's default is 50)


def _numbers(markdown: str, label: str) -> tuple[int, float]:
    """(network evaluations, seconds per image) from the markdown table row starting with ``label``."""
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
    evals, secs = row.strip("| ").split(" | ")[-2:]
    return int(evals), float(secs)


def test_models_are_the_generative_shipped_ones():
    models = app_models()
    assert models["mnist-teacher"] == "diffusion"
    assert "mnist-classifier" not in models and not any("encoder" in m for m in models)
    assert set(models.values()) <= {"diffusion", "student", "generator"}


def test_parse_classes():
    assert parse_classes("0, 1,7") == [0, 1, 7]
    assert parse_classes("3 4;5") == [3, 4, 5]
    assert parse_classes("0-3") == [0, 1, 2, 3]
    for bad, message in [("a,b", "whole numbers"), ("", "at least one"), ("12", "0-9"), ("5-2", "backwards"),
                         ("0-9,0-9,0-9", "at most")]:
        with pytest.raises(ValueError, match=message):
            parse_classes(bad)


def test_compare_teacher_solver_against_cached_reference():
    app._reference_cache.clear()
    mine, ref, md = compare("mnist-teacher", "dpmpp_2m", 3, 1.0, "0,1", 0, reference_steps=REF)
    assert mine.dtype == np.uint8 and mine.shape == ref.shape and mine.ndim == 2
    assert mine.shape[1] > 2 * mine.shape[0] * 0.9 and mine.std() > 10  # two digits side by side, not blank
    assert _numbers(md, "mnist-teacher, dpmpp_2m")[0] == 6  # a guided step: two network evaluations
    ref_evals, ref_secs = _numbers(md, "mnist-teacher, ddim")
    assert ref_evals == 2 * REF and ref_secs > 0
    assert re.search(r"Speed-up over the reference: [\d.]+x", md) and "cache" not in md
    t0 = time.perf_counter()
    _, ref2, md2 = compare("mnist-teacher", "ddim", REF, 1.0, "0,1", 0, reference_steps=REF)
    assert "from the cache" in md2 and np.array_equal(ref2, ref)
    assert time.perf_counter() - t0 < 5


def test_compare_student_and_generator_use_their_own_sampler():
    _, _, md = compare("mnist-guided-2", "unipc_bh2_3", 17, 1.0, "3", 1, reference_steps=REF)
    assert _numbers(md, "mnist-guided-2")[0] == 2 and "do not apply" in md  # w is an input: one call per step
    _, _, md = compare("mnist-dmd-1", "ddim", 17, 2.5, "3", 1, reference_steps=REF)
    assert _numbers(md, "mnist-dmd-1")[0] == 1 and "w = 1 baked in" in md and md.startswith("w = 1,")


@pytest.mark.parametrize("args, message", [
    (("mnist-teacher", "dpmpp_2m", 3, 1.0, "one, two", 0), "whole numbers"),
    (("mnist-teacher", "dpmpp_2m", 3, 9.0, "1", 0), "guidance w must lie"),
    (("mnist-teacher", "dpmpp_2m", "x", 1.0, "1", 0), "steps must be a number"),
    (("mnist-teacher", "nope", 3, 1.0, "1", 0), "unknown solver"),
    (("mnist-classifier", "ddim", 3, 1.0, "1", 0), "unknown model"),
    (("mnist-teacher", "ddim", 3, 1.0, "1", -1), "seed must lie"),
])
def test_compare_bad_input_is_an_error_message(args, message):
    mine, ref, md = compare(*args, reference_steps=REF)
    assert mine is None and ref is None and md.startswith("**Error:**") and message in md


def test_parse_prompt_lines_checks_the_grammar():
    assert parse_prompt_lines("a thick seven\n\n  a thin two slanted left \n") == ["a thick seven",
                                                                                   "a thin two slanted left"]
    for bad, message in [("a fat seven", "unknown word 'fat'"), ("seven", "is not 'a [handwritten"),
                         ("\n \n", "at least one prompt"), ("a thin one\n" * (MAX_IMAGES + 1), "at most")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_prompt_lines(bad)


def test_compare_text_puts_every_shipped_method_side_by_side(tmp_path):
    students = stand_in_students(tmp_path)
    methods = text_methods(students=students, reference_steps=REF)
    assert [m.model for m in methods] == ["mnist-sd", "mnist-sd", *TEXT_STUDENTS]
    grids, md = compare_text("a thick seven\na thin two slanted left", 2.0, 0, reference_steps=REF, students=students)
    assert len(grids) == 4 and all(g.dtype == np.uint8 and g.shape == grids[0].shape for g in grids)
    assert grids[0].shape[1] > 1.5 * grids[0].shape[0] and grids[1].std() > 10  # two digits side by side
    assert _numbers(md, "mnist-sd, fewstep unipc_bh2_3, 5 steps")[0] == 10  # five guided steps: two evaluations each
    assert _numbers(md, "guided-distilled student, 4 steps")[0] == 4  # w is an input: one evaluation per step
    assert _numbers(md, "DMD generator, 1 step")[0] == 1
    ref_evals, ref_secs = _numbers(md, "mnist-sd, stock PNDM")
    assert ref_evals >= 2 * REF and ref_secs > 0 and md.startswith("w = 2 (guidance_scale 3)")
    # without the students: the teacher's two methods, the students named as not shipped yet
    grids, md = compare_text("a handwritten zero", 1.0, 0, reference_steps=REF, students=tmp_path / "none")
    assert len(grids) == 2 and md.count("is not shipped yet") == 2
    # out-of-grammar prompts: the grammar's one-line error, one empty image per method
    grids, md = compare_text("a thick seven\na fat seven", 1.0, 0, reference_steps=REF, students=students)
    assert grids == [None] * 4 and md.startswith("**Error:** unknown word 'fat'") and "\n" not in md


def test_launch_refuses_sharing_and_other_hosts():
    with pytest.raises(ValueError, match="never shares"):
        launch(share=True, prevent_thread_lock=True)
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        launch(host="0.0.0.0", prevent_thread_lock=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_round_trip_through_gradio_client():
    from gradio_client import Client
    from PIL import Image
    port = _free_port()
    demo, url = launch(port=port, prevent_thread_lock=True, reference_steps=REF, quiet=True)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}") and demo.server_name == "127.0.0.1"
        client = Client(url, verbose=False)
        mine, ref, md = client.predict("mnist-teacher", "ddim", 2, 1.0, "4,7", 3, api_name="/compare")
        for path in (mine, ref):
            with Image.open(path) as im:
                assert im.size[0] > im.size[1] > 28 and np.asarray(im).std() > 10  # a row of two digits
        evals, secs = _numbers(md, "mnist-teacher, ddim, 2 steps")
        assert evals == 4 and secs > 0 and "Speed-up" in md
        bad = client.predict("mnist-teacher", "ddim", 2, 1.0, "seven", 3, api_name="/compare")
        assert bad[0] is None and bad[2].startswith("**Error:**")
        # the text-to-image tab: the two teacher methods (no student shipped here), then the table
        *images, md = client.predict("a thick seven", 2.0, 0, api_name="/compare_text")
        assert len(images) == len([m for m in text_methods() if m.folder is not None]) >= 2
        with Image.open(images[1]) as im:
            assert np.asarray(im).std() > 10
        assert _numbers(md, "mnist-sd, fewstep unipc_bh2_3, 5 steps")[0] == 10
        *images, md = client.predict("a thick sevn", 2.0, 0, api_name="/compare_text")
        assert all(i is None for i in images) and "unknown word 'sevn'" in md
    finally:
        demo.close()


def test_cli_without_gradio_exits_2_with_one_line():
    code = "import sys; sys.modules['gradio'] = None; from fewstep.cli import main; main(['app'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'fewstep app needs gradio: pip install "fewstep[app]"'


def test_cli_port_taken_exits_2_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "fewstep", "app", "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
