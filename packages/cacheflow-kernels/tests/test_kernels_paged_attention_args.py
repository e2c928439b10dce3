"""paged_attention's argument checks and split-K planning, on CPU tensors (runs in CI).

The Python checks must fire before the kernel library is touched (``get_function`` is a tripwire
unless a test replaces it); with the library built, the C++ checks are called directly too.
"""

from __future__ import annotations

from typing import Any

import pytest

import cacheflow_kernels
from cacheflow_kernels import _attention_ops
from cacheflow_kernels._attention_ops import (
    MAX_PARTITIONS,
    MIN_AUTO_PARTITION,
    MIN_ONE_WAVE_PARTITION,
    MIN_WAVE_PARTITION,
    PARTITION_ALIGN,
    SPLIT_ENV,
    plan_partitions,
    plan_time,
)
from cacheflow_kernels._lib import library_path

torch = pytest.importorskip("torch")

OP = "paged_attention"
ORDER = ("out", "query", "key_cache", "value_cache", "block_tables", "context_lens")


def make_args(
    dtype: Any = None, num_seqs: int = 3, num_heads: int = 4, num_kv_heads: int = 2,
    head_size: int = 64, num_blocks: int = 6, block_size: int = 16, max_blocks: int = 3,
) -> dict[str, Any]:
    """A valid float16 argument set on the CPU (valid except for the device)."""
    dtype = dtype or torch.float16
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(num_seqs, num_heads, head_size, generator=gen).to(dtype)
    cache = (num_blocks, block_size, num_kv_heads, head_size)
    return {
        "out": torch.empty_like(query),
        "query": query,
        "key_cache": torch.randn(cache, generator=gen).to(dtype),
        "value_cache": torch.randn(cache, generator=gen).to(dtype),
        "block_tables": torch.randint(0, num_blocks, (num_seqs, max_blocks), generator=gen,
                                      dtype=torch.int32),
        "context_lens": torch.randint(1, max_blocks * block_size, (num_seqs,), generator=gen,
                                      dtype=torch.int32),
    }


class FakeCuda:
    """A CPU tensor that reports a CUDA device through ``__dlpack_device__`` (kDLCUDA = 2)."""

    def __init__(self, tensor: Any, index: int = 0) -> None:
        self.tensor, self.index = tensor, index
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.index)

    def is_contiguous(self) -> bool:
        return bool(self.tensor.is_contiguous())


@pytest.fixture(autouse=True)
def _library_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(name: str) -> Any:
        raise AssertionError(f"library touched ({name}) before arguments were validated")

    monkeypatch.setattr(_attention_ops, "get_function", tripwire)
    monkeypatch.setattr(_attention_ops, "_sm_counts", {})


def _call(args: dict[str, Any], **kwargs: Any) -> None:
    scale = kwargs.pop("scale", 0.125)
    cacheflow_kernels.paged_attention(*(args[n] for n in ORDER), scale, **kwargs)


def _expect(args: dict[str, Any], arg: str, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as info:
        _call(args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{OP}: argument '{arg}' must be "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def _cuda(args: dict[str, Any]) -> dict[str, Any]:
    return {k: FakeCuda(v) for k, v in args.items()}


# ---- device ---------------------------------------------------------------------------------


def test_cpu_tensors_need_cuda() -> None:
    _expect(make_args(), "query", "a CUDA tensor", "got a tensor on cpu")


@pytest.mark.parametrize("arg", [n for n in ORDER if n != "query"])
def test_cpu_argument_among_cuda_ones(arg: str) -> None:
    args = {k: v if k == arg else FakeCuda(v) for k, v in make_args().items()}
    _expect(args, arg, "on the same device as 'query' (cuda:0)", "got cpu")


@pytest.mark.parametrize("arg", [n for n in ORDER if n != "query"])
def test_other_cuda_device(arg: str) -> None:
    args = {k: FakeCuda(v, 1 if k == arg else 0) for k, v in make_args().items()}
    _expect(args, arg, "on the same device as 'query' (cuda:0)", "got cuda:1")


def test_optional_tensors_checked_for_device() -> None:
    args = _cuda(make_args())
    _expect(args, "alibi_slopes", "same device", alibi_slopes=torch.ones(4))
    _expect(args, "workspace", "same device", workspace=torch.empty(10))


def test_meta_tensors_need_cuda() -> None:
    args = {k: v.to("meta") for k, v in make_args().items()}
    _expect(args, "query", "a CUDA tensor", "meta")


# ---- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_valid_dtypes_reach_the_device_check(dtype: str) -> None:
    _expect(make_args(getattr(torch, dtype)), "query", "a CUDA tensor")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8])
def test_query_dtype(dtype: Any) -> None:
    args = make_args()
    args["query"] = args["query"].to(dtype)
    _expect(args, "query", "float16, bfloat16 or float32", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("arg", ["out", "key_cache", "value_cache"])
def test_dtype_must_match_query(arg: str) -> None:
    args = make_args(torch.float16)
    args[arg] = args[arg].to(torch.bfloat16)
    like = "float16 like 'key_cache'" if arg == "value_cache" else "float16 like 'query'"
    _expect(args, arg, like, "got bfloat16")


@pytest.mark.parametrize("arg", ["block_tables", "context_lens"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_index_dtypes(arg: str, dtype: Any) -> None:
    args = make_args()
    args[arg] = args[arg].to(dtype)
    _expect(args, arg, "of dtype int32", str(dtype).removeprefix("torch."))


def test_alibi_and_workspace_dtypes() -> None:
    _expect(make_args(), "alibi_slopes", "of dtype float32", "float16",
            alibi_slopes=torch.ones(4, dtype=torch.float16))
    _expect(make_args(), "workspace", "of dtype float32", "bfloat16",
            workspace=torch.ones(4, dtype=torch.bfloat16))
    _expect(make_args(), "lse", "of dtype float32", "float16",
            lse=torch.ones(3, 4, dtype=torch.float16))


# ---- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "new_shape", "fragment"),
    [
        ("out", (2, 4, 64), "num_seqs=3"),
        ("out", (3, 4, 32), "head_size=64"),
        ("key_cache", (6, 16, 2, 80), "head_size=64"),
        ("value_cache", (5, 16, 2, 64), "num_blocks=6"),
        ("value_cache", (6, 16, 1, 64), "num_kv_heads=2"),
        ("value_cache", (6, 8, 2, 64), "block_size=16"),
        ("block_tables", (2, 3), "num_seqs=3"),
        ("context_lens", (4,), "num_seqs=3"),
    ],
)
def test_shapes(arg: str, new_shape: tuple[int, ...], fragment: str) -> None:
    args = make_args()
    args[arg] = torch.zeros(new_shape, dtype=args[arg].dtype)
    _expect(args, arg, "of shape [", fragment, f"got [{', '.join(map(str, new_shape))}]")


@pytest.mark.parametrize(
    ("arg", "new_shape"),
    [("query", (3, 256)), ("out", (3, 4, 64, 1)), ("key_cache", (6, 16, 128)),
     ("value_cache", (96, 2, 64)), ("block_tables", (9,)), ("context_lens", (3, 1))],
)
def test_ndims(arg: str, new_shape: tuple[int, ...]) -> None:
    args = make_args()
    args[arg] = torch.zeros(new_shape, dtype=args[arg].dtype)
    _expect(args, arg, "-D tensor [", f"got a {len(new_shape)}-D tensor")


@pytest.mark.parametrize("head_size", [32, 48, 72, 100, 160, 512])
def test_unsupported_head_size(head_size: int) -> None:
    args = make_args(head_size=head_size)
    _expect(args, "query", "of head_size 64, 80, 96, 112, 128 or 256",
            f"got head_size {head_size}")


@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 256])
def test_supported_head_sizes(head_size: int) -> None:
    _expect(make_args(head_size=head_size), "query", "a CUDA tensor")


