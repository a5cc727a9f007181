"""LoRA students of diffusers pipeline teachers (``--lora-rank R``): adapters trained over the teacher's own
frozen weights, exported as a ``pytorch_lora_weights.safetensors`` that stock diffusers loads.

* :func:`with_lora` makes a student (or DMD's fake score) whose diffusers module carries a peft LoRA adapter
  (diffusers' own ``module.add_adapter(peft.LoraConfig(...))``). The module is a *shallow* copy of the
  teacher's: new module objects, but every base weight is the teacher's own ``Parameter`` object (same
  storage), frozen; only the LoRA factors (and a guided student's new guidance layer) train. The adapter is
  injected into the copy's tree, so the teacher's module keeps its plain layers and its outputs.
  The result is a :class:`LoraNet`: a DiffusersNet whose ``copy.deepcopy`` (the training loop's EMA, the
  progressive rounds' next student) shares the frozen weights again, and whose ``requires_grad_(True)``
  re-enables only the trained parameters (so it can never unfreeze the teacher's weights).
* :func:`memory_plan` counts trained and frozen parameters and estimates the training memory.
* :func:`export_lora` writes the LoRA form of a student: the adapter in the file ``load_lora_weights``
  reads, the student's scheduler, a README.md model card with the stock diffusers lines and fewstep.json;
  :func:`load_lora_student` reads it back over the teacher's weights.

Targets (peft module-name suffixes): ``"attention"`` (default: to_q / to_k / to_v / to_out.0, and SD3's
context projections add_q_proj / add_k_proj / add_v_proj / to_add_out), ``"attention+ff"`` (plus the
feed-forward layers), ``"all"`` (plus, for UNets, the ResNet convolutions conv1 / conv2 and the attention
blocks' proj_in / proj_out), or a tuple of suffixes. All of them load through ``load_lora_weights``
(the export records the adapter's LoraConfig in the file's metadata).

Guided students (w through ``time_cond_proj_dim``): the new ``time_embedding.cond_proj`` layer is not in
the teacher, and ``load_lora_weights`` cannot add a layer. It is trained (zero-initialised) and exported
beside the adapter as ``guidance_embedding.safetensors``; the model card loads the UNet with
``time_cond_proj_dim`` in its config and that file, then the adapter (stock diffusers code throughout).
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from ..diffusers import DiffusersNet
from .teachers import INFO, PipelineTeacher, export_student, student_scheduler

__all__ = ["LoraNet", "with_lora", "memory_plan", "memory_summary", "export_lora", "load_lora_student",
           "merged_student", "lora_exporter", "cli_command", "last_quality", "lora_teacher_pipeline", "TARGETS",
           "LORA_WEIGHTS", "GUIDANCE_WEIGHTS"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights(folder) reads
GUIDANCE_WEIGHTS = "guidance_embedding.safetensors"  # a guided LoRA student's time_embedding.cond_proj
GUIDANCE_LAYER = "time_embedding.cond_proj"

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # SD3's context stream
_FF = ("ff.net.0.proj", "ff.net.2")
_FF_CONTEXT = ("ff_context.net.0.proj", "ff_context.net.2")
_UNET_CONV = ("conv1", "conv2", "proj_in", "proj_out")
TARGETS = {
    "unet": {"attention": _ATTENTION, "attention+ff": _ATTENTION + _FF, "all": _ATTENTION + _FF + _UNET_CONV},
    "transformer": {"attention": _ATTENTION + _JOINT_ATTENTION,
                    "attention+ff": _ATTENTION + _JOINT_ATTENTION + _FF + _FF_CONTEXT,
                    "all": _ATTENTION + _JOINT_ATTENTION + _FF + _FF_CONTEXT},
}


# ---------------------------------------------------------------------------
# The LoRA student
# ---------------------------------------------------------------------------

class LoraNet(DiffusersNet):
    """A DiffusersNet whose module carries a LoRA adapter over frozen base weights shared with another net
    (built by :func:`with_lora`). ``lora``: {rank, alpha, targets, w_input}; ``trained_names``: the names of
    the parameters that train (LoRA factors, a new guidance layer)."""

    lora: dict
    trained_names: frozenset

    def requires_grad_(self, requires_grad: bool = True) -> "LoraNet":
        """Set requires_grad of the trained parameters only: the shared base weights stay frozen."""
        for name, p in self.named_parameters():
            p.requires_grad_(bool(requires_grad) and name in self.trained_names)
        return self

    def __deepcopy__(self, memo):
        """A copy with its own trained parameters that shares the frozen ones (and the prompt banks):
        the training loop's EMA and a progressive round's next student hold no second base."""
        for name, p in self.named_parameters():
            if name not in self.trained_names:
                memo.setdefault(id(p), p)
        for bank in (self.label_context, self.pooled_context):
            if bank is not None:
                memo.setdefault(id(bank), bank)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name in self.trained_names]


def _role(module: nn.Module) -> str:
    return "transformer" if type(module).__name__ == "SD3Transformer2DModel" else "unet"


def _targets(module: nn.Module, targets) -> tuple[str, ...]:
    """The peft target suffixes of ``targets`` (a preset name or suffixes), each matching a module of ``module``."""
    presets = TARGETS[_role(module)]
    if targets is None:
        targets = "attention"
    if isinstance(targets, str):
        if targets not in presets:
            raise ValueError(f"unknown LoRA targets {targets!r}; choose {', '.join(presets)} or pass module-name "
                             "suffixes such as ('to_q', 'to_v')")
        targets = presets[targets]
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        raise ValueError(f"LoRA targets {missing or list(targets)} match no layer of {type(module).__name__}; "
                         f"use a preset ({', '.join(presets)}) or suffixes of its module names")
    return tuple(targets)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with new module objects but the same Parameter objects (shared base weights)."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})


def _add_guidance_layer(module: nn.Module, dim: int) -> None:
    """Give a UNet2DConditionModel a zero-initialised ``time_embedding.cond_proj`` (its time_cond_proj_dim
    input, as with_w_input does), recorded in its config."""
    width = module.time_embedding.linear_1.in_features
    p = next(module.parameters())
    layer = nn.Linear(dim, width, bias=False).to(device=p.device, dtype=p.dtype)
    nn.init.zeros_(layer.weight)
    module.time_embedding.cond_proj = layer
    module.register_to_config(time_cond_proj_dim=dim)


def _lora_config(**kwargs):
    """peft's LoraConfig, or a one-line error saying how to install peft."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("LoRA students need the peft package: pip install 'peft>=0.17' (or leave --lora-rank "
                         "out)") from None
    return LoraConfig(**kwargs)


