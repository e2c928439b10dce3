"""Package-level behaviour that holds on any machine: imports, versions, cuda_available."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cacheflow_kernels

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120,
    )


def test_import_does_not_import_torch_or_tvm_ffi() -> None:
    code = (
        "import sys, cacheflow_kernels\n"
        "bad = [m for m in ('torch', 'tvm_ffi') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_validation_does_not_import_torch_or_tvm_ffi() -> None:
    """Argument checks run on plain duck-typed objects without importing any framework."""
    code = (
        "import sys, cacheflow_kernels\n"
        "class T:\n"
        "    def __init__(self, shape, dtype='float16'):\n"
        "        self.shape, self.dtype = shape, dtype\n"
        "    def __dlpack_device__(self): return (1, 0)\n"
        "    def is_contiguous(self): return True\n"
        "try:\n"
        "    cacheflow_kernels.reshape_and_cache(T((3, 2, 8)), T((3, 2, 8)), T((4, 2, 2, 8)),\n"
        "                                        T((4, 2, 2, 8)), T((3,), 'int64'))\n"
        "except ValueError as e:\n"
        "    assert 'CUDA tensor' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ValueError')\n"
        "assert 'torch' not in sys.modules and 'tvm_ffi' not in sys.modules\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_versions() -> None:
    assert cacheflow_kernels.__version__ == "0.3.0"
    assert isinstance(cacheflow_kernels.ABI_VERSION, int)
    assert cacheflow_kernels.ABI_VERSION >= 1


def test_version_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = PACKAGE_DIR / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not run from a source tree")
    with pyproject.open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert cacheflow_kernels.__version__ == version


def test_cuda_available_false_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cacheflow_kernels.cuda_available() is False


def test_cuda_available_without_cuda_imports_nothing() -> None:
    """On a CPU machine, cuda_available() answers from the driver alone."""
    code = (
        "import sys, cacheflow_kernels\n"
        "r = cacheflow_kernels.cuda_available()\n"
        "assert isinstance(r, bool)\n"
        "print(r, 'torch' in sys.modules)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    available, torch_imported = result.stdout.split()
    if available == "False":
        assert torch_imported == "False"


def test_public_functions_are_documented_and_typed() -> None:
    for name in ("cuda_available", "reshape_and_cache", "library_path"):
        fn = getattr(cacheflow_kernels, name)
        assert inspect.getdoc(fn), name
        assert "return" in fn.__annotations__, name
    doc = inspect.getdoc(cacheflow_kernels.reshape_and_cache)
    for word in ("[num_tokens, num_kv_heads, head_size]",
                 "[num_blocks, block_size, num_kv_heads, head_size]", "int64", "bfloat16"):
        assert word in doc


def test_library_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "libx.so"
    monkeypatch.setenv("CACHEFLOW_KERNELS_LIBRARY", str(target))
    assert cacheflow_kernels.library_path() == target


def test_missing_library_raises_runtime_error(tmp_path: Path) -> None:
    code = (
        "import cacheflow_kernels\n"
        "from cacheflow_kernels._lib import load_library\n"
        "try:\n"
        "    load_library()\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError', e)\n"
    )
    result = _run_python(code, CACHEFLOW_KERNELS_LIBRARY=str(tmp_path / "missing.so"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RuntimeError")
    assert "missing.so" in result.stdout
