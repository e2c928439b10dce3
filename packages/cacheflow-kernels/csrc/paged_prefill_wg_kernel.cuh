// paged_prefill_attention on Hopper (sm_90a): warpgroup MMAs (device code; no TVM-FFI here).
//
// The same op and the same CTA order (TileOf) as the FlashAttention-2-style kernel of
// paged_prefill_kernel.cuh, with the two GEMMs of each key tile on wgmma.mma_async, which reads
// its operands from shared memory itself instead of through ldmatrix and per-warp mma.sync:
//   * one CTA of two warpgroups per (query tile of BM = 128 rows, head, sequence); warpgroup g
//     owns rows 64 g .. 64 g + 63, warp w of it the 16 rows 64 g + 16 w .. (the accumulator
//     layout of wgmma m64nNk16).
//   * Q, K and V tiles live in shared memory in the 128-byte-swizzled layout wgmma reads: a tile
//     of R rows x D columns is ceil(D / 64) column blocks of R rows x 128 bytes, the 16-byte
//     chunk c of row r stored at chunk c ^ (r % 8). Every 16-byte copy of a row lands in its own
//     bank group, so the cp.async gathers through the block table are conflict-free. The next
//     tiles load while tile n is computed, one CTA barrier per tile.
//   * S = Q K^T: D / 16 wgmmas m64nBNk16 per warpgroup, A = Q and B = K both K-major from shared
//     memory. O += P V: BN / 16 wgmmas m64nDk16 with A = P from registers (the S accumulators
//     packed to 16 bits: the accumulator layout is the A-fragment layout) and B = V read
//     MN-major ("transposed"), so V needs no transposing copy.
//   * two schedules (PagedPrefillWgKernel's kOverlap): the softmax of tile n - 1 while the tensor
//     cores do P V of tile n (FlashAttention-3's intra-warpgroup pipelining; K then loads two
//     tiles ahead into three buffers), or each step's GEMMs and softmax one after the other.
//   * masking, the online softmax with lazy rescaling, soft capping, FP8 caches (widened to the
//     query's type on the way into shared memory) and the sliding window are those of the
//     mma.sync kernel, per warp of 16 rows.
//   * the output is staged through each warpgroup's own Q rows (same swizzled layout) and
//     leaves in 16-byte stores.
// Head sizes 96 and 128 take BN = 128 keys; 256 takes BN = 64 (128 accumulator registers of O
// per thread); 64 takes BN = 64 with two CTAs per SM (122 registers), so that one CTA's softmax
// runs while the other's wgmmas keep the tensor cores busy (at d64 a key costs half the MMA
// work of d128 and the same softmax work). The host launches it on compute capability 9.0 when
// the library was built for sm_90a (paged_prefill_wg_{fp16,bf16}.cu, chosen in
// paged_prefill.cu); tests/emulation runs this source on a CPU.
#pragma once

#include "paged_prefill_kernel.cuh"

#if !defined(CACHEFLOW_PREFILL_EMULATE)
#include "wgmma_ptx.cuh"
#endif

