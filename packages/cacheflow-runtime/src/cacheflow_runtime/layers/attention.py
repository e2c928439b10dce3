"""The two attention layers every model uses (the recipe of docs/adding_a_new_model.md)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from cacheflow_runtime.attention import InputMetadata, PagedAttention
from cacheflow_runtime.attention import cuda as cuda_backend
from cacheflow_runtime.kernels import attention_rotary_fusion_wanted
from cacheflow_runtime.layers.rotary_embedding import RotaryEmbedding

KVCache = Optional[tuple[torch.Tensor, torch.Tensor]]


class GPTCacheFlowAttention(PagedAttention):
    """Plain multi-head (or grouped-query) attention over the paged cache, no rotary embedding.

    ``forward(query, key, value, kv_cache, input_metadata)`` as PagedAttention.
    """


class GPTNeoXCacheFlowAttention(PagedAttention):
    """Attention with rotary embeddings applied to query and key first (neox or gpt-j style)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, rotary_dim: int,
                 max_position: int = 8192, base: float = 10000.0, is_neox_style: bool = True,
                 num_kv_heads: Optional[int] = None,
                 rope_scaling: Optional[dict[str, Any]] = None,
                 sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads,
                         sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
        self.rotary_emb = RotaryEmbedding(head_size, rotary_dim, max_position, base,
                                          is_neox_style, rope_scaling)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,  # type: ignore[override]
                key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                input_metadata: InputMetadata) -> torch.Tensor:
        """Rotates query and key at ``positions`` [num_tokens], then attends. On the cuda
        backend the rotation and the cache write may be one kernel
        (``RotaryEmbedding.forward_with_cache``), with the same results."""
        if kv_cache is not None and self.backend_for(query) is cuda_backend:
            k_scale, v_scale = self.cache_scales(kv_cache[0])
            out = self._decode_with_rotary_cache(positions, query, key, value, kv_cache,
                                                 input_metadata, k_scale, v_scale)
            if out is not None:
                return out
            if self.rotary_emb.forward_with_cache(positions, query, key, value, *kv_cache,
                                                  input_metadata.slot_mapping, k_scale,
                                                  v_scale):
                return self.attend_cached(query, kv_cache, input_metadata)
        query, key = self.rotary_emb(positions, query, key, input_metadata.query_lens,
                                     input_metadata.context_lens_host,
                                     input_metadata.prompt_lens)
        return super().forward(query, key, value, kv_cache, input_metadata)

    def _decode_with_rotary_cache(self, positions: torch.Tensor, query: torch.Tensor,
                                  key: torch.Tensor, value: torch.Tensor,
                                  kv_cache: tuple[torch.Tensor, torch.Tensor],
                                  input_metadata: InputMetadata, k_scale: float,
                                  v_scale: float) -> Optional[torch.Tensor]:
        """The decode step in one kernel (rotary, cache write and attention:
        ``cuda_backend.decode_with_rotary_cache``), or None where it does not apply."""
        if not attention_rotary_fusion_wanted(query.shape[0], self.num_kv_heads,
                                              query.device, self.num_heads,
                                              self.head_size) or (
                input_metadata.cascade is not None and self.takes_cascade):
            return None
        table = self.rotary_emb.kernel_table(positions, query, key)
        if table is None:
            return None
        out = cuda_backend.decode_with_rotary_cache(
            query, key, value, *kv_cache, input_metadata, self.scale, positions, table,
            self.rotary_emb.is_neox_style, sliding_window=self.sliding_window, k_scale=k_scale,
            v_scale=v_scale, logits_soft_cap=self.logits_soft_cap)
        return None if out is None else out.view(query.shape[0], self.num_heads * self.head_size)
