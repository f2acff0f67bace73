"""The optimizer state a part keeps for one parameter, described before training: a list of ``StateTensor``
(the single-process shape and bytes per element of each state tensor), from configuration alone.

One function turns a layout into bytes: ``rank_bytes``. With parameters sharded ``Shard(0)`` over ``world_size``
ranks (FSDP2), every state tensor with at least one dim is a ``Shard(0)`` DTensor of its single-process tensor,
split by rows like ``torch.chunk`` (``sharding.chunk_range``); 0-dim tensors are held whole by every rank (see
``sharding.py``). Python numbers in the state (refresh counts, some step counters) hold no tensor bytes and are
left out of layouts."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Tuple

import torch

from .sharding import chunk_range


class StateTensor(NamedTuple):
    shape: Tuple[int, ...]  # the tensor a single process holds; () for a 0-dim counter
    itemsize: int  # bytes per element


def state_tensor(shape, dtype: torch.dtype) -> StateTensor:
    return StateTensor(tuple(int(s) for s in shape), torch.empty((), dtype=dtype).element_size())


def rank_bytes(layout: Iterable[StateTensor], world_size: int = 1, rank: int = 0) -> int:
    """Bytes that ``rank`` of ``world_size`` holds of the state tensors in ``layout`` (world_size 1: all of them)."""
    total = 0
    for t in layout:
        if not t.shape:
            total += t.itemsize
            continue
        start, stop = chunk_range(t.shape[0], rank, world_size)
        total += (stop - start) * math.prod(t.shape[1:]) * t.itemsize
    return total


def check_world(world_size, rank, rank_key: str = "rank") -> None:
    """A clear error for a world size or rank that names no process (``rank_key``: the caller's name for it)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{rank_key} must be an int in [0, world_size={world_size}), got {rank!r}")


__all__ = ["StateTensor", "check_world", "rank_bytes", "state_tensor"]
