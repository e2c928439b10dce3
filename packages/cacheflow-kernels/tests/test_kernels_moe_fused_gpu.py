"""The fused MoE kernels on a CUDA device: ``moe_grouped_gemm`` with ``row_index`` /
``out_index`` / ``out_scale``, ``moe_grouped_gemm_gated``, ``moe_sort_by_expert`` and
``moe_sum_topk``, against torch. Skipped without CUDA.

Every mma.sync tile is tested in one process through CACHEFLOW_MOE_GEMM (read at each call;
``wmma`` makes the fused variants take the automatic choice)."""

from __future__ import annotations

import os
from typing import Any

import pytest

import cacheflow_kernels as ck

from moe_testutil import TILES, segment_offsets

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


def _expert_of_rows(counts: list[int], rows: int) -> Any:
    expert = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    start = 0
    for e, c in enumerate(counts):
        expert[start:start + c] = e
        start += c
    return expert


def _products(x: Any, w: Any, counts: list[int], row_index: Any) -> Any:
    """float32 [rows, N]: x[row_index[r]] @ w[e(r)].T (zero rows past the segments)."""
    rows = row_index.shape[0]
    valid = (row_index >= 0) & (row_index < x.shape[0])
    a = torch.where(valid.unsqueeze(1), x[row_index.clamp(0, x.shape[0] - 1).long()].float(),
                    torch.zeros((), device="cuda"))
    out = torch.zeros(rows, w.shape[1], device="cuda")
    start = 0
    for e, c in enumerate(counts):
        out[start:start + c] = a[start:start + c] @ w[e].float().t()
        start += c
    return out


def _tol(dtype: Any) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 4e-3


