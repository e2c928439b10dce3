"""PagedAttention: write this step's K/V into the paged cache, then attend over it."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Optional

import torch
from torch import nn

from cacheflow_runtime.attention import cascade, cuda, reference
from cacheflow_runtime.attention.metadata import InputMetadata

#: "auto": the cuda backend for CUDA tensors when cacheflow_kernels has CUDA (and the head size
#: is one its kernels support), else the reference backend; "reference": plain torch, any
#: device; "cuda": cacheflow_kernels (decode and prefill kernels).
BACKENDS = ("auto", "reference", "cuda")


class PagedAttention(nn.Module):
    """Multi-head attention (MHA, GQA, MQA) over a paged KV cache.

    Inputs are flattened over the batch: query [num_tokens, num_heads * head_size], key and value
    [num_tokens, num_kv_heads * head_size]. ``kv_cache`` is (key_cache, value_cache), each
    [num_blocks, block_size, num_kv_heads, head_size], or None during a profiling run (then no
    cache is written and attention runs over the new tokens only).

    ``sliding_window`` W (Mistral, Qwen2, Gemma): each query sees only the last W positions, its
    own included (HF's ``kv_idx > q_idx - W``); None attends to the whole context.

    ``logits_soft_cap`` c (Gemma 2): the scaled scores become ``c * tanh(scores / c)`` before
    masking and softmax; None leaves them as they are.

    ``backend``: one of BACKENDS. "auto" (default) picks per call: the cuda backend when the
    tensors are on a CUDA device and cacheflow_kernels.cuda_available(), else the reference
    backend. "cuda" raises ValueError when cacheflow_kernels has no CUDA.

    ``k_scale`` / ``v_scale`` (floats, 1.0 by default) are this layer's FP8 KV-cache scales:
    with a ``torch.float8_e4m3fn`` cache, keys are stored as ``key / k_scale`` and read back
    multiplied by it (values likewise); caches of the model's dtype ignore them. FP8
    checkpoints carry them as ``<attention module>.k_scale`` / ``.v_scale`` tensors, which
    :func:`load_kv_scale` puts here while a model loads its weights.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: Optional[int] = None, backend: str = "auto",
                 sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, "
                             f"got {sliding_window!r}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be a positive number or None, "
                             f"got {logits_soft_cap!r}")
        self.sliding_window = sliding_window
        self.logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuda" and not cuda.available():
            raise ValueError("attention backend 'cuda' needs cacheflow_kernels with CUDA, but "
                             "cacheflow_kernels.cuda_available() is False (no CUDA device, or "
                             "the kernel library is missing); use backend='auto' or 'reference'")
        if backend == "cuda" and not cuda.supports_head_size(head_size):
            raise ValueError(f"attention backend 'cuda' supports head sizes "
                             f"{cuda.head_sizes()}, got {head_size}; use "
                             f"backend='auto' or 'reference'")
        self.backend = backend
        self.k_scale = 1.0
        self.v_scale = 1.0

    @property
    def takes_cascade(self) -> bool:
        """Whether decode steps with a shared prefix may run cascade attention in this layer (no
        sliding window, no soft-capping: the prefix attention has neither)."""
        return self.sliding_window is None and self.logits_soft_cap is None

    def set_kv_scale(self, which: str, value: float) -> None:
        """Sets ``k_scale`` (``which="k"``), ``v_scale`` ("v") or both ("kv"); the value must
        be a finite number > 0."""
        if which not in ("k", "v", "kv"):
            raise ValueError(f"which must be 'k', 'v' or 'kv', got {which!r}")
        value = float(value)
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"a KV-cache scale must be a finite number > 0, got {value!r}")
        if "k" in which:
            self.k_scale = value
        if "v" in which:
            self.v_scale = value

    def backend_for(self, query: torch.Tensor) -> ModuleType:
        """The backend module (cuda or reference) that runs a step on ``query``'s device."""
        if self.backend == "reference":
            return reference
        if self.backend == "cuda":
            if not query.is_cuda:
                raise ValueError(f"attention backend 'cuda' needs CUDA tensors, got a tensor on "
                                 f"{query.device}")
            return cuda
        if query.is_cuda and cuda.available() and cuda.supports_head_size(self.head_size):
            return cuda
        return reference

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]],
                input_metadata: InputMetadata) -> torch.Tensor:
        """Returns the attention output [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        if kv_cache is None:
            out = _attend_without_cache(q, k, v, input_metadata, self.scale,
                                        self.sliding_window, self.logits_soft_cap)
            return out.view(num_tokens, self.num_heads * self.head_size)
        key_cache, value_cache = kv_cache
        k_scale, v_scale = self.cache_scales(key_cache)
        self.backend_for(q).reshape_and_cache(k, v, key_cache, value_cache,
                                              input_metadata.slot_mapping, k_scale, v_scale)
        return self.attend_cached(query, kv_cache, input_metadata)

    def cache_scales(self, key_cache: torch.Tensor) -> tuple[float, float]:
        """(k_scale, v_scale) for a write to or a read from ``key_cache``: this layer's scales
        for an FP8 cache; 1.0 for others (the kernels insist on it: the scales mean nothing
        there)."""
        if key_cache.dtype == torch.float8_e4m3fn:
            return self.k_scale, self.v_scale
        return 1.0, 1.0

    def attend_cached(self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                      input_metadata: InputMetadata) -> torch.Tensor:
        """Attention of ``query`` [num_tokens, num_heads * head_size] over the cache, whose
        slots already hold this step's keys and values (written by :meth:`forward`, or by a
        fused rotary-and-cache kernel); returns [num_tokens, num_heads * head_size]."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        key_cache, value_cache = kv_cache
        backend = self.backend_for(q)
        k_scale, v_scale = self.cache_scales(key_cache)
        if input_metadata.cascade is not None and self.takes_cascade:
            out = cascade.cascade_decode(backend, q, key_cache, value_cache,
                                         input_metadata.cascade, self.scale, k_scale, v_scale)
        else:
            out = backend.paged_attention(q, key_cache, value_cache, input_metadata, self.scale,
                                          sliding_window=self.sliding_window, k_scale=k_scale,
                                          v_scale=v_scale, logits_soft_cap=self.logits_soft_cap)
        return out.view(num_tokens, self.num_heads * self.head_size)


