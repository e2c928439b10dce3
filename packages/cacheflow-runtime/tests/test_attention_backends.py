"""PagedAttention's backend choice and the cuda backend's dispatch.

On the CPU: "auto" and "reference" run the reference backend, "cuda" without CUDA is a clear
ValueError, and the cuda backend's decode path hands the kernel the right arguments (the kernel
call is faked with the reference). With a GPU (``gpu`` marker): the cuda backend against the
reference backend on decode and prefill steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cacheflow_runtime.attention import InputMetadata, PagedAttention, cuda, reference
from cacheflow_runtime.attention.paged_attention import BACKENDS


def _metadata(query_lens: list[int], context_lens: list[int], tables: list[list[int]],
              slots: list[int], device: str = "cpu") -> InputMetadata:
    width = max(len(t) for t in tables)
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    return InputMetadata(
        query_lens=query_lens, context_lens_host=context_lens,
        query_start_loc=torch.tensor(cu, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        logit_indices=torch.tensor([c - 1 for c in cu[1:]], device=device),
        is_prompt=max(query_lens) > 1)


def _step(query_lens: list[int], cached: list[int], num_heads: int = 8, num_kv_heads: int = 2,
          head_size: int = 64, block_size: int = 16, dtype: torch.dtype = torch.float32,
          device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """A step: sequence i has cached[i] tokens in the cache and query_lens[i] new ones."""
    gen = torch.Generator().manual_seed(seed)
    totals = [c + q for c, q in zip(cached, query_lens)]
    blocks_needed = [-(-t // block_size) for t in totals]
    num_blocks = sum(blocks_needed) + 2
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype)

    def slot(table: list[int], pos: int) -> int:
        return table[pos // block_size] * block_size + pos % block_size

    old = [slot(t, p) for t, c in zip(tables, cached) for p in range(c)]
    n_old = len(old)
    if n_old:
        reference.reshape_and_cache(
            torch.randn(n_old, num_kv_heads, head_size, generator=gen).to(dtype),
            torch.randn(n_old, num_kv_heads, head_size, generator=gen).to(dtype),
            key_cache, value_cache, torch.tensor(old))
    new_slots = [slot(t, p) for t, c, q in zip(tables, cached, query_lens)
                 for p in range(c, c + q)]
    n = sum(query_lens)
    step = {
        "query": torch.randn(n, num_heads * head_size, generator=gen).to(dtype),
        "key": torch.randn(n, num_kv_heads * head_size, generator=gen).to(dtype),
        "value": torch.randn(n, num_kv_heads * head_size, generator=gen).to(dtype),
        "kv_cache": (key_cache, value_cache),
        "metadata": _metadata(query_lens, totals, tables, new_slots),
    }
    if device != "cpu":
        step = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        step["kv_cache"] = (key_cache.to(device), value_cache.to(device))
        step["metadata"] = _metadata(query_lens, totals, tables, new_slots, device)
    return step


def _run(layer: PagedAttention, step: dict[str, Any]) -> torch.Tensor:
    kv = tuple(c.clone() for c in step["kv_cache"])
    return layer(step["query"], step["key"], step["value"], kv, step["metadata"])


def test_backends_listed() -> None:
    assert BACKENDS == ("auto", "reference", "cuda")


def test_default_is_auto_and_runs_reference_on_cpu() -> None:
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2)
    assert layer.backend == "auto"
    step = _step([1, 1, 1], [5, 40, 16])
    assert layer.backend_for(step["query"]) is reference
    out = _run(layer, step)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.isfinite(out).all()


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="attention backend must be one of"):
        PagedAttention(8, 64, 0.125, backend="triton")


def test_cuda_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "available", lambda: False)
    with pytest.raises(ValueError, match=r"backend 'cuda' needs cacheflow_kernels with CUDA.*"
                                         r"cuda_available\(\) is False"):
        PagedAttention(8, 64, 0.125, backend="cuda")


def test_cuda_with_unsupported_head_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "available", lambda: True)
    with pytest.raises(ValueError, match="supports head sizes .* got 40"):
        PagedAttention(8, 40, 0.125, backend="cuda")


def test_auto_keeps_cpu_tensors_on_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "available", lambda: True)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2)
    assert layer.backend_for(torch.zeros(1)) is reference


def test_forced_cuda_rejects_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "available", lambda: True)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors, got a tensor on cpu"):
        layer.backend_for(torch.zeros(1))


def test_is_decode() -> None:
    assert cuda.is_decode(_metadata([1, 1], [3, 9], [[0], [1]], [2, 24]))
    assert not cuda.is_decode(_metadata([1, 4], [3, 9], [[0], [1]], [2, 21, 22, 23, 24]))


class FakeKernels:
    """Stands in for the cacheflow_kernels functions the cuda backend calls (CPU tensors)."""

    PAGED_ATTENTION_HEAD_SIZES = (64, 80, 96, 112, 128, 256)
    PAGED_ATTENTION_BLOCK_SIZES = (8, 16, 32)
    PAGED_PREFILL_MAX_HEAD_SIZE = 256

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def reshape_and_cache(self, key: Any, value: Any, key_cache: Any, value_cache: Any,
                          slot_mapping: Any, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self.calls.append(("reshape_and_cache", {"contiguous": key.is_contiguous(),
                                                 "scales": (k_scale, v_scale)}))
        reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale,
                                    v_scale)

    def paged_attention(self, out: Any, query: Any, key_cache: Any, value_cache: Any,
                        block_tables: Any, context_lens: Any, scale: float,
                        alibi_slopes: Any = None, *, max_context_len: Any = None,
                        workspace: Any = None, sliding_window: Any = None,
                        k_scale: float = 1.0, v_scale: float = 1.0,
                        logits_soft_cap: Any = None) -> None:
        self.calls.append(("paged_attention", {
            "max_context_len": max_context_len, "block_tables": block_tables.dtype,
            "context_lens": context_lens.tolist(), "scale": scale, "window": sliding_window,
            "contiguous": query.is_contiguous(), "scales": (k_scale, v_scale),
            "soft_cap": logits_soft_cap}))
        n = query.shape[0]
        meta = InputMetadata(
            query_lens=[1] * n, context_lens_host=context_lens.tolist(),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32), context_lens=context_lens,
            block_tables=block_tables, slot_mapping=torch.zeros(n, dtype=torch.int64),
            logit_indices=torch.arange(n), is_prompt=False)
        kwargs = {} if sliding_window is None else {"sliding_window": sliding_window}
        out.copy_(reference.paged_attention(query, key_cache, value_cache, meta, scale,
                                            alibi_slopes, k_scale=k_scale, v_scale=v_scale,
                                            logits_soft_cap=logits_soft_cap, **kwargs))


    def paged_prefill_attention(self, out: Any, query: Any, key_cache: Any, value_cache: Any,
                                block_tables: Any, query_start_loc: Any, context_lens: Any,
                                scale: float, max_query_len: Any = None,
                                sliding_window: Any = None, *, k_scale: float = 1.0,
                                v_scale: float = 1.0, logits_soft_cap: Any = None) -> None:
        starts = query_start_loc.tolist()
        self.calls.append(("paged_prefill_attention", {
            "max_query_len": max_query_len, "query_start_loc": starts, "window": sliding_window,
            "dtypes": (block_tables.dtype, query_start_loc.dtype, context_lens.dtype),
            "scale": scale, "contiguous": query.is_contiguous() and out.is_contiguous(),
            "query_row_stride": query.stride(0), "out_contiguous": out.is_contiguous(),
            "scales": (k_scale, v_scale), "soft_cap": logits_soft_cap}))
        q_lens = [b - a for a, b in zip(starts, starts[1:])]
        meta = InputMetadata(
            query_lens=q_lens, context_lens_host=context_lens.tolist(),
            query_start_loc=query_start_loc, context_lens=context_lens,
            block_tables=block_tables, slot_mapping=torch.zeros(len(query), dtype=torch.int64),
            logit_indices=torch.zeros(0, dtype=torch.int64), is_prompt=True)
        kwargs = {} if sliding_window is None else {"sliding_window": sliding_window}
        out.copy_(reference.paged_attention(query, key_cache, value_cache, meta, scale,
                                            k_scale=k_scale, v_scale=v_scale,
                                            logits_soft_cap=logits_soft_cap, **kwargs))


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch) -> FakeKernels:
    fake = FakeKernels()
    monkeypatch.setattr(cuda, "cacheflow_kernels", fake)
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "supports_decode", lambda q, kc: True)  # CPU tensors here
    return fake


def test_cuda_backend_decode_goes_to_the_kernel(fake_kernels: FakeKernels,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([1, 1, 1], [5, 40, 16])
    out = _run(layer, step)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    names = [c[0] for c in fake_kernels.calls]
    assert names == ["reshape_and_cache", "paged_attention"]
    args = fake_kernels.calls[1][1]
    assert args["max_context_len"] == 41 and args["context_lens"] == [6, 41, 17]
    assert args["block_tables"] == torch.int32 and args["scale"] == 0.125
    assert args["contiguous"] and fake_kernels.calls[0][1]["contiguous"]


def test_cuda_backend_reads_fused_qkv_views_in_place(fake_kernels: FakeKernels,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v as column slices of one fused QKV output (strided token rows) reach
    reshape_and_cache and paged_attention without a copy; the result is the reference's."""
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([1, 1, 1], [5, 40, 16])
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    fused = torch.cat([step["query"], step["key"], step["value"]], dim=1)
    q, k, v = fused.split([8 * 64, 2 * 64, 2 * 64], dim=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = _run(layer, dict(step, query=q, key=k, value=v))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    names = [c[0] for c in fake_kernels.calls]
    assert names == ["reshape_and_cache", "paged_attention"]
    assert not fake_kernels.calls[0][1]["contiguous"]
    assert not fake_kernels.calls[1][1]["contiguous"]


def test_token_rows_copies_only_layouts_the_kernels_reject() -> None:
    fused = torch.zeros(4, 12 * 64, dtype=torch.float16)
    view = fused[:, 64:8 * 64 + 64].view(4, 8, 64)  # dense rows at a 128-byte offset
    assert cuda._token_rows(view, 16) is view
    odd = torch.zeros(4, 12 * 64 + 4, dtype=torch.float16)[:, : 8 * 64].view(4, 8, 64)
    assert cuda._token_rows(odd) is odd  # any row stride for reshape_and_cache
    copied = cuda._token_rows(odd, 16)  # 1032-byte rows: not 16-byte multiples
    assert copied.is_contiguous() and torch.equal(copied, odd)
    transposed = torch.zeros(4, 64, 8, dtype=torch.float16).transpose(1, 2)
    assert cuda._token_rows(transposed).is_contiguous()


def test_cuda_backend_passes_the_sliding_window(fake_kernels: FakeKernels,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layer = PagedAttention(4, 64, 0.125, num_kv_heads=4, backend="cuda", sliding_window=7)
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([1, 1], [30, 3], num_heads=4, num_kv_heads=4)
    out = _run(layer, step)
    ref = _run(PagedAttention(4, 64, 0.125, num_kv_heads=4, backend="reference",
                              sliding_window=7), step)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert fake_kernels.calls[1][1]["window"] == 7


def test_cuda_backend_prefill_goes_to_the_seam(fake_kernels: FakeKernels,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []

    def prefill(query: Any, key_cache: Any, value_cache: Any, metadata: InputMetadata,
                scale: float, alibi_slopes: Any = None, sliding_window: Any = None,
                **scales: Any) -> Any:
        seen.append(metadata.query_lens)
        return reference.paged_attention(query, key_cache, value_cache, metadata, scale)

    monkeypatch.setattr(cuda, "prefill", prefill)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([7, 1, 1], [0, 5, 16])  # mixed, a prompt first: no leading decodes
    out = _run(layer, step)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert seen == [[7, 1, 1]]
    assert [c[0] for c in fake_kernels.calls] == ["reshape_and_cache"]


def test_leading_decodes() -> None:
    """A mixed step's leading decodes and the rest, as two metadata over the same rows."""
    tables = [[3], [4, 5], [6], [7, 8, 9], [10]]
    meta = _metadata([1, 1, 4, 1, 2], [6, 20, 4, 40, 9], tables,
                     [50, 91, 96, 97, 98, 99, 140, 168, 169])
    split = meta.leading_decodes
    assert split is not None and split.num_decodes == 2
    dec, rest = split.decodes, split.rest
    assert dec.query_lens == [1, 1] and dec.context_lens_host == [6, 20]
    assert dec.query_start_loc.tolist() == [0, 1, 2] and dec.max_context_len == 20
    assert dec.block_tables.tolist() == [[3, 0, 0], [4, 5, 0]] and not dec.is_prompt
    assert dec.slot_mapping.tolist() == [50, 91]
    assert rest.query_lens == [4, 1, 2] and rest.context_lens.tolist() == [4, 40, 9]
    assert rest.query_start_loc.tolist() == [0, 4, 5, 7] and rest.max_query_len == 4
    assert rest.num_tokens == 7 and rest.block_tables.tolist() == [[6, 0, 0], [7, 8, 9],
                                                                  [10, 0, 0]]
    assert rest.slot_mapping.tolist() == [96, 97, 98, 99, 140, 168, 169]
    assert meta.leading_decodes is split  # once per step
    assert _metadata([1, 1], [3, 9], [[0], [1]], [2, 24]).leading_decodes is None
    assert _metadata([2, 1], [3, 9], [[0], [1]], [1, 2, 24]).leading_decodes is None


def test_mixed_step_without_the_split_is_one_prefill(fake_kernels: FakeKernels,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """CACHEFLOW_MIXED_DECODE_KERNEL=0 (read at import) sends the whole mixed step to the
    prefill kernel."""
    monkeypatch.setattr(cuda, "_MIXED_DECODE_KERNEL", False)
    monkeypatch.setattr(cuda, "supports_prefill", lambda q, kc, a=None, w=None: a is None)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([1, 1, 7], [5, 16, 0])
    out = _run(layer, step)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in fake_kernels.calls] == ["reshape_and_cache", "paged_prefill_attention"]
    assert fake_kernels.calls[1][1]["query_start_loc"] == [0, 1, 2, 9]


def test_cuda_backend_prefill_runs_the_prefill_kernel(fake_kernels: FakeKernels,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "supports_prefill",  # CPU tensors here
                        lambda q, kc, a=None, w=None: a is None)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    # two leading decodes, a prompt, a decode and a prefix-cached chunk
    step = _step([1, 1, 7, 1, 3], [5, 40, 0, 16, 30])
    out = _run(layer, step)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in fake_kernels.calls] == ["reshape_and_cache", "paged_attention",
                                                  "paged_prefill_attention"]
    dec = fake_kernels.calls[1][1]
    assert dec["context_lens"] == [6, 41] and dec["max_context_len"] == 41
    args = fake_kernels.calls[2][1]
    assert args["max_query_len"] == 7 and args["query_start_loc"] == [0, 7, 8, 11]
    assert args["dtypes"] == (torch.int32,) * 3 and args["scale"] == 0.125 and args["contiguous"]


@pytest.mark.parametrize(("extra_cols", "copied"), [(4 * 64, False), (3, True)])
def test_cuda_backend_prefill_reads_fused_query_rows_in_place(
        fake_kernels: FakeKernels, monkeypatch: pytest.MonkeyPatch, extra_cols: int,
        copied: bool) -> None:
    """A mixed step's query as a column slice of a fused QKV output reaches the prefill kernel
    without a copy when its row stride is a multiple of 16 bytes (else it is copied); the
    output is contiguous and equals the reference's either way."""
    monkeypatch.setattr(cuda, "supports_prefill",  # CPU tensors here
                        lambda q, kc, a=None, w=None: a is None)
    layer = PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="cuda")
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([1, 7, 3], [5, 0, 30], dtype=torch.float16)
    ref = _run(PagedAttention(8, 64, 0.125, num_kv_heads=2, backend="reference"), step)
    wide = torch.cat([step["query"], torch.zeros(step["query"].shape[0], extra_cols,
                                                 dtype=step["query"].dtype)], dim=1)
    query = wide[:, : 8 * 64]
    assert not query.is_contiguous()
    out = _run(layer, dict(step, query=query))
    assert torch.equal(out, ref)
    args = fake_kernels.calls[-1][1]
    assert fake_kernels.calls[-1][0] == "paged_prefill_attention"
    assert args["query_row_stride"] == (8 * 64 if copied else 8 * 64 + extra_cols)
    assert args["out_contiguous"]


@pytest.mark.parametrize("window", [None, 7])
def test_prefill_kernel_support(window: int | None) -> None:
    """The prefill kernel takes only CUDA tensors (and no ALiBi)."""
    q, kc = torch.zeros(3, 8, 64), torch.zeros(4, 16, 2, 64)
    assert not cuda.supports_prefill(q, kc, None, window)


def test_cuda_backend_prefill_passes_the_sliding_window(fake_kernels: FakeKernels,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "supports_prefill", lambda q, kc, a=None, w=None: a is None)
    layer = PagedAttention(4, 64, 0.125, num_kv_heads=4, backend="cuda", sliding_window=5)
    monkeypatch.setattr(layer, "backend_for", lambda q: cuda)
    step = _step([6, 1], [3, 9], num_heads=4, num_kv_heads=4)
    out = _run(layer, step)
    ref = _run(PagedAttention(4, 64, 0.125, num_kv_heads=4, backend="reference",
                              sliding_window=5), step)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in fake_kernels.calls] == ["reshape_and_cache", "paged_prefill_attention"]
    assert fake_kernels.calls[1][1]["window"] == 5


