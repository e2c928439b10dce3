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


#: KV-cache dtypes: "auto" (the model's dtype) or "fp8" (FP8 E4M3; "fp8_e4m3" is an alias).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def parse_kv_cache_dtype(cache_dtype: str) -> str:
    """"auto" or "fp8" (with "fp8_e4m3" read as "fp8"); ValueError for anything else."""
    if cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {cache_dtype!r}")
    return "fp8" if cache_dtype.startswith("fp8") else "auto"


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element dtype of the KV cache tensors: the model's for "auto",
    ``torch.float8_e4m3fn`` for "fp8"."""
    return torch.float8_e4m3fn if parse_kv_cache_dtype(cache_dtype) == "fp8" else model_dtype


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
    """The paged KV cache: block size, how many blocks on the device, swap space on the host.

    ``num_device_blocks=None`` sizes the cache from memory: on CUDA ``gpu_memory_utilization`` of
    the card after a profiling run, on CPU ``cpu_kv_cache_gib``.

    ``cache_dtype``: "auto" stores keys and values in the model's dtype; "fp8" (alias
    "fp8_e4m3") in FP8 E4M3, quantized on write with each layer's K/V scales (1.0 unless the
    checkpoint carries ``k_scale``/``v_scale``): half the bytes per block, so twice the tokens
    in the same memory.
    """

    block_size: int = 16
    num_device_blocks: Optional[int] = None
    swap_space_gib: float = 4.0
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_cpu_blocks: Optional[int] = None
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.cache_dtype = parse_kv_cache_dtype(self.cache_dtype)
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


@dataclass
class SchedulerConfig:
    """Batch limits of one step and how to preempt when the KV cache runs out."""

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_model_len: int = 2048
    preemption_mode: str = "recompute"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(self.max_model_len, 2048)
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}) so that every prompt fits "
                             "in one step")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
