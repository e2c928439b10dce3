"""A host replay of the index arithmetic of the mma.sync grouped-GEMM kernel
(csrc/moe_grouped_gemm.cu, namespace mma_path), run without a GPU.

The replay transcribes the kernel's formulas (tile lookup, cp.async chunk assignment and XOR
swizzle, the cp.async group/stage bookkeeping, ldmatrix.x4 lane addresses, the mma.m16n8k16
fragment layouts, the staged epilogue) and executes them with the PTX semantics of ldmatrix
(lane l receives elements 2 (l % 4), +1 of row l / 4 of each 8x8 matrix) and mma (a0..a3: rows
g / g + 8 x k 0-7 / 8-15; b0, b1: k 0-7 / 8-15 of column g; c0, c1 row g, c2, c3 row g + 8;
g = lane / 4, columns / k pairs 2 (lane % 4)). Integer-valued inputs make every product and sum
exact, so the result must equal the reference bit for bit. It also checks that every ldmatrix
phase is free of bank conflicts and that a stage is never overwritten while it may still be
read. If the kernel's formulas change, change them here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

np = pytest.importorskip("numpy")

BK = 64
ROW_ELEMS = 64


@dataclass(frozen=True)
class Tile:
    bm: int
    bn: int
    wm: int
    wn: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn

    @property
    def warp_tile_m(self) -> int:
        return self.bm // self.wm

    @property
    def warp_tile_n(self) -> int:
        return self.bn // self.wn

    @property
    def row_step(self) -> int:
        return self.threads // 8

    @property
    def stage_elems(self) -> int:
        return (self.bm + self.bn) * ROW_ELEMS

    @property
    def out_ld(self) -> int:
        return self.bn + 8

    @property
    def smem_elems(self) -> int:
        return max(self.stages * self.stage_elems, self.bm * self.out_ld)


# The tiles of the kernel (Tile128x256s4, Tile128x256s3, Tile128x128, Tile64x128, Tile32x128).
TILES = {
    "128x256": Tile(128, 256, 2, 4, 4),
    "128x256s3": Tile(128, 256, 2, 4, 3),
    "128x128": Tile(128, 128, 2, 2, 3),
    "64x128": Tile(64, 128, 2, 2, 4),
    "32x128": Tile(32, 128, 1, 4, 4),
}


def swizzle(row, chunk):
    return row * ROW_ELEMS + ((chunk ^ (row & 7)) << 3)


def find_tile(bm: int, block_x: int, offsets: list[int], m: int) -> tuple[int, int, int]:
    """FindTile: warp 0 scans the experts 32 at a time (inclusive prefix sum + ballot)."""
    e_count = len(offsets) - 1
    t = block_x
    for base in range(0, e_count, 32):
        begin = np.zeros(32, dtype=np.int64)
        end = np.zeros(32, dtype=np.int64)
        tiles = np.zeros(32, dtype=np.int64)
        for lane in range(32):
            e = base + lane
            if e < e_count:
                b, en = offsets[e], offsets[e + 1]
                b = 0 if b < 0 else (m if b > m else b)
                en = b if en < b else (m if en > m else en)
                begin[lane], end[lane], tiles[lane] = b, en, (en - b + bm - 1) // bm
        incl = np.cumsum(tiles)
        hit = np.nonzero(incl > t)[0]
        if hit.size:
            src = int(hit[0])
            return base + src, int(begin[src] + (t - (incl[src] - tiles[src])) * bm), int(end[src])
        t -= int(incl[31])
    return -1, 0, 0


LANES = np.arange(32)
# mma.m16n8k16 fragment coordinates: lane, register, half -> (row, k) of A, (k, col) of B,
# (row, col) of C; g = lane / 4, t = lane % 4.
_G, _T = LANES // 4, LANES % 4
_A_ROW = np.stack([_G, _G + 8, _G, _G + 8], 1)[:, :, None].repeat(2, 2)      # [32, 4, 2]
_A_K = (np.stack([2 * _T, 2 * _T, 2 * _T + 8, 2 * _T + 8], 1)[:, :, None]
        + np.arange(2)[None, None, :])
_B_K = np.stack([2 * _T, 2 * _T + 8], 1)[:, :, None] + np.arange(2)[None, None, :]  # [32,2,2]
_B_COL = _G[:, None, None].repeat(2, 1).repeat(2, 2)
_C_ROW = np.stack([_G, _G, _G + 8, _G + 8], 1)                                 # [32, 4]
_C_COL = np.stack([2 * _T, 2 * _T + 1, 2 * _T, 2 * _T + 1], 1)


def check_conflict_free(addrs_elems) -> None:
    """One ldmatrix phase: 8 row addresses of 16 bytes must cover the 32 banks once."""
    byte = np.asarray(addrs_elems, dtype=np.int64) * 2
    assert (byte % 16 == 0).all(), "ldmatrix row address not 16-byte aligned"
    banks = ((byte // 4)[:, None] + np.arange(4)[None, :]) % 32
    assert len(set(banks.reshape(-1).tolist())) == 32, f"bank conflict: {sorted(addrs_elems)}"


def ldmatrix_x4(smem, addrs):
    """addrs[lane] = element offset of the row lane supplies; returns regs[lane][i] = 2 values:
    elements 2 (lane % 4), +1 of row lane / 4 of matrix i (rows given by lanes 8i..8i+7)."""
    addrs = np.asarray(addrs, dtype=np.int64)
    for i in range(4):
        check_conflict_free(addrs[i * 8:(i + 1) * 8])
    row = addrs[np.arange(4)[None, :] * 8 + (LANES // 4)[:, None]]              # [32, 4]
    first = row + ((LANES % 4) * 2)[:, None]
    return smem[first[:, :, None] + np.arange(2)[None, None, :]]                 # [32, 4, 2]


def mma16816(acc, a, b0, b1):
    """acc[lane][4] += A (from a[lane][4][2]) @ B (from b0/b1[lane][2]) per PTX layouts."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    A[_A_ROW, _A_K] = a
    B[_B_K, _B_COL] = np.stack([b0, b1], 1)
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragment not covered / unwritten"
    acc += (A @ B)[_C_ROW, _C_COL]