# (rows per expert, x rows, out features / intermediate, in features): empty experts, segments
# around the 32/64/128-row tiles, N / I off the tiles and off 8, K off the 64-element step,
# 40 experts (the tile lookup's warp scan wraps), one row.
CASES = [
    ([5, 0, 130, 1], 40, 96, 64),
    ([0, 0, 3], 2, 10, 8),
    ([1], 1, 136, 72),
    ([17] * 16, 100, 136, 72),
    ([129, 255, 0, 64, 1, 1, 500, 7], 300, 264, 520),
    ([0, 1, 15, 17, 63, 65, 127, 129], 200, 200, 136),
    ([2, 0, 1, 3] * 10, 50, 384, 256),
    ([300] * 8, 1024, 1024, 512),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_indexed_gemm_gathers_scatters_and_scales(case: int, dtype: Any,
                                                  moe_gemm_variant: str) -> None:
    counts, x_rows, n, k = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(case)
    m = sum(counts)
    x = torch.randn(x_rows, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(len(counts), n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    offsets = segment_offsets(counts)
    row_index = torch.randint(0, x_rows, (m,), generator=gen, device="cuda").to(torch.int32)
    out_rows = m + 3
    out_index = torch.randperm(out_rows, generator=gen, device="cuda")[:m].to(torch.int32)
    out_scale = torch.rand(out_rows, generator=gen, device="cuda") + 0.5
    out = torch.full((out_rows, n), float("nan"), dtype=dtype, device="cuda")
    ck.moe_grouped_gemm(out, x, w, offsets, row_index=row_index, out_index=out_index,
                        out_scale=out_scale)
    torch.cuda.synchronize()
    prod = _products(x, w, counts, row_index)
    ref = torch.full((out_rows, n), float("nan"), device="cuda")
    ref[out_index.long()] = prod * out_scale[out_index.long()].unsqueeze(1)
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indexed_gemm_edges(dtype: Any, moe_gemm_variant: str) -> None:
    """Indices outside x read zeros, outside out are not written; a gather alone and a scatter
    alone; rows past offsets[E] are not touched."""
    counts = [7, 0, 40]
    m, x_rows, n, k = sum(counts) + 4, 30, 72, 64
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(x_rows, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(3, n, k, generator=gen, device="cuda") / 8).to(dtype)
    offsets = segment_offsets(counts)
    row_index = torch.randint(0, x_rows, (m,), generator=gen, device="cuda").to(torch.int32)
    row_index[[0, 9]] = torch.tensor([-1, x_rows], dtype=torch.int32, device="cuda")
    gathered = torch.full((m, n), 7.0, dtype=dtype, device="cuda")
    ck.moe_grouped_gemm(gathered, x, w, offsets, row_index=row_index)
    t = sum(counts)
    ref = _products(x, w, counts, row_index[:t])
    torch.testing.assert_close(gathered[:t].float(), ref[:t], atol=_tol(dtype), rtol=_tol(dtype))
    assert (gathered[[0, 9]] == 0).all()
    assert (gathered[t:] == 7).all()
    rows = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    out_index = torch.arange(m, device="cuda").flip(0).to(torch.int32)  # row r -> m - 1 - r
    out_index[3] = -5  # not written: out row m - 4 keeps its value
    scattered = torch.full((m, n), 7.0, dtype=dtype, device="cuda")
    ck.moe_grouped_gemm(scattered, rows, w, offsets, out_index=out_index)
    plain = torch.empty(m, n, dtype=dtype, device="cuda")
    ck.moe_grouped_gemm(plain, rows, w, offsets)
    torch.cuda.synchronize()
    written = [r for r in range(t) if r != 3]
    dst = torch.tensor([m - 1 - r for r in written], device="cuda")
    assert torch.equal(scattered[dst], plain[written])
    # rows past offsets[E] (r >= t: out rows 0 .. m - t - 1) and the skipped row stay
    assert (scattered[: m - t] == 7).all() and (scattered[m - 4] == 7).all()


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gated_gemm_matches_torch(case: int, dtype: Any, activation: str,
                                  moe_gemm_variant: str) -> None:
    if activation != "silu" and moe_gemm_variant not in ("auto", "32x128"):
        pytest.skip("the activation switch is tile-independent: two variants suffice")
    counts, x_rows, inter, k = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(100 + case)
    m = sum(counts)
    x = torch.randn(x_rows, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(len(counts), 2 * inter, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    offsets = segment_offsets(counts)
    row_index = torch.randint(0, x_rows, (m,), generator=gen, device="cuda").to(torch.int32)
    out = torch.full((m, inter), float("nan"), dtype=dtype, device="cuda")
    ck.moe_grouped_gemm_gated(out, x, w, offsets, row_index=row_index, activation=activation)
    torch.cuda.synchronize()
    h = _products(x, w, counts, row_index)
    gate, up = h[:, :inter], h[:, inter:]
    act = F.silu(gate) if activation == "silu" else F.gelu(
        gate, approximate="tanh" if activation == "gelu_tanh" else "none")
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), act * up, atol=tol, rtol=tol)


def test_gated_gemm_without_index_and_untouched_rows(moe_gemm_variant: str) -> None:
    counts = [63, 129, 1, 0, 17]
    m, inter, k = sum(counts) + 9, 136, 136
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(5, 2 * inter, k, generator=gen, device="cuda") / 12).to(torch.bfloat16)
    out = torch.full((m, inter), 7.0, dtype=torch.bfloat16, device="cuda")
    ck.moe_grouped_gemm_gated(out, x, w, segment_offsets(counts))
    torch.cuda.synchronize()
    t = sum(counts)
    assert (out[t:] == 7).all()
    h = _products(x, w, counts, torch.arange(t, device="cuda", dtype=torch.int32))
    ref = F.silu(h[:, :inter]) * h[:, inter:]
    torch.testing.assert_close(out[:t].float(), ref, atol=2e-2, rtol=2e-2)


def test_tiles_agree_bitwise_on_exact_inputs() -> None:
    """Small-integer inputs make every product and float32 sum exact, so every tile's indexed
    and gated results must agree bit for bit (and the indexed ones with the rounded reference)."""
    counts = [0, 1, 15, 17, 63, 65, 127, 129]
    m, x_rows, n, k = sum(counts), 150, 264, 520
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randint(-3, 4, (x_rows, k), generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randint(-3, 4, (8, n, k), generator=gen, device="cuda").to(torch.bfloat16)
    offsets = segment_offsets(counts)
    row_index = torch.randint(0, x_rows, (m,), generator=gen, device="cuda").to(torch.int32)
    out_index = torch.randperm(m, generator=gen, device="cuda").to(torch.int32)
    scale = 2.0 ** torch.randint(-2, 3, (m,), generator=gen, device="cuda").float()
    ref = torch.empty(m, n, device="cuda")
    ref[out_index.long()] = _products(x, w, counts, row_index) * scale[out_index.long(), None]
    ref = ref.to(torch.bfloat16)
    gated = []
    old = os.environ.get("CACHEFLOW_MOE_GEMM")
    try:
        for tile in TILES:
            os.environ["CACHEFLOW_MOE_GEMM"] = tile
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            ck.moe_grouped_gemm(out, x, w, offsets, row_index=row_index, out_index=out_index,
                                out_scale=scale)
            g = torch.full((m, n // 2), float("nan"), dtype=torch.bfloat16, device="cuda")
            ck.moe_grouped_gemm_gated(g, x, w, offsets, row_index=row_index)
            torch.cuda.synchronize()
            assert torch.equal(out, ref), tile
            gated.append(g)
    finally:
        if old is None:
            os.environ.pop("CACHEFLOW_MOE_GEMM", None)
        else:
            os.environ["CACHEFLOW_MOE_GEMM"] = old
    for tile, g in zip(TILES[1:], gated[1:]):
        assert torch.equal(g, gated[0]), tile


def _sort_reference(ids: Any, num_experts: int) -> tuple[Any, Any, Any]:
    flat = ids.reshape(-1).long()
    bucket = torch.where((flat >= 0) & (flat < num_experts), flat,
                         torch.full_like(flat, num_experts))
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=ids.device), counts.cumsum(0)])
    return offsets, order, order // ids.shape[1]


@pytest.mark.parametrize("tokens, top_k, experts", [
    (1, 1, 1), (1, 2, 8), (64, 2, 8), (4096, 2, 8), (4096, 4, 60), (3000, 8, 256),
    (16384, 2, 8), (513, 3, 40), (0, 2, 8),
])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
def test_sort_by_expert_matches_stable_argsort(tokens: int, top_k: int, experts: int,
                                               id_dtype: Any) -> None:
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + experts)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen, device="cuda").to(id_dtype)
    if tokens >= 64:
        ids[5, 0], ids[9, top_k - 1] = -1, experts  # out of range: last, in pair order
    pairs = tokens * top_k
    offsets = torch.full((experts + 1,), -7, dtype=torch.int64, device="cuda")
    sorted_pairs = torch.full((pairs,), -7, dtype=torch.int32, device="cuda")
    token_index = torch.full((pairs,), -7, dtype=torch.int32, device="cuda")
    ck.moe_sort_by_expert(offsets, sorted_pairs, token_index, ids)
    torch.cuda.synchronize()
    want_offsets, want_order, want_tokens = _sort_reference(ids, experts)
    assert torch.equal(offsets, want_offsets)
    assert torch.equal(sorted_pairs.long(), want_order)
    assert torch.equal(token_index.long(), want_tokens)