@pytest.mark.parametrize("block_size", [1, 4, 12, 64])
def test_unsupported_block_size(block_size: int) -> None:
    args = make_args(block_size=block_size)
    _expect(args, "key_cache", "of block_size 8, 16 or 32", f"got block_size {block_size}")


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_supported_block_sizes(block_size: int) -> None:
    _expect(make_args(block_size=block_size), "query", "a CUDA tensor")


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 3), (6, 4), (2, 4)])
def test_heads_must_be_a_multiple_of_kv_heads(num_heads: int, num_kv_heads: int) -> None:
    args = make_args(num_heads=num_heads, num_kv_heads=num_kv_heads)
    _expect(args, "key_cache", f"num_kv_heads dividing num_heads={num_heads}",
            f"got num_kv_heads {num_kv_heads}")


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (32, 4), (8, 1)])
def test_mha_gqa_mqa_accepted(num_heads: int, num_kv_heads: int) -> None:
    _expect(make_args(num_heads=num_heads, num_kv_heads=num_kv_heads), "query", "a CUDA tensor")


def test_alibi_and_workspace_shapes() -> None:
    _expect(make_args(), "alibi_slopes", "of shape [num_heads=4]", "got [2]",
            alibi_slopes=torch.ones(2))
    _expect(make_args(), "workspace", "1-D tensor", "2-D",
            workspace=torch.ones(2, 2))
    _expect(make_args(), "lse", "of shape [num_seqs=3, num_heads=4]", "got [3, 2]",
            lse=torch.ones(3, 2))
    _expect(make_args(), "lse", "2-D tensor", "1-D", lse=torch.ones(12))


# ---- scalars --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", None, True])
def test_scale(scale: Any) -> None:
    _expect(make_args(), "scale", "a finite real number", scale=scale)


@pytest.mark.parametrize("value", [-1, 2.5, "8"])
def test_max_context_len(value: Any) -> None:
    _expect(make_args(), "max_context_len", "None or an int >= 0", max_context_len=value)


@pytest.mark.parametrize("value", [-64, 32, 100, 64.0])
def test_partition_size(value: Any) -> None:
    _expect(make_args(), "partition_size", f"a positive multiple of {PARTITION_ALIGN}",
            partition_size=value)


@pytest.mark.parametrize("value", [0, -3, 1.5])
def test_sliding_window(value: Any) -> None:
    _expect(make_args(), "sliding_window", "None or an int >= 1", sliding_window=value)


@pytest.mark.parametrize("value", [0, 64, 4096])
def test_valid_partition_sizes_reach_the_device_check(value: int) -> None:
    _expect(make_args(), "query", "a CUDA tensor", partition_size=value)


# ---- memory layout --------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ORDER)
def test_non_contiguous(arg: str) -> None:
    args = make_args()
    x = args[arg]
    args[arg] = torch.stack([x, x], dim=-1)[..., 0]  # same shape, every other element
    assert not args[arg].is_contiguous()
    _expect(args, arg, "contiguous", "strided tensor")


def _fused_query(query: Any, extra_heads: int = 4) -> Any:
    """The query as the first heads of wider rows (a view into a fused QKV output)."""
    n, h, d = query.shape
    fused = torch.zeros(n, (h + extra_heads) * d, dtype=query.dtype)
    view = fused[:, : h * d].view(n, h, d)
    view.copy_(query)
    return view


def test_strided_query_rows_reach_the_device_check() -> None:
    """A query whose sequence rows are strided (dense [num_heads, head_size] per row) passes the
    layout checks; so does a one-sequence query with an arbitrary row stride."""
    args = make_args()
    args["query"] = _fused_query(args["query"])
    assert not args["query"].is_contiguous()
    _expect(args, "query", "a CUDA tensor")
    one = make_args(num_seqs=1)
    one["query"] = one["query"].as_strided(one["query"].shape, (7, 64, 1))
    _expect(one, "query", "a CUDA tensor")


@pytest.mark.parametrize("layout", ["heads", "dims", "overlap"])
def test_query_rows_must_be_dense(layout: str) -> None:
    args = make_args()
    q = args["query"]
    n, h, d = q.shape
    if layout == "heads":  # heads not adjacent within a row
        args["query"] = torch.zeros(h, n, d, dtype=q.dtype).transpose(0, 1)
    elif layout == "dims":  # every other element
        args["query"] = torch.stack([q, q], dim=-1)[..., 0]
    else:  # rows overlapping
        args["query"] = torch.zeros(n * d + h * d, dtype=q.dtype).as_strided((n, h, d), (d, d, 1))
    msg = _expect(args, "query", "contiguous, or rows of contiguous [4, 64] blocks",
                  "strided tensor", "with strides")
    assert str(list(args["query"].stride())) in msg


def test_non_contiguous_optional_tensors() -> None:
    strided = torch.ones(8)[::2]
    _expect(make_args(), "alibi_slopes", "contiguous", alibi_slopes=strided)
    _expect(make_args(), "workspace", "contiguous", workspace=torch.ones(20)[::2])
    _expect(make_args(), "lse", "contiguous", lse=torch.ones(4, 3).t())


def test_not_a_tensor() -> None:
    args = make_args()
    args["context_lens"] = [1, 2, 3]
    with pytest.raises(TypeError, match=f"{OP}: argument 'context_lens' must be a tensor"):
        _call(args)


