"""CUDA device detection through the driver API (ctypes over libcuda), without torch."""

from __future__ import annotations

import ctypes
import sys

_CUDA_SUCCESS = 0


def _driver_library_name() -> str:
    return "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 on any failure (no driver, no device).

    Calls ``cuInit(0)`` and ``cuDeviceGetCount``. Like any CUDA initialisation in a process,
    this makes CUDA unusable in children created later with ``fork`` (use ``spawn``).
    """
    try:
        lib = ctypes.CDLL(_driver_library_name())
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuInit.restype = ctypes.c_int
        lib.cuDeviceGetCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cuDeviceGetCount.restype = ctypes.c_int
        if lib.cuInit(0) != _CUDA_SUCCESS:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS:
            return 0
        return max(int(count.value), 0)
    except Exception:  # noqa: BLE001 - any failure means "no usable CUDA"
        return 0