def with_lora(net: DiffusersNet, rank: int, *, alpha: float | None = None, targets=None,
              w_input: int | None = None, seed: int = 0) -> LoraNet:
    """A LoRA student of ``net`` (see the module docstring): ``net``'s weights shared and frozen, an adapter
    of rank ``rank`` (scale ``alpha / rank``, alpha defaults to rank) on ``targets``, zero at init (the
    student equals ``net``). ``w_input``: add a guidance input of that time_cond_proj_dim (guided
    distillation, 256 as with_w_input), trained with the adapter. ``seed``: the seed of lora_A's random
    initialisation (the caller's RNG state is left as it was)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}; leave --lora-rank out to train all weights")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}; leave it out for alpha = rank")
    if isinstance(net, LoraNet):
        raise ValueError("this net already carries a LoRA adapter; pass the teacher's net to with_lora")
    if not isinstance(net, DiffusersNet):
        raise ValueError(f"LoRA students are for diffusers pipeline teachers (a DiffusersNet), not a "
                         f"{type(net).__name__}: leave --lora-rank out, or pass --teacher a pipeline folder")
    if getattr(net.unet, "peft_config", None):
        raise ValueError(f"{type(net.unet).__name__} already holds a peft adapter; pass the teacher's plain net")
    module = _shallow_copy(net.unet)
    target = _targets(module, targets)
    if w_input is not None:
        if net.use_w:
            raise ValueError("this net already has a guidance input; leave w_input out")
        if "time_cond_proj_dim" in inspect.signature(type(module).__init__).parameters:
            _add_guidance_layer(module, int(w_input))
    with torch.random.fork_rng(devices=[]):  # lora_A's random init: the same for the same seed, whatever the RNG
        torch.manual_seed(seed)
        module.add_adapter(_lora_config(r=rank, lora_alpha=rank if alpha is None else alpha,
                                        target_modules=list(target)))
    student = LoraNet(module, net._schedule_arg, **net.conditioning())
    student.prediction = net.prediction
    if w_input is not None and not student.use_w:  # SD3 / UNet2DModel: a fewstep WEmbedding (not exportable)
        student._add_w(int(w_input))
    student.lora = {"rank": rank, "alpha": float(rank if alpha is None else alpha), "targets": list(target),
                    "w_input": None if w_input is None else int(w_input)}
    student.trained_names = frozenset(n for n, _ in student.named_parameters()
                                      if ".lora_" in n or n.startswith(f"unet.{GUIDANCE_LAYER}.")
                                      or n.startswith("w_embedding."))
    return student.requires_grad_(True)


# ---------------------------------------------------------------------------
# Parameters and memory
# ---------------------------------------------------------------------------

def _key(p: torch.Tensor):
    return p.data_ptr() or id(p)


def memory_plan(teacher, student: nn.Module, fake: nn.Module | None = None, dtype=torch.float32) -> dict:
    """Trained and frozen parameter counts of a run, and its weight memory in bytes at ``dtype``: each
    trained parameter's weight, gradient, two AdamW moments and EMA copy, plus every frozen weight once
    (the teacher's and the students' shared base); ``full_finetune_bytes``: the same run with whole-network
    students (their five copies each, plus the teacher). ``summary``: one line to print before training."""
    base = getattr(teacher, "net", teacher)
    nets = {"student": student, **({"fake": fake} if fake is not None else {})}
    trained = {name: sum(p.numel() for p in n.parameters() if p.requires_grad) for name, n in nets.items()}
    trained_keys = {_key(p) for n in nets.values() for p in n.parameters() if p.requires_grad}
    frozen_seen, frozen = set(), 0
    for m in (base, *nets.values()):
        for p in m.parameters():
            k = _key(p)
            if k not in trained_keys and k not in frozen_seen:
                frozen_seen.add(k)
                frozen += p.numel()
    size = torch.empty((), dtype=dtype).element_size()
    n_trained = sum(trained.values())
    parts = {"frozen_weights": frozen * size, "trained_weights": n_trained * size, "grads": n_trained * size,
             "adam": 2 * n_trained * size, "ema": n_trained * size}
    teacher_params = sum(p.numel() for p in base.parameters())
    whole = sum(sum(p.numel() for p in n.parameters()) for n in nets.values())
    plan = {"trained_params": trained, "trained": n_trained, "frozen": frozen, "teacher_params": teacher_params,
            "bytes": parts, "total_bytes": sum(parts.values()),
            "full_finetune_bytes": (teacher_params + 5 * whole) * size, "dtype": str(dtype).replace("torch.", "")}
    plan["summary"] = memory_summary(plan)
    return plan


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _mib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def memory_summary(plan: dict) -> str:
    """One line: trained vs frozen parameters, and the weight memory against whole-network training."""
    each = ", ".join(f"{k} {_count(v)}" for k, v in plan["trained_params"].items())
    share = plan["trained"] / max(plan["teacher_params"], 1)
    return (f"training {_count(plan['trained'])} parameters ({each}; {share:.2%} of the teacher's "
            f"{_count(plan['teacher_params'])}), {_count(plan['frozen'])} frozen and held once; weights + grads + "
            f"AdamW + EMA ~ {_mib(plan['total_bytes'])} at {plan['dtype']} "
            f"(whole-network students: {_mib(plan['full_finetune_bytes'])})")


# ---------------------------------------------------------------------------
# Export as a LoRA for stock diffusers, and back
# ---------------------------------------------------------------------------

def lora_teacher_pipeline(teacher: PipelineTeacher):
    """The teacher's pipeline class, refused in one line when diffusers cannot load a LoRA into it."""
    cls = type(teacher.pipe)
    if not hasattr(cls, "save_lora_weights") or not hasattr(cls, "load_lora_weights"):
        raise ValueError(f"{teacher.kind} has no load_lora_weights: LoRA students export for "
                         "StableDiffusionPipeline / StableDiffusion3Pipeline teachers; leave --lora-rank out")
    return cls


