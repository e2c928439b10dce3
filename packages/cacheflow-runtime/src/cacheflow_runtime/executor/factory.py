"""Choosing and building the executor from ``ParallelConfig``, after checking that the model can
be split that way (before any worker process starts)."""

from __future__ import annotations

import os

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cacheflow_runtime.executor.base import Executor
from cacheflow_runtime.executor.in_process import InProcessExecutor
from cacheflow_runtime.executor.rank_worker import WorkerSpec
from cacheflow_runtime.parallel_state import tensor_parallel_shard
from cacheflow_runtime.registry import load_model_class


def resolve_backend(parallel_config: ParallelConfig) -> str:
    """"inprocess" for one rank without Ray, else the configured backend ("mp" by default)."""
    backend = parallel_config.distributed_executor_backend
    if parallel_config.tensor_parallel_size == 1 and backend != "ray":
        return "inprocess"
    return backend or "mp"


def check_tensor_parallel(model_config: ModelConfig, parallel_config: ParallelConfig,
                          device: torch.device) -> None:
    """Raises ValueError, saying why, when the model cannot be split over
    ``tensor_parallel_size`` ranks on ``device``: the size must divide the attention heads, the
    KV heads must divide by it or it by them (fewer KV heads than ranks are replicated), every
    other split dimension must divide (checked by building rank 0's layers on the meta
    device), and with CUDA worker processes there must be as many visible GPUs."""
    tp = parallel_config.tensor_parallel_size
    if tp == 1:
        return
    heads, kv_heads = model_config.num_attention_heads, model_config.num_kv_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {heads} "
                         f"attention heads: each rank must hold a whole number of heads "
                         f"(choose a divisor of {heads})")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} and the model's {kv_heads} KV heads do not "
                         "divide one another: each rank needs whole KV heads (or an equal "
                         "share of replicas of one)")
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ValueError(f"with tensor_parallel_size={tp} the ranks use the first {tp} "
                             f"visible GPUs; choose them with CUDA_VISIBLE_DEVICES instead of "
                             f"device={str(device)!r}")
        visible = torch.cuda.device_count()
        if resolve_backend(parallel_config) == "mp" and tp > visible:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs on this host but only "
                             f"{visible} are visible (CUDA_VISIBLE_DEVICES="
                             f"{_visible_devices_env()}); use distributed_executor_backend="
                             "'ray' to span several hosts")
    model_cls = load_model_class(model_config.architecture)
    try:
        with torch.device("meta"), tensor_parallel_shard(tp, 0):
            model_cls(model_config.hf_config)
    except ValueError as exc:
        raise ValueError(f"tensor_parallel_size={tp} does not fit the model: {exc}") from exc


def _visible_devices_env() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def create_executor(model_config: ModelConfig, cache_config: CacheConfig,
                    scheduler_config: SchedulerConfig, parallel_config: ParallelConfig,
                    device: torch.device, seed: int = 0,
                    enforce_eager: bool = False) -> Executor:
    """The executor ``parallel_config`` asks for: in this process for one rank, else one
    worker process per rank ("mp") or one Ray actor per rank ("ray"). Refuses a size the model
    or the host cannot take before anything starts."""
    backend = resolve_backend(parallel_config)
    if backend == "inprocess":
        return InProcessExecutor(model_config, cache_config, scheduler_config, str(device),
                                 seed, enforce_eager=enforce_eager)
    check_tensor_parallel(model_config, parallel_config, device)
    tp = parallel_config.tensor_parallel_size
    if backend == "ray":
        from cacheflow_runtime.executor.ray_executor import RayExecutor

        return RayExecutor(model_config, cache_config, scheduler_config, tp, device.type,
                           seed, enforce_eager)
    from cacheflow_runtime.executor.multiproc import MultiprocExecutor, local_init_method

    spec = WorkerSpec(model_config, cache_config, scheduler_config, tp, local_init_method(),
                      device.type, seed, enforce_eager)
    return MultiprocExecutor.for_host(spec)
