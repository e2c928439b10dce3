"""The Python argument checks of reshape_and_cache, on CPU tensors (no CUDA, no library needed).

Every check must fire before the kernel library is touched: ``get_function`` is replaced by a
tripwire in each test.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import cacheflow_kernels
from cacheflow_kernels import _cache_ops

from kernels_testutil import make_args

torch = pytest.importorskip("torch")

ORDER = ("key", "value", "key_cache", "value_cache", "slot_mapping")


@pytest.fixture(autouse=True)
def _library_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(name: str) -> Any:
        raise AssertionError(f"library touched ({name}) before arguments were validated")

    monkeypatch.setattr(_cache_ops, "get_function", tripwire)


def _call(args: dict[str, Any], **scales: Any) -> None:
    cacheflow_kernels.reshape_and_cache(*(args[name] for name in ORDER), **scales)


def _expect(args: dict[str, Any], arg: str, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        _call(args)
    msg = str(info.value)
    assert msg.startswith(f"reshape_and_cache: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


class FakeCuda:
    """A CPU tensor that reports a CUDA device through ``__dlpack_device__`` (kDLCUDA = 2)."""

    def __init__(self, tensor: Any, index: int = 0) -> None:
        self.tensor, self.index = tensor, index
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.index)

    def is_contiguous(self) -> bool:
        return bool(self.tensor.is_contiguous())


def test_cpu_tensors_need_cuda() -> None:
    _expect(make_args(), "key", "a CUDA tensor", "got a tensor on cpu")


@pytest.mark.parametrize("arg", ORDER[1:])
def test_cpu_argument_among_cuda_ones(arg: str) -> None:
    args = {k: v if k == arg else FakeCuda(v) for k, v in make_args().items()}
    _expect(args, arg, "on the same device as 'key' (cuda:0)", "got cpu")


@pytest.mark.parametrize("arg", ORDER[1:])
def test_other_cuda_device(arg: str) -> None:
    args = {k: FakeCuda(v, 1 if k == arg else 0) for k, v in make_args().items()}
    _expect(args, arg, "on the same device as 'key' (cuda:0)", "got cuda:1")


def test_valid_arguments_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        _cache_ops, "get_function", lambda name: lambda *a: calls.append((name, *a))
    )
    args = {k: FakeCuda(v) for k, v in make_args().items()}
    _call(args)
    assert len(calls) == 1 and calls[0][0] == "reshape_and_cache"
    assert list(calls[0][1:]) == [args[name] for name in ORDER] + [1.0, 1.0]


def test_meta_tensors_need_cuda() -> None:
    args = make_args(device="meta")
    _expect(args, "key", "a CUDA tensor", "got a tensor on meta")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_valid_dtypes_reach_the_device_check(dtype: str) -> None:
    _expect(make_args(getattr(torch, dtype)), "key", "a CUDA tensor")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8])
def test_key_dtype(dtype: Any) -> None:
    args = make_args()
    args["key"] = args["key"].to(dtype)
    _expect(args, "key", "float16, bfloat16 or float32", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("arg", ["value", "key_cache", "value_cache"])
def test_dtype_must_match_key(arg: str) -> None:
    args = make_args(torch.float16)
    args[arg] = args[arg].to(torch.bfloat16)
    # The value cache follows the key cache (which may also be an FP8 cache).
    like = "float16 like 'key_cache'" if arg == "value_cache" else "float16 like 'key'"
    _expect(args, arg, like, "got bfloat16")


def test_fp8_caches_need_matching_dtypes_and_positive_scales(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        _cache_ops, "get_function", lambda name: lambda *a: calls.append((name, *a))
    )
    args = {k: FakeCuda(v) for k, v in make_args().items()}
    for name in ("key_cache", "value_cache"):
        args[name] = FakeCuda(torch.zeros(args[name].shape, dtype=torch.float8_e4m3fn))
    _call(args, k_scale=0.5, v_scale=torch.tensor([0.25]))
    assert calls[0][-2:] == (0.5, 0.25)
    args["value_cache"] = FakeCuda(torch.zeros(args["value_cache"].shape, dtype=torch.float16))
    _expect(args, "value_cache", "float8_e4m3fn like 'key_cache'", "got float16")
    with pytest.raises(ValueError, match="argument 'k_scale' must be 1.0 unless the caches are"):
        _call({k: FakeCuda(v) for k, v in make_args().items()}, k_scale=2.0)


def test_float8_caches_go_to_the_library_as_their_bytes() -> None:
    from cacheflow_kernels import _checks

    cache = torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn)
    raw = _checks.as_kernel_cache(cache)
    assert raw.dtype == torch.uint8 and raw.data_ptr() == cache.data_ptr()
    assert raw.tolist() == [0x38, 0xC0, 0x7E]
    half = torch.ones(3, dtype=torch.float16)
    assert _checks.as_kernel_cache(half) is half


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.uint8])
def test_slot_mapping_dtype(dtype: Any) -> None:
    args = make_args()
    args["slot_mapping"] = args["slot_mapping"].to(dtype)
    _expect(args, "slot_mapping", "of dtype int64", str(dtype).removeprefix("torch."))


def test_key_ndim() -> None:
    args = make_args()
    args["key"] = args["key"].flatten(1)
    _expect(args, "key", "3-D tensor [num_tokens, num_kv_heads, head_size]", "2-D tensor")


@pytest.mark.parametrize(
    ("arg", "new_shape", "fragment"),
    [
        ("value", (4, 2, 8), "num_tokens=5"),
        ("value", (5, 1, 8), "num_kv_heads=2"),
        ("value", (5, 2, 4), "head_size=8"),
        ("key_cache", (4, 3, 1, 8), "num_kv_heads=2"),
        ("key_cache", (4, 3, 2, 16), "head_size=8"),
        ("value_cache", (5, 3, 2, 8), "num_blocks=4"),
        ("value_cache", (4, 2, 2, 8), "block_size=3"),
        ("slot_mapping", (4,), "num_tokens=5"),
    ],
)
def test_shapes(arg: str, new_shape: tuple[int, ...], fragment: str) -> None:
    args = make_args()
    args[arg] = torch.zeros(new_shape, dtype=args[arg].dtype)
    msg = _expect(args, arg, "of shape [", fragment)
    assert re.search(r"got \[" + ", ".join(map(str, new_shape)) + r"\]", msg), msg


@pytest.mark.parametrize(
    ("arg", "new_shape", "ndim"),
    [("key_cache", (4, 3, 16), 3), ("value_cache", (12, 2, 8), 3),
     ("slot_mapping", (5, 1), 2), ("value", (5, 16), 2)],
)
def test_ndims(arg: str, new_shape: tuple[int, ...], ndim: int) -> None:
    args = make_args()
    args[arg] = torch.zeros(new_shape, dtype=args[arg].dtype)
    _expect(args, arg, f"{ndim}-D tensor of shape")


@pytest.mark.parametrize("arg", ORDER)
def test_non_contiguous(arg: str) -> None:
    args = make_args()
    x = args[arg]
    # Same shape and values, but every other element of a twice-as-long buffer.
    wide = torch.stack([x, x], dim=-1)
    args[arg] = wide[..., 0]
    assert not args[arg].is_contiguous()
    _expect(args, arg, "contiguous", "strided tensor")


def test_strided_token_rows_reach_the_device_check() -> None:
    """key and value as views into one fused QKV output (strided token rows, each token's
    [num_kv_heads, head_size] dense) pass the layout checks."""
    args = make_args()
    n, h, d = args["key"].shape
    fused = torch.zeros(n, 5 * h * d, dtype=args["key"].dtype)
    args["key"] = fused[:, 3 * h * d: 4 * h * d].view(n, h, d)
    args["value"] = fused[:, 4 * h * d:].view(n, h, d)
    assert not args["key"].is_contiguous()
    _expect(args, "key", "a CUDA tensor")


@pytest.mark.parametrize("arg", ["key", "value"])
def test_token_rows_must_be_dense(arg: str) -> None:
    args = make_args()
    n, h, d = args[arg].shape
    args[arg] = torch.zeros(h, n, d, dtype=args[arg].dtype).transpose(0, 1)
    _expect(args, arg, f"contiguous, or rows of contiguous [{h}, {d}] blocks", "with strides")


def test_transposed_cache_is_non_contiguous() -> None:
    args = make_args(num_heads=3, head_size=3)
    args["key_cache"] = args["key_cache"].transpose(2, 3)
    _expect(args, "key_cache", "contiguous")


def test_not_a_tensor() -> None:
    args = make_args()
    args["slot_mapping"] = [0, 1, 2, 3, -1]
    msg = "reshape_and_cache: argument 'slot_mapping' must be a tensor"
    with pytest.raises(TypeError, match=msg):
        _call(args)


def test_numpy_arrays_are_checked_generically() -> None:
    np = pytest.importorskip("numpy")
    args = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in make_args(torch.float32).items()}
    _expect(args, "key", "a CUDA tensor", "cpu")
    args["value_cache"] = np.asfortranarray(args["value_cache"])
    _expect(args, "value_cache", "contiguous")


def test_error_message_is_complete() -> None:
    args = make_args()
    args["key_cache"] = torch.zeros((4, 3, 2, 16), dtype=torch.float16)
    with pytest.raises(ValueError) as info:
        _call(args)
    assert str(info.value) == (
        "reshape_and_cache: argument 'key_cache' must be of shape "
        "[num_blocks, block_size, num_kv_heads=2, head_size=8], got [4, 3, 2, 16]"
    )


def test_empty_batch_still_checked() -> None:
    _expect(make_args(num_tokens=0), "key", "a CUDA tensor")
