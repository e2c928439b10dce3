"""The runtime's link to cacheflow-kernels: which ABI it was written against (checked at
import), and when layers may call its kernels instead of their torch code."""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch

import cacheflow_kernels

# The ABI_VERSION of cacheflow_kernels this runtime calls (and the package range in pyproject).
SUPPORTED_KERNELS_ABI = 5
SUPPORTED_KERNELS_RANGE = ">=0.3.0,<0.4"


def check_kernels(module: ModuleType = cacheflow_kernels) -> ModuleType:
    """Returns the kernels module, or raises ImportError saying which versions fit."""
    abi = getattr(module, "ABI_VERSION", None)
    if abi != SUPPORTED_KERNELS_ABI:
        raise ImportError(
            f"cacheflow-runtime needs cacheflow-kernels with ABI_VERSION {SUPPORTED_KERNELS_ABI} "
            f"(cacheflow-kernels{SUPPORTED_KERNELS_RANGE}), but the installed cacheflow-kernels "
            f"{getattr(module, '__version__', '?')} has ABI_VERSION {abi}; install a matching "
            f"version: pip install 'cacheflow-kernels{SUPPORTED_KERNELS_RANGE}'")
    return module


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def cuda_ready() -> bool:
    """True when cacheflow_kernels has a CUDA device and its library loads (checked once)."""
    return bool(cacheflow_kernels.cuda_available())


def kernels_for(*tensors: torch.Tensor) -> Optional[ModuleType]:
    """cacheflow_kernels when every tensor is a CUDA tensor of the first one's float dtype and
    the library has CUDA; else None, and the caller runs its torch code (CPU, other dtypes)."""
    first = tensors[0]
    if not first.is_cuda or first.dtype not in _FLOAT_DTYPES:
        return None
    if any(not t.is_cuda or t.dtype != first.dtype for t in tensors[1:]):
        return None
    return cacheflow_kernels if cuda_ready() else None


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def skinny_gemm_applies(x: torch.Tensor, weight: torch.Tensor, silu_gated: bool = False) -> bool:
    """Whether ``x @ weight.T`` goes to cacheflow_kernels.skinny_gemm instead of cuBLAS: unless
    CACHEFLOW_SKINNY_GEMM=0 (cuBLAS for every projection; the A/B knob), for one contiguous
    float16/bfloat16 CUDA row on compute capability 9.0+, a contiguous 16-byte-aligned weight
    of the same dtype and a row length the kernel takes (``silu_gated``:
    x is ``[gate | up]``, twice the weight's row length)."""
    ck = cacheflow_kernels
    # One row only: the kernel takes two, but at two rows it ran at 34-56% of the copy rate on
    # an H200 (2026-12-05; cuBLAS 59-95%), at one row at 70-100% (cuBLAS 60-95%).
    if x.dim() != 2 or x.shape[0] != 1 or getattr(ck, "SKINNY_GEMM_MAX_ROWS", 0) < 1:
        return False
    if os.environ.get("CACHEFLOW_SKINNY_GEMM") == "0":
        return False
    k = weight.shape[-1]
    return (x.shape[1] == (2 * k if silu_gated else k)
            and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.is_contiguous()
            and weight.dtype == x.dtype and weight.is_cuda and weight.is_contiguous()
            and k % 64 == 0 and k <= ck.SKINNY_GEMM_MAX_K and x.data_ptr() % 16 == 0
            and weight.data_ptr() % 16 == 0
            and _compute_capability(x.device.index or 0) >= (9, 0) and cuda_ready())


def skinny_fusion_enabled() -> bool:
    """Whether one-row steps run the RMS norms and residual adds of LLaMA-family layers inside
    skinny_gemm (norm in the qkv / gate_up GEMMs' prologue, residual add in the o / down GEMMs'
    epilogue: six kernels a layer instead of eight). On unless CACHEFLOW_SKINNY_FUSE=0: on an
    H200 (2026-12-05) the 7B decode step at batch 1 went from 3.934 to 3.836 ms."""
    return os.environ.get("CACHEFLOW_SKINNY_FUSE") != "0"


