"""cacheflow-runtime: the paged-KV engine (scheduler, block manager, sampler, worker, engine)."""

from cacheflow_runtime import kernels  # noqa: F401  (checks the kernels ABI at import)
from cacheflow_runtime.config import (
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_dtype,
    resolve_device,
)
from cacheflow_runtime.engine.async_llm_engine import (
    AsyncLLMEngine,
    BaseAsyncEngine,
    EngineClosedError,
    EngineOverloadedError,
    EngineStats,
    RequestStream,
)
from cacheflow_runtime.engine.core_client import EngineCoreClient
from cacheflow_runtime.engine.detokenizer import stop_string_holdback
from cacheflow_runtime.engine.llm_engine import LLMEngine
from cacheflow_runtime.errors import (
    CacheflowUserError,
    CheckpointError,
    InvalidArgumentError,
    InvalidRequestError,
)
from cacheflow_runtime.executor.rank_worker import WorkerFailedError
from cacheflow_runtime.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    CompletionOutput,
    RequestOutput,
)
from cacheflow_runtime.sampling_metadata import Logprob
from cacheflow_runtime.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

__all__ = ["AsyncLLMEngine", "BaseAsyncEngine", "BeamSearchOutput", "BeamSearchParams",
           "BeamSearchSequence", "CacheConfig", "CacheflowUserError",
           "CheckpointError", "CompletionOutput", "EngineClosedError", "EngineCoreClient",
           "EngineOverloadedError", "EngineStats",
           "InvalidArgumentError", "InvalidRequestError", "LLMEngine", "Logprob", "ModelConfig",
           "ParallelConfig", "RequestOutput", "RequestStream", "SamplingParams",
           "SchedulerConfig", "WorkerFailedError", "__version__", "parse_dtype",
           "resolve_device", "stop_string_holdback"]
