"""The executor of a single worker in the engine's own process (tensor_parallel_size = 1)."""

from __future__ import annotations

from typing import Any, Optional

from cacheflow_runtime.config import CacheConfig, ModelConfig, SchedulerConfig
from cacheflow_runtime.core.step_data import SchedulerOutput
from cacheflow_runtime.executor.base import Executor
from cacheflow_runtime.executor.handle import StepHandle
from cacheflow_runtime.model_executor.worker import Worker


class InProcessExecutor(Executor):
    """One :class:`Worker` called directly."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, device: str, seed: int = 0,
                 enforce_eager: bool = False) -> None:
        self.worker = Worker(model_config, cache_config, scheduler_config, device, seed,
                             enforce_eager=enforce_eager)

    def determine_num_available_blocks(self) -> tuple[int, int]:
        """(device blocks, cpu blocks) from the config or from a memory profile."""
        return self.worker.determine_num_available_blocks()

    def initialize_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the worker's KV cache and captures its decode graphs."""
        self.worker.initialize_cache(num_device_blocks, num_cpu_blocks)
        self.uses_cuda_graphs = self.worker.uses_cuda_graphs

    def cuda_graph_usage(self) -> Optional[dict[str, Any]]:
        """The worker's CUDA graph counters (None without graphs)."""
        return self.worker.cuda_graph_usage()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Queues the step on the worker's device; the handle waits for its samples."""
        return self.worker.execute_model_async(scheduler_output)

    def shutdown(self) -> None:
        """Nothing to release: the worker lives and dies with this process."""