def _check_exportable(net) -> None:
    if not isinstance(net, LoraNet) or not getattr(net.unet, "peft_config", None):
        raise ValueError(f"export_lora writes LoRA students (with_lora), got {type(net).__name__}; "
                         "use export_student for whole-network students")
    if net.w_embedding is not None:
        raise ValueError("this student's w input is a fewstep WEmbedding (its model class has no time_cond_proj_dim): "
                         "stock diffusers cannot feed it; export students of UNet2DConditionModel teachers")


def _adapter_state(module: nn.Module) -> dict:
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(module).items()}


def export_lora(teacher: PipelineTeacher, net: LoraNet, folder, *, steps: int | None, info: dict,
                prediction: str | None = None, renoise: bool = False) -> Path:
    """Write the LoRA form of ``net`` to ``folder``: ``pytorch_lora_weights.safetensors`` (what the teacher
    pipeline's ``load_lora_weights(folder)`` reads, its LoraConfig in the file's metadata), a guided student's
    ``guidance_embedding.safetensors``, ``scheduler/`` (the student's, ``student_scheduler``), README.md (the
    model card: base, rank, steps, w, quality, the stock loading code) and fewstep.json (``info`` plus the
    steps and the adapter); returns the folder."""
    from safetensors.torch import save_file
    cls = lora_teacher_pipeline(teacher)
    _check_exportable(net)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    role, module = teacher.role, net.unet
    kwargs = {f"{role}_lora_layers": _adapter_state(module)}
    if f"{role}_lora_adapter_metadata" in inspect.signature(cls.save_lora_weights).parameters:
        kwargs[f"{role}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    elif net.lora["alpha"] != net.lora["rank"]:
        raise ValueError("this diffusers version saves no LoRA metadata, so alpha != rank would load at the wrong "
                         "scale; upgrade diffusers or train with alpha = rank")
    cls.save_lora_weights(folder, **kwargs)
    if net.lora["w_input"] is not None:
        weight = module.time_embedding.cond_proj.weight.detach().to("cpu", torch.float32).contiguous()
        save_file({f"{GUIDANCE_LAYER}.weight": weight}, str(folder / GUIDANCE_WEIGHTS))
    scheduler = student_scheduler(teacher, steps, prediction, renoise)
    scheduler.save_pretrained(folder / "scheduler")
    record = {**info, "student_steps": steps, "teacher": teacher.source, "pipeline": teacher.kind,
              "prompts": len(teacher.prompts or []), "lora": dict(net.lora),
              "trained_params": sum(p.numel() for p in net.trained_parameters())}
    (folder / INFO).write_text(json.dumps(record, indent=1) + "\n")
    (folder / "README.md").write_text(model_card(teacher, record, type(scheduler).__name__, folder))
    return folder


def _w_line(record: dict) -> tuple[str, str]:
    """(what the card says about w, the guidance_scale of its example call)."""
    if record["lora"]["w_input"] is not None:
        lo, hi = record.get("w_range", (0.0, 4.0))
        return (f"an input: `guidance_scale = 1 + w` feeds the UNet's guidance embedding (trained for w in "
                f"[{lo:g}, {hi:g}]); one network call per step, no classifier-free guidance", "1 + w")
    w = record.get("w", record.get("real_w"))
    what = "distilled in" if w is not None else "not recorded"
    return (f"{w if w is not None else '?'} ({what}): call with `guidance_scale=1.0`; a larger value would run "
            "classifier-free guidance on the student (two calls per step, not what it learned)", "1.0")


def model_card(teacher: PipelineTeacher, record: dict, scheduler: str, folder: Path) -> str:
    """README.md of a LoRA export: what it is, how it was made and measured, and the stock diffusers code."""
    lora, steps = record["lora"], record["student_steps"]
    base, export = str(teacher.folder), str(folder)
    w_text, scale = _w_line(record)
    quality = record.get("quality")
    if isinstance(quality, dict):
        quality = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
    calls = steps if steps is not None else "any (a w-conditioned model for any sampler)"
    if lora["w_input"] is not None:
        load = (f"unet = UNet2DConditionModel.from_pretrained(\"{base}\", subfolder=\"unet\", "
                f"time_cond_proj_dim={lora['w_input']}, low_cpu_mem_usage=False)\n"
                f"unet.load_state_dict(load_file(\"{export}/{GUIDANCE_WEIGHTS}\"), strict=False)  # the new layer\n"
                f"pipe = {teacher.kind}.from_pretrained(\"{base}\", unet=unet)\n")
        imports = (f"from diffusers import {teacher.kind}, UNet2DConditionModel, {scheduler}\n"
                   "from safetensors.torch import load_file\n")
    else:
        load = f"pipe = {teacher.kind}.from_pretrained(\"{base}\")\n"
        imports = f"from diffusers import {teacher.kind}, {scheduler}\n"
    prompt = json.dumps(teacher.prompts[0] if teacher.prompts else "your prompt")
    code = (imports + load + f"pipe.load_lora_weights(\"{export}\")\n"
            + (f"pipe.scheduler = {scheduler}.from_pretrained(\"{export}\", subfolder=\"scheduler\")\n")
            + ("w = 2.0  # the guidance weight\n" if lora["w_input"] is not None else "") + f"prompt = {prompt}\n"
            + f"images = pipe(prompt, num_inference_steps={steps or 8}, guidance_scale={scale}).images\n")
    guided = ("\nThe UNet needs `time_cond_proj_dim` in its config and the trained `time_embedding.cond_proj` "
              f"layer ({GUIDANCE_WEIGHTS}), which `load_lora_weights` cannot add: the first two lines load them.\n"
              if lora["w_input"] is not None else "")
    rows = [("base model", f"`{record['teacher']}` ({record['pipeline']})"),
            ("recipe", record.get("recipe", "?")),
            ("command", f"`{record['command']}`" if record.get("command") else "not recorded"),
            ("sampling steps", calls), ("w", w_text),
            ("LoRA", f"rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}"),
            ("trained parameters", f"{record['trained_params']:,}"),
            ("training steps", record.get("train_steps", "?")),
            ("quality", quality or "not measured for this export")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\nbase_model: {record['teacher']}\nlibrary_name: diffusers\ntags: [fewstep, lora, distillation]\n"
            f"---\n\n# A {calls}-step LoRA student of {record['teacher']}\n\n"
            f"fewstep distilled `{record['teacher']}` into LoRA adapters of its {teacher.role}. "
            f"The adapter runs on the teacher's own weights; `scheduler/` is the student's sampler ({scheduler}), "
            "which it needs: the teacher's own scheduler would sample other times.\n\n"
            f"| what | value |\n|---|---|\n{table}\n\n## Load it with stock diffusers\n{guided}\n"
            f"```python\n{code}```\n")


def load_lora_student(teacher: PipelineTeacher, folder) -> LoraNet:
    """A LoRA export (export_lora) over the teacher's weights, as a LoraNet (to continue or evaluate it)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        lora = json.loads((folder / INFO).read_text())["lora"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"{folder} is not a LoRA export of fewstep (no 'lora' in its {INFO}); "
                         "use load_student for pipeline folders") from None
    net = with_lora(teacher.net, lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"]),
                    w_input=lora["w_input"])
    prefix = teacher.role + "."
    state = {k[len(prefix):]: v for k, v in load_file(str(folder / LORA_WEIGHTS)).items() if k.startswith(prefix)}
    expected = set(_adapter_state(net.unet))
    if set(state) != expected:
        raise ValueError(f"{folder / LORA_WEIGHTS} does not fit a rank-{lora['rank']} adapter on {lora['targets']} "
                         f"({len(set(state) ^ expected)} keys differ); was it written for another teacher?")
    p = next(net.unet.parameters())
    set_peft_model_state_dict(net.unet, {k: v.to(p.device, p.dtype) for k, v in state.items()})
    if lora["w_input"] is not None:
        w = load_file(str(folder / GUIDANCE_WEIGHTS))[f"{GUIDANCE_LAYER}.weight"]
        with torch.no_grad():
            net.unet.time_embedding.cond_proj.weight.copy_(w)
    return net


def merged_student(net: LoraNet) -> DiffusersNet:
    """A whole-network copy of a LoRA student with the adapter merged into its weights (not shared): what
    ``export_student`` writes as a full pipeline folder."""
    _check_exportable(net)
    module = copy.deepcopy(net.unet)  # the module alone: a full copy, the teacher's weights untouched
    module.fuse_lora()
    module.unload_lora()
    plain = DiffusersNet(module.requires_grad_(True), net._schedule_arg, **net.conditioning())
    plain.prediction = net.prediction
    return plain


def cli_command() -> str | None:
    """The ``fewstep ...`` command line this process runs (None outside the CLI, e.g. in a notebook or a test)."""
    import shlex
    import sys
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if first is None or not (first.name == "fewstep" or first.parts[-2:] == ("fewstep", "__main__.py")):
        return None
    return shlex.join(["fewstep", *sys.argv[1:]])


def last_quality(fid_log) -> dict | None:
    """The last point of a run's FID-against-training-steps curve (previews' fid.jsonl), for the model card."""
    try:
        lines = Path(fid_log).read_text().splitlines() if fid_log is not None else []
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    if not last:
        return None
    return {"FID (classifier features)": last.get("fid"), "n": last.get("n"),
            "class accuracy": last.get("class_accuracy"), "at training step": last.get("step")}


def lora_exporter(teacher: PipelineTeacher, steps: int | None, *, guided: bool = False, fid_log=None,
                  prediction: str | None = None, renoise: bool = False) -> dict:
    """A Stage's ``save`` / ``load`` for LoRA students (pipeline_exporter's LoRA form), refusing before training
    what cannot be exported. The model card records this process's command (:func:`cli_command`) and the
    last point of ``fid_log`` as the measured quality."""
    lora_teacher_pipeline(teacher)
    module = getattr(teacher.pipe, teacher.role)
    if guided and "time_cond_proj_dim" not in inspect.signature(type(module).__init__).parameters:
        raise ValueError(f"a guided LoRA student of {type(module).__name__} would take w through a fewstep WEmbedding "
                         "that stock diffusers cannot feed; guided LoRA needs a UNet2DConditionModel teacher: leave "
                         "--lora-rank out")
    student_scheduler(teacher, steps, prediction, renoise)  # refuses an unexportable student before training
    command = cli_command()

    def save(net, folder, extra):
        info = {k: v for k, v in extra.items() if k != "schedule"}
        if command is not None:
            info.setdefault("command", command)
        quality = last_quality(fid_log)
        if quality is not None:
            info.setdefault("quality", quality)
        export_student(teacher, merged_student(net), folder, steps=steps, info=info, prediction=prediction,
                       renoise=renoise)  # the full pipeline too
        return export_lora(teacher, net, folder, steps=steps, info=info, prediction=prediction, renoise=renoise)
    return {"save": save, "load": lambda folder: load_lora_student(teacher, folder)}
