"""The attention front end over the paged KV cache."""

from cacheflow_runtime.attention.metadata import InputMetadata, build_input_metadata
from cacheflow_runtime.attention.paged_attention import (
    PagedAttention,
    is_kv_scale_name,
    load_kv_scale,
)

__all__ = ["InputMetadata", "PagedAttention", "build_input_metadata", "is_kv_scale_name",
           "load_kv_scale"]