def test_error_message_is_complete() -> None:
    args = make_args()
    args["key_cache"] = torch.zeros((6, 16, 2, 80), dtype=torch.float16)
    with pytest.raises(ValueError) as info:
        _call(args)
    assert str(info.value) == (
        "paged_attention: argument 'key_cache' must be of shape "
        "[num_blocks, block_size, num_kv_heads, head_size=64], got [6, 16, 2, 80]"
    )


# ---- what reaches the library ---------------------------------------------------------------


class Recorder:
    """Replaces get_function: a fixed SM count and a record of the kernel call."""

    def __init__(self, sms: int = 132) -> None:
        self.sms, self.calls = sms, []

    def __call__(self, name: str) -> Any:
        if name == "paged_attention_sm_count":
            return lambda index: self.sms
        assert name == "paged_attention", name
        return lambda *a: self.calls.append(a)


def test_valid_arguments_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = _cuda(make_args())
    alibi = FakeCuda(torch.ones(4))
    _call(args, scale=0.25, alibi_slopes=alibi)
    (call,) = rec.calls
    assert list(call[:6]) == [args[n] for n in ORDER]
    # scale, alibi, max_context_len (default: 3 blocks * 16), partition (no split), workspace,
    # sliding window (0: none), k_scale, v_scale, logits soft cap (0: none), lse (None)
    assert call[6:] == (0.25, alibi, 48, 0, None, 0, 1.0, 1.0, 0.0, None)


