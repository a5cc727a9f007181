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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .images import save_image_grid

__all__ = ["train", "TrainResult", "make_batch_source", "save_image_grid", "latest_checkpoint",
           "load_checkpoint_weights"]

CKPT_PREFIX = "ckpt-"
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

def _split_tree(obj, tensors: dict, key: str):
    """Replace tensors in a nested structure by references; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split_tree(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _split_tree(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
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


def _state_tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _file_names(name: str) -> tuple[str, str, str]:
    """(weights, EMA, optimizer) file names of network ``name`` in a checkpoint; the single
    network of a one-network run is called 'model' and keeps the plain names."""
    if name == "model":
        return "model.safetensors", "ema.safetensors", "optimizer.safetensors"
    return f"{name}.safetensors", f"{name}.ema.safetensors", f"{name}.optimizer.safetensors"


def save_checkpoint(out_dir: Path, step: int, nets: dict, source, extra: dict, keep: int = 2) -> Path:
    """Write ``ckpt-<step>`` atomically (tmp folder + os.replace), update latest.json, prune old ones.

    ``nets`` maps each trained network's name to a :class:`_Trained` (model, EMA, optimizer, scheduler).
    """
    from safetensors.torch import save_file

    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = out_dir / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_meta, sched = {}, {}
    for name, n in nets.items():
        f_model, f_ema, f_opt = _file_names(name)
        save_file(_state_tensors(n.raw), str(tmp / f_model))
        save_file(_state_tensors(n.ema), str(tmp / f_ema))
        opt_tensors: dict = {}
        opt_meta[name] = _split_tree(n.optimizer.state_dict(), opt_tensors, "opt")
        save_file(opt_tensors, str(tmp / f_opt))
        sched[name] = n.scheduler.state_dict()
    rng_js, rng_tensors = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    _write_json(tmp / "state.json", {"step": step, "networks": list(nets), "optimizers": opt_meta,
                                     "schedulers": sched, "rng": rng_js, "data": source.state_dict(), **extra})
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


def load_checkpoint_weights(ckpt: Path, which: str = "ema", network: str = "model") -> dict:
    """State dict of a network ('model' for one-network runs) or its EMA from a checkpoint folder."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got {which!r}")
    f_model, f_ema, _ = _file_names(network)
    return _read_safetensors(Path(ckpt) / (f_model if which == "model" else f_ema))


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
        try:
            n.raw.load_state_dict(_read_safetensors(ckpt / f_model))
            n.ema.load_state_dict(_read_safetensors(ckpt / f_ema))
        except RuntimeError as e:  # another architecture or size than the run that wrote the checkpoint
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ValueError(f"checkpoint {ckpt} does not fit network {name!r} of this run ({first} ...); "
                             "resume with the network that wrote it, or use a new out_dir") from None
        n.optimizer.load_state_dict(_join_tree(state["optimizers"][name], _read_safetensors(ckpt / f_opt)))
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
    """ema <- decay * ema + (1 - decay) * model for float tensors; other buffers are copied."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m.to(e.dtype), 1.0 - decay)
        else:
            e.copy_(m)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warm-up: min(decay, (1 + step) / (10 + step)), so early EMA tracks the model."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _warmup_lambda(warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


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
    AdamW optimizer and warm-up scheduler, and its EMA decay."""
    model: torch.nn.Module
    raw: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema_decay: float


