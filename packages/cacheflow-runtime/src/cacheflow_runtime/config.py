"""Engine configuration: what the model looks like to the runtime, the KV cache, the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turns "float16", "bf16", torch.float32, ... into a torch dtype (ValueError if unknown)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> the first CUDA device if there is one, else CPU; otherwise validated as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


@dataclass
class ModelConfig:
    """What the runtime needs to know about a model (built by cacheflow_models from an HF config).

    ``hf_config`` is the model's own config object, handed unchanged to the model class.
    ``architecture`` is the name looked up in the ``cacheflow.models`` entry-point group.
    """

    model_path: str
    architecture: str
    hf_config: Any
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    eos_token_id: Optional[int] = None
    weights_format: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_size",
                     "hidden_size", "vocab_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, how many blocks on the device, swap space on the host,
    and whether full blocks are shared between requests with a common prefix (prefix caching).

    ``num_device_blocks=None`` sizes the cache from memory: on CUDA ``gpu_memory_utilization`` of
    the card after a profiling run, on CPU ``cpu_kv_cache_gib``.
    """

    block_size: int = 16
    num_device_blocks: Optional[int] = None
    swap_space_gib: float = 4.0
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_cpu_blocks: Optional[int] = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size!r}")
        if self.num_device_blocks is not None and (
                not isinstance(self.num_device_blocks, int) or self.num_device_blocks < 1):
            raise ValueError(f"kv_cache_blocks must be a positive integer or None, "
                             f"got {self.num_device_blocks!r}")
        if not self.swap_space_gib >= 0:
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")


PREEMPTION_MODES = ("recompute", "swap")
#: The step token budget when chunked prefill is on and none is given.
DEFAULT_CHUNKED_TOKEN_BUDGET = 2048


@dataclass
class SchedulerConfig:
    """Batch limits of one step and how to preempt when the KV cache runs out.

    ``max_num_batched_tokens`` is the step's token budget. With ``enable_chunked_prefill``
    (default) a step mixes the running requests' decode tokens with chunks of prompts, and a
    prompt longer than what is left of the budget is split over steps (default budget 2048);
    without it a step runs either whole prompts or decodes, and every prompt must fit one step
    (default budget max(max_model_len, 2048)).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_model_len: int = 2048
    preemption_mode: str = "recompute"
    enable_chunked_prefill: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (DEFAULT_CHUNKED_TOKEN_BUDGET
                                           if self.enable_chunked_prefill
                                           else max(self.max_model_len, 2048))
        if (isinstance(self.max_num_batched_tokens, bool)
                or not isinstance(self.max_num_batched_tokens, int)
                or self.max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be a positive integer, "
                             f"got {self.max_num_batched_tokens!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}) so that every prompt fits "
                             "in one step when enable_chunked_prefill is False")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass
class ParallelConfig:
    """How the model is split: ``tensor_parallel_size`` ranks, run by one process each ("mp",
    on this host) or by Ray actors ("ray", across hosts); None picks "mp" when the size is > 1."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None

    def __post_init__(self) -> None:
        size = self.tensor_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{DISTRIBUTED_EXECUTOR_BACKENDS} or None, got {backend!r}")