namespace cacheflow {
namespace prefill {

/*!
 * \brief Tile shapes and the shared-memory plan of the Hopper kernel for head size D, with
 * `kOverlap` (the FlashAttention-3 schedule: three K buffers, K loaded two tiles ahead).
 */
template <int D, int BN, bool kOverlap>
struct WgTraits {
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kBM = kWarpGroups * 64;   // query rows per CTA
  static constexpr int kBN = BN;                 // keys per tile
  static constexpr int kChunks = D / 8;          // 16-byte chunks per row
  static constexpr int kColBlocks = (D + 63) / 64;  // 128-byte column blocks per tile
  static constexpr int kQBytes = kColBlocks * kBM * 128;
  static constexpr int kKvBytes = kColBlocks * BN * 128;
  static constexpr int kKBuffers = kOverlap ? 3 : 2;
  static constexpr int kVBuffers = 2;
  static constexpr int kSlotRing = 4;            // slot lists of 4 tiles (indexed tile & 3)
  // 1 KiB of slack to align the swizzled tiles, Q, the K and V buffers, the slot ring.
  static constexpr int kSmemBytes =
      1024 + kQBytes + (kKBuffers + kVBuffers) * kKvBytes + kSlotRing * BN * 4;
  static_assert(D % 32 == 0 && D <= 256, "head sizes 64, 96, 128, 256");
  static_assert(BN % 16 == 0 && BN <= kThreads, "one thread per key looks up the slots");
  static_assert((kBM * kChunks) % kThreads == 0 && (BN * kChunks) % kThreads == 0,
                "tiles must split evenly over the threads");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");
};

/*! \brief CTAs per SM the Hopper kernel is compiled for: two at head size 64, else one. */
constexpr int WgCtasPerSm(int d) { return d == 64 ? 2 : 1; }

/*! \brief Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile of `rows` rows. */
CF_DEVICE uint32_t SwizzledChunk(int rows, int r, int c) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

/*!
 * \brief A wgmma shared-memory matrix descriptor with the 128-byte swizzle: start address, the
 * leading and stride byte offsets (PTX ISA "matrix descriptor"; both multiples of 16).
 */
CF_DEVICE uint64_t SwizzledDesc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

/*!
 * \brief The Hopper kernel. kOverlap = false: per key tile, S = Q K^T, softmax, O += P V, each
 * waited for in turn. kOverlap = true (FlashAttention-3's intra-warpgroup pipelining): P V of
 * tile n and S of tile n - 1 are issued together, and the softmax of tile n - 1 runs while the
 * tensor cores still do P V of tile n (O is rescaled once that completes). K is then needed one
 * tile earlier than V: three K buffers, K loaded two tiles ahead.
 */
template <class T, int D, int BN, bool kFp8, bool kOverlap>
CF_GLOBAL void CF_LAUNCH_BOUNDS_MIN(256, WgCtasPerSm(D))
    PagedPrefillWgKernel(const PrefillParams p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  using Tr = WgTraits<D, BN, kOverlap>;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kBM = Tr::kBM;
  constexpr int kChunks = Tr::kChunks;
  constexpr int kQBytes = Tr::kQBytes;
  constexpr int kKvBytes = Tr::kKvBytes;
  constexpr int kKB = Tr::kKBuffers;
  // Tiles ahead whose slots are looked up: the loads of a step reach one tile further with
  // kOverlap (K of tile n - 2 while computing tile n).
  constexpr int kAhead = kOverlap ? 3 : 2;

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid >> 7;
  const int warp = (tid >> 5) & 3;  // within the warpgroup
  const int lane = tid & 31;
  constexpr int kCacheBytes = kFp8 ? 1 : 2;
  QueryTile t;
  if (!LocateQueryTile<kBM, BN, D, kCacheBytes>(p, t)) return;  // (before any barrier)
  if (t.n_tiles == 0) {
    ZeroTileRows<kChunks, kThreads>(t, tid);
    return;
  }

  // Swizzled tiles need 1024-byte-aligned bases (the swizzle is a function of address bits 7-9).
  unsigned char* smem_raw = DynamicSmem();
  const uint32_t raw = SmemU32(smem_raw);
  const uint32_t s_q = (raw + 1023u) & ~1023u;
  const uint32_t s_k = s_q + kQBytes;          // K of tile n in buffer n % kKB
  const uint32_t s_v = s_k + kKB * kKvBytes;   // V of tile n in buffer n & 1
  int32_t* s_slot = reinterpret_cast<int32_t*>(smem_raw + (s_v + 2 * kKvBytes - raw));
  unsigned char* smem_q = smem_raw + (s_q - raw);
  auto k_buffer = [&](int tile) { return s_k + (tile % kKB) * kKvBytes; };
  auto v_buffer = [&](int tile) { return s_v + (tile & 1) * kKvBytes; };

  // Issues the copies of one K or V tile whose slots are `slots[0..BN)`; slot < 0 zero-fills.
  auto load_kv = [&](uint32_t dst, const unsigned char* base, int tile) {
    const int32_t* slots = s_slot + (tile & 3) * BN;
#pragma unroll
    for (int j = 0; j < BN * kChunks / kThreads; ++j) {
      int r, c;
      ChunkCoords<kChunks, kThreads>(tid, j, r, c);
      const int slot = slots[r];
      const bool valid = slot >= 0;
      const uint32_t at = dst + SwizzledChunk(BN, r, c);
      if constexpr (kFp8) {
        Fp8Io<T>::Fill16(at, base + slot * t.slot_bytes + c * 8, valid);
      } else {
        CpAsync16(at, valid ? base + slot * t.slot_bytes + c * 16 : base, valid);
      }
    }
  };
  auto load_k = [&](int tile) { load_kv(k_buffer(tile), t.k_base, tile); };
  auto load_v = [&](int tile) { load_kv(v_buffer(tile), t.v_base, tile); };
  // Every CTA barrier of the loop is preceded by this: this thread's copies landed and visible
  // to the tensor cores (the async proxy), including the FP8 path's plain shared stores.
  auto copies_visible = [&]() {
    CpAsyncWait<0>();
    FenceProxyAsync();
    SyncCta();
  };

  // ---- Prologue: slots of the first tiles, Q, the first K and V. ----
  if (tid < BN) {
    for (int i = 0; i < kAhead; ++i) {
      const int n = t.n_tiles - 1 - i;
      if (n >= t.n_lo) s_slot[(n & 3) * BN + tid] = SlotOf(p, t.table, n * BN + tid, t.ctx);
    }
  }
#pragma unroll
  for (int j = 0; j < kBM * kChunks / kThreads; ++j) {
    int r, c;
    ChunkCoords<kChunks, kThreads>(tid, j, r, c);
    const bool valid = r < t.rows;  // rows past the sequence are zero-filled
    CpAsync16(s_q + SwizzledChunk(kBM, r, c),
              valid ? t.q_ptr + r * t.q_token_bytes + c * 16 : p.query, valid);
  }
  SyncCta();  // slots visible
  load_k(t.n_tiles - 1);
  load_v(t.n_tiles - 1);
  if (kOverlap && t.n_tiles - 2 >= t.n_lo) load_k(t.n_tiles - 2);
  CpAsyncCommit();

  const int quad_row = lane >> 2;
  const int quad_col = (lane & 3) * 2;
  const int wr0 = wg * 64 + warp * 16;  // this warp's first row in the tile
  // K-major operands: 8-row groups 1024 bytes apart (LBO unused: a step's 16 columns are in one
  // 128-byte row). V (MN-major): 8-key groups 1024 bytes apart, 64-column blocks BN * 128 apart.
  const uint32_t q_rows = s_q + wg * 64 * 128;

  float acc_o[D / 2];
  float s[BN / 2];         // S of the tile being scored, then its P (unnormalized)
  uint32_t pa[BN / 16][4];  // P packed to 16 bits: the A operand of O += P V
  float row_max[2];
  float row_sum[2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_max[h] = -INFINITY;
    row_sum[h] = 0.f;
  }
  const float scale_log2 = p.scale_log2;
  const float inv_scale = 1.f / p.scale;
  const bool lazy_rescale = p.rescale_threshold >= 0.f;

  // S = Q K^T of `tile` into s (issued and committed, not waited for).
  auto issue_s = [&](int tile) {
    const uint32_t k_tile = k_buffer(tile);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t col = (kk & 3) * 32;  // 16 columns = 32 bytes into the 128-byte rows
      const uint64_t a = SwizzledDesc(q_rows + (kk >> 2) * (kBM * 128) + col, 16, 1024);
      const uint64_t b = SwizzledDesc(k_tile + (kk >> 2) * (BN * 128) + col, 16, 1024);
      WgmmaSS<T, BN>::Run(s, a, b, kk > 0 ? 1 : 0);
    }
    WgmmaCommit();
  };
  // O += P V of `tile` from pa (issued and committed, not waited for).
  auto issue_pv = [&](int tile) {
    const uint32_t v_tile = v_buffer(tile);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      WgmmaRS<T, D>::Run(acc_o, pa[kk], SwizzledDesc(v_tile + kk * 2048, BN * 128, 1024));
    }
    WgmmaCommit();
  };
  // The online softmax of the scores in s (as the mma.sync kernel's, per warp of 16 rows):
  // soft cap, mask, each row's new maximum, P = 2^(S * scale_log2 - max) in place, the sums.
  // Returns in alpha the factors O must be scaled by (1 where it is not rescaled), applied by
  // the caller once no P V is in flight.
  auto softmax = [&](int tile, float (&alpha)[2]) {
    if (p.soft_cap > 0.f) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] = SoftCap(p, s[i] * p.scale) * inv_scale;
    }
    // Tiles reaching past row 0's position (the diagonal) or below the last row's window.
    if (tile * BN + BN - 1 > t.pos0 || tile * BN < t.lower_edge) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        const int row = wr0 + quad_row + ((i >> 1) & 1) * 8;
        const int key = tile * BN + (i >> 2) * 8 + quad_col + (i & 1);
        const int pos = t.pos0 + row;
        if (key > pos || (t.has_window && key <= pos - p.window)) s[i] = -INFINITY;
      }
    }
    float m_new[2];
    bool grow = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        mx = fmaxf(mx, fmaxf(s[nt * 4 + 2 * h], s[nt * 4 + 2 * h + 1]));
      }
      mx = fmaxf(mx, ShflXor(mx, 1));
      mx = fmaxf(mx, ShflXor(mx, 2));
      m_new[h] = fmaxf(row_max[h], mx * scale_log2);
      grow |= m_new[h] > row_max[h] + p.rescale_threshold;
    }
    const bool rescale = !lazy_rescale || AnySync(grow);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m = rescale ? m_new[h] : row_max[h];
      const float m_use = m == -INFINITY ? 0.f : m;  // a row without keys yet keeps -inf
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const float pr = Exp2(fmaf(s[nt * 4 + e], scale_log2, -m_use));
          s[nt * 4 + e] = pr;
          sum += pr;
        }
      }
      alpha[h] = rescale ? Exp2(row_max[h] - m_use) : 1.f;
      row_sum[h] = row_sum[h] * alpha[h] + sum;
      row_max[h] = m;
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        acc_o[dt * 4 + 2 * h] *= alpha[h];
        acc_o[dt * 4 + 2 * h + 1] *= alpha[h];
      }
    }
  };
  // P's 16-key slices from the S registers, all packed before the first wgmma (a register
  // written between two wgmmas makes the compiler serialize them).
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = Pack2<T>(s[kk * 8 + 2 * i], s[kk * 8 + 2 * i + 1]);
    }
  };

  if constexpr (!kOverlap) {
    for (int n = t.n_tiles - 1; n >= t.n_lo; --n) {
      copies_visible();  // K/V[n] (and Q) landed; everyone is done with tile n + 1's buffers
      if (n - 1 >= t.n_lo) {
        load_k(n - 1);
        load_v(n - 1);
      }
      CpAsyncCommit();
      int next_slot = -1;
      const bool look_up = n - kAhead >= t.n_lo && tid < BN;
      if (look_up) next_slot = SlotOf(p, t.table, (n - kAhead) * BN + tid, t.ctx);
      issue_s(n);
      WgmmaWait<0>();
      WgmmaFenceOperand(s);
      if (look_up) s_slot[((n - kAhead) & 3) * BN + tid] = next_slot;
      float alpha[2];
      softmax(n, alpha);
      rescale_o(alpha);
      pack_p();
      issue_pv(n);
      WgmmaWait<0>();
      WgmmaFenceOperand(acc_o);
      WgmmaFenceOperand(pa);
    }
  } else {
    // Tile n_tiles - 1 scored before the loop; each step then issues P V of tile n with S of
    // tile n - 1, and scores n - 1 while P V runs.
    copies_visible();
    issue_s(t.n_tiles - 1);
    WgmmaWait<0>();
    WgmmaFenceOperand(s);
    {
      float alpha[2];
      softmax(t.n_tiles - 1, alpha);  // (O is still zero: nothing to rescale)
    }
    pack_p();
    for (int n = t.n_tiles - 1; n >= t.n_lo; --n) {
      // K[n - 1] and V[n] landed; everyone is done with S of tile n and P V of tile n + 1, so
      // K buffer (n - 2) % 3 (S of n + 1) and V buffer (n - 1) & 1 (P V of n + 1) are free.
      copies_visible();
      if (n - 2 >= t.n_lo) load_k(n - 2);
      if (n - 1 >= t.n_lo) load_v(n - 1);
      CpAsyncCommit();
      int next_slot = -1;
      const bool look_up = n - kAhead >= t.n_lo && tid < BN;
      if (look_up) next_slot = SlotOf(p, t.table, (n - kAhead) * BN + tid, t.ctx);
      if (n - 1 >= t.n_lo) {
        issue_s(n - 1);
        issue_pv(n);
        if (look_up) s_slot[((n - kAhead) & 3) * BN + tid] = next_slot;
        WgmmaWait<1>();  // S of tile n - 1 (P V of tile n may still run)
        WgmmaFenceOperand(s);
        float alpha[2];
        softmax(n - 1, alpha);
        WgmmaWait<0>();
        WgmmaFenceOperand(acc_o);
        WgmmaFenceOperand(pa);
        rescale_o(alpha);
        pack_p();
      } else {
        issue_pv(n);
        WgmmaWait<0>();
        WgmmaFenceOperand(acc_o);
        WgmmaFenceOperand(pa);
      }
    }
  }
  CpAsyncWait<0>();

  // ---- Epilogue: O / sum into this warp's own Q rows (swizzled), then 16-byte stores. ----
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += ShflXor(l, 1);
    l += ShflXor(l, 2);
    inv[h] = l > 0.f ? p.v_scale / l : 0.f;
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wr0 + quad_row + h * 8;
      const int col = dt * 8 + quad_col;
      StoreShared32(s_q + SwizzledChunk(kBM, row, col >> 3) + (col & 7) * 2,
                    Pack2<T>(acc_o[dt * 4 + 2 * h] * inv[h], acc_o[dt * 4 + 2 * h + 1] * inv[h]));
    }
  }
  SyncWarp();