def run_block(cfg: Tile, out, x, w, offsets, m, n, k, bx, by, out_vec):
    expert, row0, seg_end = find_tile(cfg.bm, bx, offsets, m)
    if expert < 0:
        return False
    n0 = by * cfg.bn
    smem = np.full(cfg.smem_elems, np.nan)
    xf, wf = x.reshape(-1), w.reshape(-1)
    tid = np.arange(cfg.threads)
    ld_row, ld_chunk = tid >> 3, tid & 7
    ld_dst = swizzle(ld_row, ld_chunk)
    a_src = (row0 + ld_row) * k + ld_chunk * 8
    b_src = (expert * n + n0 + ld_row) * k + ld_chunk * 8
    a_rows = seg_end - row0 - ld_row
    b_rows = n - n0 - ld_row
    a_loads, b_loads = cfg.bm // cfg.row_step, cfg.bn // cfg.row_step
    assert cfg.bm % cfg.row_step == 0 and cfg.bn % cfg.row_step == 0 and cfg.row_step % 8 == 0

    pending: list[list[tuple[int, int]]] = []  # committed groups: (slot, k tile) copies
    open_group: list[tuple[int, int]] = []
    slot_tile = [None] * cfg.stages          # k tile whose data a slot holds (once landed)
    slot_loading = [None] * cfg.stages       # k tile being copied into a slot
    staged: dict[int, tuple] = {}            # slot -> (dst offsets, values) of in-flight copies

    def load_stage(slot: int, kt: int) -> None:
        assert slot_loading[slot] is None, "slot overwritten while its copy is in flight"
        k0 = kt * BK
        base = slot * cfg.stage_elems
        k_ok = k0 + ld_chunk * 8 < k
        dsts, vals = [], []
        for i in range(a_loads):
            ok = k_ok & (i * cfg.row_step < a_rows)
            src = np.where(ok, a_src + i * cfg.row_step * k + k0, 0)
            dsts.extend((base + ld_dst + i * cfg.row_step * ROW_ELEMS).tolist())
            vals.extend(np.where(ok[:, None], xf[src[:, None] + np.arange(8)[None, :]], 0.0))
        for i in range(b_loads):
            ok = k_ok & (i * cfg.row_step < b_rows)
            src = np.where(ok, b_src + i * cfg.row_step * k + k0, 0)
            dsts.extend((base + cfg.bm * ROW_ELEMS + ld_dst + i * cfg.row_step * ROW_ELEMS)
                        .tolist())
            vals.extend(np.where(ok[:, None], wf[src[:, None] + np.arange(8)[None, :]], 0.0))
        # every 16-byte destination of the stage written exactly once
        assert sorted(dsts) == list(range(base, base + cfg.stage_elems, 8))
        staged[slot] = (dsts, vals)
        slot_loading[slot] = kt
        slot_tile[slot] = None
        open_group.append((slot, kt))

    def commit() -> None:
        pending.append(list(open_group))
        open_group.clear()

    def wait(n_pending: int) -> None:
        while len(pending) > n_pending:
            for slot, kt in pending.pop(0):
                dsts, vals = staged.pop(slot)
                for d, v in zip(dsts, vals):
                    smem[d:d + 8] = v
                slot_tile[slot], slot_loading[slot] = kt, None

    warps = cfg.threads // 32
    mi_n, ni_n = cfg.warp_tile_m // 16, cfg.warp_tile_n // 8
    acc = np.zeros((warps, mi_n, ni_n, 32, 4))
    lane = LANES
    k_tiles = (k + BK - 1) // BK
    for s in range(cfg.stages - 1):
        if s < k_tiles:
            load_stage(s, s)
        commit()
    read_slot, write_slot = 0, cfg.stages - 1
    for kt in range(k_tiles):
        wait(cfg.stages - 2)
        # __syncthreads; the next load may overwrite write_slot (tile kt - 1 was read before).
        nxt = kt + cfg.stages - 1
        if nxt < k_tiles:
            assert slot_tile[write_slot] in (None, kt - 1)
            load_stage(write_slot, nxt)
        commit()
        assert slot_tile[read_slot] == kt, "tile read before it landed"
        a_s = read_slot * cfg.stage_elems
        b_s = a_s + cfg.bm * ROW_ELEMS
        for warp in range(warps):
            warp_m, warp_n = warp // cfg.wn, warp % cfg.wn
            a_frag_row = warp_m * cfg.warp_tile_m + (lane & 15)
            a_frag_hi = lane >> 4
            b_frag_row = warp_n * cfg.warp_tile_n + (lane & 7) + ((lane >> 4) << 3)
            b_frag_hi = (lane >> 3) & 1
            for kk in range(BK // 16):
                af = [ldmatrix_x4(smem, a_s + swizzle(a_frag_row + mi * 16, 2 * kk + a_frag_hi))
                      for mi in range(mi_n)]
                bf = [None] * ni_n
                for nj in range(ni_n // 2):
                    r = ldmatrix_x4(smem, b_s + swizzle(b_frag_row + nj * 16, 2 * kk + b_frag_hi))
                    bf[2 * nj] = (r[:, 0], r[:, 1])
                    bf[2 * nj + 1] = (r[:, 2], r[:, 3])
                for mi in range(mi_n):
                    for ni in range(ni_n):
                        mma16816(acc[warp, mi, ni], af[mi], *bf[ni])
        read_slot = 0 if read_slot + 1 == cfg.stages else read_slot + 1
        write_slot = 0 if write_slot + 1 == cfg.stages else write_slot + 1
    wait(0)
    assert not open_group and not staged

    # Epilogue: staging words, then 8-element row chunks.
    stage = np.full(cfg.bm * cfg.out_ld, np.nan)
    written = np.zeros(cfg.bm * cfg.out_ld, dtype=np.int64)
    for warp in range(warps):
        warp_m, warp_n = warp // cfg.wn, warp % cfg.wn
        r_base = warp_m * cfg.warp_tile_m + (lane >> 2)
        c_base = warp_n * cfg.warp_tile_n + (lane & 3) * 2
        for mi in range(mi_n):
            for ni in range(ni_n):
                r, c = r_base + mi * 16, c_base + ni * 8
                word_banks = []
                for half, rr in ((0, r), (2, r + 8)):
                    idx = rr * cfg.out_ld + c
                    assert (idx % 2 == 0).all()
                    word_banks.append(len(set((idx // 2) % 32)))
                    for q in range(2):
                        stage[idx + q] = acc[warp, mi, ni, :, half + q]
                        np.add.at(written, idx + q, 1)
                assert word_banks == [32, 32], "bank conflict in the staging store"
    tile_written = written.reshape(cfg.bm, cfg.out_ld)[:, :cfg.bn]
    assert (tile_written == 1).all(), "staging tile not covered exactly once"
    chunks = cfg.bn // 8
    for c in range(cfg.bm * chunks):  # all threads' iterations together
        r, cc = c // chunks, (c % chunks) * 8
        gr, gc = row0 + r, n0 + cc
        if gr >= seg_end or gc >= n:
            continue
        src = stage[r * cfg.out_ld + cc: r * cfg.out_ld + cc + 8]
        if out_vec and gc + 8 <= n:
            out[gr, gc:gc + 8] = src
        else:
            q = min(8, n - gc)
            out[gr, gc:gc + q] = src[:q]
    return True


def replay(cfg: Tile, counts: list[int], n: int, k: int, m_extra: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    m = sum(counts) + m_extra
    e = len(counts)
    x = rng.integers(-3, 4, size=(m, k)).astype(np.float64)
    w = rng.integers(-3, 4, size=(e, n, k)).astype(np.float64)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    out = np.full((m, n), np.nan)
    grid_x = (m + cfg.bm - 1) // cfg.bm + e
    grid_y = (n + cfg.bn - 1) // cfg.bn
    ran = 0
    for bx in range(grid_x):
        for by in range(grid_y):
            ran += run_block(cfg, out, x, w, offsets, m, n, k, bx, by, out_vec=n % 8 == 0)
    ref = np.full((m, n), np.nan)
    for ex in range(e):
        b, t = offsets[ex], offsets[ex + 1]
        ref[b:t] = x[b:t] @ w[ex].T
    np.testing.assert_array_equal(out, ref)  # NaN past offsets[E]: untouched
    expected_blocks = sum((c + cfg.bm - 1) // cfg.bm for c in counts) * grid_y
    assert ran == expected_blocks


@pytest.mark.parametrize("name", list(TILES))
def test_replay_matches_reference(name: str) -> None:
    cfg = TILES[name]
    # a partial and an empty segment, rows past offsets[E], N off the tile and off 8, K off 64
    replay(cfg, [cfg.bm + 1, 0, 3], n=cfg.bn + 10, k=136, m_extra=5)


def test_replay_small_tile_edges() -> None:
    cfg = TILES["32x128"]
    replay(cfg, [1, 15, 17, 0, 33], n=136, k=64, seed=1)
    replay(cfg, [2], n=8, k=8, seed=2)


def test_find_tile_many_experts() -> None:
    """More than 32 experts: the scan carries the tile count across warp-sized chunks."""
    counts = [(i * 7) % 5 for i in range(70)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    bm = 2
    expected = []
    for e, c in enumerate(counts):
        for t in range((c + bm - 1) // bm):
            expected.append((e, offsets[e] + t * bm, offsets[e + 1]))
    got = [find_tile(bm, b, offsets, offsets[-1]) for b in range(len(expected) + 3)]
    assert got[:len(expected)] == expected
    assert got[len(expected):] == [(-1, 0, 0)] * 3