def test_unsupported_block_size_falls_back_to_reference() -> None:
    step = _step([1], [10], block_size=4)
    q = step["query"].view(1, 8, 64)
    assert not cuda.supports_decode(q, step["kv_cache"][0])


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize(
    ("query_lens", "cached"),
    [([1] * 6, [0, 5, 40, 16, 300, 1000]),  # decode: the kernel
     ([1, 9, 1], [17, 0, 64]),              # mixed: a decode, then the prefill kernel
     ([1, 1, 1, 200, 1, 37], [40, 1000, 5, 0, 17, 300]),  # leading decodes, prompts, decode
     ([9, 1, 1], [0, 17, 64]),              # mixed, a prompt first: all the prefill kernel
     ([300, 1, 64], [700, 17, 0])],         # prefix-cached prompt, decode, prompt
)
def test_cuda_backend_matches_reference_on_gpu(dtype: torch.dtype, window: int | None,
                                               query_lens: list[int],
                                               cached: list[int]) -> None:
    assert cuda.available()
    step = _step(query_lens, cached, num_heads=16, num_kv_heads=4, head_size=128,
                 dtype=dtype, device="cuda", seed=3)
    fast = PagedAttention(16, 128, 128 ** -0.5, num_kv_heads=4, sliding_window=window)
    assert fast.backend_for(step["query"]) is cuda  # "auto" picks the kernels on CUDA
    slow = PagedAttention(16, 128, 128 ** -0.5, num_kv_heads=4, backend="reference",
                          sliding_window=window)
    kv_fast = tuple(c.clone() for c in step["kv_cache"])
    kv_slow = tuple(c.clone() for c in step["kv_cache"])
    out = fast(step["query"], step["key"], step["value"], kv_fast, step["metadata"])
    ref = slow(step["query"], step["key"], step["value"], kv_slow, step["metadata"])
    torch.testing.assert_close(kv_fast[0], kv_slow[0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(kv_fast[1], kv_slow[1], equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("query_lens", [[1] * 5, [1, 9, 1, 1, 1]])
def test_cuda_backend_fused_qkv_views_on_gpu(dtype: torch.dtype, query_lens: list[int]) -> None:
    """q/k/v as column slices of one fused QKV output give bit for bit the caches and output of
    their contiguous copies (decode: no copy made; mixed: the prefill path)."""
    assert cuda.available()
    step = _step(query_lens, [0, 5, 40, 300, 1000], num_heads=32, num_kv_heads=1,
                 head_size=128, dtype=dtype, device="cuda", seed=4)
    layer = PagedAttention(32, 128, 128 ** -0.5, num_kv_heads=1)
    fused = torch.cat([step["query"], step["key"], step["value"]], dim=1)
    q, k, v = fused.split([32 * 128, 128, 128], dim=1)
    kv_views = tuple(c.clone() for c in step["kv_cache"])
    kv_dense = tuple(c.clone() for c in step["kv_cache"])
    out = layer(q, k, v, kv_views, step["metadata"])
    ref = layer(q.contiguous(), k.contiguous(), v.contiguous(), kv_dense, step["metadata"])
    torch.testing.assert_close(kv_views[0], kv_dense[0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(kv_views[1], kv_dense[1], equal_nan=True, rtol=0, atol=0)
    assert torch.equal(out, ref)