def test_fp8_caches_scales_and_soft_cap_reach_the_library(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = _cuda(make_args())
    for name in ("key_cache", "value_cache"):
        args[name] = FakeCuda(torch.zeros(args[name].shape, dtype=torch.float8_e4m3fn))
    _call(args, k_scale=0.5, v_scale=0.125, logits_soft_cap=30.0)
    (call,) = rec.calls
    assert call[-4:] == (0.5, 0.125, 30.0, None)
    with pytest.raises(ValueError, match="argument 'logits_soft_cap' must be None or a finite"):
        _call(args, logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match="argument 'v_scale' must be a finite number > 0"):
        _call(args, v_scale=0.0)


def test_split_needs_a_large_enough_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    args = _cuda(make_args(num_seqs=1, max_blocks=64, num_blocks=70))  # 1024 tokens
    need = 1 * 4 * 4 * (64 + 2)  # 4 partitions of 256
    assert cacheflow_kernels.paged_attention_workspace_size(
        1, 4, 2, 64, 1024, num_sms=132, partition_size=256) == need
    with pytest.raises(ValueError, match=f"argument 'workspace' must be at least {need} float32"):
        _call(args, partition_size=256, workspace=FakeCuda(torch.empty(need - 1)))
    ws = FakeCuda(torch.empty(need))
    _call(args, partition_size=256, workspace=ws, sliding_window=100)
    (call,) = rec.calls
    assert call[6:] == (0.125, None, 1024, 256, ws, 100, 1.0, 1.0, 0.0, None)


def test_unsplit_call_passes_no_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    _call(_cuda(make_args()), partition_size=0, workspace=FakeCuda(torch.empty(3)),
          max_context_len=20)
    assert rec.calls[0][8:11] == (20, 0, None)


def test_max_context_len_clamped_to_table(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    _call(_cuda(make_args()), max_context_len=10_000)
    assert rec.calls[0][8] == 48


def test_too_many_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_attention_ops, "get_function", Recorder())
    args = _cuda(make_args(num_seqs=1, block_size=32, max_blocks=20_000, num_blocks=1))
    with pytest.raises(ValueError, match=f"at most {MAX_PARTITIONS} partitions"):
        _call(args, partition_size=64)


def test_empty_batch_is_checked_then_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _expect(make_args(num_seqs=0), "query", "a CUDA tensor")
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    _call(_cuda(make_args(num_seqs=0)))
    assert rec.calls == []


def test_validated_signature_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain torch tensors: a signature that passed the checks skips them on the next call, but
    the scalars are still checked, and a tensor that differs (here: strided) is checked again."""
    rec = Recorder()
    monkeypatch.setattr(_attention_ops, "get_function", rec)
    monkeypatch.setattr(_attention_ops, "_CHECKS", _attention_ops.C.CheckMemo())
    # CPU tensors stand in for CUDA ones: only the device check is disabled.
    monkeypatch.setattr(_attention_ops.C, "check_cuda", lambda *a: None)
    args = make_args()
    _call(args)
    _call(args, scale=0.5)
    assert len(_attention_ops._CHECKS) == 1
    assert [c[6] for c in rec.calls] == [0.125, 0.5]
    _expect(args, "scale", "a finite real number", scale=float("nan"))
    _expect(args, "max_context_len", "None or an int >= 0", max_context_len=True)
    _expect(args, "partition_size", "multiple of 64", partition_size=100)
    strided_out = torch.empty_like(args["out"]).transpose(0, 1).contiguous().transpose(0, 1)
    assert strided_out.shape == args["out"].shape and not strided_out.is_contiguous()
    _expect(dict(args, out=strided_out), "out", "contiguous")
    assert len(rec.calls) == 2


# ---- the split-K plan ----------------------------------------------------------------------
# "fill": the plan of 2026-12-03 (CACHEFLOW_PA_SPLIT=fill); "wave" the default.


def test_plan_no_split_when_two_partitions_do_not_fit_one_wave() -> None:
    # batch 64, 32 KV heads: 2048 CTAs; GQA-8 with 4 KV heads: 256 CTAs, more than half of the
    # 3 x 132 resident CTAs at head size 128
    assert plan_partitions(64, 32, 32, 2048, 132, split="fill") == (0, 1)
    assert plan_partitions(64, 32, 4, 2048, 132, split="fill") == (0, 1)
    # head size 256: 2 resident CTAs per SM, so 16 x 16 = 256 CTAs fill one wave
    assert plan_partitions(16, 16, 16, 4096, 132, head_size=256, split="fill") == (0, 1)


@pytest.mark.parametrize(
    ("args", "head_size", "expected"),
    [
        # MQA with 32 heads over 32 sequences: 32 CTAs of 32 heads are fewer than the SMs, so
        # CTAs of 16 (3 resident per SM at d128): 64 CTAs x 6 <= 396
        ((32, 32, 1, 4096), 128, (704, 6)),
        # ... over 160 sequences: 160 CTAs of 32 heads, 2 resident per SM: one wave unsplit
        ((160, 32, 1, 4096), 128, (0, 1)),
        ((8, 32, 4, 8192), 128, (704, 12)),    # 32 CTAs x 12
        ((16, 32, 8, 4096), 64, (1024, 4)),    # 128 CTAs x 4 = 512 <= 4 x 132
        ((1, 32, 4, 32768), 128, (512, 64)),   # the 512-token minimum binds
        ((1, 32, 32, 32768), 128, (2752, 12)),
    ],
)
def test_plan_fills_one_wave(args: tuple[int, int, int, int], head_size: int,
                             expected: tuple[int, int]) -> None:
    assert plan_partitions(*args, 132, head_size=head_size, split="fill") == expected


@pytest.mark.parametrize("split", ["wave", "fill"])
@pytest.mark.parametrize(
    ("num_seqs", "num_heads", "num_kv_heads", "max_ctx"),
    [(1, 32, 32, 32768), (1, 32, 4, 32768), (16, 32, 4, 8192), (4, 8, 1, 5000),
     (2, 64, 8, 2800), (1, 1, 1, 1 << 30)],
)
def test_plan_split(num_seqs: int, num_heads: int, num_kv_heads: int, max_ctx: int,
                    split: str) -> None:
    size, parts = plan_partitions(num_seqs, num_heads, num_kv_heads, max_ctx, 132, split=split)
    assert parts > 1
    group = num_heads // num_kv_heads
    heads = _attention_ops.cta_heads(group, 128, num_seqs * num_kv_heads, 132)
    ctas = num_seqs * num_kv_heads * -(-group // heads) * parts
    if split == "fill":
        shortest = MIN_AUTO_PARTITION
    else:  # shorter partitions only where the split grid keeps at most one CTA per SM
        shortest = MIN_ONE_WAVE_PARTITION if ctas <= 132 else MIN_WAVE_PARTITION
    assert size % PARTITION_ALIGN == 0 and size >= shortest
    assert (parts - 1) * size < max_ctx <= parts * size
    assert parts <= MAX_PARTITIONS
    if split == "fill":
        resident = _attention_ops.resident_ctas_per_sm(128, heads)
        assert ctas <= resident * 132 or size == MIN_AUTO_PARTITION or parts == MAX_PARTITIONS


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # (num_seqs, num_heads, num_kv_heads, max_context_len): the fastest plan of an H100
        # sweep (2026-12-06, docs/benchmarks.md), where the merge cost of 128 tokens split
        # these into 256-token partitions, 6-32% slower
        ((32, 32, 1, 512), (0, 1)),     # MQA: 9.22 us unsplit, 11.69 in 2 x 256
        ((64, 32, 1, 1024), (0, 1)),    # 19.72 unsplit, 22.63 in 2 x 512
        ((8, 32, 4, 1024), (0, 1)),     # GQA-8: 10.85 unsplit, 12.73 in 4 x 256
        ((1, 32, 32, 1024), (0, 1)),    # MHA batch 1: 10.26 unsplit, 12.24 in 4 x 256
        ((2, 32, 32, 2048), (0, 1)),    # 25.05 unsplit, 27.60 in 4 x 512
        # ... and where splitting was the faster plan, it still splits (16 CTAs: partitions of
        # 128 tokens keep one CTA per SM; survey of 2026-12-06 19:00: 8.51 in 8 x 128, 9.52 in
        # 4 x 256, 14.84 unsplit)
        ((8, 32, 1, 1024), (128, 8)),
        # 64 wide CTAs of 16 heads unsplit: 12.40 us against 14.48 in 4 x 256 (H100,
        # 2026-12-07 11:45; 4-warp CTAs unsplit took 15.63)
        ((32, 32, 1, 1024), (0, 1)),
    ],
)
def test_plan_keeps_short_contexts_whole(args: tuple[int, int, int, int],
                                         expected: tuple[int, int]) -> None:
    assert plan_partitions(*args, 132, head_size=128, split="wave") == expected


def test_plan_follows_the_cta_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups above 16 heads plan CTAs of 32 (2 resident per SM at d128, 3 at d64) where the
    unsplit grid of such CTAs has one per SM or more, else CTAs of 16; CACHEFLOW_PA_ROWS=16 or
    32 forces one."""
    monkeypatch.delenv(_attention_ops.ROWS_ENV, raising=False)
    cta_heads = _attention_ops.cta_heads
    assert cta_heads(32, 128, 132, 132) == 32   # 132 CTAs of 32 heads on 132 SMs
    assert cta_heads(32, 128, 131, 132) == 16
    assert cta_heads(48, 128, 66, 132) == 32    # two head groups each: 132 CTAs
    assert cta_heads(48, 128, 65, 132) == 16
    assert cta_heads(16, 128, 1000, 132) == 16  # one row tile covers the group
    assert cta_heads(32, 256, 1000, 132) == 16  # d256: no two-row-tile kernel
    assert _attention_ops.resident_ctas_per_sm(128, 32) == 2
    assert _attention_ops.resident_ctas_per_sm(64, 32) == 3
    # MQA, 32 heads, 32 sequences x 4k tokens (32 CTAs of 32: too few): the plan of CTAs of 16,
    # 64 wide ones unsplit (32.12 us against 33.24 in 4 x 1024, H100 2026-12-07 11:45).
    assert plan_partitions(32, 32, 1, 4096, 132, split="wave") == (0, 1)
    assert plan_partitions(32, 32, 1, 4096, 132, split="fill") == (704, 6)
    # 256 sequences x 2k: 256 CTAs of 32 fill the SMs unsplit (CTAs of 16 would split in two).
    assert plan_partitions(256, 32, 1, 2048, 132, split="wave") == (0, 1)
    monkeypatch.setenv(_attention_ops.ROWS_ENV, "32")
    assert cta_heads(32, 128, 1, 132) == 32
    assert plan_partitions(32, 32, 1, 8192, 132, split="fill") == (1024, 8)
    monkeypatch.setenv(_attention_ops.ROWS_ENV, "16")
    assert cta_heads(32, 128, 1000, 132) == 16
    assert plan_partitions(256, 32, 1, 2048, 132, split="wave") == (1024, 2)


def test_plan_short_contexts_do_not_split() -> None:
    assert plan_partitions(1, 8, 8, MIN_AUTO_PARTITION * 2 - 1, 132, split="fill") == (0, 1)
    assert plan_partitions(1, 8, 8, MIN_WAVE_PARTITION * 2 - 1, 132, split="wave") == (0, 1)
    for split in ("wave", "fill"):
        assert plan_partitions(1, 8, 8, 0, 132, split=split) == (0, 1)


def test_plan_explicit_partition_size() -> None:
    for split in ("wave", "fill"):
        assert plan_partitions(64, 32, 32, 2048, 132, partition_size=512, split=split) == (512, 4)
        assert plan_partitions(64, 32, 32, 512, 132, partition_size=512, split=split) == (0, 1)
        assert plan_partitions(1, 32, 32, 32768, 132, partition_size=0, split=split) == (0, 1)


@pytest.mark.parametrize(
    ("args", "head_size", "four_warps", "wide"),
    [
        # 512 CTAs on 132 SMs x 3: 1.3 waves, a tail of one CTA per SM -> two partitions
        ((16, 32, 32, 8192), 128, (4096, 2), (4096, 2)),
        # whole waves already, or many of them: no split
        ((64, 32, 32, 2048), 128, (0, 1), (0, 1)),
        ((64, 32, 4, 2048), 128, (0, 1), (0, 1)),
        ((16, 16, 16, 4096), 256, (0, 1), (0, 1)),
        ((256, 32, 32, 512), 128, (0, 1), (0, 1)),
        # few CTAs: about two per SM (the saturating count of 3 resident), long partitions (wide
        # CTAs run unsplit grids only: these stay split)
        ((1, 32, 32, 32768), 128, (4096, 8), (4096, 8)),
        ((32, 32, 1, 4096), 128, (1024, 4), (0, 1)),  # MQA: wide CTAs of 16 heads, 64 of them
        ((128, 32, 1, 1024), 128, (0, 1), (0, 1)),
        ((8, 32, 4, 8192), 128, (1024, 8), (1024, 8)),
        ((1, 32, 4, 32768), 128, (512, 64), (512, 64)),
        # head size 64: 4 resident, 3 saturating; 128 unsplit wide CTAs, one per SM, beat 3
        # partitions of 4-warp CTAs and the merge
        ((16, 32, 8, 4096), 64, (1408, 3), (0, 1)),
        ((4, 32, 32, 2048), 128, (1024, 2), (0, 1)),
    ],
)
def test_plan_wave_model(monkeypatch: pytest.MonkeyPatch, args: tuple[int, int, int, int],
                         head_size: int, four_warps: tuple[int, int],
                         wide: tuple[int, int]) -> None:
    """The plan for CTAs of 4 warps (CACHEFLOW_PA_WARPS=4) and with wide CTAs (the default)
    for grids of at most one CTA per SM."""
    monkeypatch.setenv(_attention_ops.WARPS_ENV, "4")
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == four_warps
    monkeypatch.delenv(_attention_ops.WARPS_ENV)
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == wide


def test_fused_plan_is_the_four_warp_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused launch of a group of 17-32 query heads runs 4-warp CTAs, so it is planned as
    paged_attention with CACHEFLOW_PA_WARPS=4 (the two give the same bits only with the same
    split); groups up to 16 run wide CTAs fused too and keep the default plan."""
    monkeypatch.delenv(_attention_ops.WIDE_GROUP_ENV, raising=False)
    shapes = [(64, 32, 1, 1500), (48, 32, 1, 1024), (16, 32, 1, 768), (8, 24, 1, 4096)]
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    default = [plan_partitions(*s, 132, split="wave") for s in shapes]
    fused = [plan_partitions(*s, 132, split="wave", fused=True) for s in shapes]
    gqa = plan_partitions(4, 32, 4, 2048, 132, split="wave")
    assert plan_partitions(4, 32, 4, 2048, 132, split="wave", fused=True) == gqa
    monkeypatch.setenv(_attention_ops.WARPS_ENV, "4")
    four_warps = [plan_partitions(*s, 132, split="wave") for s in shapes]
    assert fused == four_warps
    assert fused != default  # the default plans of these shapes run wide CTAs unsplit
    assert default[:3] == [(0, 1)] * 3


def test_plan_wide_ctas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide CTAs (the warps of ``resident`` 4-warp CTAs in one) at head sizes up to 128 and
    groups of at most 32 query heads: an unsplit plan whose grid has at most one CTA per SM is
    costed at ``resident`` times a lone CTA's rate where the grid covers at least a fifth of the
    SMs, else at the saturated rate; split plans keep the 4-warp model."""
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    monkeypatch.delenv(_attention_ops.WIDE_GROUP_ENV, raising=False)
    allowed = _attention_ops.wide_ctas_allowed
    assert [allowed(d, 16) for d in (64, 80, 96, 112, 128, 256)] == [
        True, True, True, True, True, False]
    assert allowed(128, 1) and allowed(128, 17) and allowed(96, 32)
    assert allowed(128, 33) and allowed(128, 48)
    assert not allowed(128, 49)  # larger groups keep CTAs of 4 warps
    for value, largest in (("32", 32), ("64", 64), ("0", 48), ("x", 48), ("2000", 48)):
        monkeypatch.setenv(_attention_ops.WIDE_GROUP_ENV, value)
        assert (allowed(128, largest), allowed(128, largest + 1)) == (True, False), value
    # MQA of 48 heads at batch 32 (96 CTAs of 16 heads): unsplit in wide CTAs (13.80 us, 0.99x
    # SDPA), where 4-warp CTAs split in 2 x 512 (17.43 us; H100, 2026-12-07 14:56).
    monkeypatch.delenv(_attention_ops.WIDE_GROUP_ENV)
    assert plan_partitions(32, 48, 1, 1024, 132, split="wave") == (0, 1)
    monkeypatch.setenv(_attention_ops.WIDE_GROUP_ENV, "32")
    assert plan_partitions(32, 48, 1, 1024, 132, split="wave") == (512, 2)
    monkeypatch.delenv(_attention_ops.WIDE_GROUP_ENV)
    # Groups of 17-32 are planned as wide CTAs from grids of a fifth of the SMs (the measured
    # ones): MQA-32 at batch 16 (32 CTAs of 16 heads) unsplit, at batch 12 (24) split as before.
    assert plan_partitions(16, 32, 1, 768, 132, split="wave") == (0, 1)
    assert plan_partitions(12, 32, 1, 512, 132, split="wave") == (128, 4)
    work = 4096 + _attention_ops._CTA_OVERHEAD_TOKENS
    assert plan_time(128, 1, 4096, 132, 4, 16, wide=True) == pytest.approx(work / 4)
    assert plan_time(27, 1, 4096, 132, 4, 16, wide=True) == pytest.approx(work / 4)
    assert plan_time(26, 1, 4096, 132, 4, 16, wide=True) == pytest.approx(work / 3)
    assert plan_time(128, 1, 4096, 132, 4, 16) == pytest.approx(work)
    # a split plan, or a grid of more than one CTA per SM, is costed as before
    for ctas, parts in ((128, 3), (133, 1)):
        assert plan_time(ctas, parts, 4096, 132, 4, 16, wide=True) == \
            plan_time(ctas, parts, 4096, 132, 4, 16)
    assert plan_partitions(16, 32, 8, 4096, 132, head_size=64, split="wave") == (0, 1)
    monkeypatch.setenv(_attention_ops.WARPS_ENV, "4")
    assert not allowed(128, 16)
    assert plan_partitions(16, 32, 8, 4096, 132, head_size=64, split="wave") == (1408, 3)


@pytest.mark.parametrize(
    ("args", "head_size", "expected"),
    [
        # (num_seqs, num_heads, num_kv_heads, max_context_len): an H100 sweep (2026-12-06,
        # docs/benchmarks.md) of the shapes where the two wide-CTA rates disagree. 32-64 wide
        # CTAs: unsplit fastest (us unsplit / in the split the saturated rate chose)
        ((1, 32, 32, 2048), 128, (0, 1)),   # 16.2 / 16.55 in 8 x 256
        ((2, 32, 32, 3072), 128, (0, 1)),   # 35.6 / 38.2
        ((2, 32, 32, 6144), 128, (0, 1)),   # 67.4 / 69.4
        ((8, 32, 4, 2048), 128, (0, 1)),    # 16.9 / 17.9
        ((16, 32, 4, 4096), 128, (0, 1)),   # 47.8 / 50.0
        ((4, 32, 8, 3072), 64, (0, 1)),     # 13.9 / 14.6
        ((8, 32, 8, 4096), 64, (0, 1)),     # 25.8 / 28.8
        # 4-16 wide CTAs: the split fastest (us in the split / unsplit)
        ((1, 32, 4, 2048), 128, (128, 16)),  # 6.84 in 16 x 128, 8.47 in 8 x 256 / 14.15
        ((4, 32, 4, 2048), 128, (256, 8)),  # 12.7 / 14.6
        ((2, 32, 8, 3072), 64, (256, 12)),  # 10.0 / 12.95
    ],
)
def test_plan_wide_grids_by_their_share_of_the_sms(
        monkeypatch: pytest.MonkeyPatch, args: tuple[int, int, int, int], head_size: int,
        expected: tuple[int, int]) -> None:
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == expected


@pytest.mark.parametrize(
    ("args", "head_size", "measured"),
    # (seqs, heads, kv heads, context), head size; H100 us, 2026-12-06: unsplit / the two-way
    # split planned before
    [
        ((32, 32, 8, 2048), 64, (47.3, 50.0)),
        ((64, 32, 4, 2048), 64, (48.25, 52.87)),
        ((96, 32, 1, 2048), 64, (23.78, 28.8)),
        ((32, 32, 8, 4096), 80, (126.76, 134.66)),
        ((8, 32, 32, 16384), 64, (340.68, 346.63)),
    ],
)
def test_plan_grids_of_one_to_two_ctas_per_sm_unsplit(
        monkeypatch: pytest.MonkeyPatch, args: tuple[int, int, int, int], head_size: int,
        measured: tuple[float, float]) -> None:
    """Grids of one to two 16-row CTAs per SM at head sizes up to 96 (four resident) run unsplit:
    two CTAs per SM saturate it there (_PAIR_GRID_SATURATION), so a two-way split only adds its
    merge. Each shape was measured faster unsplit than split in two."""
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    monkeypatch.delenv(_attention_ops.ROWS_ENV, raising=False)
    seqs, heads, kv, ctx = args
    assert measured[0] < measured[1]
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == (0, 1)
    # the same model without the pair-grid saturation split them in two
    monkeypatch.setattr(_attention_ops, "_PAIR_GRID_SATURATION", 3)
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(*args, 132, head_size=head_size, split="wave")[1] == 2
    _attention_ops._WAVE_PLANS.clear()


def test_plan_limits_partitions_by_the_grid() -> None:
    """max_wave_partitions: 256-token partitions at least; 128 where the split grid keeps at most
    one CTA per SM; at most two partitions for grids of one CTA per SM or more unsplit."""
    most = _attention_ops.max_wave_partitions
    assert MIN_ONE_WAVE_PARTITION == 128 and _attention_ops.FULL_GRID_MAX_PARTITIONS == 2
    assert most(4, 1024, 132) == 8        # 32 CTAs of 128 tokens
    assert most(4, 65536, 132) == 256     # long contexts: the 256-token limit is the larger
    assert most(16, 4096, 132) == 16      # 16 x 256 = 4096 beats 8 (one wave of 128-token CTAs)
    assert most(64, 1024, 132) == 4       # 2 per wave of 128 tokens < 4 of 256
    assert most(131, 32768, 132) == 128
    assert most(132, 32768, 132) == 2
    assert most(1000, 32768, 132) == 2
    assert most(1, 100, 132) == 0


@pytest.mark.parametrize(
    ("args", "head_size", "measured"),
    # (seqs, heads, kv heads, context), head size; H100 us (2026-12-06 survey and sweeps,
    # docs/benchmarks.md): the plan's partitions, its time, and the earlier plan's partitions
    # and time (a split of 3-11)
    [
        ((72, 32, 1, 4096), 128, (2, 64.29, 7, 77.66)),     # MQA, 144 CTAs of 16 heads
        ((72, 32, 1, 8192), 128, (2, 116.11, 10, 131.11)),
        ((17, 32, 8, 4096), 64, (2, 55.09, 7, 57.91)),      # GQA-4 d64, 136 CTAs
        ((17, 32, 8, 8192), 64, (2, 103.74, 11, 107.04)),
        ((7, 32, 32, 16384), 64, (1, 311.29, 7, 321.53)),   # MHA d64, 224 CTAs
    ],
)
def test_plan_full_grids_split_at_most_in_two(
        monkeypatch: pytest.MonkeyPatch, args: tuple[int, int, int, int], head_size: int,
        measured: tuple[int, float, int, float]) -> None:
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    monkeypatch.delenv(_attention_ops.ROWS_ENV, raising=False)
    parts, us, old_parts, old_us = measured
    assert us < old_us
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(*args, 132, head_size=head_size, split="wave")[1] == parts
    # without the limit the model splits them as before
    monkeypatch.setattr(_attention_ops, "FULL_GRID_MAX_PARTITIONS", 1 << 20)
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(*args, 132, head_size=head_size, split="wave")[1] == old_parts
    _attention_ops._WAVE_PLANS.clear()


@pytest.mark.parametrize(
    ("args", "head_size", "measured"),
    # (seqs, heads, kv heads, context), head size; H100 us (2026-12-06 19:00 and 19:14,
    # docs/benchmarks.md): the split plan's time, and the unsplit time the full merge cost chose
    [
        ((1, 32, 4, 1024), 128, ((128, 8), 6.06, 8.65)),   # GQA-8, 4 wide CTAs unsplit
        ((8, 32, 1, 512), 128, ((128, 4), 7.00, 8.32)),    # MQA, 16 CTAs of 16 heads (8.32-8.57)
    ],
)
def test_plan_small_grids_merge_cheaply(
        monkeypatch: pytest.MonkeyPatch, args: tuple[int, int, int, int], head_size: int,
        measured: tuple[tuple[int, int], float, float]) -> None:
    """A split grid of fewer CTAs than SMs pays the merge's cost in proportion (merge_cost): small
    grids at short contexts split into 128-token partitions, which measured faster."""
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    monkeypatch.delenv(_attention_ops.ROWS_ENV, raising=False)
    plan, split_us, whole_us = measured
    assert split_us < whole_us
    # half from few CTAs up to one per SM, then in proportion, all from two per SM
    assert _attention_ops.merge_cost(16, 132) == _attention_ops.merge_cost(132, 132) == 256
    assert _attention_ops.merge_cost(198, 132) == pytest.approx(384)
    assert _attention_ops.merge_cost(264, 132) == _attention_ops.merge_cost(1000, 132) == 512
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == plan
    # at the full cost for every grid these stayed whole
    monkeypatch.setattr(_attention_ops, "merge_cost", lambda split_ctas, num_sms: 576)
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(*args, 132, head_size=head_size, split="wave") == (0, 1)
    _attention_ops._WAVE_PLANS.clear()


def test_plan_keeps_tiny_wide_grids_at_head_size_64_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two to eight wide CTAs at head size 64 and 1k tokens stay whole (8 measured: 5.46 us whole,
    6.14 in 8 x 128, H100 2026-12-06): the merge's share has a floor, without which the fewer
    CTAs would split (SmolLM2's 3 KV heads, Qwen2-0.5B's 2, at batch 1)."""
    monkeypatch.delenv(_attention_ops.WARPS_ENV, raising=False)
    for args in ((1, 32, 8, 1024), (1, 9, 3, 1024), (1, 14, 2, 1024), (1, 32, 4, 1024)):
        _attention_ops._WAVE_PLANS.clear()
        assert plan_partitions(*args, 132, head_size=64, split="wave") == (0, 1), args
    monkeypatch.setattr(_attention_ops, "_MERGE_MIN_SHARE", 0.0)
    _attention_ops._WAVE_PLANS.clear()
    assert plan_partitions(1, 9, 3, 1024, 132, head_size=64, split="wave") == (128, 8)
    _attention_ops._WAVE_PLANS.clear()


def test_plan_wave_is_the_model_minimum_and_follows_the_sm_count() -> None:
    """The chosen count is the cheapest of every count the model allows (not just the tried
    wave boundaries) wherever the merge costs the same for each of them; a count the model
    prices lower is one whose split grid pays less than the full merge, which the planner does
    not search (trying every such count moved plans to ones measured slower, H100 2026-12-07).
    The plan scales with the multiprocessor count."""
    full = _attention_ops._MERGE_FULL_CTAS_PER_SM
    for ctas, ctx, sms, resident in [(512, 8192, 132, 3), (64, 4096, 132, 3), (4, 32768, 132, 3),
                                     (128, 4096, 108, 4), (30, 20000, 80, 2), (7, 3000, 46, 3),
                                     (48, 1536, 144, 2)]:
        best = _attention_ops._wave_partitions(ctas, ctx, sms, resident, 16)
        most = _attention_ops.max_wave_partitions(ctas, ctx, sms)
        times = {p: plan_time(ctas, p, ctx, sms, resident, 16) for p in range(1, most + 1)}
        cheaper = [p for p, t in times.items() if t < times[best] * (1 - 1e-9)]
        assert all(ctas * p < full * sms for p in cheaper), (ctas, ctx, sms, best, cheaper)
        if ctas * 2 >= full * sms:
            assert not cheaper, (ctas, ctx, sms)
    # the same problem on a device with half the SMs needs fewer partitions
    assert plan_partitions(1, 32, 32, 32768, 66, split="wave")[1] < \
        plan_partitions(1, 32, 32, 32768, 132, split="wave")[1]


def test_saturating_ctas() -> None:
    """Two thirds of the resident 16-row CTAs saturate an SM's share; one 32-row CTA does."""
    assert [_attention_ops.saturating_ctas_per_sm(r) for r in (2, 3, 4)] == [2, 2, 3]
    assert [_attention_ops.saturating_ctas_per_sm(r, 32) for r in (2, 3, 4)] == [1, 1, 1]
    # 128 CTAs of 32 rows on 132 SMs: a split into two partitions costs more than none
    assert plan_time(128, 2, 1024, 132, 2, 32) > plan_time(128, 1, 1024, 132, 2, 32)


def test_plan_wave_tail_model() -> None:
    """plan_time: a grid of whole waves costs its waves; a partial last wave of fewer CTAs per
    SM than saturate it costs as much as a saturating one."""
    # 396 CTAs on 132 SMs x 3 (2 saturate): one wave, 3 CTAs per SM -> 3 / 2 CTA times
    assert plan_time(396, 1, 1000, 132, 3, 1) == pytest.approx(3 * 1064 / 2)
    # 132 CTAs: one per SM, runs as long as two
    assert plan_time(132, 1, 1000, 132, 3, 1) == plan_time(264, 1, 1000, 132, 3, 1)


def test_plan_split_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPLIT_ENV, raising=False)
    assert plan_partitions(16, 32, 32, 8192, 132) == (4096, 2)
    monkeypatch.setenv(SPLIT_ENV, "fill")
    assert plan_partitions(16, 32, 32, 8192, 132) == (0, 1)
    assert cacheflow_kernels.paged_attention_workspace_size(16, 32, 32, 128, 8192,
                                                            num_sms=132) == 0
    monkeypatch.setenv(SPLIT_ENV, "wave")
    assert plan_partitions(16, 32, 32, 8192, 132) == (4096, 2)
    assert cacheflow_kernels.paged_attention_workspace_size(
        16, 32, 32, 128, 8192, num_sms=132) == 16 * 32 * 2 * 130


