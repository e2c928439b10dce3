"""paged_prefill_attention's argument checks on CPU tensors (no CUDA needed).

The Python checks must fire before the kernel library is touched (``get_function`` is a tripwire
in those tests); the C++ checks are exercised by calling the library directly, where it is built.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from prefill_testutil import ARG_ORDER, FakeCuda, small_cpu_args

import cacheflow_kernels
from cacheflow_kernels import _prefill_ops
from cacheflow_kernels._lib import library_path

torch = pytest.importorskip("torch")

OP = "paged_prefill_attention"
SCALE = 0.125


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> Any:
        raise AssertionError(f"library touched ({name}) before arguments were validated")

    monkeypatch.setattr(_prefill_ops, "get_function", fail)


def _call(args: dict[str, Any], scale: Any = SCALE, max_query_len: Any = None,
          sliding_window: Any = None) -> None:
    cacheflow_kernels.paged_prefill_attention(
        *(args[name] for name in ARG_ORDER), scale, max_query_len, sliding_window=sliding_window
    )


def _expect(args: dict[str, Any], arg: str, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as info:
        _call(args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{OP}: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def _fake_cuda(args: dict[str, Any]) -> dict[str, Any]:
    return {k: FakeCuda(v) for k, v in args.items()}


# ---- Python checks (tripwire armed). ----

@pytest.mark.usefixtures("tripwire")
def test_cpu_tensors_need_cuda() -> None:
    _expect(small_cpu_args(), "query", "a CUDA tensor", "got a tensor on cpu")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("arg", [a for a in ARG_ORDER if a != "query"])
def test_cpu_argument_among_cuda_ones(arg: str) -> None:
    args = {k: v if k == arg else FakeCuda(v) for k, v in small_cpu_args().items()}
    _expect(args, arg, "on the same device as 'query' (cuda:0)", "got cpu")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("arg", [a for a in ARG_ORDER if a != "query"])
def test_other_cuda_device(arg: str) -> None:
    args = {k: FakeCuda(v, 1 if k == arg else 0) for k, v in small_cpu_args().items()}
    _expect(args, arg, "on the same device as 'query' (cuda:0)", "got cuda:1")


@pytest.mark.usefixtures("tripwire")
def test_query_dtype() -> None:
    args = small_cpu_args()
    args["query"] = args["query"].double()
    _expect(args, "query", "float16, bfloat16 or float32", "got float64")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("arg", ["out", "key_cache", "value_cache"])
def test_dtype_must_match_query(arg: str) -> None:
    args = small_cpu_args(torch.float16)
    args[arg] = args[arg].to(torch.bfloat16)
    like = "float16 like 'key_cache'" if arg == "value_cache" else "float16 like 'query'"
    _expect(args, arg, f"of dtype {like}", "got bfloat16")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("arg", ["block_tables", "query_start_loc", "context_lens"])
def test_int32_metadata(arg: str) -> None:
    args = small_cpu_args()
    args[arg] = args[arg].long()
    _expect(args, arg, "of dtype int32", "got int64")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize(
    ("arg", "shape", "fragments"),
    [
        ("query", (5, 256), ("a 3-D tensor [num_tokens, num_heads, head_size]",)),
        ("out", (5, 4, 32), ("of shape [num_tokens=5, num_heads=4, head_size=64]",)),
        ("out", (6, 4, 64), ("num_tokens=5", "got [6, 4, 64]")),
        ("key_cache", (6, 4, 2, 32), ("head_size=64", "got [6, 4, 2, 32]")),
        ("key_cache", (6, 4, 3, 64), ("num_kv_heads dividing num_heads=4", "[6, 4, 3, 64]")),
        ("key_cache", (6, 0, 2, 64), ("of block_size >= 1",)),
        ("key_cache", (6, 4, 128), ("a 4-D tensor",)),
        ("value_cache", (6, 4, 1, 64), ("num_kv_heads=2", "got [6, 4, 1, 64]")),
        ("value_cache", (7, 4, 2, 64), ("num_blocks=", "got [7, 4, 2, 64]")),
        ("block_tables", (2,), ("a 2-D tensor [num_seqs, max_blocks_per_seq]",)),
        ("query_start_loc", (2,), ("of shape [num_seqs + 1=3]", "got [2]")),
        ("context_lens", (3,), ("of shape [num_seqs=2]", "got [3]")),
    ],
)
def test_shapes(arg: str, shape: tuple[int, ...], fragments: tuple[str, ...]) -> None:
    args = small_cpu_args()
    args[arg] = torch.zeros(shape, dtype=args[arg].dtype)
    _expect(args, arg, *fragments)


@pytest.mark.usefixtures("tripwire")
def test_key_cache_with_zero_kv_heads() -> None:
    args = small_cpu_args()
    args["key_cache"] = torch.zeros(6, 4, 0, 64, dtype=args["key_cache"].dtype)
    _expect(args, "key_cache", "num_kv_heads dividing num_heads=4")


@pytest.mark.usefixtures("tripwire")
def test_head_size_too_large() -> None:
    args = small_cpu_args()
    shape = args["query"].shape[:2] + (264,)
    for name in ("query", "out"):
        args[name] = torch.zeros(shape, dtype=args[name].dtype)
    for name in ("key_cache", "value_cache"):
        args[name] = torch.zeros(args[name].shape[:3] + (264,), dtype=args[name].dtype)
    _expect(args, "query", "of head_size between 1 and 256")


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("scale", [0.0, -0.5, math.inf, math.nan])
def test_scale_value(scale: float) -> None:
    _expect(_fake_cuda(small_cpu_args()), "scale", "a finite number > 0", scale=scale)


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("scale", ["0.1", True, None])
def test_scale_type(scale: Any) -> None:
    _expect(_fake_cuda(small_cpu_args()), "scale", "a real number", scale=scale)


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize(("value", "fragment"), [(-1, ">= 0 (or None)"), (2.0, "an int or None"),
                                                 (True, "an int or None"), ("3", "an int")])
def test_max_query_len(value: Any, fragment: str) -> None:
    _expect(_fake_cuda(small_cpu_args()), "max_query_len", fragment, max_query_len=value)


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize(("value", "fragment"), [(0, ">= 1 (or None)"), (-3, ">= 1"),
                                                 (4.0, "an int or None"), (True, "an int")])
def test_sliding_window(value: Any, fragment: str) -> None:
    _expect(_fake_cuda(small_cpu_args()), "sliding_window", fragment, sliding_window=value)


@pytest.mark.usefixtures("tripwire")
@pytest.mark.parametrize("arg", ARG_ORDER)
def test_non_contiguous(arg: str) -> None:
    args = small_cpu_args()
    x = args[arg]
    args[arg] = torch.stack([x, x], dim=-1)[..., 0]
    assert not args[arg].is_contiguous()
    _expect(args, arg, "contiguous")


def test_not_a_tensor(tripwire: None) -> None:
    args = small_cpu_args()
    args["block_tables"] = [[0, 1]]
    with pytest.raises(TypeError, match="argument 'block_tables' must be a tensor"):
        _call(args)


def test_valid_arguments_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        _prefill_ops, "get_function", lambda name: lambda *a: calls.append((name, *a))
    )
    args = _fake_cuda(small_cpu_args())
    _call(args, scale=1, max_query_len=None)
    _call(args, scale=np_float(0.25), max_query_len=7, sliding_window=4096)
    assert [c[0] for c in calls] == [OP, OP]
    assert calls[0][1:8] == tuple(args[name] for name in ARG_ORDER)
    assert calls[0][8:] == (1.0, -1, 0, 1.0, 1.0, 0.0) and isinstance(calls[0][8], float)
    assert calls[1][8:] == (0.25, 7, 4096, 1.0, 1.0, 0.0)


def np_float(x: float) -> Any:
    """A non-builtin real (numpy float64 where numpy is installed)."""
    try:
        import numpy as np
    except ImportError:
        return x
    return np.float64(x)


def test_exported() -> None:
    assert "paged_prefill_attention" in cacheflow_kernels.__all__
    assert cacheflow_kernels.paged_prefill_attention.__doc__


# ---- C++ checks: the built library called directly with CPU tensors (no launch happens). ----

needs_library = pytest.mark.skipif(
    not library_path().is_file(), reason=f"kernel library not built ({library_path()})"
)


def _raw(args: dict[str, Any], scale: float = SCALE, max_query_len: int = -1,
         sliding_window: int = 0, k_scale: float = 1.0, v_scale: float = 1.0,
         soft_cap: float = 0.0) -> str:
    from cacheflow_kernels._lib import get_function

    with pytest.raises(ValueError) as info:
        get_function(OP)(*(args[name] for name in ARG_ORDER), scale, max_query_len,
                         sliding_window, k_scale, v_scale, soft_cap)
    return str(info.value)


@needs_library
def test_cpp_rejects_cpu_tensors() -> None:
    msg = _raw(small_cpu_args())
    assert f"{OP}: argument 'query' must be a CUDA tensor, got a tensor on cpu" in msg


@needs_library
@pytest.mark.parametrize("arg", ["out", "key_cache", "value_cache"])
def test_cpp_rejects_dtype_mismatch(arg: str) -> None:
    args = small_cpu_args(torch.float16)
    args[arg] = args[arg].float()
    like = "key_cache" if arg == "value_cache" else "query"
    msg = _raw(args)
    assert f"argument '{arg}' must be float16 like '{like}'" in msg and "got float32" in msg


@needs_library
@pytest.mark.parametrize("arg", ["block_tables", "query_start_loc", "context_lens"])
def test_cpp_rejects_int64_metadata(arg: str) -> None:
    args = small_cpu_args()
    args[arg] = args[arg].long()
    assert f"argument '{arg}' must be int32, got int64" in _raw(args)


@needs_library
@pytest.mark.parametrize(
    ("arg", "shape", "fragment"),
    [
        ("query", (5, 256), "must be 3-D"),
        ("out", (5, 4, 32), "like 'query', got [5, 4, 32]"),
        ("key_cache", (6, 4, 2, 32), "got [6, 4, 2, 32]"),
        ("key_cache", (6, 4, 3, 64), "num_kv_heads dividing num_heads=4"),
        ("value_cache", (6, 4, 1, 64), "like 'key_cache', got [6, 4, 1, 64]"),
        ("query_start_loc", (2,), "must be of shape [3]"),
        ("context_lens", (3,), "must be of shape [2]"),
    ],
)
def test_cpp_rejects_shapes(arg: str, shape: tuple[int, ...], fragment: str) -> None:
    args = small_cpu_args()
    args[arg] = torch.zeros(shape, dtype=args[arg].dtype)
    msg = _raw(args)
    assert f"argument '{arg}'" in msg and fragment in msg, msg


@needs_library
@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan])
def test_cpp_rejects_scale(scale: float) -> None:
    assert "argument 'scale' must be a finite number > 0" in _raw(small_cpu_args(), scale=scale)


@needs_library
def test_cpp_rejects_max_query_len() -> None:
    assert "argument 'max_query_len' must be >= 0" in _raw(small_cpu_args(), max_query_len=-2)


@needs_library
def test_cpp_rejects_sliding_window() -> None:
    assert "argument 'sliding_window' must be >= 1 (or 0: none)" in _raw(small_cpu_args(),
                                                                          sliding_window=-1)


@needs_library
def test_cpp_rejects_head_size() -> None:
    args = small_cpu_args()
    for name in ("query", "out"):
        args[name] = torch.zeros(args[name].shape[:2] + (264,), dtype=args[name].dtype)
    for name in ("key_cache", "value_cache"):
        args[name] = torch.zeros(args[name].shape[:3] + (264,), dtype=args[name].dtype)
    assert "argument 'query' must be of head_size between 1 and 256" in _raw(args)


@needs_library
@pytest.mark.parametrize("arg", ARG_ORDER)
def test_cpp_rejects_non_contiguous(arg: str) -> None:
    args = small_cpu_args()
    args[arg] = torch.stack([args[arg], args[arg]], dim=-1)[..., 0]
    assert f"argument '{arg}' must be contiguous" in _raw(args)
