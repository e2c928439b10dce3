"""cacheflow-serve: the offline LLM API and the `cacheflow` command."""

from cacheflow_runtime import CompletionOutput, RequestOutput, SamplingParams
from cacheflow_serve.llm import LLM

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