def test_plan_wave_memo_per_context_bucket() -> None:
    """One model evaluation per 64-token bucket: contexts in a bucket share the partition
    count; the size still covers each context."""
    for ctx in range(8192, 8256):
        size, parts = plan_partitions(16, 32, 32, ctx, 132, split="wave")
        assert parts == 2 and (parts - 1) * size < ctx <= parts * size


def test_workspace_size_formula() -> None:
    size, parts = plan_partitions(2, 16, 2, 9000, 132)
    assert parts > 1
    assert cacheflow_kernels.paged_attention_workspace_size(
        2, 16, 2, 128, 9000, num_sms=132) == 2 * 16 * parts * 130
    assert cacheflow_kernels.paged_attention_workspace_size(
        256, 32, 32, 128, 9000, num_sms=132) == 0


def test_workspace_size_device_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device`` as None, an index, "cuda", "cuda:N" or a torch.device asks the library for
    that device's multiprocessor count; anything else is refused by name."""
    asked: list[int] = []

    def fake_get_function(name: str) -> Any:
        assert name == "paged_attention_sm_count"
        return lambda index: asked.append(index) or 132

    monkeypatch.setattr(_attention_ops, "get_function", fake_get_function)
    monkeypatch.setattr(_attention_ops, "_sm_counts", {})
    expected = 2 * 16 * plan_partitions(2, 16, 2, 9000, 132)[1] * 130
    for device, index in ((None, 0), (0, 0), (3, 3), ("cuda", 0), ("cuda:2", 2),
                          (torch.device("cuda"), 0), (torch.device("cuda", 1), 1)):
        monkeypatch.setattr(_attention_ops, "_sm_counts", {})
        asked.clear()
        assert cacheflow_kernels.paged_attention_workspace_size(
            2, 16, 2, 128, 9000, device=device) == expected
        assert asked == [index], device
    for bad in ("cpu", "cuda:x", "cuda:", torch.device("cpu"), -1, 1.5):
        with pytest.raises(ValueError, match="device must be a CUDA device"):
            cacheflow_kernels.paged_attention_workspace_size(2, 16, 2, 128, 9000, device=bad)


