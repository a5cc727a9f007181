"""Distillation teachers from diffusers folders, and students exported back to pipeline folders.

``teacher_from(spec, prompts, null_class=)`` turns a ``--teacher`` argument into what the recipes train
against: a fewstep model (``fewstep.load``) for fewstep names and folders, or a :class:`PipelineTeacher`
for a diffusers folder:

* a pipeline folder (``model_index.json``; the shipped ``mnist-sd`` / ``mnist-sd3`` too) of one of
  :data:`COVERED_PIPELINES`: StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline
  (text-to-image), DDPMPipeline / DDIMPipeline (pixel UNet2DModel, unconditional or class-conditional);
* a bare ``UNet2DModel`` folder (``config.json`` with ``_class_name`` + weights) with the scheduler it was
  trained with beside it (``scheduler_config.json`` in the folder, or ``scheduler/scheduler_config.json``
  in it or next to it): a DDPMPipeline teacher built in memory (no VAE: the latents are the images). A bare
  UNet2DConditionModel / SD3Transformer2DModel is refused: its text embeddings come from the pipeline's
  text encoders, so pass the pipeline folder.

A PipelineTeacher is a :class:`fewstep.api.DiffusionModel` on the pipeline's latents: its net is the
pipeline's UNet / SD3 transformer as a :class:`fewstep.diffusers.DiffusersNet`, its schedule and
prediction type come from the pipeline's scheduler config. Its classes:

* text pipelines: the prompts of ``--prompts``: class k is prompt k, whose text embeddings are computed once
  by the pipeline's own ``encode_prompt`` and kept as a bank (the text encoders are not called during
  training); the null class (the unconditional input of classifier-free guidance) is the last bank row:
  the empty prompt's embeddings for SD and SD3. SDXL banks ``prompt_embeds`` (both text encoders) and
  ``pooled_prompt_embeds``, and feeds its added conditions ``text_embeds`` = the pooled row and
  ``time_ids`` = (original size, crop corner (0, 0), target size) at the stock call's default size
  (UNet sample_size x vae_scale_factor). Its null row is what the stock SDXL call uses as the negative
  when it guides without a negative prompt: zeros for ``prompt_embeds`` and ``pooled_prompt_embeds`` when
  the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL's default), else the empty prompt's
  embeddings;
* a class-conditional UNet2DModel (``num_class_embeds``): its class ids. It has no null class unless
  ``null_class=K`` (``--null-class K``) names the id it was trained with as unconditional; guidance (DMD's
  real_w > 0, guided distillation) needs one (:func:`check_guidance`). The classes distilled over are the
  ids below K when K is the last id (the usual layout), else every id;
* an unconditional UNet2DModel: none.

``export_student`` writes a student as a pipeline of the teacher's own class (a bare UNet's: DDPMPipeline)
whose scheduler samples the student's own grid, so that stock diffusers runs it:

* VP teachers: ``DDIMScheduler`` with ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True``;
  at N steps its timesteps N_train (1 - i/N) - 1 are fewstep's student grid t_max i / N, and its last
  step returns x0_hat (alpha_prev = 1), as the student's DDIM sampler does. A guided student takes w
  through the UNet's ``time_cond_proj_dim`` input, which the stock SD and SDXL pipelines fill with the
  guidance embedding of ``guidance_scale - 1`` (and then run no classifier-free guidance). SDXL exports keep
  the teacher's ``force_zeros_for_empty_prompt``. A class-conditional UNet's DDPMPipeline loads in stock
  diffusers, but its call passes no class labels: step its scheduler with ``unet(x, t, class_labels=...)``.
* flow teachers (SD3): ``FlowMatchEulerDiscreteScheduler``; at one step it goes from sigma 1 to 0 in
  one Euler step, x0 = x - v, the one-step generator's own output; at N steps (progressive students) with
  shift 1 and ``shift_terminal`` 1 / N its sigmas are the student's grid 1, (N - 1) / N, ..., 1 / N, 0, and an
  Euler step there is the student's DDIM step.
* DMD2's multi-step generators (``renoise=True``: x0 = G(x, t_i), then x0 re-noised to t_(i+1) with fresh
  noise): VP teachers get ``LCMScheduler`` with ``original_inference_steps`` N, whose N timesteps are the
  generator's times and whose step is exactly that re-noising (its boundary scalings are 1 to 1e-7 at
  t >= 100); flow teachers FlowMatchEuler as above with ``stochastic_sampling=True`` (x0 = x - sigma v, then
  (1 - sigma') x0 + sigma' noise). The stock call draws the fresh noise from the call's ``generator`` (SD) or
  torch's global generator (SD3, whose pipeline does not pass one to the step).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..api import ASSETS, DiffusionModel, diffusers_class, load
from ..diffusers import DiffusersNet
from .textbed import INFO  # what fewstep records in a pipeline folder it writes (recipe, steps, w, train_steps)

__all__ = ["PipelineTeacher", "teacher_from", "trainable", "read_prompts", "export_student", "load_student", "INFO",
           "TEXT_PIPELINES", "COVERED_PIPELINES", "BARE_MODELS", "check_guidance", "NO_NULL_CLASS"]

SDXL = "StableDiffusionXLPipeline"
TEXT_PIPELINES = ("StableDiffusionPipeline", SDXL, "StableDiffusion3Pipeline")
COVERED_PIPELINES = TEXT_PIPELINES + ("DDPMPipeline", "DDIMPipeline")
BARE_MODELS = ("UNet2DModel",)  # model folders that are a teacher with the scheduler beside them
TEXT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel")  # bare: their text encoders are missing
NO_NULL_CLASS = ("this class-conditional UNet has no null class: pass --null-class K, the class id it was trained "
                 "with as unconditional")


def _diffusers_folder(spec) -> tuple[Path, str] | None:
    """(folder, diffusers class) of a pipeline folder or a bare model folder, None for a fewstep model; one line
    for an existing folder that is neither."""
    for folder in (ASSETS / str(spec), Path(str(spec))):
        cls = diffusers_class(folder)
        if cls is not None:
            return folder, str(cls)
    folder = Path(str(spec))
    if folder.is_dir() and not any((folder / f).is_file() for f in ("config.json", "model/config.json")):
        raise ValueError(f"{folder} is neither a fewstep model folder (config.json + model.safetensors) nor a "
                         "diffusers folder (model_index.json, or a model's config.json with _class_name): pass one "
                         "of those")
    return None


def _check_covered(kind: str) -> None:
    if kind not in COVERED_PIPELINES:
        raise ValueError(f"{kind} is not a covered teacher pipeline (covered: {', '.join(COVERED_PIPELINES)}); "
                         "Flux / Sana pack latents or take extra ids these recipes do not feed yet")


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


def trained_on_test_bed(folder: Path) -> bool:
    """Whether a pipeline folder is one of the test bed's (the mnist-sd / mnist-sd3 recipes) trained on the
    captioned MNIST digits, not on a user's own images (whose captions it records)."""
    try:
        info = json.loads((Path(folder) / INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe") in ("mnist-sd", "mnist-sd3") and "caption_words" not in info


def teacher_from(spec, prompts: list[str] | None = None, device: str | torch.device = "cpu", *,
                 null_class: int | None = None, guidance: bool = False):
    """The teacher named by ``--teacher``: a fewstep model, or a :class:`PipelineTeacher` for a diffusers
    pipeline folder or bare UNet2DModel folder (module docstring). ``prompts``: the text pipelines' prompts
    (the shipped test-bed pipelines default to their prompt suite); ``null_class``: a class-conditional
    UNet's unconditional class id; ``guidance=True``: the run guides (DMD real_w > 0, guided distillation),
    so a class-conditional teacher without a null class is refused now (:func:`check_guidance`)."""
    found = _diffusers_folder(spec)
    if found is None:
        teacher = _fewstep_teacher(spec, prompts, null_class, device)
    elif (found[0] / "model_index.json").is_file():
        _check_covered(found[1])  # before loading: an uncovered pipeline may not even load
        if prompts is None:
            prompts = default_prompts(found[0])
        teacher = PipelineTeacher(load(found[0]).to(device), prompts, str(spec), null_class=null_class)
    else:
        teacher = PipelineTeacher(_bare_pipeline(*found).to(device), prompts, str(spec), null_class=null_class)
    if guidance:
        check_guidance(teacher)
    return teacher


def _fewstep_teacher(spec, prompts, null_class, device):
    if prompts is not None:
        raise ValueError(f"--prompts is for text-to-image pipeline teachers; {spec} is a fewstep class-"
                         "conditional model (it distills over its classes): leave --prompts out")
    if null_class is not None:
        raise ValueError(f"--null-class is for class-conditional diffusers UNets; {spec} is a fewstep model that "
                         "records its own null class: leave --null-class out")
    return load(spec).to(device)


def _bare_pipeline(folder: Path, kind: str):
    """A DDPMPipeline in memory around a bare UNet2DModel folder and the scheduler beside it."""
    if kind in TEXT_MODELS:
        raise ValueError(f"{folder} holds a bare {kind}, whose text embeddings come from its pipeline's text "
                         "encoders: pass the pipeline folder (model_index.json, text_encoder/, tokenizer/) instead")
    if kind not in BARE_MODELS:
        raise ValueError(f"{folder} holds a diffusers {kind}, not a denoiser fewstep distills (bare folders: "
                         f"{', '.join(BARE_MODELS)}; pipelines: {', '.join(COVERED_PIPELINES)}): pass one of those")
    from diffusers import DDPMPipeline
    scheduler = _scheduler_beside(folder, kind)
    return DDPMPipeline(unet=load(folder), scheduler=scheduler)


def _scheduler_beside(folder: Path, kind: str):
    """The scheduler saved beside a bare model folder (in it, its scheduler/ sub-folder, or a sibling scheduler/)."""
    import diffusers
    places = [folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
              folder.parent / "scheduler" / "scheduler_config.json"]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        raise ValueError(f"no scheduler for the {kind} in {folder}: looked for {', '.join(map(str, places))}; save the "
                         "scheduler it was trained with there (scheduler.save_pretrained)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"cannot read {path} ({e}); write the scheduler's config there (scheduler.save_pretrained)") \
            from None
    cls = getattr(diffusers, str(cfg.get("_class_name")) if isinstance(cfg, dict) else "", None)
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{path} names {cfg.get('_class_name')!r}, which is not a diffusers scheduler class; write "
                         "the scheduler's own config there (scheduler.save_pretrained)")
    return cls.from_config(cfg)


def check_guidance(teacher, w: float = 1.0) -> None:
    """Refuse, before any work, guidance at ``w`` (DMD's real_w > 0, guided distillation) from a
    class-conditional teacher that has no null class."""
    if w and getattr(teacher, "num_classes", None) is not None and getattr(teacher, "null_class", None) is None:
        raise ValueError(NO_NULL_CLASS)


class PipelineTeacher(DiffusionModel):
    """A diffusers pipeline as a distillation teacher (see the module docstring)."""

    def __init__(self, pipe, prompts: list[str] | None, source: str, *, null_class: int | None = None):
        kind = type(pipe).__name__
        _check_covered(kind)
        if any(p.dtype != torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters()):
            pipe = pipe.to(dtype=torch.float32)  # trained in float32 (fewstep.load gives float32 already)
        self.pipe, self.kind = pipe, kind
        self.role = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        module = getattr(pipe, self.role)
        self.prompts = list(prompts) if prompts is not None else None
        inputs, self.repeated_rows = self._conditioning(pipe, kind, module, null_class)
        net = DiffusersNet(module, pipe.scheduler.config, **inputs)
        if self.repeated_rows:
            from ..nets.textbed import RepeatedTokenJointAttnProcessor
            module.set_attn_processor(RepeatedTokenJointAttnProcessor(self.repeated_rows))
        size = module.config.sample_size
        shape = [module.config.in_channels, *((size, size) if isinstance(size, int) else size)]
        config = {"schedule": net.schedule.config(), "prediction": net.prediction, "image_shape": shape,
                  "recipe": kind, **_class_config(net)}
        super().__init__(net, config, source)
        self.folder = Path(getattr(pipe, "name_or_path", source) or source)

    def _conditioning(self, pipe, kind, module, null_class) -> tuple[dict, int]:
        """(DiffusersNet's conditioning keywords, repeated zero rows of SD3's bank)."""
        if kind in TEXT_PIPELINES:
            if null_class is not None:
                raise ValueError(f"--null-class is for class-conditional UNets; a {kind} teacher's null class is its "
                                 "empty prompt: leave --null-class out")
            if not self.prompts:
                raise ValueError(f"a {kind} teacher distills over prompts: pass --prompts FILE (one prompt per line)")
            return _text_bank(pipe, kind, self.prompts)
        if self.prompts is not None:
            classes = getattr(module.config, "num_class_embeds", None)
            what = f"this class-conditional UNet distills over its {classes} class ids" if classes else \
                f"{kind} takes no text"
            raise ValueError(f"--prompts is for text-to-image pipelines; {what}: leave --prompts out")
        return {"null_class": null_class}, 0

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
        """Images in [-1, 1] from the pipeline's latents, unscaled as its own call does (pixel pipelines: as is)."""
        vae = self.vae
        if vae is None:
            return latents.clamp(-1, 1)
        z = _unscale(latents.to(next(vae.parameters()).dtype), vae.config, self.kind)
        return vae.decode(z).sample.float().clamp(-1, 1)

    def prompt_digits(self) -> torch.Tensor | None:
        """The digit each prompt names (the test bed's grammar), or None when a prompt does not parse."""
        if not self.prompts:
            return None
        from ..data.captions import parse_caption
        parsed = [parse_caption(p) for p in self.prompts]
        return None if any(p is None for p in parsed) else torch.tensor([p[0] for p in parsed])


def _class_config(net: DiffusersNet) -> dict:
    """num_classes / null_class of the teacher's config: the ids below the null class when it is the last id (a
    prompt bank's empty prompt, the usual class-embedding layout), else every id."""
    if net.num_classes is None:
        return {}
    null = net.null_class
    config = {"num_classes": net.num_classes - 1 if null == net.num_classes - 1 else net.num_classes}
    return config if null is None else {**config, "null_class": null}


def scale_latents(z: torch.Tensor, cfg, kind: str) -> torch.Tensor:
    """The denoiser's latents from the VAE's (the inverse of :func:`_unscale`, as the pipeline's training scales)."""
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if kind == SDXL and mean is not None and std is not None:
        view = (1, -1) + (1,) * (z.ndim - 2)
        return (z - torch.tensor(mean).view(view).to(z)) * cfg.scaling_factor / torch.tensor(std).view(view).to(z)
    shift = getattr(cfg, "shift_factor", None) if kind == "StableDiffusion3Pipeline" else None
    return ((z - shift) if shift is not None else z) * cfg.scaling_factor


def _unscale(z: torch.Tensor, cfg, kind: str) -> torch.Tensor:
    """The VAE's latents from the denoiser's, as the pipeline's call unscales them before decoding."""
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if kind == SDXL and mean is not None and std is not None:  # SDXL: z std / scaling + mean, per channel
        view = (1, -1) + (1,) * (z.ndim - 2)
        return z * torch.tensor(std).view(view).to(z) / cfg.scaling_factor + torch.tensor(mean).view(view).to(z)
    z = z / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None) if kind == "StableDiffusion3Pipeline" else None  # SD / SDXL: none
    return z + shift if shift is not None else z


def _text_bank(pipe, kind: str, prompts: list[str]) -> tuple[dict, int]:
    """The prompt bank with the null row last (module docstring), as DiffusersNet keywords; SD3's repeated rows."""
    texts, null = prompts + [""], len(prompts)
    with torch.no_grad():
        if kind == "StableDiffusion3Pipeline":
            embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=pipe.device,
                                                      do_classifier_free_guidance=False)
            embeds, pooled, rows = _sd3_bank(embeds.float(), pooled.float())
            return {"label_context": embeds, "pooled_context": pooled, "null_class": null}, rows
        if kind == SDXL:
            return {**_sdxl_bank(pipe, texts), "null_class": null}, 0
        embeds = pipe.encode_prompt(texts, pipe.device, 1, False)[0]
    return {"label_context": embeds.float(), "null_class": null}, 0


