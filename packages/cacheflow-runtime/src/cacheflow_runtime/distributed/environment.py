"""Joining and leaving the tensor-parallel group of one worker process."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.distributed.communicator import Communicator, create_communicator

# How long a CPU-group collective (the rendezvous, the NCCL id exchange, a gloo collective of
# the CPU backend) may wait for the other ranks. Worker failures are detected by the executor
# much sooner; this only bounds a rank left waiting on its own.
DEFAULT_GROUP_TIMEOUT_S = 600.0


def get_open_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def get_ip() -> str:
    """This host's address as other hosts see it (loopback when the host is offline)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def init_distributed_environment(world_size: int, rank: int, init_method: str,
                                 device: torch.device,
                                 timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> Communicator:
    """Joins the CPU (gloo) group at ``init_method`` (``tcp://host:port``) as ``rank``, builds
    the communicator for ``device`` over it and makes it this process's tensor-parallel group
    (``parallel_state``). On CPU the threads of torch are shared out among the ranks."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=init_method, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))
    group = dist.group.WORLD
    assert group is not None
    communicator = create_communicator(group, device)
    ps.initialize_tensor_parallel(world_size, rank, communicator)
    return communicator


def destroy_distributed_environment() -> None:
    """Closes the communicator and leaves the CPU group; safe to call when never joined."""
    communicator = ps.get_communicator()
    ps.reset_tensor_parallel()
    if communicator is not None:
        communicator.close()
    if dist.is_initialized():
        dist.destroy_process_group()
