"""One tensor-parallel rank's worker, as the multiprocess and the Ray executors run it.

:class:`WorkerSpec` is what every rank needs to start (plain, picklable); :class:`RankWorker`
joins the group, loads this rank's shard of the model and serves the executor's calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig, SchedulerConfig
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.distributed import (
    destroy_distributed_environment,
    init_distributed_environment,
)
from cacheflow_runtime.model_executor.worker import Worker


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died, hung or raised; the engine cannot go on.

    ``rank`` is the failed worker's rank (None when it cannot be told which).
    """

    def __init__(self, message: str, rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass
class WorkerSpec:
    """What every rank of an executor needs to start: the engine's configs, the group's size and
    rendezvous address (``tcp://host:port`` of rank 0), and the device type."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    world_size: int
    init_method: str
    device_type: str = "cpu"
    seed: int = 0
    enforce_eager: bool = False


class RankWorker:
    """Rank ``rank`` of the group: its communicator and its :class:`Worker` (which loads only
    this rank's shard of every weight). Only rank 0 returns the step's output."""

    def __init__(self, spec: WorkerSpec, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.communicator = init_distributed_environment(spec.world_size, rank,
                                                         spec.init_method, device)
        self.worker = Worker(spec.model_config, spec.cache_config, spec.scheduler_config,
                             device, spec.seed, rank=rank, enforce_eager=spec.enforce_eager)

    def backend(self) -> str:
        """The communicator's transport (e.g. "nccl 2.27.3 (...)", "gloo (torch.distributed)")."""
        return self.communicator.backend

    def determine_num_available_blocks(self) -> tuple[int, int]:
        """(device blocks, cpu blocks) this rank can hold."""
        return self.worker.determine_num_available_blocks()

    def initialize_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> bool:
        """Allocates this rank's KV cache; True when it captured CUDA graphs."""
        self.worker.initialize_cache(num_device_blocks, num_cpu_blocks)
        return self.worker.uses_cuda_graphs

    def cuda_graph_usage(self) -> Optional[dict[str, Any]]:
        """This rank's CUDA graph counters (None without graphs)."""
        return self.worker.cuda_graph_usage()

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Runs the step; rank 0 returns the sampled tokens, the others None."""
        output = self.worker.execute_model(scheduler_output)
        return output if self.rank == 0 else None

    def shutdown(self) -> None:
        """Leaves the group."""
        destroy_distributed_environment()
