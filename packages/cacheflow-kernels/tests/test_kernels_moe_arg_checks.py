"""The Python argument checks of moe_grouped_gemm on CPU tensors: every mistake is a ValueError
naming the argument, raised before the kernel library is touched."""

from __future__ import annotations

from typing import Any

import pytest
from elementwise_testutil import FakeCuda

import cacheflow_kernels as ck
from cacheflow_kernels import _moe_ops

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _library_tripwire(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def tripwire(name: str) -> Any:
        calls.append(name)
        return lambda *args: None

    monkeypatch.setattr(_moe_ops, "get_function", tripwire)
    return calls


def _args(dtype: Any = torch.bfloat16, m: int = 10, n: int = 24, k: int = 16,
          e: int = 3) -> dict[str, Any]:
    return dict(out=torch.empty(m, n, dtype=dtype), x=torch.empty(m, k, dtype=dtype),
                w=torch.empty(e, n, k, dtype=dtype),
                expert_offsets=torch.tensor([0, 4, 4, m][: e + 1], dtype=torch.int64))


class _FakeCudaPtr(FakeCuda):
    """FakeCuda that also tells its address (the alignment check reads ``data_ptr()``)."""

    def data_ptr(self) -> int:
        return int(self.tensor.data_ptr())


def _fake_cuda(args: dict[str, Any]) -> dict[str, Any]:
    return {k: _FakeCudaPtr(v) for k, v in args.items()}


@pytest.mark.parametrize("change, name, expected", [
    (dict(x=torch.empty(10, 16, dtype=torch.float32)), "x", "of dtype float16 or bfloat16"),
    (dict(x=torch.empty(10, 12, dtype=torch.bfloat16)), "x", "positive multiple of 8"),
    (dict(x=torch.empty(10, dtype=torch.bfloat16)), "x", "2-D tensor"),
    (dict(w=torch.empty(3, 24, 8, dtype=torch.bfloat16)), "w", "in_features=16"),
    (dict(w=torch.empty(3, 24, 16, dtype=torch.float16)), "w", "of dtype bfloat16 like 'x'"),
    (dict(expert_offsets=torch.tensor([0, 10], dtype=torch.int64)), "expert_offsets",
     "num_experts + 1=4"),
    (dict(expert_offsets=torch.tensor([0, 1, 2, 10], dtype=torch.int32)), "expert_offsets",
     "of dtype int64"),
    (dict(out=torch.empty(10, 25, dtype=torch.bfloat16)), "out", "out_features=24"),
    (dict(out=torch.empty(24, 10, dtype=torch.bfloat16).t()), "out", "contiguous"),
    (dict(x=torch.empty(10, 17, dtype=torch.bfloat16)[:, 1:]), "x", "contiguous"),
])
def test_bad_argument_is_named(change: dict[str, Any], name: str, expected: str,
                               _library_tripwire: list[str]) -> None:
    args = _fake_cuda({**_args(), **change})
    with pytest.raises(ValueError, match=f"moe_grouped_gemm: argument '{name}' must be") as exc:
        ck.moe_grouped_gemm(**args)
    assert expected in str(exc.value)
    assert _library_tripwire == []


def test_unaligned_view_is_refused(_library_tripwire: list[str]) -> None:
    base = torch.empty(10 * 16 + 1, dtype=torch.bfloat16)
    args = _args()
    args["x"] = base[1:].view(10, 16)  # contiguous, but 2 bytes past an aligned address
    with pytest.raises(ValueError, match="argument 'x' must be 16-byte aligned"):
        ck.moe_grouped_gemm(**_fake_cuda(args))
    assert _library_tripwire == []


def test_cpu_tensors_are_refused_before_the_library(_library_tripwire: list[str]) -> None:
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor, got a tensor on cpu"):
        ck.moe_grouped_gemm(**_args())
    assert _library_tripwire == []


def test_valid_arguments_reach_the_library(_library_tripwire: list[str]) -> None:
    ck.moe_grouped_gemm(**_fake_cuda(_args(torch.float16)))
    assert _library_tripwire == ["moe_grouped_gemm"]


# ---- the indexed / gated GEMMs, the sort and the top-k sum ---------------------------------------


def _indexed_args(dtype: Any = torch.bfloat16) -> dict[str, Any]:
    """A gather of 6 product rows from 4 rows of x, scattered into 8 rows of out."""
    return dict(out=torch.empty(8, 24, dtype=dtype), x=torch.empty(4, 16, dtype=dtype),
                w=torch.empty(3, 24, 16, dtype=dtype),
                expert_offsets=torch.tensor([0, 2, 2, 6], dtype=torch.int64),
                row_index=torch.zeros(6, dtype=torch.int32),
                out_index=torch.zeros(6, dtype=torch.int32),
                out_scale=torch.ones(8, dtype=torch.float32))


@pytest.mark.parametrize("change, name, expected", [
    (dict(row_index=torch.zeros(6, dtype=torch.int64)), "row_index", "of dtype int32"),
    (dict(out_index=torch.zeros(5, dtype=torch.int32)), "out_index", "num_rows=6"),
    (dict(row_index=torch.zeros(6, 1, dtype=torch.int32)), "row_index", "1-D tensor"),
    (dict(out_scale=torch.ones(8, dtype=torch.float16)), "out_scale", "of dtype float32"),
    (dict(out_scale=torch.ones(7, dtype=torch.float32)), "out_scale", "out_rows=8"),
    (dict(out=torch.empty(8, 25, dtype=torch.bfloat16)), "out", "out_features=24"),
    (dict(out_index=None, out=torch.empty(8, 24, dtype=torch.bfloat16)), "out", "num_rows=6"),
    (dict(row_index=torch.zeros(12, dtype=torch.int32)[::2]), "row_index", "contiguous"),
])
def test_indexed_bad_argument_is_named(change: dict[str, Any], name: str, expected: str,
                                       _library_tripwire: list[str]) -> None:
    args = {k: v for k, v in {**_indexed_args(), **change}.items()}
    args = {k: (None if v is None else _FakeCudaPtr(v)) for k, v in args.items()}
    with pytest.raises(ValueError, match=f"moe_grouped_gemm: argument '{name}' must be") as exc:
        ck.moe_grouped_gemm(**args)
    assert expected in str(exc.value)
    assert _library_tripwire == []


def test_indexed_valid_arguments_reach_the_indexed_entry(_library_tripwire: list[str]) -> None:
    ck.moe_grouped_gemm(**_fake_cuda(_indexed_args()))
    args = _indexed_args()
    args["out"] = torch.empty(6, 24, dtype=torch.bfloat16)
    del args["out_index"], args["out_scale"]
    ck.moe_grouped_gemm(**_fake_cuda(args))  # a gather alone
    assert _library_tripwire == ["moe_grouped_gemm_indexed"] * 2


def _gated_args(dtype: Any = torch.bfloat16) -> dict[str, Any]:
    return dict(out=torch.empty(6, 12, dtype=dtype), x=torch.empty(4, 16, dtype=dtype),
                w=torch.empty(3, 24, 16, dtype=dtype),
                expert_offsets=torch.tensor([0, 2, 2, 6], dtype=torch.int64),
                row_index=torch.zeros(6, dtype=torch.int32))


@pytest.mark.parametrize("change, name, expected", [
    (dict(out=torch.empty(6, 24, dtype=torch.bfloat16)), "out", "intermediate=12"),
    (dict(w=torch.empty(3, 23, 16, dtype=torch.bfloat16),
          out=torch.empty(6, 11, dtype=torch.bfloat16)), "w", "an even count"),
    (dict(activation="relu"), "activation", "'silu', 'gelu' or 'gelu_tanh'"),
    (dict(row_index=None), "out", "num_rows=4"),
    (dict(x=torch.empty(4, 12, dtype=torch.bfloat16)), "x", "positive multiple of 8"),
    (dict(row_index=torch.zeros(6, dtype=torch.int64)), "row_index", "of dtype int32"),
])
def test_gated_bad_argument_is_named(change: dict[str, Any], name: str, expected: str,
                                     _library_tripwire: list[str]) -> None:
    args: dict[str, Any] = {**_gated_args(), **change}
    args = {k: (_FakeCudaPtr(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError,
                       match=f"moe_grouped_gemm_gated: argument '{name}' must be") as exc:
        ck.moe_grouped_gemm_gated(**args)
    assert expected in str(exc.value)
    assert _library_tripwire == []


def test_gated_valid_arguments_reach_the_library(_library_tripwire: list[str]) -> None:
    ck.moe_grouped_gemm_gated(**_fake_cuda(_gated_args(torch.float16)), activation="gelu_tanh")
    assert _library_tripwire == ["moe_grouped_gemm_gated"]


def _sort_args() -> dict[str, Any]:
    return dict(expert_offsets=torch.empty(9, dtype=torch.int64),
                sorted_pairs=torch.empty(10, dtype=torch.int32),
                token_index=torch.empty(10, dtype=torch.int32),
                topk_ids=torch.zeros(5, 2, dtype=torch.int64))


@pytest.mark.parametrize("change, name, expected", [
    (dict(topk_ids=torch.zeros(5, 2, dtype=torch.float32)), "topk_ids", "int32 or int64"),
    (dict(topk_ids=torch.zeros(10, dtype=torch.int64)), "topk_ids", "2-D tensor"),
    (dict(sorted_pairs=torch.empty(9, dtype=torch.int32)), "sorted_pairs",
     "num_tokens * top_k=10"),
    (dict(token_index=torch.empty(10, dtype=torch.int64)), "token_index", "of dtype int32"),
    (dict(expert_offsets=torch.empty(1, dtype=torch.int64)), "expert_offsets",
     "num_experts >= 1"),
    (dict(expert_offsets=torch.empty(9, dtype=torch.int32)), "expert_offsets", "int64"),
])
def test_sort_bad_argument_is_named(change: dict[str, Any], name: str, expected: str,
                                    _library_tripwire: list[str]) -> None:
    args = _fake_cuda({**_sort_args(), **change})
    with pytest.raises(ValueError, match=f"moe_sort_by_expert: argument '{name}' must be") as exc:
        ck.moe_sort_by_expert(**args)
    assert expected in str(exc.value)
    assert _library_tripwire == []


def test_sort_valid_arguments_reach_the_library(_library_tripwire: list[str]) -> None:
    ck.moe_sort_by_expert(**_fake_cuda(_sort_args()))
    assert _library_tripwire == ["moe_sort_by_expert"]


def _sum_args() -> dict[str, Any]:
    return dict(out=torch.empty(5, 16, dtype=torch.float16),
                x=torch.empty(5, 2, 16, dtype=torch.float16),
                topk_ids=torch.zeros(5, 2, dtype=torch.int32))


@pytest.mark.parametrize("change, name, expected", [
    (dict(x=torch.empty(10, 16, dtype=torch.float16)), "x", "3-D tensor"),
    (dict(out=torch.empty(5, 16, dtype=torch.bfloat16)), "out", "of dtype float16 like 'x'"),
    (dict(topk_ids=torch.zeros(5, 3, dtype=torch.int32)), "topk_ids", "top_k=2"),
    (dict(num_experts=0), "num_experts", "a positive int"),
])
def test_sum_bad_argument_is_named(change: dict[str, Any], name: str, expected: str,
                                   _library_tripwire: list[str]) -> None:
    args: dict[str, Any] = {**_fake_cuda(_sum_args()), "num_experts": 4}
    args.update({k: (_FakeCudaPtr(v) if isinstance(v, torch.Tensor) else v)
                 for k, v in change.items()})
    with pytest.raises(ValueError, match=f"moe_sum_topk: argument '{name}' must be") as exc:
        ck.moe_sum_topk(**args)
    assert expected in str(exc.value)
    assert _library_tripwire == []


def test_sum_valid_arguments_reach_the_library(_library_tripwire: list[str]) -> None:
    ck.moe_sum_topk(**_fake_cuda(_sum_args()), num_experts=4)
    assert _library_tripwire == ["moe_sum_topk"]