def test_exports() -> None:
    assert cacheflow_kernels.PAGED_ATTENTION_HEAD_SIZES == (64, 80, 96, 112, 128, 256)
    assert cacheflow_kernels.PAGED_ATTENTION_BLOCK_SIZES == (8, 16, 32)
    for name in ("paged_attention", "paged_attention_workspace_size"):
        assert name in cacheflow_kernels.__all__


# ---- the C++ checks (library built; CPU tensors, called directly) ---------------------------

needs_library = pytest.mark.skipif(
    not library_path().is_file(), reason=f"kernel library not built ({library_path()})"
)


def _raw(args: dict[str, Any], scale: Any = 0.125, alibi: Any = None, max_ctx: int = 48,
         partition: int = 0, workspace: Any = None, window: int = 0, k_scale: float = 1.0,
         v_scale: float = 1.0, soft_cap: float = 0.0, lse: Any = None) -> str:
    from cacheflow_kernels._lib import get_function

    with pytest.raises(ValueError) as info:
        get_function(OP)(*(args[n] for n in ORDER), scale, alibi, max_ctx, partition, workspace,
                         window, k_scale, v_scale, soft_cap, lse)
    return str(info.value)


@needs_library
def test_cpp_rejects_cpu_tensors() -> None:
    assert "paged_attention: argument 'query' must be a CUDA tensor, got a tensor on cpu" in \
        _raw(make_args())