#: Checkpoint name suffixes of KV-cache scales (vLLM / llm-compressor FP8 checkpoints, whose
#: compressed-tensors form stores them as the K and V projections' output scales) and which
#: scale each sets; a module path ending in one of _PROJ_NAMES names the attention module above.
_KV_SCALE_SUFFIXES = {".k_scale": "k", ".v_scale": "v", ".kv_scale": "kv",
                      ".k_proj.output_scale": "k", ".v_proj.output_scale": "v"}
_PROJ_NAMES = (".k_proj", ".v_proj", ".qkv_proj", ".query_key_value")


def is_kv_scale_name(name: str) -> bool:
    """Whether a checkpoint tensor name is a KV-cache scale (``...k_scale``, ``...v_scale``,
    ``...kv_scale``, ``...k_proj.output_scale``, ``...v_proj.output_scale``)."""
    return name.endswith(tuple(_KV_SCALE_SUFFIXES))


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Loads a checkpoint's KV-cache scale into the PagedAttention layer it belongs to.

    ``name`` is the checkpoint name, e.g. ``model.layers.3.self_attn.k_scale`` (also
    ``...self_attn.k_proj.k_scale``, ``...self_attn.k_proj.output_scale``, the older single
    ``...kv_scale``, and on a fused projection ``...qkv_proj.k_scale`` or GPT-NeoX's
    ``...attention.query_key_value.k_scale``); the layer is the one
    PagedAttention module under that attention module (``self_attn.attn`` in the models here),
    so models need no name mapping of their own. ``tensor`` holds one number.

    Returns False when ``name`` is not a KV-cache scale or names no module with exactly one
    PagedAttention under it (the caller then reports it as unexpected); raises ValueError for a
    tensor of more than one element or a value that is not finite and > 0.
    """
    suffix = next((s for s in _KV_SCALE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return False
    path = name[: -len(suffix)]
    if path.endswith(_PROJ_NAMES):
        path = path[: path.rindex(".")]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    layers = [m for m in module.modules() if isinstance(m, PagedAttention)]
    if len(layers) != 1:
        return False
    if tensor.numel() != 1:
        raise ValueError(f"a KV-cache scale must hold one number, got a tensor of shape "
                         f"{list(tensor.shape)}")
    layers[0].set_kv_scale(_KV_SCALE_SUFFIXES[suffix], float(tensor.reshape(()).float()))
    return True


def _attend_without_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          metadata: InputMetadata, scale: float,
                          sliding_window: Optional[int] = None,
                          logits_soft_cap: Optional[float] = None) -> torch.Tensor:
    """Causal attention over only the new tokens of each sequence (profiling runs)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for q_len in metadata.query_lens:
        qs = q[start:start + q_len].transpose(0, 1)
        ks = k[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:start + q_len].repeat_interleave(group, dim=1).transpose(0, 1)
        pos = torch.arange(q_len, device=q.device)
        diff = pos[:, None] - pos[None, :]
        mask = diff >= 0
        if sliding_window is not None:
            mask = mask & (diff < sliding_window)
        if logits_soft_cap is not None:
            # SDPA has no soft-capping: the scores are formed here.
            scores = reference.soft_cap((qs.float() @ ks.float().transpose(-1, -2)) * scale,
                                        logits_soft_cap).masked_fill(~mask, float("-inf"))
            res = (torch.softmax(scores, dim=-1) @ vs.float()).to(q.dtype)
        elif sliding_window is None:
            res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                   scale=scale)
        else:
            res = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                                   scale=scale)
        out[start:start + q_len] = res.transpose(0, 1)
        start += q_len
    return out
