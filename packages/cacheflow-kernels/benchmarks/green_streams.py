"""Two torch streams on disjoint sets of SMs (CUDA green contexts through the driver API).

torch's own ``GreenContext.create(num_sms)`` takes the first ``num_sms`` SMs every time, so two
of them overlap; here the device's SMs are split once into a group of ``first_sms`` and the
rest, and each part gets a green context and a stream. A benchmark can then run one kind of
kernel on each part at the same time, with neither able to take the other's SMs.

Needs a CUDA 12.4+ driver (``libcuda.so.1``); ``split_streams`` raises ``RuntimeError`` naming
the driver call that failed.
"""

from __future__ import annotations

import ctypes
from typing import Any

_RESOURCE_BYTES = 144  # sizeof(CUdevResource), ABI version 1: type, 92 bytes padding, 48 union
_SM_COUNT_OFFSET = 96  # CUdevResource.sm.smCount
_RESOURCE_TYPE_SM = 1
_GREEN_CTX_DEFAULT_STREAM = 1
_STREAM_NON_BLOCKING = 1

_Resource = ctypes.c_ubyte * _RESOURCE_BYTES


def _check(driver: Any, name: str, *args: Any) -> None:
    code = getattr(driver, name)(*args)
    if code != 0:
        raise RuntimeError(f"{name} failed with CUresult {code}")


def _sm_count(resource: Any) -> int:
    return int.from_bytes(bytes(resource[_SM_COUNT_OFFSET:_SM_COUNT_OFFSET + 4]), "little")


def split_streams(torch: Any, first_sms: int, device: int = 0) -> tuple[Any, Any, int, int]:
    """(stream on ``first_sms`` SMs, stream on the remaining SMs, SMs of each part) for CUDA
    device ``device``. The driver rounds ``first_sms`` up to its partition granularity (8 on
    Hopper); the actual counts are returned. The green contexts live as long as the process."""
    torch.cuda.init()
    torch.zeros(1, device=f"cuda:{device}")  # the primary context first, as the driver advises
    driver = ctypes.CDLL("libcuda.so.1")
    handle = ctypes.c_int()
    _check(driver, "cuDeviceGet", ctypes.byref(handle), device)
    whole, group, rest = _Resource(), _Resource(), _Resource()
    _check(driver, "cuDeviceGetDevResource", handle, ctypes.byref(whole), _RESOURCE_TYPE_SM)
    groups = ctypes.c_uint(1)
    _check(driver, "cuDevSmResourceSplitByCount", ctypes.byref(group), ctypes.byref(groups),
           ctypes.byref(whole), ctypes.byref(rest), 0, first_sms)
    if groups.value != 1:
        raise RuntimeError(f"cannot split {first_sms} SMs off this device")
    streams = []
    for part in (group, rest):
        desc, green, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(driver, "cuDevResourceGenerateDesc", ctypes.byref(desc), ctypes.byref(part), 1)
        _check(driver, "cuGreenCtxCreate", ctypes.byref(green), desc, handle,
               _GREEN_CTX_DEFAULT_STREAM)
        _check(driver, "cuGreenCtxStreamCreate", ctypes.byref(stream), green,
               _STREAM_NON_BLOCKING, 0)
        streams.append(torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device)))
    return streams[0], streams[1], _sm_count(group), _sm_count(rest)
