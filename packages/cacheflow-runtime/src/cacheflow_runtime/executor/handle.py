"""What an executor returns for a step it has started: a handle whose ``result()`` waits for the
step's ``ModelRunnerOutput``. Handles are read in the order their steps were started."""

from __future__ import annotations

from typing import Protocol

from cacheflow_runtime.core.step_data import ModelRunnerOutput


class StepHandle(Protocol):
    """A step started on the worker(s); ``result()`` blocks until its output is there."""

    def result(self) -> ModelRunnerOutput:
        """The step's sampled tokens and prompt logprobs."""

    def ready(self) -> bool:
        """Whether ``result()`` would return without waiting for the device or the workers
        (asked without blocking, so the host can do other work while it is False)."""


class CompletedStep:
    """The handle of a step whose output is already known."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        """The output given at construction."""
        return self._output

    def ready(self) -> bool:
        """Always True: the output is known."""
        return True
