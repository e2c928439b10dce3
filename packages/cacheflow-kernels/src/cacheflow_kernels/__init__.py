"""cacheflow-kernels: CUDA kernels of cacheflow, exposed through Apache TVM-FFI.

One shared library (``lib/libcacheflow_kernels.so``) serves every Python version and any
DLPack framework (torch, JAX, CuPy). Importing this package imports neither torch nor
``tvm_ffi``: the library is loaded on the first kernel call.

Public API: :data:`__version__`, :data:`ABI_VERSION`, :func:`cuda_available`,
:func:`reshape_and_cache`.
"""

from __future__ import annotations

from ._cache_ops import reshape_and_cache
from ._cuda import cuda_device_count
from ._lib import library_path, load_library
from ._version import ABI_VERSION, __version__


def cuda_available() -> bool:
    """True when a CUDA device exists and the kernel library loads; False on any failure.

    The device check goes through the CUDA driver (``cuInit``/``cuDeviceGetCount`` via ctypes),
    so on a machine without CUDA this imports neither torch nor ``tvm_ffi``. Only when a device
    exists is the library loaded (which imports ``tvm_ffi``, and torch if installed).
    """
    if cuda_device_count() <= 0:
        return False
    try:
        load_library()
    except Exception:  # noqa: BLE001 - "not available", whatever the reason
        return False
    return True


__all__ = [
    "ABI_VERSION",
    "__version__",
    "cuda_available",
    "library_path",
    "reshape_and_cache",
]
