"""Engine configuration: what the model looks like to the runtime, the KV cache, the scheduler."""

from __future__ import annotations

import importlib.util
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cacheflow_runtime.errors import InvalidArgumentError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    """InvalidArgumentError ``"<name> must be <allowed>, got <value>"`` unless ``ok``."""
    if not ok:
        raise InvalidArgumentError(f"{name} must be {allowed}, got {value!r}", field=name,
                                   value=value)


def is_int(value: Any) -> bool:
    """True for an integer that is not a bool (NumPy's integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a real number that is not a bool (NumPy's included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turns "float16", "bf16", torch.float32, ... into a torch dtype (ValueError if unknown)."""
    if isinstance(dtype, torch.dtype):
        _require(dtype in _DTYPES.values(), "dtype", "one of float32, float16, bfloat16", dtype)
        return dtype
    _require(isinstance(dtype, str) and dtype in _DTYPES, "dtype",
             f"one of {sorted(set(_DTYPES))} or 'auto'", dtype)
    return _DTYPES[dtype]


#: KV-cache dtypes: "auto" (the model's dtype) or "fp8" (FP8 E4M3; "fp8_e4m3" is an alias).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def parse_kv_cache_dtype(cache_dtype: str) -> str:
    """"auto" or "fp8" (with "fp8_e4m3" read as "fp8"); an InvalidArgumentError naming
    ``kv_cache_dtype`` for anything else."""
    _require(isinstance(cache_dtype, str) and cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
             f"one of {KV_CACHE_DTYPES}", cache_dtype)
    return "fp8" if cache_dtype.startswith("fp8") else "auto"


#: What reported logprobs are (vLLM's ``logprobs_mode`` values; the first is the default): see
#: the sampler's module docstring.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def parse_logprobs_mode(mode: str) -> str:
    """``mode`` when it is one of ``LOGPROBS_MODES``; otherwise an InvalidArgumentError naming
    it."""
    _require(isinstance(mode, str) and mode in LOGPROBS_MODES, "logprobs_mode",
             f"one of {', '.join(LOGPROBS_MODES)}", mode)
    return mode


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element dtype of the KV cache tensors: the model's for "auto",
    ``torch.float8_e4m3fn`` for "fp8"."""
    return torch.float8_e4m3fn if parse_kv_cache_dtype(cache_dtype) == "fp8" else model_dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> the first CUDA device if there is one, else CPU; otherwise validated as given."""
    if isinstance(device, torch.device):
        return device
    allowed = "'auto', 'cpu' or 'cuda[:N]'"
    _require(isinstance(device, str), "device", allowed, device)
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    _require(resolved is not None and resolved.type in ("cpu", "cuda"), "device", allowed,
             device)
    assert resolved is not None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} was asked for but CUDA is not available "
                                   "here", field="device", value=device)
    return resolved


