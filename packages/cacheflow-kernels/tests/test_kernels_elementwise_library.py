"""The C++ checks of the element-wise ops in the built library, on any machine: called directly
(bypassing the Python checks) with CPU tensors, each raises ValueError naming the op and the
argument before any launch. Also proves that lists of tensors (copy_blocks) and strings
(gelu_and_mul) cross the TVM-FFI boundary."""

from __future__ import annotations

from typing import Any

import pytest

from cacheflow_kernels._lib import get_function, library_path

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not library_path().is_file(), reason=f"kernel library not built ({library_path()})"
)

EXPORTS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul",
           "gelu_new", "gelu_fast", "copy_blocks", "swap_blocks")


def _raw(name: str, *args: Any) -> str:
    with pytest.raises(ValueError) as info:
        get_function(name)(*args)
    msg = str(info.value)
    assert f"{name}: argument '" in msg, msg
    return msg


def h(*shape: int, dtype: Any = torch.float16) -> Any:
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("name", EXPORTS)
def test_exported(name: str) -> None:
    assert callable(get_function(name))


# ---- rms_norm / fused_add_rms_norm ----

def test_rms_norm_cpu() -> None:
    msg = _raw("rms_norm", h(3, 8), h(3, 8), h(8), 1e-6)
    assert "rms_norm: argument 'x' must be a CUDA tensor, got a tensor on cpu" in msg


@pytest.mark.parametrize(
    ("args", "fragment"),
    [((h(3, 8), h(3, 8, dtype=torch.float64), h(8), 1e-6),
      "argument 'x' must be float16, bfloat16 or float32, got float64"),
     ((h(3, 8), h(3, 8), h(8, dtype=torch.float32), 1e-6),
      "argument 'weight' must be float16 like 'x', got float32"),
     ((h(3, 8), h(3, 8), h(9), 1e-6), "argument 'weight' must be of shape [8]"),
     ((h(3, 9), h(3, 8), h(8), 1e-6), "argument 'out' must be of shape [3, 8] like 'x'"),
     ((h(3, 8), h(3, 8), h(8), -1.0), "argument 'eps' must be a finite float >= 0"),
     ((h(3, 8), h(3, 16)[:, ::2], h(8), 1e-6), "argument 'x' must be contiguous"),
     ((h(3, 8), h(24), h(8), 1e-6), "argument 'x' must be 2-D")],
)
def test_rms_norm_checks(args: tuple[Any, ...], fragment: str) -> None:
    assert fragment in _raw("rms_norm", *args)


def test_fused_add_rms_norm_checks() -> None:
    assert "argument 'x' must be a CUDA tensor" in _raw(
        "fused_add_rms_norm", h(3, 8), h(3, 8), h(8), 1e-6)
    assert "argument 'residual' must be of shape [3, 8] like 'x'" in _raw(
        "fused_add_rms_norm", h(3, 8), h(4, 8), h(8), 1e-6)
    assert "argument 'residual' must be contiguous" in _raw(
        "fused_add_rms_norm", h(3, 8), h(3, 16)[:, ::2], h(8), 1e-6)


# ---- rotary_embedding ----

def _rot(**over: Any) -> tuple[Any, ...]:
    args = {"positions": torch.arange(3), "query": h(3, 32), "key": h(3, 16),
            "cos_sin_cache": torch.randn(8, 16), "head_size": 16, "is_neox": True}
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize(
    ("over", "fragment"),
    [({}, "argument 'positions' must be a CUDA tensor, got a tensor on cpu"),
     ({"positions": torch.arange(3).int()}, "argument 'positions' must be int64"),
     ({"query": h(3, 30)}, "argument 'query' must be of shape [num_tokens, num_heads * head_size]"
                           " with a last dimension divisible by head_size=16"),
     ({"key": h(4, 16)}, "argument 'key' must be of shape [3, ...]"),
     ({"key": h(3, 16, dtype=torch.bfloat16)}, "argument 'key' must be float16 like 'query'"),
     ({"query": h(3, 64)[:, ::2]}, "argument 'query' must be contiguous in its last dimension"),
     ({"cos_sin_cache": torch.randn(8, 18)}, "rot_dim even, >= 2 and <= head_size=16"),
     ({"cos_sin_cache": torch.randn(8, 16).half()}, "argument 'cos_sin_cache' must be float32"),
     ({"cos_sin_cache": torch.randn(16, 8).t()}, "argument 'cos_sin_cache' must be contiguous"),
     ({"head_size": 0}, "argument 'head_size' must be a positive integer")],
)
def test_rotary_checks(over: dict[str, Any], fragment: str) -> None:
    assert fragment in _raw("rotary_embedding", *_rot(**over))