def _sdxl_bank(pipe, texts: list[str]) -> dict:
    """SDXL's prompt_embeds and pooled_prompt_embeds of ``texts`` (the last, "", becomes the stock negative) and
    its time ids."""
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device=pipe.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    embeds, pooled = embeds.float().clone(), pooled.float().clone()
    if pipe.config.force_zeros_for_empty_prompt:  # encode_prompt's negative without a negative prompt: zeros
        embeds[-1], pooled[-1] = 0.0, 0.0
    return {"label_context": embeds, "pooled_context": pooled, "time_ids": sdxl_time_ids(pipe, pooled.shape[-1])}


def sdxl_time_ids(pipe, pooled_width: int) -> torch.Tensor:
    """SDXL's (6,) added time ids at the stock call's default size: original = target = (H, W) with H = W = UNet
    sample_size x vae_scale_factor, crop corner (0, 0), built by the pipeline's own ``_get_add_time_ids``."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    encoder = getattr(pipe, "text_encoder_2", None)
    dim = encoder.config.projection_dim if encoder is not None else pooled_width  # as the SDXL call chooses
    return pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                  text_encoder_projection_dim=dim)[0]


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


def student_scheduler(teacher: PipelineTeacher, steps: int | None, prediction: str | None = None,
                      renoise: bool = False):
    """A stock diffusers scheduler whose ``steps``-step sampling is the student's own (module docstring);
    steps None (guided stage 1: a w-conditioned model for any sampler): the teacher's own scheduler.
    ``prediction``: the student's output type when it is not the teacher's (a VP DMD generator that
    predicts x0: ``prediction_type="sample"``); ``renoise``: a DMD2 multi-step generator (fresh noise after
    each step)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
    cfg = teacher.pipe.scheduler.config
    if steps is None:
        return type(teacher.pipe.scheduler).from_config(cfg)
    if prediction not in (None, teacher.prediction) and teacher.net.family.name != "vp":
        raise ValueError(f"a {teacher.net.family.name} student outputs the teacher's {teacher.prediction}; "
                         f"gen_prediction={prediction!r} exports for VP teachers only: leave it unset")
    renoise = renoise and steps > 1
    if teacher.net.family.name == "flow":  # the student's grid i / N from pure noise (distill.fraction_to_time):
        # shift 1 stretched to end at 1 / N; an Euler step x + (s - t) v is the student's DDIM step on flow
        if steps == 1:
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        return FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=1.0, use_dynamic_shifting=False,
                                                           shift_terminal=1.0 / steps, stochastic_sampling=renoise)
    if teacher.net.family.name != "vp":
        raise ValueError(f"students of {teacher.net.family.name} teachers cannot be exported as pipelines yet")
    kind = {} if prediction in (None, teacher.prediction) else {"prediction_type": SCHEDULER_PREDICTIONS[prediction]}
    ddim = DDIMScheduler.from_config(cfg, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, **kind)
    if not renoise:
        return ddim
    lcm = LCMScheduler.from_config(cfg, original_inference_steps=steps, clip_sample=False, thresholding=False,
                                   **kind)
    lcm.set_timesteps(steps)
    ddim.set_timesteps(steps)
    if not torch.equal(lcm.timesteps, ddim.timesteps):  # N not dividing the training steps
        raise ValueError(f"a {steps}-step DMD2 generator exports as a stock pipeline (LCMScheduler) only when {steps} "
                         f"divides the teacher's {cfg.num_train_timesteps} training steps: choose gen_steps 2, 4, 5 "
                         "or 8")
    return lcm


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