@dataclass
class ModelConfig:
    """What the runtime needs to know about a model (built by cacheflow_models from an HF config).

    ``hf_config`` is the model's own config object, handed unchanged to the model class.
    ``architecture`` is the name looked up in the ``cacheflow.models`` entry-point group.
    ``extra_eos_token_ids``: ids that also end a sequence as EOS does (a config or generation
    config naming several, e.g. LLaMA-3 instruct models' end of turn besides end of text).
    ``length_dependent_rope``: ("dynamic" or "longrope", the length past which it changes the
    rotation) where the model's rotary scaling rotates a prompt by its length, so that prefix
    caching keeps prompts rotated differently apart
    (``rotary_embedding.length_dependent_rope``); None where rotation is by position alone.
    ``logprobs_mode``: what reported logprobs are (``LOGPROBS_MODES``; set by the engine's
    caller, not by the model).
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
    extra_eos_token_ids: tuple[int, ...] = ()
    length_dependent_rope: Optional[tuple[str, int]] = None
    logprobs_mode: str = LOGPROBS_MODES[0]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends a sequence as EOS (unless ``ignore_eos``)."""
        ids = set(self.extra_eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_size",
                     "hidden_size", "vocab_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        parse_logprobs_mode(self.logprobs_mode)
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, how many blocks on the device, swap space on the host,
    and whether full blocks are shared between requests with a common prefix (prefix caching).

    ``num_device_blocks=None`` sizes the cache from memory: on CUDA ``gpu_memory_utilization`` of
    the card after a profiling run, on CPU ``cpu_kv_cache_gib``.

    ``cache_dtype``: "auto" stores keys and values in the model's dtype; "fp8" (alias
    "fp8_e4m3") in FP8 E4M3, quantized on write with each layer's K/V scales (1.0 unless the
    checkpoint carries ``k_scale``/``v_scale``): half the bytes per block, so twice the tokens
    in the same memory.
    """

    block_size: int = 16
    num_device_blocks: Optional[int] = None
    swap_space: float = 4.0
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_cpu_blocks: Optional[int] = None
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.cache_dtype = parse_kv_cache_dtype(self.cache_dtype)
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                 "True or False", self.enable_prefix_caching)
        _require(is_int(self.block_size) and self.block_size in (8, 16, 32), "block_size",
                 "8, 16 or 32", self.block_size)
        _require(self.num_device_blocks is None
                 or (is_int(self.num_device_blocks) and self.num_device_blocks >= 1),
                 "kv_cache_blocks", "a positive integer or None", self.num_device_blocks)
        _require(is_number(self.swap_space) and self.swap_space >= 0,
                 "swap_space", "a number >= 0", self.swap_space)
        _require(is_number(self.gpu_memory_utilization)
                 and 0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                 "a number in (0, 1]", self.gpu_memory_utilization)
        _require(is_number(self.cpu_kv_cache_gib) and self.cpu_kv_cache_gib > 0,
                 "cpu_kv_cache_gib", "a number > 0", self.cpu_kv_cache_gib)
        _require(self.num_cpu_blocks is None
                 or (is_int(self.num_cpu_blocks) and self.num_cpu_blocks >= 0),
                 "num_cpu_blocks", "an integer >= 0 or None", self.num_cpu_blocks)


PREEMPTION_MODES = ("recompute", "swap")
#: The step token budget when chunked prefill is on and none is given.
DEFAULT_CHUNKED_TOKEN_BUDGET = 2048
#: GPUs with at least this much memory (A100s aside) get the larger batch limits below.
LARGE_GPU_MEMORY_BYTES = 70 * 1024**3


@dataclass(frozen=True)
class BatchLimits:
    """A scheduler's ``max_num_seqs`` and ``max_num_batched_tokens``."""

    max_num_seqs: int
    max_num_batched_tokens: int


def default_batch_limits(device: torch.device, serving: bool = False) -> BatchLimits:
    """The batch limits a front end uses when the user gives none, by device and use (vLLM's
    defaults, so that a vLLM command line means the same batches here).

    GPUs of 70 GiB or more other than A100s (H100, H200): 1,024 sequences, and 16,384 tokens
    per step offline or 8,192 when ``serving`` (larger steps raise throughput; a server keeps
    them smaller for its streams' inter-token latency). Other GPUs: 256 sequences, and 8,192
    tokens offline or 2,048 serving. CPU: 256 sequences and 2,048 tokens.
    """
    if device.type != "cuda":
        return BatchLimits(256, DEFAULT_CHUNKED_TOKEN_BUDGET)
    props = torch.cuda.get_device_properties(device)
    if props.total_memory >= LARGE_GPU_MEMORY_BYTES and "a100" not in props.name.lower():
        return BatchLimits(1024, 8192 if serving else 16384)
    return BatchLimits(256, 2048 if serving else 8192)