@pytest.mark.parametrize("hidden", [1024, 24, 13])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_topk_matches_torch(hidden: int, top_k: int, dtype: Any) -> None:
    tokens, experts = 257, 8
    gen = torch.Generator(device="cuda").manual_seed(hidden + top_k)
    x = torch.randn(tokens, top_k, hidden, generator=gen, device="cuda").to(dtype)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen, device="cuda")
    ids[3, 0] = experts  # skipped
    x[3, 0] = float("nan")
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device="cuda")
    ck.moe_sum_topk(out, x, ids, experts)
    torch.cuda.synchronize()
    valid = ((ids >= 0) & (ids < experts)).unsqueeze(-1)
    acc = torch.zeros(tokens, hidden, device="cuda")
    for s in range(top_k):
        acc = acc + torch.where(valid[:, s], x[:, s].float(), torch.zeros((), device="cuda"))
    assert torch.equal(out, acc.to(dtype))


def _fused_layer(x: Any, w13: Any, w2: Any, weights: Any, ids: Any, bufs: dict[str, Any]) -> Any:
    """The runtime's fused path, on preallocated buffers (for graph capture)."""
    experts = w13.shape[0]
    ck.moe_sort_by_expert(bufs["offsets"], bufs["pairs"], bufs["tokens"], ids)
    ck.moe_grouped_gemm_gated(bufs["h"], x, w13, bufs["offsets"], row_index=bufs["tokens"])
    ck.moe_grouped_gemm(bufs["per_slot"].view(-1, w2.shape[1]), bufs["h"], w2, bufs["offsets"],
                        out_index=bufs["pairs"], out_scale=weights.view(-1))
    ck.moe_sum_topk(bufs["out"], bufs["per_slot"], ids, experts)
    return bufs["out"]


def test_fused_chain_is_capturable_in_a_cuda_graph() -> None:
    tokens, experts, top_k, hidden, inter = 96, 8, 2, 128, 192
    gen = torch.Generator(device="cuda").manual_seed(9)
    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dt)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") / 11).to(dt)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") / 14).to(dt)

    def route() -> tuple[Any, Any]:
        logits = torch.randn(tokens, experts, generator=gen, device="cuda")
        w, i = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).contiguous(), i

    weights, ids = route()
    rows = tokens * top_k
    bufs = dict(offsets=torch.empty(experts + 1, dtype=torch.int64, device="cuda"),
                pairs=torch.empty(rows, dtype=torch.int32, device="cuda"),
                tokens=torch.empty(rows, dtype=torch.int32, device="cuda"),
                h=torch.empty(rows, inter, dtype=dt, device="cuda"),
                per_slot=torch.empty(tokens, top_k, hidden, dtype=dt, device="cuda"),
                out=torch.empty(tokens, hidden, dtype=dt, device="cuda"))
    _fused_layer(x, w13, w2, weights, ids, bufs)  # loads the library, warms up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _fused_layer(x, w13, w2, weights, ids, bufs)
    new_weights, new_ids = route()  # new routing, same shapes: the replay reads it
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    x.copy_(torch.randn(tokens, hidden, generator=gen, device="cuda").to(dt))
    graph.replay()
    torch.cuda.synchronize()
    ref = torch.zeros(tokens, hidden, device="cuda")
    for t in range(tokens):
        for s in range(top_k):
            e = int(ids[t, s])
            gate, up = (x[t].float() @ w13[e].float().t()).chunk(2)
            ref[t] += weights[t, s] * ((F.silu(gate) * up) @ w2[e].float().t())
    scale = ref.abs().max().item()
    assert (bufs["out"].float() - ref).abs().max().item() <= 3e-2 * scale
