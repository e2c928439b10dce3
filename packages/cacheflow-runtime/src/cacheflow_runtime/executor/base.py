"""The interface between the engine and the workers that run the model."""

from __future__ import annotations

from abc import ABC, abstractmethod

from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    """Runs the model over one or more workers (one per tensor-parallel rank).

    Life cycle: ``determine_num_available_blocks`` (the minimum over ranks), then
    ``initialize_cache`` once, then ``execute_model`` once per step, then ``shutdown``.
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
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on every worker and returns the sampled tokens."""

    @abstractmethod
    def shutdown(self) -> None:
        """Releases the workers; idempotent."""
