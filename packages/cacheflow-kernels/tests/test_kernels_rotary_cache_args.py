"""The Python argument checks of rotary_embedding_with_cache on CPU tensors (shapes, dtypes and
layouts first, devices last), and what valid arguments hand to the library. No CUDA needed:
the library is replaced by a tripwire or a recorder."""

from __future__ import annotations

from typing import Any

import pytest
from elementwise_testutil import FakeCuda

import cacheflow_kernels as ck
from cacheflow_kernels import _rotary_ops

torch = pytest.importorskip("torch")

OP = "rotary_embedding_with_cache"


@pytest.fixture(autouse=True)
def _library_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(name: str) -> Any:
        raise AssertionError(f"library touched ({name}) before arguments were validated")

    monkeypatch.setattr(_rotary_ops, "get_function", tripwire)


def make_args(dtype: Any = torch.float16, head_size: int = 32, cache_dtype: Any = None,
              rot_dim: int | None = None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads = 5, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    cache = torch.zeros(3, 8, kv_heads, head_size, dtype=cache_dtype or dtype)
    return {
        "positions": torch.arange(tokens, dtype=torch.int64),
        "query": qkv[:, :q_size], "key": qkv[:, q_size:q_size + kv_size],
        "value": qkv[:, q_size + kv_size:],
        "cos_sin_cache": torch.randn(16, rot_dim or head_size, generator=g),
        "head_size": head_size, "is_neox": True,
        "key_cache": cache, "value_cache": cache.clone(),
        "slot_mapping": torch.tensor([0, 3, -1, 9, 17], dtype=torch.int64),
    }


def fake(args: dict[str, Any], keep_cpu: str | None = None) -> dict[str, Any]:
    return {k: FakeCuda(v) if isinstance(v, torch.Tensor) and k != keep_cpu else v
            for k, v in args.items()}


def expect(args: dict[str, Any], arg: str, *fragments: str, **scales: float) -> str:
    with pytest.raises(ValueError) as info:
        ck.rotary_embedding_with_cache(*args.values(), **scales)
    msg = str(info.value)
    assert msg.startswith(f"{OP}: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def test_valid_arguments_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_rotary_ops, "get_function",
                        lambda name: lambda *a: calls.append((name, *a)))
    args = fake(make_args())
    ck.rotary_embedding_with_cache(*args.values())
    assert len(calls) == 1 and calls[0][0] == OP
    assert list(calls[0][1:]) == [*args.values(), 1.0, 1.0]


def test_fp8_caches_take_their_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_rotary_ops, "get_function",
                        lambda name: lambda *a: calls.append((name, *a)))
    args = fake(make_args(cache_dtype=torch.float8_e4m3fn))
    ck.rotary_embedding_with_cache(*args.values(), k_scale=0.5, v_scale=torch.tensor(2.0))
    assert calls[0][-2:] == (0.5, 2.0)


def test_scales_other_than_one_need_an_fp8_cache() -> None:
    expect(fake(make_args()), "k_scale", "1.0", k_scale=0.5)


def test_cpu_tensors_need_cuda() -> None:
    expect(make_args(), "positions", "a CUDA tensor", "got a tensor on cpu")


@pytest.mark.parametrize("arg", ["query", "key", "value", "cos_sin_cache", "key_cache",
                                 "value_cache", "slot_mapping"])
def test_cpu_argument_among_cuda_ones(arg: str) -> None:
    expect(fake(make_args(), keep_cpu=arg), arg, "on the same device as 'positions' (cuda:0)",
           "got cpu")


def test_float32_activations_take_the_two_ops() -> None:
    expect(fake(make_args(torch.float32)), "query", "float16", "bfloat16")


def test_partial_rotary_takes_the_two_ops() -> None:
    expect(fake(make_args(rot_dim=16)), "cos_sin_cache", "every feature rotates", "rot_dim 16")


def test_head_size_a_multiple_of_16() -> None:
    args = make_args(head_size=24)
    expect(fake(args), "head_size", "a multiple of 16", "24")


def test_value_of_the_key_shape() -> None:
    args = make_args()
    args["value"] = args["value"][:, :32]
    expect(fake(args), "value", "of the shape of 'key'", "[5, 32]")


def test_rows_a_multiple_of_8_elements_apart() -> None:
    args = make_args()
    wide = torch.zeros(5, 64 + 4, dtype=torch.float16)
    args["key"] = wide[:, :64]
    expect(fake(args), "key", "rows a multiple of 8 elements apart", "row stride 68")


def test_cache_shape_and_dtype() -> None:
    args = make_args()
    args["key_cache"] = torch.zeros(3, 8, 2, 16, dtype=torch.float16)
    expect(fake(args), "key_cache", "head_size")
    args = make_args()
    args["value_cache"] = args["value_cache"].to(torch.bfloat16)
    expect(fake(args), "value_cache", "float16")
    args = make_args()
    args["key_cache"] = args["key_cache"].to(torch.bfloat16)
    expect(fake(args), "key_cache", "float16")


def test_slot_mapping_int64_of_num_tokens() -> None:
    args = make_args()
    args["slot_mapping"] = args["slot_mapping"].to(torch.int32)
    expect(fake(args), "slot_mapping", "int64")
    args = make_args()
    args["slot_mapping"] = args["slot_mapping"][:4]
    expect(fake(args), "slot_mapping", "num_tokens=5")


def test_rotary_errors_name_this_op() -> None:
    args = make_args()
    args["positions"] = args["positions"].to(torch.int32)
    expect(fake(args), "positions", "int64")
