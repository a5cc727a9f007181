"""Splitting sample generation over processes (accelerate launch, torchrun).

Work made in batches is dealt round-robin: process r makes batches r, r + world, ...; then every
process gathers all of them in batch order. With per-sample seeds the result is the same set of
images whatever the number of processes.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["process_group", "my_batches", "gather_batches", "on_main", "sample_generators"]


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
