"""The remembered argument checks (_checks.CheckMemo): a signature that passed is not re-checked,
anything that differs is, and a call that fails is never remembered (CPU tensors stand in for
CUDA ones: only the device check is switched off)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cacheflow_kernels import _checks as C
from cacheflow_kernels import _norm_ops, _prefill_ops, _rotary_ops

torch = pytest.importorskip("torch")


class Recorder:
    """Stands in for the kernel library: records each call's op name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> Any:
        return lambda *args: self.calls.append(name)


@pytest.fixture
def lib(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    for module in (_norm_ops, _rotary_ops, _prefill_ops):
        monkeypatch.setattr(module, "get_function", rec)
    monkeypatch.setattr(C, "check_cuda", lambda *a: None)
    monkeypatch.setattr(_norm_ops, "_RMS_NORM_CHECKS", C.CheckMemo())
    monkeypatch.setattr(_rotary_ops, "_CHECKS", C.CheckMemo())
    monkeypatch.setattr(_prefill_ops, "_CHECKS", C.CheckMemo())
    return rec


def test_signature_distinguishes_what_the_checks_read() -> None:
    x = torch.zeros(4, 8, dtype=torch.float16)
    base = C.torch_signature((x, None), (1e-6,))
    assert base == C.torch_signature((torch.ones(4, 8, dtype=torch.float16), None), (1e-6,))
    assert base != C.torch_signature((x.float(), None), (1e-6,))
    assert base != C.torch_signature((torch.zeros(4, 9, dtype=torch.float16), None), (1e-6,))
    assert base != C.torch_signature((x.t().contiguous().t(), None), (1e-6,))  # strides
    assert base != C.torch_signature((x, x), (1e-6,))
    assert C.torch_signature((x,), (True,)) != C.torch_signature((x,), (1,))
    assert C.torch_signature((np.zeros((4, 8)),)) is None  # other array types: never memoized

    class Sub(torch.Tensor):
        pass

    assert C.torch_signature((x.as_subclass(Sub),)) is None
    assert C.torch_signature((x,), ([1],)) is None  # unhashable scalar


def test_memo_runs_validate_once_and_never_keeps_failures() -> None:
    memo = C.CheckMemo(maxsize=2)
    x = torch.zeros(2, 2)
    runs: list[int] = []
    assert memo.check((x,), (), lambda: runs.append(1) or 7) == 7
    assert memo.check((x,), (), lambda: runs.append(1) or 8) == 7
    assert len(runs) == 1 and len(memo) == 1

    def bad() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        memo.check((x.double(),), (), bad)
    assert len(memo) == 1
    memo.check((x.half(),), (), lambda: 1)
    memo.check((x.int(),), (), lambda: 2)  # over maxsize: the memo starts over
    assert len(memo) == 1


def test_rms_norm_repeat_call_still_checks_scalars_and_new_tensors(lib: Recorder) -> None:
    x = torch.randn(3, 64, dtype=torch.float16)
    out, w = torch.empty_like(x), torch.ones(64, dtype=torch.float16)
    _norm_ops.rms_norm(out, x, w, 1e-6)
    _norm_ops.rms_norm(out, x, w, 1e-6)
    assert lib.calls == ["rms_norm", "rms_norm"] and len(_norm_ops._RMS_NORM_CHECKS) == 1
    with pytest.raises(ValueError, match="rms_norm: argument 'eps' must be a finite float >= 0"):
        _norm_ops.rms_norm(out, x, w, float("nan"))
    with pytest.raises(ValueError, match="argument 'out' must be contiguous"):
        _norm_ops.rms_norm(torch.empty(64, 3, dtype=torch.float16).t(), x, w, 1e-6)
    with pytest.raises(ValueError, match="argument 'weight' must be of dtype float16"):
        _norm_ops.rms_norm(out, x, w.float(), 1e-6)
    assert len(lib.calls) == 2 and len(_norm_ops._RMS_NORM_CHECKS) == 1


def test_rotary_head_size_is_part_of_the_signature(lib: Recorder) -> None:
    pos = torch.arange(4)
    q = torch.randn(4, 2 * 64, dtype=torch.bfloat16)
    k = torch.randn(4, 64, dtype=torch.bfloat16)
    cache = torch.randn(16, 64)
    _rotary_ops.rotary_embedding(pos, q, k, cache, 64, True)
    with pytest.raises(ValueError, match="argument 'query' must be of shape"):
        _rotary_ops.rotary_embedding(pos, q, k, cache, 48, True)
    with pytest.raises(ValueError, match="argument 'is_neox' must be a bool"):
        _rotary_ops.rotary_embedding(pos, q, k, cache, 64, 1)
    assert lib.calls == ["rotary_embedding"]


def test_prefill_scalars_are_checked_on_every_call(lib: Recorder) -> None:
    from prefill_testutil import call_args, make_case

    case = make_case([3, 5], [3, 9])
    args = call_args(case)
    _prefill_ops.paged_prefill_attention(*args, case["scale"], max_query_len=5)
    _prefill_ops.paged_prefill_attention(*args, case["scale"], max_query_len=7)
    assert len(_prefill_ops._CHECKS) == 1 and len(lib.calls) == 2
    with pytest.raises(ValueError, match="argument 'max_query_len' must be >= 0"):
        _prefill_ops.paged_prefill_attention(*args, case["scale"], max_query_len=-1)
    with pytest.raises(ValueError, match="argument 'scale' must be a finite number > 0"):
        _prefill_ops.paged_prefill_attention(*args, 0.0)
    with pytest.raises(ValueError, match="argument 'sliding_window' must be an int or None"):
        _prefill_ops.paged_prefill_attention(*args, case["scale"], sliding_window=2.5)
    assert len(lib.calls) == 2
