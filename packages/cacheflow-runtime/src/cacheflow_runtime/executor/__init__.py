"""Executors: who runs the workers (in this process today; one process per GPU or Ray actors for
tensor parallelism). The engine talks to one :class:`Executor` through the plain-data step
interface of ``core/step_data.py``."""

from cacheflow_runtime.executor.base import Executor
from cacheflow_runtime.executor.in_process import InProcessExecutor

__all__ = ["Executor", "InProcessExecutor"]
