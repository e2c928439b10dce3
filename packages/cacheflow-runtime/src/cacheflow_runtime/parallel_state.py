"""Tensor-parallel state of this process: its rank, the world size, and the collectives.

One process per GPU; with a world size of 1 (the default) every collective is the identity.
The collectives run through the :class:`~cacheflow_runtime.distributed.Communicator` set by
``initialize_tensor_parallel`` (NCCL on GPUs, gloo on CPU); a worker process gets one from
``cacheflow_runtime.distributed.init_distributed_environment``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from cacheflow_runtime.distributed.communicator import Communicator

_COMMUNICATOR: Optional[Communicator] = None
_TP_SIZE = 1
_TP_RANK = 0


def initialize_tensor_parallel(world_size: int, rank: int,
                               communicator: Optional[Communicator] = None) -> None:
    """Sets this process's tensor-parallel rank and world size, and the communicator that runs
    the collectives (required when ``world_size`` > 1)."""
    global _COMMUNICATOR, _TP_SIZE, _TP_RANK
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor parallel rank {rank} is not in a world of size {world_size}")
    if world_size > 1 and communicator is None:
        raise RuntimeError("tensor parallelism over several processes needs a communicator "
                           "(see cacheflow_runtime.distributed.init_distributed_environment)")
    if communicator is not None and (communicator.world_size, communicator.rank) != (
            world_size, rank):
        raise ValueError(f"the communicator is rank {communicator.rank} of "
                         f"{communicator.world_size}, not rank {rank} of {world_size}")
    _COMMUNICATOR, _TP_SIZE, _TP_RANK = communicator, world_size, rank


def reset_tensor_parallel() -> None:
    """Back to a single process (world size 1, no communicator)."""
    global _COMMUNICATOR, _TP_SIZE, _TP_RANK
    _COMMUNICATOR, _TP_SIZE, _TP_RANK = None, 1, 0


def get_communicator() -> Optional[Communicator]:
    """The communicator of this process's group (None in a single process)."""
    return _COMMUNICATOR


@contextlib.contextmanager
def tensor_parallel_shard(world_size: int, rank: int) -> Iterator[None]:
    """Within the block, layers are built (and load weights) as rank ``rank`` of ``world_size``.

    For building and inspecting one rank's shard of a model in a single process, without a
    process group (e.g. to check that the shards of every rank put together give the full
    tensors); a collective run inside the block fails. The previous state is restored on exit.
    """
    global _COMMUNICATOR, _TP_SIZE, _TP_RANK
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor parallel rank {rank} is not in a world of size {world_size}")
    saved = (_COMMUNICATOR, _TP_SIZE, _TP_RANK)
    _COMMUNICATOR, _TP_SIZE, _TP_RANK = None, world_size, rank
    try:
        yield
    finally:
        _COMMUNICATOR, _TP_SIZE, _TP_RANK = saved


def get_tensor_parallel_world_size() -> int:
    """Number of processes that share each layer."""
    return _TP_SIZE


def get_tensor_parallel_rank() -> int:
    """This process's rank among them."""
    return _TP_RANK


def _communicator() -> Communicator:
    if _COMMUNICATOR is None:
        raise RuntimeError("a tensor-parallel collective ran without a communicator (inside "
                           "tensor_parallel_shard, or before initialize_tensor_parallel)")
    return _COMMUNICATOR


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the tensor-parallel group (in place) and returns it."""
    if _TP_SIZE == 1:
        return tensor
    return _communicator().all_reduce(tensor)


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's ``tensor`` along ``dim``, in rank order."""
    if _TP_SIZE == 1:
        return tensor
    return _communicator().all_gather(tensor, dim)


def reduce_scatter(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sums ``tensor`` over the group and returns this rank's block along ``dim``."""
    if _TP_SIZE == 1:
        return tensor
    return _communicator().reduce_scatter(tensor, dim)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrites ``tensor`` with rank ``src``'s (in place) and returns it."""
    if _TP_SIZE == 1:
        return tensor
    return _communicator().broadcast(tensor, src)
