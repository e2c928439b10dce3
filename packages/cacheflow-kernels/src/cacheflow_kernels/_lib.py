"""Locating and lazily loading the kernel library (``libcacheflow_kernels.so``) with TVM-FFI.

``tvm_ffi`` is imported only here, on first use: importing it also imports torch when torch is
installed, and ``import cacheflow_kernels`` must stay free of both.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._version import ABI_VERSION, __version__

#: Environment variable naming a library file to load instead of the packaged one
#: (e.g. a plain-CMake build: ``$CACHEFLOW_KERNELS_LIBRARY=build/.../libcacheflow_kernels.so``).
LIBRARY_ENV = "CACHEFLOW_KERNELS_LIBRARY"

_lock = threading.Lock()
_module: Any = None
_functions: dict[str, Callable[..., Any]] = {}


def _library_file_name() -> str:
    if sys.platform == "win32":
        return "cacheflow_kernels.dll"
    if sys.platform == "darwin":
        return "libcacheflow_kernels.dylib"
    return "libcacheflow_kernels.so"


def library_path() -> Path:
    """Path of the kernel library that :func:`load_library` loads.

    ``$CACHEFLOW_KERNELS_LIBRARY`` when set, else ``cacheflow_kernels/lib/<lib>`` inside the
    installed package.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "lib" / _library_file_name()


def load_library() -> Any:
    """Load the kernel library once per process and return its ``tvm_ffi.Module``.

    Raises:
        RuntimeError: the file is missing, or its ABI version differs from ``ABI_VERSION``.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        path = library_path()
        if not path.is_file():
            raise RuntimeError(
                f"cacheflow_kernels {__version__}: kernel library not found at {path}; "
                "install the cacheflow-kernels wheel (built with CUDA) or set "
                f"{LIBRARY_ENV} to a built libcacheflow_kernels"
            )
        import tvm_ffi  # deferred: imports torch when torch is installed

        module = tvm_ffi.load_module(str(path))
        abi = int(module.abi_version())
        if abi != ABI_VERSION:
            raise RuntimeError(
                f"cacheflow_kernels {__version__}: library {path} has ABI version {abi}, "
                f"the Python package expects {ABI_VERSION}; rebuild or reinstall the wheel"
            )
        _module = module
        return module


def get_function(name: str) -> Callable[..., Any]:
    """The exported function ``name`` of the kernel library (loading it on first use)."""
    fn = _functions.get(name)
    if fn is None:
        fn = load_library()[name]
        _functions[name] = fn
    return fn
