"""Shared pieces of the grouped expert GEMM tests (GPU and CPU emulation): the values of
``CACHEFLOW_MOE_GEMM`` and the segment offsets of per-expert row counts."""

from __future__ import annotations

from typing import Any

# The mma tiles of the grouped GEMM, by their CACHEFLOW_MOE_GEMM names.
TILES = ["128x256", "128x256s3", "128x128", "64x128", "32x128"]
# Values of CACHEFLOW_MOE_GEMM: the automatic choice, the original WMMA kernel, each mma tile.
VARIANTS = ["auto", "wmma", *TILES]


def segment_offsets(counts: list[int], device: str = "cuda") -> Any:
    """int64 offsets ``[0, c0, c0 + c1, ...]`` of consecutive per-expert row segments."""
    import torch  # the kernels package (and its arg-check tests) install without torch

    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return torch.tensor(out, dtype=torch.int64, device=device)