ATTN_ROTARY_FUSE_ENV = "CACHEFLOW_ATTN_ROTARY_FUSE"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: Query heads per KV head from which the decode kernel's small grids run CTAs of 16 heads
#: with more warps than a fused launch can (see attention_rotary_fusion_wanted), up to twice it.
_FUSED_GROUP_LIMIT = 16


def attention_rotary_fusion_wanted(num_seqs: int, num_kv_heads: int, device: torch.device,
                                   num_heads: int | None = None, head_size: int = 128) -> bool:
    """Whether a decode step of ``num_seqs`` rows on ``device`` rotates and stores the new token
    inside the decode attention kernel
    (cacheflow_kernels.paged_attention_with_rotary_cache: one kernel a layer instead of the
    rotary + cache kernel and the attention kernel).

    ``CACHEFLOW_ATTN_ROTARY_FUSE=1``: wherever it applies; ``=0``: never; unset (or any other
    value): on CUDA where the step's attention grid, num_seqs x num_kv_heads CTAs, has at most
    one CTA per multiprocessor. Such a step waits on each kernel's latency, and the fused kernel
    saves one launch and handoff a layer: the 7B decode step at batch 1 (32 CTAs) was 0.6-1.7%
    shorter on an H100 (2026-12-06, three runs). At batch 64 (2,048 CTAs) it was 2.3% longer:
    each of the many CTAs then stores and rotates before its first score, which the separate
    rotary kernel did for all of them at once. Not for 17-32 query heads per KV head
    (``num_heads // num_kv_heads``) at head sizes up to 128 (MQA of 32 heads, say): a fused
    launch runs one 4-warp CTA of 32 heads per KV head there, latency-bound, while the
    attention kernel alone splits the group over two CTAs of 12-16 warps (wide CTAs), which
    took 0.81-0.99x the time of the 4-warp plans before them on an H100 (2026-12-07): more than
    the launch and handoff the fusion saves (about 1%)."""
    value = os.environ.get(ATTN_ROTARY_FUSE_ENV)
    if value == "0" or getattr(cacheflow_kernels, "paged_attention_with_rotary_cache",
                               None) is None:
        return False
    if value == "1":
        return True
    group = (num_heads or num_kv_heads) // max(num_kv_heads, 1)
    if _FUSED_GROUP_LIMIT < group <= 2 * _FUSED_GROUP_LIMIT and head_size <= 128:
        return False
    return device.type == "cuda" and num_seqs * num_kv_heads <= _sm_count(device.index or 0)


def rotary_cache_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether cacheflow_kernels.rotary_embedding_with_cache takes these tensors (the rotary
    settings are the caller's to check): unless CACHEFLOW_ROTARY_CACHE=0 (the two kernels; the
    A/B knob), float16/bfloat16 CUDA ``query`` / ``key`` / ``value``
    ``[num_tokens, heads * head_size]`` with contiguous last dimensions, 16-byte aligned, rows a
    multiple of 8 elements apart; caches of their dtype or FP8, contiguous, 16-byte aligned,
    with a head size that is a multiple of 16."""
    if os.environ.get("CACHEFLOW_ROTARY_CACHE") == "0":
        return False
    if getattr(cacheflow_kernels, "rotary_embedding_with_cache", None) is None:
        return False
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if key_cache.dim() != 4 or key_cache.shape[-1] % 16:
        return False
    for t in (query, key, value):
        if (t.dim() != 2 or t.dtype != query.dtype or t.device != query.device
                or t.stride(-1) != 1 or t.data_ptr() % 16
                or (t.shape[0] > 1 and t.stride(0) % 8)):
            return False
    for c in (key_cache, value_cache):
        if (c.dtype not in (query.dtype, torch.float8_e4m3fn) or c.device != query.device
                or not c.is_contiguous() or c.data_ptr() % 16):
            return False
    return cuda_ready()


def cache_kernels_for(cache: torch.Tensor) -> Optional[ModuleType]:
    """cacheflow_kernels for a CUDA KV cache of any cache dtype (float or FP8: its block moves
    are bytewise) when the library has CUDA; else None."""
    if not cache.is_cuda or cache.dtype not in _FLOAT_DTYPES + (torch.float8_e4m3fn,):
        return None
    return cacheflow_kernels if cuda_ready() else None


check_kernels()
