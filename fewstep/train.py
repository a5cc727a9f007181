"""The one training loop that every fewstep trainer runs.

``train(objective, model, data, steps=..., out_dir=...)`` where
``objective(model, batch) -> per-sample loss (B,)``; the loop takes the mean.

Data can be
  * a tensor or a tuple/list of tensors (same first dim) held in memory, or a
    map-style dataset (``__len__`` + ``__getitem__``): shuffled epochs whose order
    depends only on (seed, epoch), last partial batch dropped;
  * a callable ``sample(generator, batch_size) -> batch`` (e.g. a toy
    distribution) drawing from a loop-owned ``torch.Generator``;
  * any other iterable (e.g. a DataLoader): cycled; its order is *not*
    restored on resume (a warning says so).

Checkpoints are folders ``out_dir/ckpt-<step>/`` holding ``model.safetensors``,
``ema.safetensors``, ``optimizer.safetensors``, ``rng.safetensors`` and
``state.json`` (step, optimizer/scheduler metadata, python/numpy RNG state,
data position). Each is written to a ``.tmp`` folder first and moved into place
with ``os.replace``; ``latest.json`` (also replaced atomically) names the newest.
With ``resume=True`` the loop continues from it exactly: on CPU with
deterministic data, a killed-and-resumed run ends with the same parameters as an
uninterrupted one.

Several processes (``accelerate launch`` or ``torchrun``, any number of GPUs or machines, or
CPU processes over gloo) need no code change: every process draws the same global batch of
``processes x grad_accum x batch_size`` rows and trains on its own slices, each slice under
torch's RNG seeded from (seed, step, phase, slice), so the update equals a one-process run with
``grad_accum`` = processes x grad_accum. Only the main process logs, checkpoints and samples.
A plain iterable is not split: each process then needs its own shard of it.

Fully sharded (``sharding="fsdp"``, or ``accelerate launch --use_fsdp``; docs/fsdp.md): every trained
network, its gradients, AdamW state and EMA are split over the processes (torch FSDP2), each process
writes its shard of every checkpoint file (``<file>.shard-<rank>-of-<world>.safetensors``, atomic as
above), resume is exact, and the returned networks and EMAs are full copies.

The metrics log ``log.jsonl`` has one JSON object per line (``step``, ``loss``,
``lr``, ``grad_norm``, ``sec_per_step``, ``elapsed`` = seconds since this
(re)start); lines past the resumed step are dropped on resume. ``sample_fn(ema_model, step)`` returning images in
[-1, 1] (or ``(images, nrow)``) is called periodically and saved as
``samples/step-<step>.png``; it runs under a forked RNG so it does not change
the training randomness.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .distributed import (CallGuard, fsdp_modules, fsdp_plan, full_tensor, is_sharded, local_chunk, local_view,
                          shard_network, sync_from_rank0)
from .images import save_image_grid

__all__ = ["train", "TrainResult", "make_batch_source", "save_image_grid", "latest_checkpoint",
           "load_checkpoint_weights"]

CKPT_PREFIX = "ckpt-"
SHARDED = "fewstep.sharded"  # a shard file's metadata key: the tensors split along dim 0 over the processes
LATEST = "latest.json"
LOG = "log.jsonl"


# ---------------------------------------------------------------------------
# Batch sources (resumable data order)
# ---------------------------------------------------------------------------

class _IndexedBatches:
    """Shuffled epochs over an indexable dataset; order is a function of (seed, epoch)."""

    exact_resume = True
    global_batches = True  # one batch for all processes and micro-batches, split by _Shards

    def __init__(self, n: int, gather: Callable, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} items, fewer than batch_size={batch_size}")
        self.n, self.gather, self.batch_size, self.seed = n, gather, batch_size, seed
        self.epoch, self.pos, self._perm = 0, 0, None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def next(self):
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        idx = self._permutation()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.gather(idx)

    def state_dict(self) -> dict:
        return {"kind": "indexed", "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


class _SampledBatches:
    """Batches drawn by ``sample(generator, batch_size)`` from a loop-owned generator."""

    exact_resume = True
    global_batches = True  # one batch for all processes and micro-batches, split by _Shards

    def __init__(self, sample: Callable, batch_size: int, seed: int):
        self.sample, self.batch_size = sample, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        return self.sample(self.generator, self.batch_size)

    def state_dict(self) -> dict:
        return {"kind": "sampled", "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class _IterBatches:
    """Cycles any iterable; its order cannot be restored on resume."""

    exact_resume = False
    global_batches = False  # each next() is one micro-batch of this process

    def __init__(self, iterable):
        self.iterable, self.it, self.count = iterable, iter(iterable), 0

    def next(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.iterable)
            try:
                batch = next(self.it)
            except StopIteration:
                raise ValueError("the data iterable is empty") from None
        self.count += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "iter", "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        warnings.warn("resuming with a plain iterable/DataLoader: the data order is not restored; "
                      "pass tensors or a map-style dataset for an exact resume")
        self.count = int(state.get("count", 0))


def _tensor_gather(tensors):
    return lambda idx: tuple(t[idx] for t in tensors) if len(tensors) > 1 else tensors[0][idx]


def _dataset_gather(dataset):
    from torch.utils.data import default_collate
    return lambda idx: default_collate([dataset[int(i)] for i in idx])


def make_batch_source(data, batch_size: int, seed: int):
    """Wrap tensors / a dataset / a sampler callable / an iterable as a resumable batch source."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        n = data[0].shape[0]
        if any(t.shape[0] != n for t in data):
            raise ValueError(f"data tensors differ in length: {[t.shape[0] for t in data]}")
        return _IndexedBatches(n, _tensor_gather(tuple(data)), batch_size, seed)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _IndexedBatches(len(data), _dataset_gather(data), batch_size, seed)
    if callable(data):
        return _SampledBatches(data, batch_size, seed)
    if hasattr(data, "__iter__"):
        return _IterBatches(data)
    raise TypeError(f"cannot train on data of type {type(data).__name__}: pass tensors, a dataset, "
                    "a sample(generator, batch_size) callable or an iterable")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------