def _pipeline_options(pipe) -> dict:
    """The constructor options of ``pipe``'s config besides its components: SDXL's force_zeros_for_empty_prompt
    (what its null prompt is) kept; SD's requires_safety_checker False (no checker is exported)."""
    params = inspect.signature(type(pipe).__init__).parameters
    options = {k: pipe.config[k] for k in params if k in pipe.config and k not in pipe.components}
    return {**options, "requires_safety_checker": False} if "requires_safety_checker" in params else options


def export_student(teacher: PipelineTeacher, net: DiffusersNet, folder, *, steps: int | None, info: dict,
                   prediction: str | None = None, renoise: bool = False) -> Path:
    """Write ``net`` as the teacher's pipeline class with the student's scheduler to ``folder`` (plus
    fewstep.json: ``info`` and the student's steps); ``prediction``: the student's output type when it is
    not the teacher's (student_scheduler). Returns the folder."""
    import copy
    folder = Path(folder)
    module = _stock_module(copy.deepcopy(net))
    components = {**teacher.pipe.components, teacher.role: module,
                  "scheduler": student_scheduler(teacher, steps, prediction, renoise)}
    pipe = type(teacher.pipe)(**components, **_pipeline_options(teacher.pipe))
    pipe.save_pretrained(folder)
    record = {**info, "student_steps": steps, "teacher": teacher.source, "pipeline": teacher.kind,
              "prompts": len(teacher.prompts or [])}
    if teacher.prompts is None and teacher.num_classes is not None:  # a class-conditional UNet's ids
        record.update(num_classes=teacher.num_classes, null_class=teacher.null_class)
    (folder / INFO).write_text(json.dumps(record, indent=1) + "\n")
    return folder


