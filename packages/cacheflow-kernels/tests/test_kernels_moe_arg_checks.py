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
