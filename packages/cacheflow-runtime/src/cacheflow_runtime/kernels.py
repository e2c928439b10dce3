"""The runtime's link to cacheflow-kernels: which ABI it was written against, checked at import."""

from __future__ import annotations

from types import ModuleType

import cacheflow_kernels

# The ABI_VERSION of cacheflow_kernels this runtime calls (and the package range in pyproject).
SUPPORTED_KERNELS_ABI = 1
SUPPORTED_KERNELS_RANGE = ">=0.1.0,<0.2"


def check_kernels(module: ModuleType = cacheflow_kernels) -> ModuleType:
    """Returns the kernels module, or raises ImportError saying which versions fit."""
    abi = getattr(module, "ABI_VERSION", None)
    if abi != SUPPORTED_KERNELS_ABI:
        raise ImportError(
            f"cacheflow-runtime needs cacheflow-kernels with ABI_VERSION {SUPPORTED_KERNELS_ABI} "
            f"(cacheflow-kernels{SUPPORTED_KERNELS_RANGE}), but the installed cacheflow-kernels "
            f"{getattr(module, '__version__', '?')} has ABI_VERSION {abi}; install a matching "
            f"version: pip install 'cacheflow-kernels{SUPPORTED_KERNELS_RANGE}'")
    return module


check_kernels()
