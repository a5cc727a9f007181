"""Distillation teachers from diffusers pipeline folders, and students exported back to pipeline folders.

``teacher_from(spec, prompts)`` turns a ``--teacher`` argument into what the recipes train against:
a fewstep model (``fewstep.load``) for fewstep names and folders, or a :class:`PipelineTeacher` for a
diffusers pipeline folder (``model_index.json``; the shipped ``mnist-sd`` / ``mnist-sd3`` too).

A PipelineTeacher is a :class:`fewstep.api.DiffusionModel` on the pipeline's latents: its net is the
pipeline's UNet / SD3 transformer as a :class:`fewstep.diffusers.DiffusersNet`, its schedule and
prediction type come from the pipeline's scheduler config, and its "classes" are the prompts of
``--prompts``: class k is prompt k, whose text embeddings are computed once by the pipeline's own
``encode_prompt`` and kept as a bank (so the text encoders are not called during training), and the
null class is the empty prompt, the unconditional input of classifier-free guidance.

``export_student`` writes a student as a pipeline of the teacher's own class whose scheduler samples
the student's own grid, so that stock diffusers runs it:

* VP teachers: ``DDIMScheduler`` with ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True``;
  at N steps its timesteps N_train (1 - i/N) - 1 are fewstep's student grid t_max i / N, and its last
  step returns x0_hat (alpha_prev = 1), as the student's DDIM sampler does. A guided student takes w
  through the UNet's ``time_cond_proj_dim`` input, which the stock SD pipeline fills with the guidance
  embedding of ``guidance_scale - 1`` (and then runs no classifier-free guidance).
* flow teachers (SD3): ``FlowMatchEulerDiscreteScheduler``; at one step it goes from sigma 1 to 0 in
  one Euler step, x0 = x - v, the one-step generator's own output.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..api import ASSETS, DiffusionModel, load
from ..diffusers import DiffusersNet
from .textbed import INFO  # what fewstep records in a pipeline folder it writes (recipe, steps, w, train_steps)

__all__ = ["PipelineTeacher", "teacher_from", "trainable", "read_prompts", "export_student", "load_student", "INFO",
           "TEXT_PIPELINES", "COVERED_PIPELINES"]

TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
COVERED_PIPELINES = TEXT_PIPELINES + ("DDPMPipeline", "DDIMPipeline")


def _pipeline_folder(spec) -> Path | None:
    for folder in (ASSETS / str(spec), Path(str(spec))):
        if (folder / "model_index.json").is_file():
            return folder
    return None


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line (blank lines and surrounding spaces dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt; write one prompt per line")
    return prompts


def default_prompts(folder: Path) -> list[str] | None:
    """The test bed's prompt suite for the shipped text-to-image pipelines (their own captions grammar)."""
    try:
        recipe = json.loads((folder / INFO).read_text()).get("recipe")
    except (OSError, ValueError):
        return None
    if recipe not in ("mnist-sd", "mnist-sd3"):
        return None
    from ..data.captions import DIGITS, SLANT, THICKNESS, caption
    return [caption(d, th, sl) for d in range(len(DIGITS)) for th in THICKNESS for sl in SLANT]


def teacher_from(spec, prompts: list[str] | None = None, device: str | torch.device = "cpu"):
    """The teacher named by ``--teacher``: a fewstep model, or a :class:`PipelineTeacher` for a diffusers
    pipeline folder (``prompts``: the text pipelines' prompts; the shipped test-bed pipelines default to
    their prompt suite)."""
    folder = _pipeline_folder(spec)
    if folder is None:
        if prompts is not None:
            raise ValueError(f"--prompts is for text-to-image pipeline teachers; {spec} is a fewstep class-"
                             "conditional model (it distills over its classes): leave --prompts out")
        return load(spec).to(device)
    pipe = load(folder)
    if prompts is None:
        prompts = default_prompts(folder)
    return PipelineTeacher(pipe.to(device), prompts, str(spec))