@needs_library
@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda a: a.update(query=a["query"].double()),
         "argument 'query' must be float16, bfloat16 or float32, got float64"),
        (lambda a: a.update(query=torch.zeros(3, 4, 72, dtype=torch.float16),
                            out=torch.zeros(3, 4, 72, dtype=torch.float16),
                            key_cache=torch.zeros(6, 16, 2, 72, dtype=torch.float16),
                            value_cache=torch.zeros(6, 16, 2, 72, dtype=torch.float16)),
         "argument 'query' must be of head_size 64, 80, 96, 112, 128 or 256, got head_size 72"),
        (lambda a: a.update(out=a["out"].float()),
         "argument 'out' must be float16 like 'query', got float32"),
        (lambda a: a.update(key_cache=torch.zeros(6, 12, 2, 64, dtype=torch.float16),
                            value_cache=torch.zeros(6, 12, 2, 64, dtype=torch.float16)),
         "argument 'key_cache' must be of block_size 8, 16 or 32, got block_size 12"),
        (lambda a: a.update(key_cache=torch.zeros(6, 16, 3, 64, dtype=torch.float16),
                            value_cache=torch.zeros(6, 16, 3, 64, dtype=torch.float16)),
         "argument 'key_cache' must be of num_kv_heads dividing num_heads=4, got num_kv_heads 3"),
        (lambda a: a.update(value_cache=torch.zeros(6, 16, 2, 64, dtype=torch.float16)[:5]),
         "argument 'value_cache' must be of shape [6, 16, 2, 64] like 'key_cache'"),
        (lambda a: a.update(block_tables=a["block_tables"].long()),
         "argument 'block_tables' must be int32, got int64"),
        (lambda a: a.update(context_lens=a["context_lens"][:2]),
         "argument 'context_lens' must be of shape [3]"),
        (lambda a: a.update(query=torch.stack([a["query"]] * 2, -1)[..., 0]),
         "argument 'query' must be contiguous, or rows of contiguous [4, 64] blocks"),
        (lambda a: a.update(query=_fused_query(a["query"])),
         "argument 'query' must be a CUDA tensor"),
    ],
)
def test_cpp_checks(mutate: Any, fragment: str) -> None:
    args = make_args()
    mutate(args)
    assert fragment in _raw(args)


