"""The attention front end over the paged KV cache."""

from cacheflow_runtime.attention.metadata import InputMetadata
from cacheflow_runtime.attention.paged_attention import PagedAttention

__all__ = ["InputMetadata", "PagedAttention"]
