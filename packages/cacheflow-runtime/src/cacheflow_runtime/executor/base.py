"""The interface between the engine and the workers that run the model."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional

from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.executor.handle import StepHandle
from cacheflow_runtime.executor.rank_worker import WorkerFailedError

logger = logging.getLogger(__name__)


class Executor(ABC):
    """Runs the model over one or more workers (one per tensor-parallel rank).

    Life cycle: ``determine_num_available_blocks`` (the minimum over ranks), then
    ``initialize_cache`` once, then ``execute_model_async`` (or ``execute_model``) once per step,
    then ``shutdown``. Steps run in the order they are started, and their handles are read in
    that order; the engine may start step k+1 before it reads step k's handle.
    """

    #: True when decode steps replay CUDA graphs (set by ``initialize_cache``).
    uses_cuda_graphs: bool = False

    @abstractmethod
    def determine_num_available_blocks(self) -> tuple[int, int]:
        """(device blocks, cpu blocks) every worker can hold."""

    @abstractmethod
    def initialize_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the KV cache on every worker (and captures CUDA graphs where allowed)."""

    @abstractmethod
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Starts one step on every worker; the handle's ``result()`` gives its output."""

    @abstractmethod
    def cuda_graph_usage(self) -> Optional[dict[str, Any]]:
        """How decode steps used the CUDA graphs so far (rank 0's counters; see
        ``CudaGraphUsage``), or None when the workers run without graphs."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on every worker and returns the sampled tokens."""
        return self.execute_model_async(scheduler_output).result()

    @abstractmethod
    def shutdown(self) -> None:
        """Releases the workers; idempotent."""


class RankExecutor(Executor):
    """What the executors with one worker per tensor-parallel rank (multiprocess, Ray) share:
    calls that every rank answers, the minimum cache over ranks, and failing for good.

    Subclasses set ``_finalizer`` (reaps every worker) and implement ``_call_all``.
    """

    _failure: Optional[WorkerFailedError] = None
    _finalizer: Callable[[], Any]

    @abstractmethod
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Calls ``method`` on every rank's worker; their answers in rank order."""

    def _fail(self, error: WorkerFailedError) -> None:
        """Records the failure, reaps every worker and raises ``error``."""
        self._failure = error
        logger.error("%s", error)
        self._finalizer()
        raise error

    def determine_num_available_blocks(self) -> tuple[int, int]:
        """(device blocks, cpu blocks) that fit on every rank: the minimum over ranks."""
        counts = self._call_all("determine_num_available_blocks")
        return min(c[0] for c in counts), min(c[1] for c in counts)

    def initialize_cache(self, num_device_blocks: int, num_cpu_blocks: int) -> None:
        """Allocates the KV cache on every rank (and captures decode graphs where allowed)."""
        graphs = self._call_all("initialize_cache", num_device_blocks, num_cpu_blocks)
        self.uses_cuda_graphs = all(graphs)

    def cuda_graph_usage(self) -> Optional[dict[str, Any]]:
        """Rank 0's graph counters (every rank replays the same graphs)."""
        return self._call_all("cuda_graph_usage")[0] if self.uses_cuda_graphs else None