# Nested state <-> (JSON, tensors)
# ---------------------------------------------------------------------------

def _split_tree(obj, tensors: dict, key: str, sharded: set | None = None):
    """Replace tensors in a nested structure by references; collect them in ``tensors`` (a DTensor as
    this process's shard, its key added to ``sharded``)."""
    if isinstance(obj, torch.Tensor):
        if is_sharded(obj):
            sharded.add(key)
        tensors[key] = local_view(obj).detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split_tree(v, tensors, f"{key}.{k}", sharded) for k, v in obj.items()}
        return {"__items__": [[k, _split_tree(v, tensors, f"{key}.{k}", sharded)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split_tree(v, tensors, f"{key}.{i}", sharded) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split_tree(v, tensors, f"{key}.{i}", sharded) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {key} in a checkpoint")


def _join_tree(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _join_tree(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join_tree(v, tensors) for v in obj["__tuple__"])
        return {k: _join_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tree(v, tensors) for v in obj]
    return obj


def _rng_state() -> tuple[dict, dict]:
    """(JSON part, tensor part) of the python, numpy and torch RNG states."""
    py = random.getstate()
    npy = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return js, tensors


def _set_rng_state(js: dict, tensors: dict) -> None:
    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_tensors(module: torch.nn.Module, sharded: set | None = None) -> dict:
    """A copy of the module's state on the CPU; of a sharded module this process's shards (their keys
    added to ``sharded``)."""
    out = {}
    for k, v in module.state_dict().items():
        if is_sharded(v):
            sharded.add(k)
        out[k] = local_view(v).detach().cpu().contiguous().clone()
    return out


def _file_names(name: str) -> tuple[str, str, str]:
    """(weights, EMA, optimizer) file names of network ``name`` in a checkpoint; the single
    network of a one-network run is called 'model' and keeps the plain names."""
    if name == "model":
        return "model.safetensors", "ema.safetensors", "optimizer.safetensors"
    return f"{name}.safetensors", f"{name}.ema.safetensors", f"{name}.optimizer.safetensors"


def _shard_path(path: Path, rank: int, world: int) -> Path:
    """``model.safetensors`` -> ``model.shard-<rank>-of-<world>.safetensors``."""
    return path.with_name(f"{path.name[:-len('.safetensors')]}.shard-{rank}-of-{world}.safetensors")


def _save_tensors(path: Path, tensors: dict, sharded: set, shards: tuple[int, int] | None) -> None:
    """One checkpoint file, or (``shards`` = (world, rank)) this process's shard file of it, which names
    the tensors split along dim 0 over the processes in its metadata."""
    from safetensors.torch import save_file
    if shards is None:
        save_file(tensors, str(path))
    else:
        world, rank = shards
        save_file(tensors, str(_shard_path(path, rank, world)), metadata={SHARDED: json.dumps(sorted(sharded))})


def _write_networks(tmp: Path, nets: dict, shards) -> tuple[dict, dict]:
    """Each network's weights, EMA and optimizer files; returns (optimizer metadata, scheduler states)."""
    opt_meta, sched = {}, {}
    for name, n in nets.items():
        f_model, f_ema, f_opt = _file_names(name)
        for module, fname in ((n.raw, f_model), (n.ema, f_ema)):
            sharded: set = set()
            _save_tensors(tmp / fname, _state_tensors(module, sharded), sharded, shards)
        opt_tensors, sharded = {}, set()
        opt_meta[name] = _split_tree(n.optimizer.state_dict(), opt_tensors, "opt", sharded)
        _save_tensors(tmp / f_opt, opt_tensors, sharded, shards)
        sched[name] = n.scheduler.state_dict()
    return opt_meta, sched


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def save_checkpoint(out_dir: Path, step: int, nets: dict, source, extra: dict, keep: int = 2,
                    shards: tuple[int, int] | None = None) -> Path:
    """Write ``ckpt-<step>`` atomically (tmp folder + os.replace), update latest.json, prune old ones.

    ``nets`` maps each trained network's name to a :class:`_Trained` (model, EMA, optimizer, scheduler).
    ``shards`` = (world, rank) of a sharded (FSDP) run: every process calls this and writes its own shard
    of every weights / EMA / optimizer file (``<file>.shard-<rank>-of-<world>.safetensors``); once all are
    written the main process adds state.json and moves the folder into place.
    """
    from safetensors.torch import save_file

    world, rank = shards or (1, 0)
    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = out_dir / (final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    opt_meta, sched = _write_networks(tmp, nets, shards)
    _barrier(world)
    if rank != 0:
        return final
    rng_js, rng_tensors = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    sharding = {"sharding": {"kind": "fsdp", "world": world}} if shards else {}
    _write_json(tmp / "state.json", {"step": step, "networks": list(nets), "optimizers": opt_meta, "schedulers": sched,
                                     "rng": rng_js, "data": source.state_dict(), **sharding, **extra})
    if final.exists():  # re-saving a step (e.g. after a resume): the previous checkpoint stays meanwhile
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json(out_dir / LATEST, {"step": step, "dir": final.name})
    _prune(out_dir, keep, final.name)
    return final


def _prune(out_dir: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in out_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in done[:-keep] if keep > 0 else []:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint folder in ``out_dir`` (None if there is none)."""
    out_dir = Path(out_dir)
    try:
        name = json.loads((out_dir / LATEST).read_text())["dir"]
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = sorted(p for p in out_dir.glob(f"{CKPT_PREFIX}*")
                  if not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read checkpoint file {path}: it is corrupt or truncated ({e})") from None


def _shard_files(path: Path) -> list[Path]:
    """The shard files of checkpoint file ``path`` written by a sharded run, in process order ([] if none)."""
    stem = path.name[:-len(".safetensors")]
    found = sorted(path.parent.glob(f"{stem}.shard-*-of-*.safetensors"))
    if not found:
        return []
    world = int(found[0].name.rsplit("-of-", 1)[1].split(".")[0])
    want = [_shard_path(path, r, world) for r in range(world)]
    if sorted(found) != sorted(want):
        raise ValueError(f"checkpoint file {path.name} has shards {[p.name for p in found]} in {path.parent}, "
                         f"not the {world} that one run writes; the checkpoint is incomplete, resume from another")
    return want


class _ShardedFile(Mapping):
    """A sharded checkpoint file as full tensors, read lazily one tensor at a time: the tensors its shards
    name as split are concatenated along dim 0 in process order, the others read from shard 0."""

    def __init__(self, parts: list[Path]):
        from safetensors import safe_open
        try:
            self.handles = [safe_open(str(p), "pt") for p in parts]
        except Exception as e:
            raise ValueError(f"cannot read checkpoint shards {parts[0].parent}: corrupt or truncated ({e})") from None
        self.split = set(json.loads((self.handles[0].metadata() or {}).get(SHARDED, "[]")))
        self.name = parts[0].parent / parts[0].name.split(".shard-")[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.handles[0].keys():
            raise KeyError(key)
        try:
            if key in self.split:
                return torch.cat([h.get_tensor(key) for h in self.handles])
            return self.handles[0].get_tensor(key)
        except Exception as e:
            raise ValueError(f"cannot read {key} from checkpoint file {self.name}: corrupt or truncated "
                             f"({e})") from None

    def __iter__(self):
        return iter(self.handles[0].keys())

    def __len__(self) -> int:
        return len(self.handles[0].keys())


def _checkpoint_file(path: Path) -> Mapping:
    """The tensors of one checkpoint file (a mapping of full tensors), whether one process wrote it or
    each process of a sharded run wrote its shard."""
    parts = [] if path.is_file() else _shard_files(path)
    return _ShardedFile(parts) if parts else _read_safetensors(path)


def load_checkpoint_weights(ckpt: Path, which: str = "ema", network: str = "model") -> dict:
    """State dict of a network ('model' for one-network runs) or its EMA from a checkpoint folder; of a
    sharded (FSDP) run's checkpoint the full tensors, assembled from its shards."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got {which!r}")
    f_model, f_ema, _ = _file_names(network)
    return dict(_checkpoint_file(Path(ckpt) / (f_model if which == "model" else f_ema)))


def _load_sharded(module: torch.nn.Module, tensors: Mapping) -> None:
    """Load full tensors into a sharded module: each process copies in its own dim-0 chunk."""
    target = module.state_dict()
    if set(target) != set(tensors):
        raise RuntimeError(f"Error(s) in loading state_dict:\n\tmissing {sorted(set(target) - set(tensors))[:3]}, "
                           f"unexpected {sorted(set(tensors) - set(target))[:3]}")
    with torch.no_grad():
        for k, v in target.items():
            full = tensors[k]
            if full.shape != v.shape:
                raise RuntimeError(f"Error(s) in loading state_dict:\n\tsize mismatch for {k}: the checkpoint "
                                   f"has {tuple(full.shape)}, the network {tuple(v.shape)}")
            local_view(v).copy_(local_chunk(full, v) if is_sharded(v) else full)


def _load_network(module: torch.nn.Module, tensors: Mapping, ckpt: Path, name: str) -> None:
    try:
        if any(is_sharded(v) for v in module.state_dict().values()):
            _load_sharded(module, tensors)
        else:
            module.load_state_dict(dict(tensors))
    except RuntimeError as e:  # another architecture or size than the run that wrote the checkpoint
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"checkpoint {ckpt} does not fit network {name!r} of this run ({first} ...); "
                         "resume with the network that wrote it, or use a new out_dir") from None


def _as_shard(value, param):
    """An optimizer state tensor read in full, as the DTensor shard of a sharded parameter's state."""
    from torch.distributed.tensor import DTensor
    if not (isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape == param.shape):
        return value  # e.g. AdamW's step count
    part = local_chunk(value, param).to(local_view(param).device)
    return DTensor.from_local(part, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
                              run_check=False)


def _shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict read in full, with the states of sharded parameters cut to this process's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, st in state["state"].items():
        if is_sharded(params[int(idx)]):
            state["state"][idx] = {k: _as_shard(v, params[int(idx)]) for k, v in st.items()}
    return state


def _restore(ckpt: Path, nets: dict, source) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    if "networks" not in state:  # a one-network checkpoint written before several networks were supported
        state.update(networks=["model"], optimizers={"model": state["optimizer"]},
                     schedulers={"model": state["scheduler"]})
    if sorted(state["networks"]) != sorted(nets):
        raise ValueError(f"checkpoint {ckpt} holds networks {state.get('networks')}, this run trains "
                         f"{list(nets)}; use a new out_dir")
    for name, n in nets.items():
        f_model, f_ema, f_opt = _file_names(name)
        _load_network(n.raw, _checkpoint_file(ckpt / f_model), ckpt, name)
        _load_network(n.ema, _checkpoint_file(ckpt / f_ema), ckpt, name)
        opt_state = _join_tree(state["optimizers"][name], _checkpoint_file(ckpt / f_opt))
        n.optimizer.load_state_dict(_shard_optimizer_state(opt_state, n.optimizer))
        n.scheduler.load_state_dict(state["schedulers"][name])
    source.load_state_dict(state["data"])
    _set_rng_state(state["rng"], _read_safetensors(ckpt / "rng.safetensors"))
    return state


# ---------------------------------------------------------------------------
# Logging and sample grids
# ---------------------------------------------------------------------------

def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines at or before ``step`` (lines of a killed run past its last checkpoint go)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a half-written last line of a killed run
    path.write_text("".join(k + "\n" for k in kept))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _run_sample_fn(sample_fn, ema, step: int, out_dir: Path) -> Path:
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            out = sample_fn(ema, step)
    random.setstate(py)
    np.random.set_state(npy)
    images, nrow = out if isinstance(out, tuple) else (out, None)
    return save_image_grid(images, out_dir / "samples" / f"step-{step:08d}.png", nrow)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: torch.nn.Module     # the trained (unwrapped) model; with several networks, the first one
    ema: torch.nn.Module       # its EMA copy
    step: int
    out_dir: Path
    last_loss: float
    models: dict = None        # every trained network by name (one-network runs: {"model": model})
    emas: dict = None          # their EMA copies
    resumed_from: int | None = None  # the checkpoint step this call continued from (None: a fresh run)
    steps_run: int = 0         # optimizer steps (loop steps) executed by this call


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for float tensors; other buffers are copied. Of sharded
    networks each process updates its own shard (no communication)."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        e, m = local_view(e), local_view(m)
        if e.dtype.is_floating_point:
            e.lerp_(m.to(e.dtype), 1.0 - decay)
        else:
            e.copy_(m)


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay warm-up: min(decay, (1 + step) / (10 + step)), so early EMA tracks the model; ``warmup=False``:
    ``decay`` from the first step (a network that starts from trained weights)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def _warmup_lambda(warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def _lr_drops(lr_drops: dict | None, names) -> list:
    """``train``'s lr_drops as [(step, {name: factor})] in step order; refuses a bad step or factor."""
    out = []
    for at, factor in sorted((lr_drops or {}).items()):
        factors = _per_net(factor, names, "lr_drops factor")
        if not (isinstance(at, int) and at >= 0) or not all(math.isfinite(f) and f > 0 for f in factors.values()):
            raise ValueError(f"lr_drops maps a step (integer >= 0) to a positive factor, got {at!r}: {factor!r}")
        out.append((at, factors))
    return out


def _apply_lr(nets: dict, lrs: dict, drops: list, step: int) -> None:
    """Set each network's learning rate for the step after ``step`` done: its lr times the factor of the
    latest drop reached (the warm-up still scales it)."""
    factors = {}
    for at, f in drops:
        if step >= at:
            factors = f
    for name, n in nets.items():
        base = lrs[name] * factors.get(name, 1.0)
        if n.scheduler.base_lrs[0] != base:
            n.scheduler.base_lrs = [base] * len(n.optimizer.param_groups)
            for group, lam in zip(n.optimizer.param_groups, n.scheduler.lr_lambdas):
                group["lr"] = base * lam(n.scheduler.last_epoch)


def _per_net(value, names, what: str) -> dict:
    """A hyper-parameter given once for all networks or as {name: value}."""
    if isinstance(value, dict):
        if sorted(value) != sorted(names):
            raise ValueError(f"{what} is given for networks {sorted(value)} but the run trains {sorted(names)}")
        return dict(value)
    return {n: value for n in names}


def _check_args(steps, lrs, batch_size, grad_accum, emas, grad_clip):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1 and isinstance(grad_accum, int) and grad_accum >= 1):
        raise ValueError(f"batch_size and grad_accum must be integers >= 1, got {batch_size!r}, {grad_accum!r}")
    for lr in lrs.values():
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
    for ema_decay in emas.values():
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")


def _due(step: int, every_steps: int | None, seconds_since: float, every_minutes: float | None) -> bool:
    """Whether a periodic action (checkpoint, samples) is due at ``step``."""
    return bool((every_steps and step % every_steps == 0) or (every_minutes and seconds_since >= 60 * every_minutes))


def _log_record(step: int, window: dict, lr: float, grad_norm: float, seconds: float, elapsed: float) -> dict:
    """One log line: per-network mean losses ('loss' for a one-network run, 'loss/<name>' otherwise)."""
    rec = {"step": step}
    for key, values in window.items():
        rec[key] = sum(values) / len(values)
    n = max(len(v) for v in window.values())
    rec.update({"lr": lr, "grad_norm": grad_norm, "sec_per_step": seconds / n, "elapsed": elapsed,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return rec


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Trained:
    """One trained network: the prepared (possibly DDP-wrapped) model, the raw module, its EMA,
    AdamW optimizer and warm-up scheduler, and its EMA decay. A sharded (FSDP) network is its own raw
    module and keeps ``template``: the unsharded architecture with its parameters on the meta device."""
    model: torch.nn.Module
    raw: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema_decay: float
    template: torch.nn.Module | None = None


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_lambda(warmup))


def _meta_template(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory); buffers are copied."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _materialize(template: torch.nn.Module, state: dict) -> torch.nn.Module:
    """An ordinary (unsharded) module: ``template`` with the full tensors of ``state`` (a state dict)."""
    params = dict(template.named_parameters(remove_duplicate=False))
    memo = {id(p): torch.nn.Parameter(state[k], p.requires_grad) for k, p in params.items()}
    plain = copy.deepcopy(template, memo)
    plain.load_state_dict(state)  # the persistent buffers
    return plain


def _build_sharded(model, plan, device, lr: float, weight_decay: float, warmup: int, ema_decay: float) -> _Trained:
    """Shard one network and its EMA (FSDP) after every process took process 0's weights; the optimizer
    is built over the shards, so its state is sharded too."""
    sync_from_rank0(model, device)
    template = _meta_template(model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    shard_network(model, plan, device)
    shard_network(ema, plan, device)
    optimizer, scheduler = _optimizer(model, lr, weight_decay, warmup)
    return _Trained(model, model, ema, optimizer, scheduler, ema_decay, template)


def _build(models: dict, accelerator, lrs: dict, weight_decays: dict, warmup: int, emas: dict, plan=None) -> dict:
    out = {}
    for name, model in models.items():
        if plan is not None:
            out[name] = _build_sharded(model, plan, accelerator.device, lrs[name], weight_decays[name], warmup,
                                       emas[name])
            continue
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer, scheduler = _optimizer(model, lrs[name], weight_decays[name], warmup)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        ema.to(accelerator.device)
        out[name] = _Trained(prepared, accelerator.unwrap_model(prepared), ema, optimizer, scheduler, emas[name])
    return out


def _full_state(module: torch.nn.Module, keep: bool = True) -> dict:
    """The full tensors of a sharded module's state (a collective: every process calls it), on the CPU;
    ``keep=False``: take part in the gathering, keep nothing."""
    out = {}
    for k, v in module.state_dict().items():
        full = full_tensor(v.detach())
        if keep:
            out[k] = full.to("cpu", copy=True)
    return out


def _unsharded(n: _Trained, which: str, keep: bool = True):
    """A sharded network's model or EMA as an ordinary module on the CPU (None where ``keep`` is False)."""
    state = _full_state(n.raw if which == "model" else n.ema, keep)
    if not keep:
        return None
    plain = _materialize(n.template, state).to("cpu")
    return plain.requires_grad_(False).eval() if which == "ema" else plain.train()


class _Sharding:
    """A sharded run's duties around each optimizer step: under FULL_SHARD the check that every process
    calls the networks alike (:class:`fewstep.distributed.CallGuard`), and freeing gathered parameters."""

    def __init__(self, plan, nets: dict, device):
        self.guard = CallGuard({k: n.model for k, n in nets.items()}, device) if plan.reshard_after_forward else None
        self.groups = [g for n in nets.values() for g in fsdp_modules(n.model)]

    def end_of_objective(self) -> None:
        if self.guard is not None:
            self.guard.end()

    def reshard(self) -> None:
        for g in self.groups:
            g.reshard()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.remove()


class _OneNetwork:
    """Adapter: a plain objective ``objective(model, batch)`` as a one-network ('model') objective."""

    def __init__(self, objective: Callable):
        self.objective = objective

    def phases(self, step: int) -> list[str]:
        return ["model"]

    def __call__(self, models: dict, batch, name: str):
        return self.objective(models["model"], batch)


def train(objective: Callable, model, data, *, steps: int, out_dir, lr: float | dict = 2e-4,
          batch_size: int = 64, warmup: int = 0, grad_clip: float | None = 1.0, ema_decay: float | dict = 0.999,
          weight_decay: float | dict = 0.0, mixed_precision: str = "no", grad_accum: int = 1,
          ckpt_every_minutes: float | None = 5.0, ckpt_every_steps: int | None = None,
          sample_fn: Callable | None = None, sample_every_minutes: float | None = 10.0,
          sample_every_steps: int | None = None, log_every: int = 50, resume: bool = True, seed: int = 0,
          keep_checkpoints: int = 2, on_step: Callable | None = None, progress: bool = True,
          cpu: bool | None = None, run_info: dict | None = None, sharding: str | None = None,
          ema_warmup: bool | dict = True, lr_drops: dict | None = None) -> TrainResult:
    """Train ``model`` on ``objective`` for ``steps`` steps; see the module docstring.

    One network: ``model`` is an nn.Module and ``objective(model, batch) -> (B,)``.
    Several networks (e.g. DMD's generator and fake score): ``model`` is ``{name: nn.Module}``
    and the objective has ``phases(step) -> [names]`` (the networks updated at this step, in
    order; each phase draws its own batch and takes one optimizer step of that network) and
    ``objective(models, batch, name) -> (B,)``. ``lr``, ``ema_decay`` and ``weight_decay`` may
    then be ``{name: value}``. Each network has its own AdamW, warm-up, EMA and checkpoint files.

    lr warms up linearly over ``warmup`` steps then stays constant (AdamW, betas (0.9, 0.999)).
    ``lr_drops`` ``{S: factor}`` (factor once or ``{name: factor}``): after S steps the learning rate is
    ``lr * factor`` (the latest S reached wins), a function of the step, so a resumed run gets the same rates.
    Each phase uses ``grad_accum`` micro-batches of ``batch_size``. ``grad_clip`` clips the global
    gradient norm (None: no clipping). Each network's EMA is updated right after that network's own
    optimizer step, with the decay of :func:`ema_decay_at` at its own update count (``ema_warmup=False``, or
    ``{name: False}``: the full decay from the first update, for a network that starts from trained weights
    whose EMA should not forget them). Checkpoints go out
    every ``ckpt_every_minutes`` and/or ``ckpt_every_steps`` and at the end. ``resume=True``
    continues from the newest checkpoint in ``out_dir`` if there is one; ``resume=False`` refuses to
    reuse a folder that has checkpoints. ``on_step(step, loss)`` is called after each step.
    ``run_info`` (JSON-able) is stored in ``run.json`` and every checkpoint. ``sample_fn`` gets the
    first network's EMA.

    ``sharding``: "fsdp" shards every trained network over the processes (torch FSDP2, see
    docs/fsdp.md), "none" never does, None (default) follows the launcher (``accelerate launch
    --use_fsdp`` or an FSDP config file). Sharded runs write sharded checkpoints and return full
    (unsharded) copies of the networks and EMAs on each process's device.
    """
    from tqdm.auto import tqdm

    models = dict(model) if isinstance(model, dict) else {"model": model}
    if not models:
        raise ValueError("no network to train")
    if not isinstance(model, dict):
        objective = _OneNetwork(objective)
    elif not hasattr(objective, "phases"):
        raise TypeError("training several networks needs an objective with phases(step) -> [network names]")
    if hasattr(objective, "check_networks"):  # refuse networks the objective cannot train, before step 1
        objective.check_networks(models)
    names = list(models)
    lrs, emas = _per_net(lr, names, "lr"), _per_net(ema_decay, names, "ema_decay")
    wds = _per_net(weight_decay, names, "weight_decay")
    ema_warm = _per_net(ema_warmup, names, "ema_warmup")
    drops = _lr_drops(lr_drops, names)
    _check_args(steps, lrs, batch_size, grad_accum, emas, grad_clip)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_writable(out_dir)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise ValueError(f"{out_dir} already holds checkpoint {ckpt.name}; pass resume=True to continue it "
                         "or choose a new out_dir")
    accelerator = _make_accelerator(mixed_precision, cpu)
    main = accelerator.is_main_process
    plan = _sharding_plan(sharding, accelerator, mixed_precision)
    _seed_all(seed)
    shards = _Shards(accelerator.num_processes, accelerator.process_index, grad_accum, batch_size, seed)
    source = make_batch_source(data, batch_size * shards.count, seed)  # every process draws the same global batch
    nets = _build(models, accelerator, lrs, wds, warmup, emas, plan)
    sharded = _Sharding(plan, nets, accelerator.device) if plan is not None else None
    ckpt_shards = (accelerator.num_processes, accelerator.process_index) if sharded else None
    step, resumed_from = 0, None
    if ckpt is not None:
        step = resumed_from = _restore(ckpt, nets, source)["step"]
        if main:
            _truncate_log(out_dir / LOG, step)
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    info = {"steps": steps, "lr": lr, "batch_size": batch_size, "warmup": warmup, "grad_clip": grad_clip,
            "ema_decay": ema_decay, "weight_decay": weight_decay, "mixed_precision": mixed_precision,
            "grad_accum": grad_accum, "seed": seed, "info": run_info or {}}
    if drops:
        info["lr_drops"] = {str(k): v for k, v in drops}
    if plan is not None:
        info["sharding"] = {"kind": "fsdp", "processes": accelerator.num_processes, **asdict(plan),
                            "groups": {k: len(fsdp_modules(n.model)) for k, n in nets.items()}}
    if main:
        _write_json(out_dir / "run.json", info)

    def checkpoint():
        if main or sharded:
            save_checkpoint(out_dir, step, nets, source, {"run": info}, keep_checkpoints, ckpt_shards)
        accelerator.wait_for_everyone()

    first = nets[names[0]]
    t_start = t_ckpt = t_sample = t_window = time.monotonic()
    bar = tqdm(total=steps, initial=step, disable=not (main and progress), dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    window, last_ckpt_step, loss_val, grad_norm = {}, step, float("nan"), float("nan")
    first_step = step
    for n in nets.values():
        n.model.train()
    while step < steps:
        if drops:
            _apply_lr(nets, lrs, drops, step)
        for phase, name in enumerate(objective.phases(step)):
            n = nets[name]
            for other in nets.values():  # a phase's loss may reach other networks (e.g. DMD's GAN head)
                other.optimizer.zero_grad(set_to_none=True)
            try:
                # the other networks enter unwrapped: only the updated one synchronises its gradients
                loss_val, grad_norm = _train_step(
                    lambda m, b: objective({**{k: v.raw for k, v in nets.items()}, name: m}, b, name),
                    n.model, source, n.optimizer, accelerator, shards, (step, phase), grad_clip, sharded)
            except FloatingPointError as e:  # nothing of this step was applied; no checkpoint is written
                good = latest_checkpoint(out_dir)
                raise FloatingPointError(f"step {step + 1} ({name}): {e}. Training stopped; the last good checkpoint "
                                         f"is {good or 'none (no checkpoint yet)'}") from None
            n.scheduler.step()  # warm-up counts this network's own updates
            # its EMA steps when it steps, its decay warm-up counting its own updates (the scheduler's count)
            ema_update(n.ema, n.raw, ema_decay_at(n.scheduler.last_epoch, n.ema_decay, ema_warm[name]))
            window.setdefault("loss" if len(nets) == 1 else f"loss/{name}", []).append(loss_val)
            for key, value in (getattr(objective, "last_metrics", None) or {}).items():
                window.setdefault(f"{name}/{key}", []).append(value)
        step += 1
        bar.update(1)
        if (step % log_every == 0 or step == steps) and window:
            now = time.monotonic()
            rec = _log_record(step, window, first.scheduler.get_last_lr()[0], grad_norm, now - t_window,
                              now - t_start)
            if main:
                _append_log(out_dir / LOG, rec)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in rec.items() if k.startswith("loss")})
            window, t_window = {}, now
        if on_step is not None:
            on_step(step, loss_val)
        if sample_fn is not None and _agree(accelerator, _due(step, sample_every_steps, time.monotonic() - t_sample,
                                                              sample_every_minutes)):
            made = _preview(sample_fn, first, step, out_dir, main, sharded is not None)
            if made is not None:
                bar.write(f"step {step}: samples -> {made}")
            t_sample = time.monotonic()
        if step < steps and _agree(accelerator, _due(step, ckpt_every_steps, time.monotonic() - t_ckpt,
                                                     ckpt_every_minutes)):
            checkpoint()
            last_ckpt_step, t_ckpt = step, time.monotonic()
            bar.write(f"step {step}: checkpoint written")
    bar.close()
    if _agree(accelerator, last_ckpt_step != step or latest_checkpoint(out_dir) is None):
        checkpoint()
    models_out, emas_out = _results(nets, sharded, accelerator.device)
    if sample_fn is not None and main:
        _run_sample_fn(sample_fn, emas_out[names[0]], step, out_dir)
    return TrainResult(model=models_out[names[0]], ema=emas_out[names[0]], step=step, out_dir=out_dir,
                       last_loss=loss_val, models=models_out, emas=emas_out, resumed_from=resumed_from,
                       steps_run=step - first_step)


def _sharding_plan(sharding, accelerator, mixed_precision: str):
    """The run's FSDP plan (None: replicated); refuses what sharded training cannot do."""
    plan = fsdp_plan(sharding, accelerator.num_processes)
    if plan is not None and mixed_precision == "fp16":
        raise ValueError("fp16 loss scaling is not supported with FSDP sharding; use mixed_precision bf16 or no")
    return plan


def _agree(accelerator, flag: bool) -> bool:
    """The main process's decision, for every process: time-based triggers (checkpoint and preview
    intervals in minutes) can fall on different steps in different processes, and both are collective."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _preview(sample_fn, first: _Trained, step: int, out_dir: Path, main: bool, sharded: bool) -> Path | None:
    """The periodic sample grid, written by the main process; of a sharded run from its EMA gathered
    into an ordinary module on the main process's CPU (every process takes part in the gathering)."""
    ema = _unsharded(first, "ema", keep=main) if sharded else first.ema
    return _run_sample_fn(sample_fn, ema, step, out_dir) if main else None


def _results(nets: dict, sharded, device) -> tuple[dict, dict]:
    """The trained networks and EMAs to return; of a sharded run full copies on ``device``."""
    if sharded is None:
        return {k: v.raw for k, v in nets.items()}, {k: v.ema for k, v in nets.items()}
    sharded.close()
    models = {k: _unsharded(v, "model").to(device) for k, v in nets.items()}
    return models, {k: _unsharded(v, "ema").to(device) for k, v in nets.items()}


def _check_writable(out_dir: Path, need_bytes: int = 1 << 20) -> None:
    """Fail before training when the run folder cannot be written (permissions, full disk)."""
    probe = out_dir / f".write-test-{os.getpid()}"  # processes of one run probe side by side
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * need_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ValueError(f"cannot write to the run folder {out_dir} ({e.strerror}); free disk space or choose "
                         "another --out") from None
    finally:
        probe.unlink(missing_ok=True)


def check_mixed_precision(mixed_precision: str, cpu: bool | None = None) -> None:
    """Refuse a precision the device cannot train in (accelerate would silently train in float32): fp16 needs a
    CUDA GPU (autocast with loss scaling), bf16 a CPU or a GPU that supports it."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    on_gpu = torch.cuda.is_available() and not cpu
    if mixed_precision == "fp16" and not on_gpu:
        raise ValueError("mixed precision fp16 needs a CUDA GPU (on the CPU it would silently train in float32); "
                         "use bf16 or no")
    if mixed_precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name()}) cannot compute in bf16; use fp16 or no")


def _make_accelerator(mixed_precision: str, cpu: bool | None):
    """An Accelerator; a previous train() call in this process may have pinned another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    check_mixed_precision(mixed_precision, cpu)
    if cpu is None and launched > 1 and not torch.cuda.is_available():
        cpu = True  # several CPU processes (gloo); without this accelerate would run each one alone
    try:
        with _without_accelerate_fsdp():
            accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        # accelerate keeps one global state per process; drop its precision settings (keeping the
        # distributed setup) so that successive trainers in one process can differ in precision
        AcceleratorState._reset_state(reset_partial_state=False)
        with _without_accelerate_fsdp():
            accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if accelerator.num_processes != launched:  # never train N independent copies by mistake
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but accelerate sees "
                           f"{accelerator.num_processes}; check the launcher's device settings (e.g. "
                           "ACCELERATE_USE_CPU=true on machines without GPUs)")
    if launched > 1:
        _close_process_group_at_exit()
    return accelerator


@contextlib.contextmanager
def _without_accelerate_fsdp():
    """Hide accelerate's FSDP switch while the Accelerator is made: the loop shards its networks itself
    (fewstep.distributed.shard_network, read from the same variables), the same way on GPUs and CPUs;
    accelerate would otherwise take over the models' preparation on GPUs only."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


@functools.cache
def _close_process_group_at_exit() -> None:
    """Destroy the process group before the interpreter exits: a gloo group left open aborts the
    process at teardown ("terminate called without an active exception") after a finished run."""
    def close():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    atexit.register(close)


class _Shards:
    """How one optimizer step splits into shards: ``world`` processes x ``grad_accum`` micro-batches.

    Every process draws the same global batch (``count`` shards of ``batch_size``) and takes its
    own shards; shard k = micro * world + rank runs under torch's RNG seeded from (seed, step,
    phase, k). So the noise and times an objective draws belong to the shard, not to the process:
    two processes give the same update as one process with ``grad_accum=2`` (same global batch).
    """

    def __init__(self, world: int, rank: int, grad_accum: int, batch_size: int, seed: int):
        self.world, self.rank, self.grad_accum, self.batch_size, self.seed = world, rank, grad_accum, batch_size, seed
        self.count = world * grad_accum

    def at(self, step: int, phase: int) -> list[tuple[int, int]]:
        """[(shard index, RNG seed)] of this process's micro-batches at ``step`` / ``phase``."""
        out = []
        for micro in range(self.grad_accum):
            k = micro * self.world + self.rank
            key = f"{self.seed}/{step}/{phase}/{k}".encode()
            out.append((k, int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1))
        return out

    def take(self, batch, k: int):
        """Shard ``k`` of a global batch (tensors sliced along the first dimension)."""
        if isinstance(batch, torch.Tensor):
            return batch[k * self.batch_size:(k + 1) * self.batch_size]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.take(b, k) for b in batch)
        if isinstance(batch, dict):
            return {key: self.take(v, k) for key, v in batch.items()}
        return batch


@contextlib.contextmanager
def _explain_entry_points(sharded: bool):
    """A sharded network run through a method other than forward computes with its shards: say how to fix it."""
    try:
        yield
    except RuntimeError as e:
        if not (sharded and "mixed torch.Tensor and DTensor" in str(e)):
            raise
        raise RuntimeError("a sharded network was run through a method other than forward (e.g. a GAN head's "
                           "logits), so its parameters were not gathered; name such methods in the module's "
                           "fsdp_forward_methods attribute, e.g. fsdp_forward_methods = ('logits',)") from None


def _train_step(objective, model, source, optimizer, accelerator, shards, where, grad_clip, sharded=None):
    """One optimizer step over this process's shards of (step, phase) = ``where``;
    returns (mean loss over all processes, grad norm). ``sharded``: the run's :class:`_Sharding` (FSDP
    reduces the gradients of every micro-batch, so there is no no_sync)."""
    total, mine = 0.0, shards.at(*where)
    batch = source.next() if source.global_batches else None
    for micro, (k, shard_seed) in enumerate(mine):
        part = shards.take(batch, k) if batch is not None else source.next()
        part = _to_device(part, accelerator.device)
        sync = micro == len(mine) - 1
        ddp_accumulate = not sync and accelerator.num_processes > 1 and sharded is None
        ctx = accelerator.no_sync(model) if ddp_accumulate else contextlib.nullcontext()
        torch.manual_seed(shard_seed)
        with ctx:
            with accelerator.autocast(), _explain_entry_points(sharded is not None):
                per_sample = objective(model, part)
            if sharded is not None:
                sharded.end_of_objective()
            if per_sample.ndim != 1:
                raise ValueError(f"the objective must return a per-sample loss of shape (B,), "
                                 f"got {tuple(per_sample.shape)}")
            loss = per_sample.float().mean()
            accelerator.backward(loss / len(mine))
        total += loss.item() / len(mine)
    if accelerator.num_processes > 1:  # every process sees the same loss (logging, the NaN stop)
        total = float(accelerator.reduce(torch.tensor([total], device=accelerator.device), "mean")[0])
    if not math.isfinite(total):
        raise FloatingPointError(f"the loss became {total}; lower lr or enable grad_clip")  # step added by train()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip is not None else float("inf")
    if sharded is None:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:  # the norm over all shards (a DTensor, the same on every process)
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if sharded is not None:
        sharded.reshard()
    return total, float(norm)