@needs_library
def test_cpp_checks_scalars_and_optionals() -> None:
    assert "argument 'scale' must be a finite number" in _raw(make_args(), scale=float("nan"))
    assert "argument 'partition_size' must be 0 or a positive multiple of 64" in \
        _raw(make_args(), partition=100)
    assert "argument 'max_context_len' must be >= 0" in _raw(make_args(), max_ctx=-1)
    assert "argument 'sliding_window' must be >= 0" in _raw(make_args(), window=-2)
    assert "argument 'alibi_slopes' must be float32, got float16" in \
        _raw(make_args(), alibi=torch.ones(4, dtype=torch.float16))
    assert "argument 'alibi_slopes' must be of shape [4]" in _raw(make_args(), alibi=torch.ones(3))
    assert "argument 'workspace' must be float32" in \
        _raw(make_args(), workspace=torch.ones(3, dtype=torch.int32))
    assert "argument 'lse' must be float32" in \
        _raw(make_args(), lse=torch.ones(3, 4, dtype=torch.float16))
    assert "argument 'lse' must be of shape [3, 4]" in _raw(make_args(), lse=torch.ones(4, 3))
    # valid optionals pass the structural checks and stop at the device check
    assert "must be a CUDA tensor" in _raw(make_args(), alibi=torch.ones(4),
                                           workspace=torch.ones(3))


@needs_library
def test_sm_count_without_a_device_raises() -> None:
    from cacheflow_kernels._lib import get_function

    if cacheflow_kernels.cuda_available():
        assert int(get_function("paged_attention_sm_count")(0)) > 0
    else:
        with pytest.raises(RuntimeError):
            get_function("paged_attention_sm_count")(0)