def load_student(teacher: PipelineTeacher, folder) -> DiffusersNet:
    """An exported student's network as a DiffusersNet with the teacher's prompt bank (to continue from it)."""
    cls = type(getattr(teacher.pipe, teacher.role))
    module = cls.from_pretrained(Path(folder) / teacher.role)
    fresh = DiffusersNet(module, teacher.pipe.scheduler.config, **teacher.net.conditioning())
    if teacher.repeated_rows:
        from ..nets.textbed import RepeatedTokenJointAttnProcessor
        module.set_attn_processor(RepeatedTokenJointAttnProcessor(teacher.repeated_rows))
    return fresh


def pipeline_exporter(teacher: PipelineTeacher, steps: int | None, prediction: str | None = None,
                      renoise: bool = False) -> dict:
    """A Stage's ``save`` / ``load`` for students of a pipeline teacher (pipeline folders, see export_student)."""
    student_scheduler(teacher, steps, prediction, renoise)  # refuses an unexportable student before training

    def save(net, folder, extra):
        info = {k: v for k, v in extra.items() if k != "schedule"}  # the schedule is the scheduler config's
        return export_student(teacher, net, folder, steps=steps, info=info, prediction=prediction, renoise=renoise)
    return {"save": save, "load": lambda folder: load_student(teacher, folder)}


def pipeline_preview_options(teacher: PipelineTeacher) -> dict:
    """generator_preview's options for a pipeline teacher: decode by its VAE; ask for digit d with the test
    bed's prompts naming d (when every prompt parses), cycling through them."""
    options = {"decode": teacher.decode, "prompts": teacher.prompts}
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
    like DMD's regression set (fewstep.distill.pairs); a teacher without a null class (an unconditional or
    class-id UNet given no --null-class) at w = 0."""
    if not isinstance(teacher, PipelineTeacher):
        from ..data.mnist import load_mnist
        return load_mnist("train")
    from ..distill.pairs import regression_pairs
    w = 1.0 if teacher.null_class is not None else 0.0
    pairs = regression_pairs(teacher, Path(out) / "teacher-samples.safetensors", n=samples.n, solver=samples.solver,
                             steps=samples.steps, w=w, seed=samples.seed, progress=progress)
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