def test_rotary_accepts_row_strided_views() -> None:
    qkv = h(3, 32 + 16 + 16)
    msg = _raw("rotary_embedding", *_rot(query=qkv[:, :32], key=qkv[:, 32:48]))
    assert "argument 'positions' must be a CUDA tensor" in msg


# ---- activations ----

@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_new", "gelu_fast"])
def test_activation_cpu(name: str) -> None:
    out = h(3, 4) if name == "silu_and_mul" else h(3, 8)
    assert f"{name}: argument 'x' must be a CUDA tensor" in _raw(name, out, h(3, 8))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul_string_argument(approximate: str) -> None:
    assert "argument 'x' must be a CUDA tensor" in _raw("gelu_and_mul", h(3, 4), h(3, 8),
                                                        approximate)


def test_gelu_and_mul_bad_approximate() -> None:
    msg = _raw("gelu_and_mul", h(3, 4), h(3, 8), "erf")
    assert "argument 'approximate' must be 'none' or 'tanh', got 'erf'" in msg


@pytest.mark.parametrize(
    ("name", "out", "x", "fragment"),
    [("silu_and_mul", h(3, 4), h(3, 7), "an even last dimension"),
     ("silu_and_mul", h(3, 8), h(3, 8), "argument 'out' must be of shape [3, 4]"),
     ("silu_and_mul", h(3, 4, dtype=torch.float32), h(3, 8), "'out' must be float16 like 'x'"),
     ("silu_and_mul", h(3, 4), h(3, 16)[:, ::2], "argument 'x' must be contiguous"),
     ("gelu_new", h(3, 7), h(3, 8), "argument 'out' must be of shape [3, 8] like 'x'"),
     ("gelu_fast", h(3, 8), h(3, 8, dtype=torch.int32), "float16, bfloat16 or float32")],
)
def test_activation_checks(name: str, out: Any, x: Any, fragment: str) -> None:
    assert fragment in _raw(name, out, x)


# ---- copy_blocks (lists of tensors through TVM-FFI) ----

def _caches(n: int = 3, shape: tuple[int, ...] = (4, 2, 2, 8)) -> list[Any]:
    return [h(*shape) for _ in range(n)]


def test_copy_blocks_cpu() -> None:
    msg = _raw("copy_blocks", _caches(), _caches(), torch.zeros(2, 2, dtype=torch.int64))
    assert "copy_blocks: argument 'block_mapping' must be a CUDA tensor" in msg


def test_copy_blocks_checks_every_layer() -> None:
    values = _caches()
    values[2] = h(4, 2, 2, 4)
    msg = _raw("copy_blocks", _caches(), values, torch.zeros(2, 2, dtype=torch.int64))
    assert "argument 'value_caches[2]' must be of shape [4, 2, 2, 8] like 'key_caches[0]'" in msg
    keys = _caches()
    keys[1] = keys[1].float()
    msg = _raw("copy_blocks", keys, _caches(), torch.zeros(2, 2, dtype=torch.int64))
    assert "argument 'key_caches[1]' must be float16 like 'key_caches[0]'" in msg


def test_copy_blocks_list_lengths() -> None:
    msg = _raw("copy_blocks", _caches(3), _caches(2), torch.zeros(2, 2, dtype=torch.int64))
    assert "argument 'value_caches' must be a list of 3 tensors" in msg


def test_copy_blocks_mapping_shape() -> None:
    msg = _raw("copy_blocks", _caches(), _caches(), torch.zeros(2, 3, dtype=torch.int64))
    assert "argument 'block_mapping' must be of shape [num_pairs, 2]" in msg


# ---- swap_blocks ----

def test_swap_blocks_two_cpu_tensors() -> None:
    msg = _raw("swap_blocks", h(4, 8), h(4, 8), torch.zeros(1, 2, dtype=torch.int64))
    assert "argument 'dst' must be a CUDA tensor when 'src' is on the CPU" in msg


@pytest.mark.parametrize(
    ("src", "dst", "mapping", "fragment"),
    [(h(4, 8), h(4, 9), torch.zeros(1, 2, dtype=torch.int64), "with the block shape of 'src'"),
     (h(4, 8), h(4, 8, dtype=torch.float32), torch.zeros(1, 2, dtype=torch.int64),
      "'dst' must be float16 like 'src'"),
     (h(4, 8), h(4, 8), torch.zeros(1, 3, dtype=torch.int64), "[num_pairs, 2]"),
     (h(4, 8), h(4, 16)[:, ::2], torch.zeros(1, 2, dtype=torch.int64), "'dst' must be contiguous")],
)
def test_swap_blocks_checks(src: Any, dst: Any, mapping: Any, fragment: str) -> None:
    assert fragment in _raw("swap_blocks", src, dst, mapping)
