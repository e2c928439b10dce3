"""The mixture-of-experts kernels (csrc/moe_kernels.cuh) on the CPU under a host emulation of
their warp-level primitives (tests/emulation/moe_emu.h on top of prefill_emu.h).

The kernel source is compiled unchanged with g++ (``-DCACHEFLOW_PREFILL_EMULATE
-DCACHEFLOW_MOE_EMULATE``): every CUDA thread is a fiber, ldmatrix / mma.sync / shuffles compute
what the PTX ISA specifies per lane, cp.async copies land only when a wait lets them, shared
memory starts as NaN, and global copies / 16-byte stores outside x, w and out abort the run. This
checks the grouped GEMM's three epilogues (plain store; gather through ``row_index`` and scatter
through ``out_index`` with a per-row scale; the gated activation with gate/up columns paired in
one block), the device-side sort by expert and the top-k sum, on every tile, without a GPU.
Integer-valued inputs make the GEMM products and sums exact, so those results must equal the
reference bit for bit; the gated epilogue is compared with a tolerance (transcendentals).
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import emulator_builds
import pytest

from moe_testutil import segment_offsets

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

TILES = {"128x256": 0, "128x256s3": 1, "128x128": 2, "64x128": 3, "32x128": 4}
TILE_BN = {"128x256": 256, "128x256s3": 256, "128x128": 128, "64x128": 128, "32x128": 128}
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
STORE, INDEXED, GATED = 0, 1, 2


# Started as collection ends (conftest.py).
EMULATOR_BUILDS = [("moe_emu.cc", "-DCACHEFLOW_PREFILL_EMULATE", "-DCACHEFLOW_MOE_EMULATE")]


@pytest.fixture(scope="module")
def emu() -> Any:
    lib_path = emulator_builds.library(EMULATOR_BUILDS[0])
    lib = ctypes.CDLL(str(lib_path))
    lib.cf_emu_moe_gemm.restype = ctypes.c_int
    lib.cf_emu_moe_gemm.argtypes = ([ctypes.c_int] * 4 + [ctypes.c_void_p] * 7
                                    + [ctypes.c_int64] * 6 + [ctypes.c_int])
    lib.cf_emu_moe_sort.restype = ctypes.c_int
    lib.cf_emu_moe_sort.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3
                                    + [ctypes.c_void_p] * 3)
    lib.cf_emu_moe_sum.restype = ctypes.c_int
    lib.cf_emu_moe_sum.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
                                   + [ctypes.c_int64] * 4)
    return lib


def _ptr(t: Optional[Any]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def run_gemm(emu: Any, epilogue: int, tile: str, out: Any, x: Any, w: Any, offsets: Any,
             rows: int, row_index: Any = None, out_index: Any = None, out_scale: Any = None,
             act: str = "silu") -> None:
    out_cols = out.shape[1]
    rc = emu.cf_emu_moe_gemm(
        1 if x.dtype == torch.bfloat16 else 0, epilogue, TILES[tile], ACTS[act], _ptr(out),
        _ptr(x), _ptr(w), _ptr(offsets), _ptr(row_index), _ptr(out_index), _ptr(out_scale),
        rows, w.shape[1], w.shape[2], w.shape[0], x.shape[0], out.shape[0],
        int(out_cols % 8 == 0))
    assert rc == 0



def _ints(gen: Any, *shape: int, dtype: Any = torch.bfloat16) -> Any:
    return torch.randint(-3, 4, shape, generator=gen).to(dtype)


def _expert_of_rows(offsets: Any, rows: int) -> Any:
    """Expert of each row (-1 at or past offsets[E])."""
    bounds = offsets.tolist()
    expert = torch.full((rows,), -1, dtype=torch.int64)
    for e in range(len(bounds) - 1):
        expert[bounds[e]:bounds[e + 1]] = e
    return expert


@pytest.mark.parametrize("tile", list(TILES))
def test_store_epilogue_is_exact(emu: Any, tile: str) -> None:
    """The plain grouped GEMM: a partial and an empty segment, rows past offsets[E] untouched,
    N off the tile and off 8 (scalar stores), K off the 64-element step."""
    gen = torch.Generator().manual_seed(1)
    bn = TILE_BN[tile]
    counts = [33, 0, 5] if tile.startswith("128") else [33, 0, 70, 1]
    n, k = bn + 10, 136
    m = sum(counts) + 5
    x, w = _ints(gen, m, k), _ints(gen, len(counts), n, k)
    offsets = segment_offsets(counts, "cpu")
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    run_gemm(emu, STORE, tile, out, x, w, offsets, m)
    expert = _expert_of_rows(offsets, m)
    ref = torch.full((m, n), float("nan"))
    for r in range(m):
        if expert[r] >= 0:
            ref[r] = x[r].double() @ w[expert[r]].double().t()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tile", ["128x256s3", "128x128", "64x128", "32x128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_indexed_epilogue_gathers_scatters_and_scales(emu: Any, tile: str, dtype: Any) -> None:
    """row_index gathers (an index outside x reads zeros), out_index scatters (an index outside
    out is not written), out_scale multiplies each destination row before the one rounding."""
    gen = torch.Generator().manual_seed(2)
    counts = [40, 0, 3, 9]
    m, x_rows, n, k = sum(counts), 23, 136, 72
    x, w = _ints(gen, x_rows, k, dtype=dtype), _ints(gen, len(counts), n, k, dtype=dtype)
    offsets = segment_offsets(counts, "cpu")
    row_index = torch.randint(0, x_rows, (m,), generator=gen, dtype=torch.int32)
    row_index[[3, 44]] = torch.tensor([-1, x_rows], dtype=torch.int32)  # read as zeros
    out_rows = m + 4
    out_index = torch.randperm(out_rows, generator=gen)[:m].to(torch.int32)
    out_index[[5, 50]] = torch.tensor([-2, out_rows + 3], dtype=torch.int32)  # not written
    out_scale = 2.0 ** torch.randint(-2, 3, (out_rows,), generator=gen).float()
    out = torch.full((out_rows, n), float("nan"), dtype=dtype)
    run_gemm(emu, INDEXED, tile, out, x, w, offsets, m, row_index, out_index, out_scale)
    ref = torch.full((out_rows, n), float("nan"), dtype=torch.float64)
    expert = _expert_of_rows(offsets, m)
    for r in range(m):
        d, s = int(out_index[r]), int(row_index[r])
        if not 0 <= d < out_rows:
            continue
        a = x[s].double() if 0 <= s < x_rows else torch.zeros(k, dtype=torch.float64)
        ref[d] = out_scale[d].double() * (a @ w[expert[r]].double().t())
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=0, atol=0,
                               equal_nan=True)


def test_indexed_epilogue_without_indices_is_the_plain_gemm(emu: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    counts = [20, 1, 0, 12]
    m, n, k = sum(counts), 40, 64
    x, w = _ints(gen, m, k), _ints(gen, len(counts), n, k)
    offsets = segment_offsets(counts, "cpu")
    plain = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    run_gemm(emu, STORE, "32x128", plain, x, w, offsets, m)
    indexed = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    run_gemm(emu, INDEXED, "32x128", indexed, x, w, offsets, m)
    assert torch.equal(plain, indexed)


def _act(name: str, g: Any) -> Any:
    if name == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh" if name == "gelu_tanh" else "none")


@pytest.mark.parametrize("tile, act, inter, dtype", [
    ("128x256", "silu", 136, torch.bfloat16),        # I off the 128-column output tile
    ("128x256s3", "gelu", 64, torch.float16),
    ("128x128", "gelu_tanh", 70, torch.bfloat16),    # I off 8: scalar stores
    ("64x128", "silu", 200, torch.float16),
    ("32x128", "silu", 24, torch.bfloat16),          # I below one output tile
    ("32x128", "gelu", 130, torch.float16),
])
def test_gated_epilogue_pairs_gate_and_up(emu: Any, tile: str, act: str, inter: int,
                                          dtype: Any) -> None:
    """out = act(h[:, :I]) * h[:, I:] with h the gathered rows times w13 [E, 2 I, K]; rows past
    offsets[E] untouched."""
    gen = torch.Generator().manual_seed(4)
    counts = [35, 0, 2, 70] if not tile.startswith("128") else [130, 0, 7]
    m, x_rows, k = sum(counts) + 3, 50, 72
    x = (torch.randn(x_rows, k, generator=gen) / 4).to(dtype)
    w = (torch.randn(len(counts), 2 * inter, k, generator=gen) / 4).to(dtype)
    offsets = segment_offsets(counts, "cpu")
    row_index = torch.randint(0, x_rows, (m,), generator=gen, dtype=torch.int32)
    out = torch.full((m, inter), float("nan"), dtype=dtype)
    run_gemm(emu, GATED, tile, out, x, w, offsets, m, row_index=row_index, act=act)
    expert = _expert_of_rows(offsets, m)
    ref = torch.full((m, inter), float("nan"), dtype=torch.float64)
    for r in range(m):
        if expert[r] >= 0:
            h = x[int(row_index[r])].double() @ w[expert[r]].double().t()
            ref[r] = _act(act, h[:inter]) * h[inter:]
    valid = expert >= 0
    assert out[~valid].isnan().all()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out[valid].double(), ref[valid], rtol=tol, atol=tol)


def run_sort(emu: Any, ids: Any, num_experts: int) -> tuple[Any, Any, Any]:
    pairs = ids.numel()
    offsets = torch.full((num_experts + 1,), -7, dtype=torch.int64)
    sorted_pairs = torch.full((pairs,), -7, dtype=torch.int32)
    token_index = torch.full((pairs,), -7, dtype=torch.int32)
    rc = emu.cf_emu_moe_sort(_ptr(ids), int(ids.dtype == torch.int64), pairs, ids.shape[1],
                             num_experts, _ptr(offsets), _ptr(sorted_pairs), _ptr(token_index))
    assert rc == 0
    return offsets, sorted_pairs, token_index


@pytest.mark.parametrize("tokens, top_k, experts, id_dtype", [
    (1, 1, 1, torch.int64),
    (37, 2, 8, torch.int64),
    (1500, 3, 5, torch.int32),   # more pairs than one pass of the CTA (4096)
    (300, 4, 20, torch.int64),
    (0, 2, 4, torch.int64),      # no pairs: offsets all zero
])
def test_sort_by_expert_is_a_stable_counting_sort(emu: Any, tokens: int, top_k: int,
                                                  experts: int, id_dtype: Any) -> None:
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen).to(id_dtype)
    if tokens > 10:  # ids outside [0, E) go last, in pair order
        ids[3, 0], ids[7, top_k - 1] = -1, experts
    offsets, sorted_pairs, token_index = run_sort(emu, ids, experts)
    flat = ids.reshape(-1).long()
    bucket = torch.where((flat >= 0) & (flat < experts), flat, torch.full_like(flat, experts))
    want = torch.argsort(bucket, stable=True)
    assert torch.equal(sorted_pairs.long(), want)
    assert torch.equal(token_index.long(), want // top_k)
    counts = torch.bincount(bucket, minlength=experts + 1)[:experts]
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


@pytest.mark.parametrize("hidden, vec", [(64, 1), (24, 1), (13, 0), (64, 0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sum_topk_adds_valid_slots_in_order(emu: Any, hidden: int, vec: int, dtype: Any) -> None:
    gen = torch.Generator().manual_seed(hidden)
    tokens, top_k, experts = 37, 3, 6
    x = torch.randn(tokens, top_k, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    ids[2, 1], ids[5, 0] = -1, experts  # skipped (their rows may hold anything)
    x[2, 1], x[5, 0] = float("nan"), float("inf")
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    rc = emu.cf_emu_moe_sum(1 if dtype == torch.bfloat16 else 0, 1, vec, _ptr(out), _ptr(x),
                            _ptr(ids), tokens, top_k, hidden, experts)
    assert rc == 0
    valid = ((ids >= 0) & (ids < experts)).unsqueeze(-1)
    acc = torch.zeros(tokens, hidden)
    for s in range(top_k):  # float32, slot order, one rounding
        acc = acc + torch.where(valid[:, s], x[:, s].float(), torch.zeros(()))
    assert torch.equal(out, acc.to(dtype))


def test_whole_layer_matches_the_per_expert_loop(emu: Any) -> None:
    """sort -> gated GEMM gathering the tokens -> indexed GEMM scattering weighted rows per
    (token, slot) -> top-k sum, against the per-expert loop in float64."""
    gen = torch.Generator().manual_seed(5)
    tokens, experts, top_k, hidden, inter = 45, 6, 2, 64, 48
    dtype = torch.bfloat16
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    probs = torch.softmax(torch.randn(tokens, experts, generator=gen), -1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).contiguous()
    offsets, pairs, token_index = run_sort(emu, ids, experts)
    m = tokens * top_k
    h = torch.full((m, inter), float("nan"), dtype=dtype)
    run_gemm(emu, GATED, "32x128", h, x, w13, offsets, m, row_index=token_index)
    per_slot = torch.full((m, hidden), float("nan"), dtype=dtype)
    run_gemm(emu, INDEXED, "32x128", per_slot, h, w2, offsets, m, out_index=pairs,
             out_scale=weights.reshape(-1))
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    assert emu.cf_emu_moe_sum(1, 1, 1, _ptr(out), _ptr(per_slot), _ptr(ids), tokens, top_k,
                              hidden, experts) == 0
    ref = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for s in range(top_k):
            e = int(ids[t, s])
            gate, up = (x[t].double() @ w13[e].double().t()).chunk(2)
            y = (torch.nn.functional.silu(gate) * up) @ w2[e].double().t()
            ref[t] += weights[t, s].double() * y
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err
