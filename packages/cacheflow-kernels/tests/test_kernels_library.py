"""The built library on any machine: it loads without CUDA, reports its ABI, links only what it
should, and its C++ checks raise ValueError before any launch (called directly, bypassing the
Python checks, with CPU tensors)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

import cacheflow_kernels
from cacheflow_kernels._lib import get_function, library_path, load_library

from kernels_testutil import make_args

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not library_path().is_file(), reason=f"kernel library not built ({library_path()})"
)

ORDER = ("key", "value", "key_cache", "value_cache", "slot_mapping")


def test_abi_version_matches() -> None:
    assert int(load_library().abi_version()) == cacheflow_kernels.ABI_VERSION


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_needs_no_torch_python_or_cudart() -> None:
    out = subprocess.run(
        ["readelf", "-d", str(library_path())], capture_output=True, text=True, check=True
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert "libtvm_ffi.so" in needed
    for lib in needed:
        assert not lib.startswith(("libtorch", "libc10", "libpython", "libcudart", "libcuda.")), lib


def _raw_call(args: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        get_function("reshape_and_cache")(*(args[name] for name in ORDER), 1.0, 1.0)
    return str(info.value)


def test_cpp_rejects_cpu_tensors() -> None:
    msg = _raw_call(make_args())
    assert "reshape_and_cache: argument 'key' must be a CUDA tensor, got a tensor on cpu" in msg


def test_cpp_rejects_wrong_key_dtype() -> None:
    args = make_args()
    args["key"] = args["key"].double()
    assert "argument 'key' must be float16, bfloat16 or float32, got float64" in _raw_call(args)


@pytest.mark.parametrize("arg", ["value", "key_cache", "value_cache"])
def test_cpp_rejects_dtype_mismatch(arg: str) -> None:
    args = make_args(torch.float16)
    args[arg] = args[arg].float()
    like = "key_cache" if arg == "value_cache" else "key"
    msg = _raw_call(args)
    assert f"argument '{arg}' must be float16 like '{like}'" in msg and "got float32" in msg


def test_cpp_rejects_slot_dtype() -> None:
    args = make_args()
    args["slot_mapping"] = args["slot_mapping"].int()
    assert "argument 'slot_mapping' must be int64, got int32" in _raw_call(args)


@pytest.mark.parametrize(
    ("arg", "shape", "fragment"),
    [
        ("key", (5, 16), "must be 3-D"),
        ("value", (4, 2, 8), "must be of shape [5, 2, 8] like 'key', got [4, 2, 8]"),
        ("key_cache", (4, 3, 2, 4), "got [4, 3, 2, 4]"),
        ("key_cache", (4, 3, 16), "must be 4-D"),
        ("value_cache", (4, 2, 2, 8), "like 'key_cache', got [4, 2, 2, 8]"),
        ("slot_mapping", (6,), "must be of shape [5]"),
    ],
)
def test_cpp_rejects_shapes(arg: str, shape: tuple[int, ...], fragment: str) -> None:
    args = make_args()
    args[arg] = torch.zeros(shape, dtype=args[arg].dtype)
    msg = _raw_call(args)
    assert f"argument '{arg}'" in msg and fragment in msg, msg


@pytest.mark.parametrize("arg", ORDER)
def test_cpp_rejects_non_contiguous(arg: str) -> None:
    args = make_args()
    args[arg] = torch.stack([args[arg], args[arg]], dim=-1)[..., 0]
    assert f"argument '{arg}' must be contiguous" in _raw_call(args)