def _build(models: dict, accelerator, lrs: dict, weight_decays: dict, warmup: int, emas: dict) -> dict:
    out = {}
    for name, model in models.items():
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs[name],
                                      weight_decay=weight_decays[name])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_lambda(warmup))
        prepared, optimizer = accelerator.prepare(model, optimizer)
        ema.to(accelerator.device)
        out[name] = _Trained(prepared, accelerator.unwrap_model(prepared), ema, optimizer, scheduler, emas[name])
    return out


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
          cpu: bool | None = None, run_info: dict | None = None) -> TrainResult:
    """Train ``model`` on ``objective`` for ``steps`` steps; see the module docstring.

    One network: ``model`` is an nn.Module and ``objective(model, batch) -> (B,)``.
    Several networks (e.g. DMD's generator and fake score): ``model`` is ``{name: nn.Module}``
    and the objective has ``phases(step) -> [names]`` (the networks updated at this step, in
    order; each phase draws its own batch and takes one optimizer step of that network) and
    ``objective(models, batch, name) -> (B,)``. ``lr``, ``ema_decay`` and ``weight_decay`` may
    then be ``{name: value}``. Each network has its own AdamW, warm-up, EMA and checkpoint files.

    lr warms up linearly over ``warmup`` steps then stays constant (AdamW, betas (0.9, 0.999)).
    Each phase uses ``grad_accum`` micro-batches of ``batch_size``. ``grad_clip`` clips the global
    gradient norm (None: no clipping). Each network's EMA is updated right after that network's own
    optimizer step, with the decay of :func:`ema_decay_at` at its own update count. Checkpoints go out
    every ``ckpt_every_minutes`` and/or ``ckpt_every_steps`` and at the end. ``resume=True``
    continues from the newest checkpoint in ``out_dir`` if there is one; ``resume=False`` refuses to
    reuse a folder that has checkpoints. ``on_step(step, loss)`` is called after each step.
    ``run_info`` (JSON-able) is stored in ``run.json`` and every checkpoint. ``sample_fn`` gets the
    first network's EMA.
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
    _seed_all(seed)
    shards = _Shards(accelerator.num_processes, accelerator.process_index, grad_accum, batch_size, seed)
    source = make_batch_source(data, batch_size * shards.count, seed)  # every process draws the same global batch
    nets = _build(models, accelerator, lrs, wds, warmup, emas)
    step, resumed_from = 0, None
    if ckpt is not None:
        step = resumed_from = _restore(ckpt, nets, source)["step"]
        if main:
            _truncate_log(out_dir / LOG, step)
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    info = {"steps": steps, "lr": lr, "batch_size": batch_size, "warmup": warmup, "grad_clip": grad_clip,
            "ema_decay": ema_decay, "weight_decay": weight_decay, "mixed_precision": mixed_precision,
            "grad_accum": grad_accum, "seed": seed, "info": run_info or {}}
    if main:
        _write_json(out_dir / "run.json", info)

    def checkpoint():
        if main:
            save_checkpoint(out_dir, step, nets, source, {"run": info}, keep_checkpoints)
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
        for phase, name in enumerate(objective.phases(step)):
            n = nets[name]
            for other in nets.values():  # a phase's loss may reach other networks (e.g. DMD's GAN head)
                other.optimizer.zero_grad(set_to_none=True)
            try:
                # the other networks enter unwrapped: only the updated one synchronises its gradients
                loss_val, grad_norm = _train_step(
                    lambda m, b: objective({**{k: v.raw for k, v in nets.items()}, name: m}, b, name),
                    n.model, source, n.optimizer, accelerator, shards, (step, phase), grad_clip)
            except FloatingPointError as e:  # nothing of this step was applied; no checkpoint is written
                good = latest_checkpoint(out_dir)
                raise FloatingPointError(f"step {step + 1} ({name}): {e}. Training stopped; the last good checkpoint "
                                         f"is {good or 'none (no checkpoint yet)'}") from None
            n.scheduler.step()  # warm-up counts this network's own updates
            # its EMA steps when it steps, its decay warm-up counting its own updates (the scheduler's count)
            ema_update(n.ema, n.raw, ema_decay_at(n.scheduler.last_epoch, n.ema_decay))
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
        if sample_fn is not None and main and _due(step, sample_every_steps, time.monotonic() - t_sample,
                                                   sample_every_minutes):
            bar.write(f"step {step}: samples -> {_run_sample_fn(sample_fn, first.ema, step, out_dir)}")
            t_sample = time.monotonic()
        if step < steps and _due(step, ckpt_every_steps, time.monotonic() - t_ckpt, ckpt_every_minutes):
            checkpoint()
            last_ckpt_step, t_ckpt = step, time.monotonic()
            bar.write(f"step {step}: checkpoint written")
    bar.close()
    if last_ckpt_step != step or latest_checkpoint(out_dir) is None:
        checkpoint()
    if sample_fn is not None and main:
        _run_sample_fn(sample_fn, first.ema, step, out_dir)
    return TrainResult(model=first.raw, ema=first.ema, step=step, out_dir=out_dir, last_loss=loss_val,
                       models={k: v.raw for k, v in nets.items()}, emas={k: v.ema for k, v in nets.items()},
                       resumed_from=resumed_from, steps_run=step - first_step)


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
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        # accelerate keeps one global state per process; drop its precision settings (keeping the
        # distributed setup) so that successive trainers in one process can differ in precision
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if accelerator.num_processes != launched:  # never train N independent copies by mistake
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but accelerate sees "
                           f"{accelerator.num_processes}; check the launcher's device settings (e.g. "
                           "ACCELERATE_USE_CPU=true on machines without GPUs)")
    if launched > 1:
        _close_process_group_at_exit()
    return accelerator


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


def _train_step(objective, model, source, optimizer, accelerator, shards, where, grad_clip):
    """One optimizer step over this process's shards of (step, phase) = ``where``;
    returns (mean loss over all processes, grad norm)."""
    total, mine = 0.0, shards.at(*where)
    batch = source.next() if source.global_batches else None
    for micro, (k, shard_seed) in enumerate(mine):
        part = shards.take(batch, k) if batch is not None else source.next()
        part = _to_device(part, accelerator.device)
        sync = micro == len(mine) - 1
        ctx = accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else contextlib.nullcontext()
        torch.manual_seed(shard_seed)
        with ctx:
            with accelerator.autocast():
                per_sample = objective(model, part)
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
    norm = accelerator.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, float(norm)
