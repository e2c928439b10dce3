"""Helpers shared by the tests of the element-wise ops (norms, rotary, activations, block ops)."""

from __future__ import annotations

from typing import Any


class FakeCuda:
    """A CPU tensor that reports a CUDA device through ``__dlpack_device__`` (kDLCUDA = 2), so the
    Python checks can be driven past the device stage without a GPU."""

    def __init__(self, tensor: Any, index: int = 0) -> None:
        self.tensor, self.index = tensor, index
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.index)

    def is_contiguous(self) -> bool:
        return bool(self.tensor.is_contiguous())

    def stride(self) -> tuple[int, ...]:
        return tuple(self.tensor.stride())


def tolerance(dtype: Any) -> dict[str, float]:
    """``assert_close`` tolerances for a result rounded to ``dtype`` that may differ from the
    reference by one or two units in the last place (a float32 intermediate that rounds the other
    way)."""
    import torch

    return {
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    }[dtype]


def poisoned_like(x: Any) -> Any:
    """A tensor of the shape, dtype and device of ``x`` filled with NaN."""
    import torch

    return torch.full_like(x, float("nan"))


def misaligned(x: Any, offset: int = 1) -> Any:
    """A copy of ``x`` starting ``offset`` elements into a larger allocation (so 16-byte accesses
    are impossible)."""
    import torch

    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    view = buf[offset:].view(x.shape)
    view.copy_(x)
    return view
