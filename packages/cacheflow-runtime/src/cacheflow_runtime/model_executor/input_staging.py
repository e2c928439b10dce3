"""One host-to-device copy per step for the step's model inputs.

A step's inputs (token ids, positions, block tables, slots, sequence offsets, the rows the
sampler reads) are a handful of small integer arrays. Copied one by one from pageable memory,
each is a separate transfer that the driver stages through its own pinned buffer before the
call returns. :class:`InputStaging` packs them into one pinned buffer instead, copies that with
a single asynchronous transfer into a device buffer, and hands out typed views of it.

Buffers rotate over ``num_slots`` slots: a slot is written again only after the copy that last
read it has run (a CUDA event), and its device buffer only by a copy queued on the same stream
after every kernel of the step that used it, so a step's views stay valid while later steps
are prepared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

# Each array starts on a 16-byte boundary, so every view is aligned for its dtype and for
# 16-byte vector loads.
_ALIGN = 16


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32}


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    found = _TORCH_DTYPES.get(dtype)
    return found if found is not None else torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class InputStaging:
    """Uploads a step's host arrays to ``device`` in one copy (see the module docstring).

    On a CPU device the arrays are only wrapped (the tensors share their memory), unless
    ``pack_on_cpu`` asks for the same packing as on CUDA (which tests use to check it without a
    GPU).
    """

    def __init__(self, device: torch.device, num_slots: int = 2,
                 pack_on_cpu: bool = False) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self.device = device
        self._packed = device.type == "cuda" or pack_on_cpu
        self._pin = device.type == "cuda"
        self._host: list[Optional[torch.Tensor]] = [None] * num_slots
        self._dev: list[Optional[torch.Tensor]] = [None] * num_slots
        self._copied: list[Optional[torch.cuda.Event]] = [None] * num_slots
        self._next = 0

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Tensors on the device with the values, dtypes and shapes of ``arrays`` (numeric
        NumPy arrays). A packed upload copies them; on an unpacked CPU device the tensors are
        the arrays themselves, so the caller must not modify them afterwards."""
        if not self._packed:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += _aligned(a.nbytes)
        slot = self._next
        self._next = (slot + 1) % len(self._host)
        host, dev = self._buffers(slot, max(total, _ALIGN))
        staged = host.numpy()
        for a, off in zip(arrays, offsets):
            staged[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        dev[:total].copy_(host[:total], non_blocking=self._pin)
        if self._pin:
            event = self._copied[slot] or torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[slot] = event
        out = []
        for a, off in zip(arrays, offsets):
            out.append(dev[off:off + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape))
        return out

    def _buffers(self, slot: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s host and device buffers with room for ``nbytes``, once the last
        copy out of the host buffer has run."""
        event = self._copied[slot]
        if event is not None:
            event.synchronize()
        host, dev = self._host[slot], self._dev[slot]
        if host is None or host.numel() < nbytes:
            size = max(nbytes, 2 * (host.numel() if host is not None else 0), 1 << 16)
            host = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
            dev = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._host[slot], self._dev[slot] = host, dev
        assert dev is not None
        return host, dev