class PipelineTeacher(DiffusionModel):
    """A diffusers pipeline as a distillation teacher (see the module docstring)."""

    def __init__(self, pipe, prompts: list[str] | None, source: str):
        kind = type(pipe).__name__
        if kind not in COVERED_PIPELINES:
            raise ValueError(f"{kind} is not a covered teacher pipeline (covered: {', '.join(COVERED_PIPELINES)}); "
                             "Flux / Sana / SDXL pack latents or add conditions these recipes do not feed yet")
        if any(p.dtype != torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters()):
            pipe = pipe.to(dtype=torch.float32)  # trained in float32 (fewstep.load gives float32 already)
        self.pipe, self.kind = pipe, kind
        self.role = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        module = getattr(pipe, self.role)
        self.prompts = list(prompts) if prompts is not None else None
        bank, pooled, self.repeated_rows = self._prompt_bank(pipe, kind)
        null = len(self.prompts) if bank is not None else None
        net = DiffusersNet(module, pipe.scheduler.config, bank, null_class=null, pooled_context=pooled)
        if self.repeated_rows:
            from ..nets.textbed import RepeatedTokenJointAttnProcessor
            module.set_attn_processor(RepeatedTokenJointAttnProcessor(self.repeated_rows))
        size = module.config.sample_size
        shape = [module.config.in_channels, *((size, size) if isinstance(size, int) else size)]
        config = {"schedule": net.schedule.config(), "prediction": net.prediction, "image_shape": shape,
                  "recipe": kind}
        if bank is not None:
            config.update(num_classes=len(self.prompts), null_class=null)
        super().__init__(net, config, source)
        self.folder = Path(getattr(pipe, "name_or_path", source) or source)

    def _prompt_bank(self, pipe, kind):
        """(prompt embeddings bank with the empty prompt last, pooled bank or None, repeated zero rows)."""
        if kind not in TEXT_PIPELINES:
            if self.prompts is not None:
                raise ValueError(f"--prompts is for text-to-image pipelines; {kind} takes no text: leave it out")
            return None, None, 0
        if not self.prompts:
            raise ValueError(f"a {kind} teacher distills over prompts: pass --prompts FILE (one prompt per line)")
        texts = self.prompts + [""]
        with torch.no_grad():
            if kind == "StableDiffusion3Pipeline":
                embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=pipe.device,
                                                          do_classifier_free_guidance=False)
                return _sd3_bank(embeds.float(), pooled.float())
            embeds = pipe.encode_prompt(texts, pipe.device, 1, False)[0]
        return embeds.float(), None, 0

    def generator_times(self, steps: int) -> torch.Tensor:
        """A DMD generator's input times: fewstep's, with a flow pipeline's first time at 1 (pure noise, sigma = 1),
        where its stock scheduler starts (the exported one-step generator then runs with no fewstep code)."""
        from ..distill import generator_times
        times = generator_times(self.schedule, steps)
        if self.net.family.starts_from_pure_noise:
            times[0] = 1.0
        return times

    @property
    def vae(self):
        return getattr(self.pipe, "vae", None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the pipeline's latents (its VAE with scaling and shift; pixel pipelines: as is)."""
        vae = self.vae
        if vae is None:
            return latents.clamp(-1, 1)
        z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        return vae.decode(z + shift if shift is not None else z).sample.float().clamp(-1, 1)

    def prompt_digits(self) -> torch.Tensor | None:
        """The digit each prompt names (the test bed's grammar), or None when a prompt does not parse."""
        if not self.prompts:
            return None
        from ..data.captions import parse_caption
        parsed = [parse_caption(p) for p in self.prompts]
        return None if any(p is None for p in parsed) else torch.tensor([p[0] for p in parsed])


def _sd3_bank(embeds: torch.Tensor, pooled: torch.Tensor):
    """SD3 without T5 appends zero rows to the CLIP tokens: keep one (RepeatedTokenJointAttnProcessor counts it
    as all of them, exactly), so training attends over ~17 tokens instead of ~270."""
    nonzero = embeds.abs().amax(dim=(0, 2)) > 0
    tail = int((~nonzero).flip(0).cumprod(0).sum())  # the trailing all-zero rows
    if tail < 2:
        return embeds, pooled, 0
    return embeds[:, :embeds.shape[1] - tail + 1], pooled, tail


# ---------------------------------------------------------------------------
# Students as pipeline folders
# ---------------------------------------------------------------------------

SCHEDULER_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # fewstep name -> diffusers'


def student_scheduler(teacher: PipelineTeacher, steps: int | None, prediction: str | None = None):
    """A stock diffusers scheduler whose ``steps``-step sampling is the student's own (module docstring);
    steps None (guided stage 1: a w-conditioned model for any sampler): the teacher's own scheduler.
    ``prediction``: the student's output type when it is not the teacher's (a VP DMD generator that
    predicts x0: ``prediction_type="sample"``)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    cfg = teacher.pipe.scheduler.config
    if steps is None:
        return type(teacher.pipe.scheduler).from_config(cfg)
    if prediction not in (None, teacher.prediction) and teacher.net.family.name != "vp":
        raise ValueError(f"a {teacher.net.family.name} student outputs the teacher's {teacher.prediction}; "
                         f"gen_prediction={prediction!r} exports for VP teachers only: leave it unset")
    if teacher.net.family.name == "flow":
        if steps != 1:
            raise ValueError(f"a flow-matching student exports at one step only for now (got {steps}); sample "
                             "multi-step flow students with fewstep")
        return FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if teacher.net.family.name != "vp":
        raise ValueError(f"students of {teacher.net.family.name} teachers cannot be exported as pipelines yet")
    kind = {} if prediction in (None, teacher.prediction) else {"prediction_type": SCHEDULER_PREDICTIONS[prediction]}
    return DDIMScheduler.from_config(cfg, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, **kind)


def _stock_module(net: DiffusersNet):
    """The diffusers module of a trained DiffusersNet, with diffusers' own attention back (SD3)."""
    module = net.unet.eval()
    if net.w_embedding is not None:
        raise ValueError("this student's w input is a fewstep WEmbedding (its model class has no time_cond_proj_dim): "
                         "stock diffusers cannot feed it; export students of UNet2DConditionModel teachers")
    if type(module).__name__ == "SD3Transformer2DModel":
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        module.set_attn_processor(JointAttnProcessor2_0())
    return module


def export_student(teacher: PipelineTeacher, net: DiffusersNet, folder, *, steps: int | None, info: dict,
                   prediction: str | None = None) -> Path:
    """Write ``net`` as the teacher's pipeline class with the student's scheduler to ``folder`` (plus
    fewstep.json: ``info`` and the student's steps); ``prediction``: the student's output type when it is
    not the teacher's (student_scheduler). Returns the folder."""
    import copy
    folder = Path(folder)
    module = _stock_module(copy.deepcopy(net))
    components = {**teacher.pipe.components, teacher.role: module,
                  "scheduler": student_scheduler(teacher, steps, prediction)}
    extra = {"requires_safety_checker": False} if "safety_checker" in components else {}
    pipe = type(teacher.pipe)(**components, **extra)
    pipe.save_pretrained(folder)
    record = {**info, "student_steps": steps, "teacher": teacher.source, "pipeline": teacher.kind,
              "prompts": len(teacher.prompts or [])}
    (folder / INFO).write_text(json.dumps(record, indent=1) + "\n")
    return folder


def load_student(teacher: PipelineTeacher, folder) -> DiffusersNet:
    """An exported student's network as a DiffusersNet with the teacher's prompt bank (to continue from it)."""
    cls = type(getattr(teacher.pipe, teacher.role))
    module = cls.from_pretrained(Path(folder) / teacher.role)
    net = teacher.net
    fresh = DiffusersNet(module, teacher.pipe.scheduler.config, net.label_context, null_class=net.null_class,
                         pooled_context=net.pooled_context)
    if teacher.repeated_rows:
        from ..nets.textbed import RepeatedTokenJointAttnProcessor
        module.set_attn_processor(RepeatedTokenJointAttnProcessor(teacher.repeated_rows))
    return fresh


def pipeline_exporter(teacher: PipelineTeacher, steps: int | None, prediction: str | None = None) -> dict:
    """A Stage's ``save`` / ``load`` for students of a pipeline teacher (pipeline folders, see export_student)."""
    student_scheduler(teacher, steps, prediction)  # refuses an unexportable student before training

    def save(net, folder, extra):
        info = {k: v for k, v in extra.items() if k != "schedule"}  # the schedule is the scheduler config's
        return export_student(teacher, net, folder, steps=steps, info=info, prediction=prediction)
    return {"save": save, "load": lambda folder: load_student(teacher, folder)}


def pipeline_preview_options(teacher: PipelineTeacher) -> dict:
    """generator_preview's options for a pipeline teacher: decode by its VAE; ask for digit d with the test
    bed's prompts naming d (when every prompt parses), cycling through them."""
    options = {"decode": teacher.decode}
    digits = teacher.prompt_digits()
    if digits is not None:
        by_digit = [torch.nonzero(digits == d).flatten() for d in range(10)]
        if all(len(b) for b in by_digit):
            def ask(lab: torch.Tensor) -> torch.Tensor:
                k = torch.arange(len(lab))
                return torch.stack([by_digit[int(d)][int(i) % len(by_digit[int(d)])] for d, i in zip(lab, k)])
            options["digit_labels"] = ask
    return options



def training_inputs(teacher, out: Path, samples, progress: bool):
    """The images the guided / progressive recipes noise when no data is given: MNIST for fewstep teachers; a
    pipeline teacher's own latents from ``samples.n`` seeded noises at w = 1 (``samples.solver`` in
    ``samples.steps`` calls) with their prompt ids, made once and cached in ``out/teacher-samples.safetensors``
    like DMD's regression set (fewstep.distill.pairs)."""
    if not isinstance(teacher, PipelineTeacher):
        from ..data.mnist import load_mnist
        return load_mnist("train")
    from ..distill.pairs import regression_pairs
    pairs = regression_pairs(teacher, Path(out) / "teacher-samples.safetensors", n=samples.n, solver=samples.solver,
                             steps=samples.steps, w=1.0, seed=samples.seed, progress=progress)
    return pairs["x_ref"], pairs["labels"]


def trainable(net, settings, requires_grad: bool = True):
    """``net`` set up for training by a recipe's settings: gradients on (unless ``requires_grad=False``: a
    teacher that the rounds copy), train mode, and gradient checkpointing where asked (diffusers networks only)."""
    if getattr(settings, "gradient_checkpointing", False):
        module = getattr(net, "unet", None)
        if not hasattr(module, "enable_gradient_checkpointing"):
            raise ValueError("--gradient-checkpointing is for diffusers UNets / transformers (a pipeline teacher); "
                             f"{type(net).__name__} has no checkpointing switch: leave the flag out")
        module.enable_gradient_checkpointing()
    return net.requires_grad_(True).train() if requires_grad else net


def announce_memory(teacher, student, fake=None, max_gib: float | None = None) -> dict:
    """Print the run's parameter counts and weight-memory estimate (weights, gradients, AdamW moments, EMA;
    activations not included) before training, and refuse up front a run over ``max_gib`` GiB."""
    from .lora import memory_plan
    plan = memory_plan(teacher, student, fake)
    print(plan["summary"])
    if max_gib is not None and plan["total_bytes"] > max_gib * 2 ** 30:
        raise ValueError(f"this run needs about {plan['total_bytes'] / 2 ** 30:.2f} GiB for weights, gradients, AdamW "
                         f"moments and EMA, over --max-memory {max_gib:g} GiB: use --lora-rank R, or a larger budget")
    return plan
