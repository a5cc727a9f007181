"""Splitting work over processes (accelerate launch, torchrun).

Sample generation: work made in batches is dealt round-robin: process r makes batches r, r + world, ...;
then every process gathers all of them in batch order. With per-sample seeds the result is the same set
of images whatever the number of processes.

Fully sharded training (the second half): :func:`fsdp_plan` reads whether and how to shard (``train(...,
sharding="fsdp")`` or accelerate's FSDP launcher settings), :func:`shard_network` shards one network with
torch's ``fully_shard`` (FSDP2: every parameter split along its first dimension over the processes), and
the tensor helpers move between a process's shard and the full tensor.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["process_group", "my_batches", "gather_batches", "on_main", "sample_generators", "FSDPPlan",
           "fsdp_plan", "sync_from_rank0", "shard_network", "fsdp_modules", "is_sharded", "local_view", "full_tensor",
           "local_chunk", "CallGuard"]


def sample_generators(seed: int, start: int, count: int, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded from (seed, image index) alone."""
    out = []
    for i in range(start, start + count):
        state = int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, dtype=np.uint64)[0])
        out.append(torch.Generator(device=device).manual_seed(state & (2 ** 63 - 1)))
    return out


def process_group() -> tuple[int, int]:
    """(world size, rank) of an initialised torch.distributed group, else (1, 0)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def my_batches(starts, world: int, rank: int) -> list:
    """The batch starts this process makes."""
    return [s for b, s in enumerate(starts) if b % world == rank]


def gather_batches(mine: list, world: int) -> list:
    """Every process's list of batches (process r holds batches r, r + world, ...) in batch order."""
    if world == 1:
        return list(mine)
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return [every[b % world][b // world] for b in range(sum(len(e) for e in every))]


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on the main process only (e.g. writing an export), then let every process go on
    together; returns its result on the main process and None elsewhere."""
    world, rank = process_group()
    out = fn(*args, **kwargs) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    return out


# ---------------------------------------------------------------------------
# Fully sharded training (torch FSDP2, ``fully_shard``)
# ---------------------------------------------------------------------------

STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # accelerate's order
WRAP_POLICIES = ("NO_WRAP", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP")


@dataclass(frozen=True)
class FSDPPlan:
    """How :func:`shard_network` shards a network.

    reshard_after_forward: True (FULL_SHARD) frees each wrapped block's gathered parameters after its
      forward and gathers them again for the backward; False (SHARD_GRAD_OP) keeps them gathered until
      the backward. Gradients, optimizer state and EMA are sharded either way.
    wrap: which submodules become shard groups of their own (gathered one at a time) before the root:
      NO_WRAP (the root only), SIZE_BASED_WRAP (every module holding >= ``min_params`` parameters not
      already in a group, innermost first) or TRANSFORMER_BASED_WRAP (modules whose class name is in
      ``classes``, default: the network's diffusers/transformers ``_no_split_modules``).
    """
    reshard_after_forward: bool = True
    wrap: str = "NO_WRAP"
    min_params: int = 100_000_000
    classes: tuple = ()


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def _strategy_from_env() -> str:
    """The FULL_SHARD / SHARD_GRAD_OP choice as accelerate reads it: FSDP_SHARDING_STRATEGY (a name or
    accelerate's 1-based index) for FSDP_VERSION 1, FSDP_RESHARD_AFTER_FORWARD (true / false) for 2."""
    if os.environ.get("FSDP_VERSION", "1").strip() == "2":
        return "FULL_SHARD" if _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true") else "SHARD_GRAD_OP"
    name = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if name.isdigit() and 1 <= int(name) <= len(STRATEGIES):
        name = STRATEGIES[int(name) - 1]
    if name not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise ValueError(f"FSDP sharding strategy {name!r} is not supported by fewstep's training loop; "
                         "use FULL_SHARD or SHARD_GRAD_OP (--fsdp_sharding_strategy)")
    return name


def _wrap_from_env() -> tuple[str, int, tuple]:
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").strip().upper()
    if policy not in WRAP_POLICIES:
        raise ValueError(f"FSDP_AUTO_WRAP_POLICY {policy!r} is not one of {', '.join(WRAP_POLICIES)}; "
                         "fix --fsdp_auto_wrap_policy")
    raw = os.environ.get("FSDP_MIN_NUM_PARAMS", str(FSDPPlan.min_params)).strip()
    if not raw.isdigit():
        raise ValueError(f"FSDP_MIN_NUM_PARAMS must be a whole number, got {raw!r}; fix --fsdp_min_num_params")
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return policy, int(raw), classes


def _refuse_unsupported_env() -> None:
    """accelerate FSDP settings the loop does not implement: refused rather than silently ignored."""
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        raise ValueError("FSDP parameter offloading is not supported by fewstep's training loop; "
                         "launch with --fsdp_offload_params false")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ValueError("FSDP activation checkpointing is not supported by fewstep's training loop; launch with "
                         "--fsdp_activation_checkpointing false (fewstep distill has --gradient-checkpointing)")


def fsdp_plan(sharding: str | None, world: int) -> FSDPPlan | None:
    """The sharding plan of a training run, or None for replicated (DDP) training.

    ``sharding``: "fsdp" (shard), "none" (never shard) or None (follow the launcher: accelerate's
    ``--use_fsdp`` / an FSDP config file set ACCELERATE_USE_FSDP=true). The options come from
    accelerate's FSDP_* variables when set. One process has nothing to shard: it trains unsharded.
    """
    if sharding not in (None, "fsdp", "none"):
        raise ValueError(f"sharding must be 'fsdp', 'none' or None (follow the launcher), got {sharding!r}")
    if sharding == "none" or (sharding is None and not _env_flag("ACCELERATE_USE_FSDP")):
        return None
    if world < 2:
        warnings.warn("FSDP sharding asked for, but this is one process: training unsharded (launch several "
                      "processes with accelerate launch or torchrun to shard)")
        return None
    _refuse_unsupported_env()
    if os.environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").strip().upper() != "SHARDED_STATE_DICT":
        warnings.warn("fewstep always writes sharded checkpoints (one file per process); "
                      "fewstep.train.load_checkpoint_weights reads them as full tensors")
    policy, min_params, classes = _wrap_from_env()
    return FSDPPlan(_strategy_from_env() == "FULL_SHARD", policy, min_params, classes)


def _no_split_classes(module: torch.nn.Module) -> tuple:
    """The ``_no_split_modules`` class names declared by any diffusers / transformers model inside ``module``."""
    names: list = []
    for m in module.modules():
        for name in getattr(m, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return tuple(names)


def _wrap_targets(module: torch.nn.Module, plan: FSDPPlan) -> list:
    """The submodules (not the root) that get shard groups of their own, innermost first."""
    if plan.wrap == "NO_WRAP":
        return []
    if plan.wrap == "TRANSFORMER_BASED_WRAP":
        classes = set(plan.classes or _no_split_classes(module))
        if not classes:
            raise ValueError(f"TRANSFORMER_BASED_WRAP needs block classes: {type(module).__name__} declares no "
                             "_no_split_modules; set --fsdp_transformer_layer_cls_to_wrap")
        return [m for m in reversed(list(module.modules())[1:]) if type(m).__name__ in classes]
    targets, covered = [], set()
    for m in reversed(list(module.modules())[1:]):  # children before their parents
        if type(m).forward is torch.nn.Module.forward:
            continue  # a container (ModuleList, ModuleDict) never runs itself: its parameters go to the parent
        own = [p for p in m.parameters() if id(p) not in covered]
        if sum(p.numel() for p in own) >= plan.min_params:
            targets.append(m)
            covered.update(id(p) for p in own)
    return targets


@torch.no_grad()
def sync_from_rank0(module: torch.nn.Module, device: torch.device) -> None:
    """Make every process start from process 0's weights (as DDP does), one tensor at a time on ``device``."""
    for t in list(module.parameters()) + list(module.buffers()):
        moved = t.detach().to(device)
        torch.distributed.broadcast(moved, src=0)
        t.copy_(moved.to(t.device))


def shard_network(module: torch.nn.Module, plan: FSDPPlan, device: torch.device):
    """Shard ``module`` in place over all processes with torch's ``fully_shard`` (its parameters become
    DTensors split along dim 0 and move to ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for m in _wrap_targets(module, plan):
        fully_shard(m, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    _register_entry_points(module)
    return module


def _register_entry_points(module: torch.nn.Module) -> None:
    """Methods other than ``forward`` that callers use to run a network (a module lists them in its
    ``fsdp_forward_methods``, e.g. a GAN head's ``logits``) gather its parameters as ``forward`` does."""
    from torch.distributed.fsdp import register_fsdp_forward_method
    for m in module.modules():
        for name in getattr(m, "fsdp_forward_methods", ()):
            register_fsdp_forward_method(m, name)


def fsdp_modules(module: torch.nn.Module) -> list:
    """The shard groups (FSDP modules) inside ``module``, the root included."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter, its gradient or optimizer state)."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage); any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every process must call it); any other tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def local_chunk(full: torch.Tensor, like) -> torch.Tensor:
    """The part of a full tensor that this process holds in DTensor ``like`` (FSDP2's dim-0 chunks)."""
    world, rank = process_group()
    chunks = full.chunk(world, dim=0)
    part = chunks[rank] if rank < len(chunks) else full[full.shape[0]:]
    want = local_view(like).shape
    if part.shape != want:
        raise ValueError(f"a tensor of shape {tuple(full.shape)} does not split into this process's shard "
                         f"{tuple(want)}; resume with the network that wrote the checkpoint")
    return part


class CallGuard:
    """FULL_SHARD gathers a network's blocks at every call, a collective: every process must call the
    sharded networks in the same order. Before each call (and at ``end()`` of a micro-batch's objective)
    the processes compare what they are about to do, so a mismatch stops with an error instead of
    hanging or mixing up the collectives."""

    def __init__(self, networks: dict, device: torch.device):
        self.device, self.names = device, ["(the end of the objective)", *networks]
        self.handles = [m.register_forward_pre_hook(self._hook(i + 1), prepend=True)
                        for i, m in enumerate(networks.values())]

    def _hook(self, code: int):
        return lambda module, args: self.check(code)

    def end(self) -> None:
        self.check(0)

    def check(self, code: int) -> None:
        both = torch.tensor([code, -code], device=self.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        hi, lo = int(both[0]), -int(both[1])
        if hi != lo:
            raise RuntimeError(f"under FULL_SHARD the processes diverged: one runs {self.names[hi]}, another "
                               f"{self.names[lo]} (the objective calls a network a different number of times "
                               "per slice); shard with SHARD_GRAD_OP instead (--fsdp_reshard_after_forward false "
                               "or --fsdp_sharding_strategy SHARD_GRAD_OP)")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
