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

__all__ = ["regression_pairs", "weights_hash", "DMDData"]


def weights_hash(net: torch.nn.Module) -> str:
    """A short SHA-256 of a network's parameters and buffers (identifies the teacher of a cache)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_cache(path: Path, settings: dict) -> tuple[dict | None, str]:
    """(tensors, '') if the cache at ``path`` is valid for ``settings``; else (None, why not)."""
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
    n = settings["n"]
    if sorted(tensors) != ["labels", "x_ref", "z"] or any(v.shape[0] != n for v in tensors.values()):
        return None, f"the cache {path} does not hold {n} (z, labels, x_ref) rows"
    if not (torch.isfinite(tensors["z"]).all() and torch.isfinite(tensors["x_ref"]).all()):
        return None, f"the cache {path} holds non-finite values"
    return tensors, ""


@torch.no_grad()
def regression_pairs(model, path, *, n: int = 2000, solver: str = "dpmpp_2m", steps: int = 20, w: float = 0.0,
                     seed: int = 0, batch_size: int = 250, progress: bool = False) -> dict:
    """The paired set for DMD's regression loss from a ``fewstep.api.DiffusionModel`` teacher.

    Row i: class i mod num_classes (balanced), z_i ~ N(0, I) from a generator seeded by (seed, i)
    (fewstep.api.sample_generators), x_ref_i = the teacher's ODE solution from z_i with ``solver``
    in ``steps`` model calls at guidance ``w``. Returns {"z", "labels", "x_ref"} (CPU tensors).
    """
    from safetensors.torch import save_file

    from ..api import sample_generators
    from ..distributed import gather_batches, my_batches, process_group
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    path = Path(path)
    settings = {"teacher": weights_hash(model.net), "n": int(n), "solver": solver, "steps": int(steps),
                "w": float(w), "seed": int(seed), "image_shape": list(model.image_shape)}
    cached, why = _read_cache(path, settings)
    if cached is not None:
        return cached
    print(f"building the DMD regression set ({n} teacher samples, {solver}, {steps} calls, w={w}): {why}",
          file=sys.stderr)
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    sigma_max = float(model.schedule.sigma(torch.tensor(model.schedule.t_max, dtype=torch.float64)))
    world, rank = process_group()  # several processes: each makes every world-th batch; the main one writes
    zs, xs = [], []
    starts = my_batches(range(0, n, batch_size), world, rank)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="regression set")
    for start in starts:
        count = min(batch_size, n - start)
        z = torch.cat([torch.randn((1, *model.image_shape), generator=g) for g in sample_generators(seed, start, count)])
        lab = None if labels is None else labels[start:start + count]
        out = model.sample_batch((z * sigma_max).to(model.device), None if lab is None else lab.to(model.device),
                                 w=w, solver=solver, steps=steps, spacing="logsnr", generator=None, progress=False)
        zs.append(z)
        xs.append(out.x.float().cpu())
    zs, xs = gather_batches(zs, world), gather_batches(xs, world)
    tensors = {"z": torch.cat(zs).contiguous(), "x_ref": torch.cat(xs).contiguous(),
               "labels": (labels if labels is not None else torch.zeros(n, dtype=torch.long)).contiguous()}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"settings": json.dumps(settings)})
        os.replace(tmp, path)
    if world > 1:
        torch.distributed.barrier()
    return tensors



class DMDData:
    """A ``sample(generator, batch_size)`` data source for DMD: a batch of paired rows, and (for the
    GAN) a batch of real images, both drawn with the training loop's generator (exact resume)."""

    def __init__(self, pairs: dict, real: tuple | None = None):
        self.pairs, self.real = pairs, real
        self.n = pairs["z"].shape[0]

    def __call__(self, generator: torch.Generator, batch_size: int) -> dict:
        idx = torch.randint(0, self.n, (batch_size,), generator=generator)
        batch = {k: v[idx] for k, v in self.pairs.items()}
        if self.real is not None:
            x, y = self.real
            j = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            batch.update(x_real=x[j], labels_real=y[j])
        return batch
