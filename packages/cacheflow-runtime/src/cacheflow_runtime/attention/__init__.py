"""The attention front end over the paged KV cache."""

from cacheflow_runtime.attention.metadata import InputMetadata
from cacheflow_runtime.attention.paged_attention import (
    PagedAttention,
    is_kv_scale_name,
    load_kv_scale,
)

__all__ = ["InputMetadata", "PagedAttention", "is_kv_scale_name", "load_kv_scale"]
