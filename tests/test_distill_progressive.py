"""`fewstep distill progressive`: plain progressive distillation of the shipped teacher, end to end on
a tiny preset (two rounds of two steps): the exports load by folder and sample with their own steps."""
from dataclasses import replace

import pytest
import torch

import fewstep
from fewstep.recipes import MNIST_PROGRESSIVE, run_progressive

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_tiny_rounds_export_loadable_students(tmp_path):
    preset = replace(MNIST_PROGRESSIVE, rounds={16: 2, 8: 2}, batch_size=4, round_warmup=1,
                     ckpt_every_minutes=None, sample_every_minutes=None)
    exports = run_progressive(tmp_path, preset, resume=False, progress=False)
    assert list(exports) == ["mnist-progressive-16", "mnist-progressive-8"]
    student = fewstep.load(exports["mnist-progressive-8"])
    assert student.student_steps == 8 and not student.w_input and student.nfe() == 8
    teacher = fewstep.load("mnist-teacher")
    moved = sum(float((a - b).abs().max()) for a, b in zip(student.net.state_dict().values(),
                                                            teacher.net.state_dict().values()))
    assert moved > 0  # two rounds of training changed the weights
    x = fewstep.generate(student, torch.arange(3), seed=0)
    xg = fewstep.generate(student, torch.arange(3), w=1.0, seed=0)  # CFG on the student
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all() and (x - xg).abs().max() > 1e-3
    # the same command continues: finished rounds are reused, not retrained
    again = run_progressive(tmp_path, preset, resume=True, progress=False)
    assert again == exports
