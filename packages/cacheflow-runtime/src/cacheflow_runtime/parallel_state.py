"""Tensor-parallel state of this process: its rank, the world size, and the collectives.

One process per GPU; with a world size of 1 (the default) every collective is the identity.
The collectives run through ``torch.distributed`` on the group set by
``initialize_tensor_parallel`` (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
import torch.distributed as dist

_TP_GROUP: Optional[dist.ProcessGroup] = None
_TP_SIZE = 1
_TP_RANK = 0


def initialize_tensor_parallel(world_size: int, rank: int,
                               group: Optional[dist.ProcessGroup] = None) -> None:
    """Sets this process's tensor-parallel rank and world size (and the group to reduce over)."""
    global _TP_GROUP, _TP_SIZE, _TP_RANK
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor parallel rank {rank} is not in a world of size {world_size}")
    if world_size > 1 and group is None and not dist.is_initialized():
        raise RuntimeError("tensor parallelism over several processes needs torch.distributed "
                           "to be initialized first")
    _TP_GROUP, _TP_SIZE, _TP_RANK = group, world_size, rank


@contextlib.contextmanager
def tensor_parallel_shard(world_size: int, rank: int) -> Iterator[None]:
    """Within the block, layers are built (and load weights) as rank ``rank`` of ``world_size``.

    For building and inspecting one rank's shard of a model in a single process, without a
    process group (e.g. to check that the shards of every rank put together give the full
    tensors); a collective run inside the block fails. The previous state is restored on exit.
    """
    global _TP_GROUP, _TP_SIZE, _TP_RANK
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor parallel rank {rank} is not in a world of size {world_size}")
    saved = (_TP_GROUP, _TP_SIZE, _TP_RANK)
    _TP_GROUP, _TP_SIZE, _TP_RANK = None, world_size, rank
    try:
        yield
    finally:
        _TP_GROUP, _TP_SIZE, _TP_RANK = saved


def get_tensor_parallel_world_size() -> int:
    """Number of processes that share each layer."""
    return _TP_SIZE


def get_tensor_parallel_rank() -> int:
    """This process's rank among them."""
    return _TP_RANK


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the tensor-parallel group (in place) and returns it."""
    if _TP_SIZE > 1:
        dist.all_reduce(tensor, group=_TP_GROUP)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's ``tensor`` along ``dim``, in rank order."""
    if _TP_SIZE == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, tensor.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