def resolve_batch_limits(device: torch.device, max_num_seqs: Any, max_num_batched_tokens: Any,
                         enable_chunked_prefill: Any, serving: bool = False) -> tuple[Any, Any]:
    """``max_num_seqs`` and ``max_num_batched_tokens`` with :func:`default_batch_limits` for
    those left at None. A defaulted budget is at least ``max_num_seqs`` (every sequence gets a
    token in a step), and stays None without chunked prefill (SchedulerConfig then sizes it by
    max_model_len). Values given are passed on as given, for SchedulerConfig to check."""
    limits = default_batch_limits(device, serving=serving)
    if max_num_seqs is None:
        max_num_seqs = limits.max_num_seqs
    if max_num_batched_tokens is None and enable_chunked_prefill is True and is_int(max_num_seqs):
        max_num_batched_tokens = max(limits.max_num_batched_tokens, max_num_seqs)
    return max_num_seqs, max_num_batched_tokens


@dataclass
class SchedulerConfig:
    """Batch limits of one step and how to preempt when the KV cache runs out.

    ``max_num_batched_tokens`` is the step's token budget. With ``enable_chunked_prefill``
    (default) a step mixes the running requests' decode tokens with chunks of prompts, and a
    prompt longer than what is left of the budget is split over steps (default budget 2048);
    without it a step runs either whole prompts or decodes, and every prompt must fit one step
    (default budget max(max_model_len, 2048)).

    ``async_scheduling`` (default on) schedules each step while the one before still runs on
    the device, so the host's work overlaps the device's; outputs are the same as without it
    (tokens, text, logprobs; a queued request may be admitted a step later, after a request
    that ended on a stop condition the step scheduled ahead could not know, so its
    ``num_cached_tokens`` may differ).
    Steps that need the previous step's tokens first (beam search, forking first samples,
    penalties, ``min_tokens``, preemption, swapped requests) are scheduled in order.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_model_len: int = 2048
    preemption_mode: str = "recompute"
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs",
                 "a positive integer", self.max_num_seqs)
        _require(is_int(self.max_model_len) and self.max_model_len >= 1, "max_model_len",
                 "a positive integer", self.max_model_len)
        _require(self.max_num_batched_tokens is None or is_int(self.max_num_batched_tokens),
                 "max_num_batched_tokens", "an integer or None", self.max_num_batched_tokens)
        if self.max_num_batched_tokens is None:
            # Never below max_num_seqs, so that every running request can decode in one step.
            self.max_num_batched_tokens = max(self.max_num_seqs,
                                              DEFAULT_CHUNKED_TOKEN_BUDGET
                                              if self.enable_chunked_prefill
                                              else max(self.max_model_len, 2048))
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 "a positive integer or None", self.max_num_batched_tokens)
        _require(isinstance(self.enable_chunked_prefill, bool), "enable_chunked_prefill",
                 "True or False", self.enable_chunked_prefill)
        _require(isinstance(self.async_scheduling, bool), "async_scheduling", "True or False",
                 self.async_scheduling)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidArgumentError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) so that every prompt fits in one step "
                "when enable_chunked_prefill is False",
                field="max_num_batched_tokens", value=self.max_num_batched_tokens)
        _require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode",
                 f"one of {PREEMPTION_MODES}", self.preemption_mode)


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass
class ParallelConfig:
    """How the model is split: ``tensor_parallel_size`` ranks, run by one process each ("mp",
    on this host) or by Ray actors ("ray", across hosts); None picks "mp" when the size is > 1."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None

    def __post_init__(self) -> None:
        _require(is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
                 "tensor_parallel_size", "a positive integer", self.tensor_parallel_size)
        _require(self.distributed_executor_backend in (None, *DISTRIBUTED_EXECUTOR_BACKENDS),
                 "distributed_executor_backend",
                 f"one of {DISTRIBUTED_EXECUTOR_BACKENDS} or None",
                 self.distributed_executor_backend)
        if self.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
            raise InvalidArgumentError(
                "distributed_executor_backend='ray' needs Ray, which is not installed: "
                "pip install 'cacheflow-runtime[ray]' (or use 'mp' on one host)",
                field="distributed_executor_backend", value="ray")
