"""cacheflow-kernels: CUDA kernels of cacheflow, exposed through Apache TVM-FFI.

One shared library (``lib/libcacheflow_kernels.so``) serves every Python version and any
DLPack framework (torch, JAX, CuPy). Importing this package imports neither torch nor
``tvm_ffi``: the library is loaded on the first kernel call.

Public API: :data:`__version__`, :data:`ABI_VERSION`, :func:`cuda_available`,
:func:`reshape_and_cache`, :func:`paged_attention` (decode; with
:func:`paged_attention_workspace_size`, and :func:`paged_attention_with_rotary_cache`, fused with
the step's rotary embedding and KV-cache write), :func:`paged_prefill_attention`;
:func:`rms_norm`, :func:`fused_add_rms_norm`, :func:`rotary_embedding` (and
:func:`rotary_embedding_with_cache`, fused with the KV-cache write), :func:`silu_and_mul`,
:func:`gelu_and_mul`, :func:`gelu_new`, :func:`gelu_fast`, :func:`copy_blocks`,
:func:`swap_blocks`, :func:`moe_grouped_gemm` (mixture-of-experts grouped GEMM, with an
optional row gather and weighted scatter), :func:`moe_grouped_gemm_gated` (gate/up projection with
the gated activation fused), :func:`moe_sort_by_expert`, :func:`moe_sum_topk`.
"""

from __future__ import annotations

from ._activation_ops import gelu_and_mul, gelu_fast, gelu_new, silu_and_mul
from ._attention_ops import (
    PAGED_ATTENTION_BLOCK_SIZES,
    PAGED_ATTENTION_HEAD_SIZES,
    paged_attention,
    paged_attention_with_rotary_cache,
    paged_attention_workspace_size,
)
from ._block_ops import copy_blocks, swap_blocks
from ._cache_ops import reshape_and_cache
from ._cuda import cuda_device_count
from ._gemm_ops import (
    SKINNY_GEMM_ACTIVATIONS,
    SKINNY_GEMM_MAX_K,
    SKINNY_GEMM_MAX_ROWS,
    skinny_gemm,
)
from ._lib import library_path, load_library
from ._moe_ops import (
    MOE_ACTIVATIONS,
    MOE_GROUPED_GEMM_DTYPES,
    moe_grouped_gemm,
    moe_grouped_gemm_gated,
    moe_sort_by_expert,
    moe_sum_topk,
)
from ._norm_ops import fused_add_rms_norm, rms_norm
from ._prefill_ops import (
    PAGED_PREFILL_MAX_HEAD_SIZE,
    PAGED_PREFILL_TENSOR_CORE_HEAD_SIZES,
    paged_prefill_attention,
)
from ._rotary_ops import rotary_embedding, rotary_embedding_with_cache
from ._version import ABI_VERSION, __version__


def cuda_available() -> bool:
    """True when a CUDA device exists and the kernel library loads; False on any failure.

    The device check goes through the CUDA driver (``cuInit``/``cuDeviceGetCount`` via ctypes),
    so on a machine without CUDA this imports neither torch nor ``tvm_ffi``. Only when a device
    exists is the library loaded (which imports ``tvm_ffi``, and torch if installed).
    """
    if cuda_device_count() <= 0:
        return False
    try:
        load_library()
    except Exception:  # noqa: BLE001 - "not available", whatever the reason
        return False
    return True


__all__ = [
    "ABI_VERSION",
    "MOE_ACTIVATIONS",
    "MOE_GROUPED_GEMM_DTYPES",
    "PAGED_ATTENTION_BLOCK_SIZES",
    "PAGED_ATTENTION_HEAD_SIZES",
    "PAGED_PREFILL_MAX_HEAD_SIZE",
    "PAGED_PREFILL_TENSOR_CORE_HEAD_SIZES",
    "SKINNY_GEMM_ACTIVATIONS",
    "SKINNY_GEMM_MAX_K",
    "SKINNY_GEMM_MAX_ROWS",
    "__version__",
    "cuda_available",
    "library_path",
    "paged_attention",
    "paged_attention_with_rotary_cache",
    "paged_attention_workspace_size",
    "paged_prefill_attention",
    "reshape_and_cache",
    "rms_norm",
    "skinny_gemm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "rotary_embedding_with_cache",
    "silu_and_mul",
    "gelu_and_mul",
    "gelu_new",
    "gelu_fast",
    "copy_blocks",
    "swap_blocks",
    "moe_grouped_gemm",
    "moe_grouped_gemm_gated",
    "moe_sort_by_expert",
    "moe_sum_topk",
]
