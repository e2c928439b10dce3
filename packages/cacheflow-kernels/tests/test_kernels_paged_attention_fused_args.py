"""paged_attention_with_rotary_cache's argument checks and its choice to decline, on CPU tensors
(runs in CI). Its kernel is checked under the emulator (test_kernels_paged_attention_emulated.py)
and on the GPU (test_kernels_paged_attention_gpu.py)."""

from __future__ import annotations

from typing import Any

import pytest
from test_kernels_paged_attention_args import (  # noqa: F401 (an autouse fixture)
    FakeCuda,
    _library_tripwire,
    make_args,
)

import cacheflow_kernels
from cacheflow_kernels import _attention_ops

torch = pytest.importorskip("torch")

OP = "paged_attention_with_rotary_cache"
ORDER = ("out", "query", "key", "value", "key_cache", "value_cache", "block_tables",
         "context_lens", "positions", "slot_mapping", "cos_sin_cache")


def fused_args(num_seqs: int = 3, max_blocks: int = 3, num_blocks: int = 6,
               dtype: Any = None) -> dict[str, Any]:
    """A valid argument set (MHA 4 query / 2 KV heads, head size 64) as fake CUDA tensors."""
    args = make_args(dtype=dtype, num_seqs=num_seqs, max_blocks=max_blocks,
                     num_blocks=num_blocks)
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(num_seqs, 2, 64, generator=gen).to(args["query"].dtype)
    args.update(key=kv, value=kv.clone(),
                positions=torch.arange(num_seqs, dtype=torch.int64),
                slot_mapping=torch.arange(num_seqs, dtype=torch.int64),
                cos_sin_cache=torch.randn(128, 64, generator=gen))
    return {k: FakeCuda(v) for k, v in args.items()}


class Recorder:
    """Replaces get_function: 132 SMs and a record of the kernel call, which returns `ran`."""

    def __init__(self, ran: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.ran = ran

    def __call__(self, name: str) -> Any:
        if name == "paged_attention_sm_count":
            return lambda index: 132
        assert name == OP, name

        def kernel(*a: Any) -> bool:
            self.calls.append(a)
            return self.ran
        return kernel


def _call(args: dict[str, Any], is_neox: Any = True, **kwargs: Any) -> bool:
    return cacheflow_kernels.paged_attention_with_rotary_cache(
        *(args[n] for n in ORDER), is_neox, kwargs.pop("scale", 0.125), **kwargs)


def test_valid_arguments_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = fused_args()
    assert _call(args, is_neox=False, max_context_len=40, sliding_window=16) is True
    (call,) = rec.calls
    assert list(call[:11]) == [args[n] for n in ORDER]
    # is_neox, scale, alibi, max_context_len, partition (no split), workspace, sliding window,
    # k_scale, v_scale, soft cap
    assert call[11:] == (False, 0.125, None, 40, 0, None, 16, 1.0, 1.0, 0.0)


def test_declined_by_the_kernel_library(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(ran=False)
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    assert _call(fused_args()) is False
    assert len(rec.calls) == 1


def test_split_plans_pass_partitions_and_a_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """One sequence with a 32k context is split (the wave plan) as paged_attention would split
    it; a given workspace is checked for size, else one is allocated."""
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = fused_args(num_seqs=1, max_blocks=2048, num_blocks=2048)
    size, parts = _attention_ops.plan_partitions(1, 4, 2, 32768, 132, head_size=64)
    assert parts > 1
    need = 1 * 4 * parts * (64 + 2)
    with pytest.raises(ValueError, match=f"argument 'workspace' must be at least {need}"):
        _call(args, max_context_len=32768, workspace=FakeCuda(torch.empty(need - 1)))
    ws = FakeCuda(torch.empty(need))
    assert _call(args, max_context_len=32768, workspace=ws) is True
    assert rec.calls[-1][15:17] == (size, ws)
    assert _call(args, max_context_len=200) is True  # a short context is not split
    assert rec.calls[-1][15:17] == (0, None)
    assert _call(args, max_context_len=32768, partition_size=0) is True  # forced unsplit
    assert rec.calls[-1][15:17] == (0, None)


def test_rotary_table_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = fused_args()
    args["cos_sin_cache"] = None
    assert _call(args) is True
    assert rec.calls[0][10] is None


def _expect(args: dict[str, Any], arg: str, *fragments: str, **kwargs: Any) -> None:
    with pytest.raises(ValueError) as info:
        _call(args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{OP}: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(("arg", "shape"), [("key", (3, 4, 64)), ("value", (3, 2, 32)),
                                             ("key", (2, 2, 64)), ("value", (3, 128))])
def test_new_key_and_value_shapes(arg: str, shape: tuple[int, ...]) -> None:
    args = fused_args()
    args[arg] = FakeCuda(torch.zeros(shape, dtype=torch.float16))
    _expect(args, arg, "num_seqs=3, num_kv_heads=2, head_size=64" if len(shape) == 3 else "")


def test_new_key_dtype_must_match_query() -> None:
    args = fused_args()
    args["value"] = FakeCuda(torch.zeros(3, 2, 64, dtype=torch.bfloat16))
    _expect(args, "value", "float16")


@pytest.mark.parametrize("arg", ["positions", "slot_mapping"])
def test_index_tensors(arg: str) -> None:
    args = fused_args()
    args[arg] = FakeCuda(torch.zeros(3, dtype=torch.int32))
    _expect(args, arg, "int64")
    args[arg] = FakeCuda(torch.zeros(4, dtype=torch.int64))
    _expect(args, arg, "[num_seqs=3]", "got [4]")


def test_rotary_table() -> None:
    args = fused_args()
    args["cos_sin_cache"] = FakeCuda(torch.zeros(128, 32))
    _expect(args, "cos_sin_cache", "64")
    args["cos_sin_cache"] = FakeCuda(torch.zeros(128, 64, dtype=torch.float16))
    _expect(args, "cos_sin_cache", "float32")


def test_query_must_be_16_bit() -> None:
    _expect(fused_args(dtype=torch.float32), "query", "float16", "bfloat16")


def test_is_neox_must_be_a_bool() -> None:
    _expect(fused_args(), "is_neox", "a bool", is_neox=1)


def test_cpu_new_token_among_cuda_tensors() -> None:
    args = fused_args()
    args["positions"] = args["positions"].tensor
    with pytest.raises(ValueError, match=f"{OP}: argument 'positions' must be on the same device"):
        _call(args)
