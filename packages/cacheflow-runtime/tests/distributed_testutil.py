"""Helpers of the tensor-parallel tests: run a function on every rank of a CPU (gloo) group of
spawned processes, list a process's living children, and tell whether a process lives."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cacheflow_runtime.distributed import (
    destroy_distributed_environment,
    init_distributed_environment,
)
from cacheflow_runtime.distributed.environment import get_open_port


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, init_method: str,
               args: tuple[Any, ...], queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_distributed_environment(world_size, rank, init_method, torch.device("cpu"))
        try:
            # plain pickle: tensors by value (torch would pass them through shared memory,
            # which goes away with this process)
            queue.put((rank, "ok", pickle.dumps(fn(rank, *args))))
        finally:
            destroy_distributed_environment()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
                 timeout: float = 120.0) -> list[Any]:
    """``fn(rank, *args)`` on each rank of a fresh gloo group of ``world_size`` spawned
    processes (``fn`` must be importable: a module-level function); the results in rank order.
    A rank's exception fails the call with its traceback."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{get_open_port()}"
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, init_method, args, queue),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]


def child_pids(pid: int | None = None) -> set[int]:
    """Pids of the living (not zombie) direct children of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            children.add(int(stat.parent.name))
    return children


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
