"""Recipes: one documented command reproduces each of fewstep's shipped models.

A recipe is a settings dataclass (its presets are instances of it, e.g. ``MNIST_GUIDED`` or
``dataclasses.replace(MNIST_DMD, steps=100)``) and a run function
``run(out, settings, *, name, teacher=None, data=None, resume=False, progress=True, ...)``:
``teacher`` and ``data`` are providers (zero-argument callables returning the teacher model or
the training data; by default the shipped ``mnist-teacher`` and the MNIST train split). Every
stage of a recipe is one run of the one training loop (``fewstep.train.train``) in its own
folder, with checkpoints and exact resume, exported as a model folder that ``fewstep.load``
reads. The ``fewstep`` command runs them (``fewstep train``, ``fewstep distill``).

This package sits above ``fewstep.api`` and ``fewstep.distill`` (see the layer contract in
pyproject.toml): recipes use the library, the library never imports a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .classifier import MNIST_CLASSIFIER, ClassifierSettings, run_classifier
from .dmd import DMD_PRESETS, MNIST_DMD, MNIST_DMD2_4, DMDSettings, PairSettings, run_dmd
from .guided import MNIST_GUIDED, MNIST_SD_GUIDED, GuidedSettings, run_guided
from .progressive import MNIST_PROGRESSIVE, ProgressiveSettings, run_progressive
from .teacher import MNIST_TEACHER, TeacherSettings, run_teacher
from .textbed import MNIST_SD, MNIST_SD3, MNIST_VAE, SD3Settings, SDSettings, VAESettings, run_sd, run_sd3, run_vae
from ._stage import Hyper

__all__ = ["Recipe", "RECIPES", "Hyper", "TeacherSettings", "ClassifierSettings", "GuidedSettings",
           "ProgressiveSettings", "DMDSettings", "PairSettings", "MNIST_TEACHER", "MNIST_CLASSIFIER", "MNIST_GUIDED",
           "MNIST_PROGRESSIVE", "MNIST_DMD", "MNIST_DMD2_4", "DMD_PRESETS", "run_teacher", "run_classifier",
           "run_guided", "run_progressive", "run_dmd", "teacher_recipe_name"]


def teacher_recipe_name(teacher, suffix: str) -> str:
    """The export name of a student of a user's --teacher: its folder's (or shipped) name plus ``suffix``."""
    from pathlib import Path
    return f"{Path(str(teacher)).resolve().name if Path(str(teacher)).exists() else teacher}-{suffix}"


@dataclass(frozen=True)
class Recipe:
    """A named preset of a recipe: ``recipe(out, **options)`` runs ``run(out, settings, name=name, **options)``
    (``recipe(out, settings=replace(recipe.settings, steps=100))`` with changed settings)."""
    name: str
    settings: Any
    run: Callable
    summary: str

    def __call__(self, out, settings=None, **options):
        return self.run(out, self.settings if settings is None else settings, **{"name": self.name, **options})


RECIPES = {r.name: r for r in (
    Recipe("mnist-teacher", MNIST_TEACHER, run_teacher, "class-conditional MNIST teacher (v-prediction, CFG)"),
    Recipe("mnist-classifier", MNIST_CLASSIFIER, run_classifier, "the classifier behind FID/KID/IS"),
    Recipe("mnist-guided", MNIST_GUIDED, run_guided, "guided distillation: stage 1, rounds 32 -> 1, encoder"),
    Recipe("mnist-sd-guided", MNIST_SD_GUIDED, run_guided, "guided distillation of the mnist-sd pipeline, to 4 steps"),
    Recipe("mnist-progressive", MNIST_PROGRESSIVE, run_progressive, "plain progressive distillation, 32 -> 4"),
    Recipe("mnist-dmd-1", MNIST_DMD, run_dmd, "one-step DMD generator with regression"),
    Recipe("mnist-dmd2-4", MNIST_DMD2_4, run_dmd, "DMD2: four steps, GAN head, no regression"),
    Recipe("mnist-sd-dmd-1", DMD_PRESETS["mnist-sd-dmd-1"], run_dmd, "one-step DMD of the mnist-sd pipeline"),
    Recipe("mnist-sd-dmd-1-lora", DMD_PRESETS["mnist-sd-dmd-1-lora"], run_dmd,
           "one-step DMD of the mnist-sd pipeline as a rank-16 LoRA"),
    Recipe("mnist-sd-dmd-1-cooldown", DMD_PRESETS["mnist-sd-dmd-1-cooldown"], run_dmd,
           "mnist-sd-dmd-1 trained on at half the learning rate (fake score first, EMA kept)"),
    Recipe("mnist-sd-dmd-1-ttur", DMD_PRESETS["mnist-sd-dmd-1-ttur"], run_dmd,
           "mnist-sd-dmd-1-cooldown trained on with 3 fake-score updates per generator update"),
    Recipe("mnist-sd-dmd-1-anneal", DMD_PRESETS["mnist-sd-dmd-1-anneal"], run_dmd,
           "the mnist-sd-dmd-1-ttur run continued at 0.3x the generator's learning rate"),
    Recipe("mnist-sd3-dmd-1", DMD_PRESETS["mnist-sd3-dmd-1"], run_dmd, "one-step DMD of the mnist-sd3 pipeline"),
    Recipe("mnist-vae", MNIST_VAE, run_vae, "AutoencoderKL for 32x32 digits -> 4x8x8 latents (text-to-image test bed)"),
    Recipe("mnist-sd", MNIST_SD, run_sd, "StableDiffusionPipeline on MNIST captions (VP, scaled_linear, CFG)"),
    Recipe("mnist-sd3", MNIST_SD3, run_sd3, "StableDiffusion3Pipeline on MNIST captions (rectified flow, no T5)"),
)}