#pragma unroll
  for (int j = 0; j < 16 * kChunks / 32; ++j) {
    int r, c;
    ChunkCoords<kChunks, 32>(lane, j, r, c);
    const int row = wr0 + r;
    if (row < t.rows) {
      Store16(t.o_ptr + row * t.token_bytes + c * 16,
              Load16(smem_q + SwizzledChunk(kBM, row, c)));
    }
  }
}

/*!
 * \brief Keys per tile of the Hopper kernel: 128, or 64 at head size 256 (register budget) and
 * at 64 (two resident CTAs, WgCtasPerSm).
 */
constexpr int WgKeysPerTile(int d) { return (d == 256 || d == 64) ? 64 : 128; }

template <class T, int D, bool kFp8, bool kOverlap, class Launch>
void LaunchWgD(int num_heads, int num_seqs, int64_t max_query_len, Launch&& launch) {
  constexpr int kBN = WgKeysPerTile(D);
  using Tr = WgTraits<D, kBN, kOverlap>;
  launch(&PagedPrefillWgKernel<T, D, kBN, kFp8, kOverlap>, num_heads, num_seqs, max_query_len,
         Tr::kBM, Tr::kThreads, Tr::kSmemBytes);
}

/*!
 * \brief Launches the Hopper kernel of element type T (Fp16 or Bf16) for head size `d`, with
 * the overlapped schedule or (overlap = false) the serial one.
 * \return false when `d` has no Hopper kernel (IsWgHeadSize).
 */
template <class T, bool kFp8 = false, class Launch>
bool DispatchWg(int64_t d, bool overlap, int num_heads, int num_seqs, int64_t max_query_len,
                Launch&& launch) {
  auto go = [&](auto d_tag) {
    constexpr int kD = decltype(d_tag)::value;
    if (overlap) {
      LaunchWgD<T, kD, kFp8, true>(num_heads, num_seqs, max_query_len, launch);
    } else {
      LaunchWgD<T, kD, kFp8, false>(num_heads, num_seqs, max_query_len, launch);
    }
    return true;
  };
  switch (d) {
    case 64: return go(std::integral_constant<int, 64>{});
    case 96: return go(std::integral_constant<int, 96>{});
    case 128: return go(std::integral_constant<int, 128>{});
    case 256: return go(std::integral_constant<int, 256>{});
    default: return false;
  }
}

}  // namespace prefill
}  // namespace cacheflow
