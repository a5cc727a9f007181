"""DMD's regression set: (noise z, class, the teacher's ODE output from z), made once and cached.

The cache is one safetensors file whose metadata records the settings it was made with
(teacher identity = a hash of its weights, n, solver, steps, w, seed). It is reused when
the settings match and the file reads back whole and finite; otherwise it is rebuilt, with a
message saying why.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..denoisers import ClassifierFreeGuidance, ModelDenoiser
from ..distributed import gather_batches, my_batches, process_group, sample_generators
from ..sampling import sample
from ..schedules import NoiseSchedule
from ._common import check_prediction, guidance_null_class, null_labels

__all__ = ["regression_pairs", "weights_hash", "cached_tensors", "DMDData"]


def weights_hash(net: torch.nn.Module) -> str:
    """A short SHA-256 of a network's parameters and buffers (identifies the teacher of a cache)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_cache(path: Path, settings: dict, names: tuple[str, ...], rows: int) -> tuple[dict | None, str]:
    """(tensors, '') if the cache at ``path`` is valid for ``settings`` (exactly the tensors ``names``,
    ``rows`` rows each, all finite); else (None, why not)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        return None, "no cache yet"
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("settings", "{}"))
        tensors = load_file(str(path))
    except Exception as e:  # truncated / corrupt file: safetensors raises its own error types
        return None, f"the cache {path} is unreadable ({type(e).__name__})"
    if meta != settings:
        changed = sorted(k for k in set(meta) | set(settings) if meta.get(k) != settings.get(k))
        return None, f"the cache {path} was made with other settings ({', '.join(changed)})"
    if sorted(tensors) != sorted(names) or any(v.shape[0] != rows for v in tensors.values()):
        return None, f"the cache {path} does not hold {rows} ({', '.join(sorted(names))}) rows"
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        return None, f"the cache {path} holds non-finite values"
    return tensors, ""


def cached_tensors(path, settings: dict, names: tuple[str, ...], rows: int, build, what: str) -> dict:
    """The tensors ``names`` (``rows`` rows each) cached in the safetensors file ``path`` for ``settings``
    (recorded in its metadata): read back when valid, else made by ``build()`` (announced with the reason)
    and written atomically by the main process."""
    path = Path(path)
    cached, why = _read_cache(path, settings, names, rows)
    if cached is not None:
        return cached
    print(f"building {what}: {why}", file=sys.stderr)
    tensors = build()
    world, rank = process_group()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"settings": json.dumps(settings)})
        os.replace(tmp, path)
    if world > 1:
        torch.distributed.barrier()
    return tensors


@torch.no_grad()
def regression_pairs(teacher, path, *, n: int = 2000, solver: str = "dpmpp_2m", steps: int = 20, w: float = 0.0,
                     seed: int = 0, batch_size: int = 250, progress: bool = False,
                     schedule: NoiseSchedule | None = None, image_shape=None, prediction: str | None = None, num_classes: int | None = None,
                     null_class: int | None = None, teacher_id: str | None = None) -> dict:
    """The paired set for DMD's regression loss from any teacher.

    teacher: a fewstep ``DiffusionModel`` (``fewstep.load``: schedule, image shape and classes come
      with it); or a net ``net(x, t, labels)`` with its output type ``prediction``; or a denoiser
      ``D(x, t, labels=None) -> x0_hat`` (then ``teacher_id`` names it in the cache). The last two
      need ``schedule`` and ``image_shape``; ``num_classes`` (0/None: unconditional) and, for w > 0,
      ``null_class``.
    Row i: class i mod num_classes (balanced), z_i ~ N(0, I) from a generator seeded by (seed, i)
    (:func:`fewstep.distributed.sample_generators`), x_ref_i = the teacher's ODE solution from
    sigma_max z_i with ``solver`` in ``steps`` model calls at guidance ``w``. Returns {"z", "labels",
    "x_ref"} (CPU tensors).
    """
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    src = _teacher_source(teacher, w, schedule, image_shape, prediction, num_classes, null_class, teacher_id)
    path = Path(path)
    settings = {"teacher": src["id"], "n": int(n), "solver": solver, "steps": int(steps), "w": float(w),
                "seed": int(seed), "image_shape": list(src["image_shape"]), **src["extra"]}
    return cached_tensors(path, settings, ("labels", "x_ref", "z"), n,
                          lambda: _teacher_pairs(src, n, solver, steps, seed, batch_size, progress),
                          f"the DMD regression set ({n} teacher samples, {solver}, {steps} calls, w={w})")


def _teacher_source(teacher, w, schedule, image_shape, prediction, num_classes, null_class, teacher_id) -> dict:
    """What regression_pairs needs of a teacher: denoiser (guided at w), schedule, image shape, classes,
    device, identity (and the extra cache settings of a bare net or denoiser)."""
    if hasattr(teacher, "denoiser") and hasattr(teacher, "net") and hasattr(teacher, "image_shape"):
        return {"denoiser": teacher.denoiser(w), "schedule": teacher.schedule,
                "image_shape": tuple(teacher.image_shape), "num_classes": teacher.num_classes, "device": teacher.device, "id": weights_hash(teacher.net),
                "extra": {}}
    if schedule is None or image_shape is None:
        raise ValueError("a bare net or denoiser teacher needs schedule= and image_shape= (the shape of one sample)")
    if isinstance(teacher, torch.nn.Module):
        if prediction is None:
            raise ValueError("a net teacher needs prediction= (its output type: eps, v, x0 or flow)")
        den = ModelDenoiser(lambda x, t, labels=None: teacher(x, t, labels), schedule, check_prediction(prediction))
        param = next(teacher.parameters(), None)
        device, ident = (param.device if param is not None else "cpu"), teacher_id or weights_hash(teacher)
    elif callable(teacher):
        if teacher_id is None:
            raise ValueError("a denoiser teacher has no weights to identify its cache by: pass teacher_id= (a name "
                             "that changes whenever the denoiser does)")
        den, device, ident = teacher, "cpu", str(teacher_id)
    else:
        raise TypeError(f"cannot make regression pairs from a {type(teacher).__name__}: pass a fewstep model, a net "
                        "or a denoiser D(x, t, labels=None)")
    if w != 0:
        if not num_classes:
            raise ValueError("guidance w needs a class-conditional teacher: pass num_classes= (and null_class=)")
        den = ClassifierFreeGuidance(den, w, null_labels(guidance_null_class(teacher, null_class, "regression_pairs")))
    return {"denoiser": den, "schedule": schedule, "image_shape": tuple(image_shape), "num_classes": num_classes,
            "device": device, "id": ident, "extra": {"schedule": repr(schedule), "prediction": prediction}}


def _teacher_pairs(src: dict, n: int, solver: str, steps: int, seed: int, batch_size: int, progress: bool) -> dict:
    """The teacher's ODE outputs for n seeded noises, made in batches shared over the processes."""
    classes, shape, schedule = src["num_classes"], src["image_shape"], src["schedule"]
    labels = torch.arange(n) % classes if classes else None
    sigma_max = float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    world, rank = process_group()  # several processes: each makes every world-th batch; the main one writes
    zs, xs = [], []
    starts = my_batches(range(0, n, batch_size), world, rank)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="regression set")
    for start in starts:
        count = min(batch_size, n - start)
        z = torch.cat([torch.randn((1, *shape), generator=g) for g in sample_generators(seed, start, count)])
        lab = None if labels is None else labels[start:start + count].to(src["device"])
        out = sample(src["denoiser"], (z * sigma_max).to(src["device"]), schedule, solver=solver, steps=steps,
                     spacing="logsnr", cond=None if lab is None else {"labels": lab}, generator=None, progress=False)
        zs.append(z)
        xs.append(out.x.float().cpu())
    zs, xs = gather_batches(zs, world), gather_batches(xs, world)
    return {"z": torch.cat(zs).contiguous(), "x_ref": torch.cat(xs).contiguous(),
            "labels": (labels if labels is not None else torch.zeros(n, dtype=torch.long)).contiguous()}


class DMDData:
    """A ``sample(generator, batch_size)`` data source for DMD: a batch of paired rows, and (for the
    GAN) a batch of real images, both drawn with the training loop's generator (exact resume).
    ``conditional=False`` (an unconditional teacher): batches carry ``labels=None``."""

    def __init__(self, pairs: dict, real: tuple | None = None, conditional: bool = True):
        self.pairs, self.real, self.conditional = pairs, real, conditional
        self.n = pairs["z"].shape[0]

    def __call__(self, generator: torch.Generator, batch_size: int) -> dict:
        idx = torch.randint(0, self.n, (batch_size,), generator=generator)
        batch = {k: v[idx] for k, v in self.pairs.items()}
        if not self.conditional:
            batch["labels"] = None
        if self.real is not None:
            x, y = self.real
            j = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            batch.update(x_real=x[j], labels_real=y[j])
        return batch
