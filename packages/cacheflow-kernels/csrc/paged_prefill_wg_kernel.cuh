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
//     bank group, so the cp.async gathers through the block table are conflict-free. K and V
//     are double-buffered: tile n - 1 loads while tile n is computed, one CTA barrier per tile.
//   * S = Q K^T: D / 16 wgmmas m64nBNk16 per warpgroup, A = Q and B = K both K-major from shared
//     memory. O += P V: BN / 16 wgmmas m64nDk16 with A = P from registers (the S accumulators
//     packed to 16 bits: the accumulator layout is the A-fragment layout) and B = V read
//     MN-major ("transposed"), so V needs no transposing copy.
//   * masking, the online softmax with lazy rescaling, soft capping, FP8 caches (widened to the
//     query's type on the way into shared memory) and the sliding window are those of the
//     mma.sync kernel, per warp of 16 rows.
//   * the output is staged through each warpgroup's own Q rows (same swizzled layout) and
//     leaves in 16-byte stores.
// Head sizes 64, 96, 128 (BN = 128 keys) and 256 (BN = 64: 128 accumulator registers of O per
// thread). The host launches it on compute capability 9.0 when the library was built for
// sm_90a (paged_prefill_wg.cu); tests/emulation runs this source on a CPU.
#pragma once

#include "paged_prefill_kernel.cuh"

#if !defined(CACHEFLOW_PREFILL_EMULATE)
#include "wgmma_ptx.cuh"
#endif

namespace cacheflow {
namespace prefill {

/*! \brief Tile shapes and the shared-memory plan of the Hopper kernel for head size D. */
template <int D, int BN>
struct WgTraits {
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kBM = kWarpGroups * 64;   // query rows per CTA
  static constexpr int kBN = BN;                 // keys per tile
  static constexpr int kChunks = D / 8;          // 16-byte chunks per row
  static constexpr int kColBlocks = (D + 63) / 64;  // 128-byte column blocks per tile
  static constexpr int kQBytes = kColBlocks * kBM * 128;
  static constexpr int kKvBytes = kColBlocks * BN * 128;
  static constexpr int kSlotRing = 4;            // slot lists of 4 tiles (indexed tile & 3)
  // 1 KiB of slack to align the swizzled tiles, Q, K and V (two buffers each), the slot ring.
  static constexpr int kSmemBytes = 1024 + kQBytes + 4 * kKvBytes + kSlotRing * BN * 4;
  static_assert(D % 32 == 0 && D <= 256, "head sizes 64, 96, 128, 256");
  static_assert(BN % 16 == 0 && BN <= kThreads, "one thread per key looks up the slots");
  static_assert((kBM * kChunks) % kThreads == 0 && (BN * kChunks) % kThreads == 0,
                "tiles must split evenly over the threads");
};

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

template <class T, int D, int BN, bool kFp8>
CF_GLOBAL void CF_LAUNCH_BOUNDS(256) PagedPrefillWgKernel(const PrefillParams p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  using Tr = WgTraits<D, BN>;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kBM = Tr::kBM;
  constexpr int kChunks = Tr::kChunks;
  constexpr int kQBytes = Tr::kQBytes;
  constexpr int kKvBytes = Tr::kKvBytes;

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid >> 7;
  const int warp = (tid >> 5) & 3;  // within the warpgroup
  const int lane = tid & 31;
  int m_block, head, seq;
  TileOf(p, m_block, head, seq);

  const int q_begin = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_begin;
  const int m0 = m_block * kBM;
  if (m0 >= q_len) return;  // (uniform over the CTA, before any barrier)
  const int ctx = p.context_lens[seq];
  const int rows = IMin(kBM, q_len - m0);
  const int pos0 = ctx - q_len + m0;
  const int last_pos = pos0 + rows - 1;
  const int n_tiles = last_pos >= 0 ? last_pos / BN + 1 : 0;
  const bool has_window = p.window > 0;
  const int first_key = has_window ? pos0 - p.window + 1 : 0;
  const int n_lo = first_key > 0 ? first_key / BN : 0;
  const int lower_edge = has_window ? last_pos - p.window + 1 : INT_MIN;
  const int kv_head = head / p.group;
  const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  const int64_t token_bytes = p.token_stride * 2;
  const int64_t q_token_bytes = p.q_token_stride * 2;
  constexpr int kCacheBytes = kFp8 ? 1 : 2;
  const int64_t slot_bytes = p.slot_stride * kCacheBytes;
  const int64_t head_offset = static_cast<int64_t>(head) * D * 2;
  const unsigned char* q_ptr = p.query + static_cast<int64_t>(q_begin + m0) * q_token_bytes +
                               head_offset;
  unsigned char* o_ptr = p.out + static_cast<int64_t>(q_begin + m0) * token_bytes + head_offset;
  const unsigned char* k_base = p.key_cache + static_cast<int64_t>(kv_head) * D * kCacheBytes;
  const unsigned char* v_base = p.value_cache + static_cast<int64_t>(kv_head) * D * kCacheBytes;

  if (n_tiles == 0) {  // no key visible at all (context_lens[seq] < q_len): zeros
    for (int i = tid; i < rows * kChunks; i += kThreads) {
      Store16(o_ptr + (i / kChunks) * token_bytes + (i % kChunks) * 16, uint4{0, 0, 0, 0});
    }
    return;
  }

  // Swizzled tiles need 1024-byte-aligned bases (the swizzle is a function of address bits 7-9).
  unsigned char* smem_raw = DynamicSmem();
  const uint32_t raw = SmemU32(smem_raw);
  const uint32_t s_q = (raw + 1023u) & ~1023u;
  const uint32_t s_k = s_q + kQBytes;          // K of tile n in buffer n & 1
  const uint32_t s_v = s_k + 2 * kKvBytes;     // V likewise
  int32_t* s_slot = reinterpret_cast<int32_t*>(smem_raw + (s_v + 2 * kKvBytes - raw));
  unsigned char* smem_q = smem_raw + (s_q - raw);

  // Issues the copies of one K or V tile whose slots are `slots[0..BN)`; slot < 0 zero-fills.
  auto load_kv = [&](uint32_t dst, const unsigned char* base, const int32_t* slots) {
#pragma unroll
    for (int j = 0; j < BN * kChunks / kThreads; ++j) {
      int r, c;
      ChunkCoords<kChunks, kThreads>(tid, j, r, c);
      const int slot = slots[r];
      const bool valid = slot >= 0;
      const uint32_t at = dst + SwizzledChunk(BN, r, c);
      if constexpr (kFp8) {
        Fp8Io<T>::Fill16(at, base + slot * slot_bytes + c * 8, valid);
      } else {
        CpAsync16(at, valid ? base + slot * slot_bytes + c * 16 : base, valid);
      }
    }
  };
  auto load_tile = [&](int tile) {
    const int32_t* slots = s_slot + (tile & 3) * BN;
    load_kv(s_k + (tile & 1) * kKvBytes, k_base, slots);
    load_kv(s_v + (tile & 1) * kKvBytes, v_base, slots);
  };

  // ---- Prologue: slots of the first two tiles, Q, K and V of the first tile. ----
  if (tid < BN) {
    const int n = n_tiles - 1;
    s_slot[(n & 3) * BN + tid] = SlotOf(p, table, n * BN + tid, ctx);
    if (n - 1 >= n_lo) s_slot[((n - 1) & 3) * BN + tid] = SlotOf(p, table, (n - 1) * BN + tid, ctx);
  }
#pragma unroll
  for (int j = 0; j < kBM * kChunks / kThreads; ++j) {
    int r, c;
    ChunkCoords<kChunks, kThreads>(tid, j, r, c);
    const bool valid = r < rows;  // rows past the sequence are zero-filled
    CpAsync16(s_q + SwizzledChunk(kBM, r, c), valid ? q_ptr + r * q_token_bytes + c * 16 : p.query,
              valid);
  }
  SyncCta();  // slots visible
  load_tile(n_tiles - 1);
  CpAsyncCommit();

  const int quad_row = lane >> 2;
  const int quad_col = (lane & 3) * 2;
  const int wr0 = wg * 64 + warp * 16;  // this warp's first row in the tile
  // K-major operands: 8-row groups 1024 bytes apart (LBO unused: a step's 16 columns are in one
  // 128-byte row). V (MN-major): 8-key groups 1024 bytes apart, 64-column blocks BN * 128 apart.
  const uint32_t q_rows = s_q + wg * 64 * 128;

  float acc_o[D / 2];
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

  auto step = [&](const int tile, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    CpAsyncWait<0>();
    FenceProxyAsync();  // this thread's copies (and stores) visible to the tensor cores
    SyncCta();          // K/V[tile] (and Q) landed; everyone is done with tile + 1's buffers
    if (tile - 1 >= n_lo) load_tile(tile - 1);
    CpAsyncCommit();
    int next_slot = -1;
    if (tile - 2 >= n_lo && tid < BN) next_slot = SlotOf(p, table, (tile - 2) * BN + tid, ctx);

    // S = Q K^T for this warpgroup's 64 rows and the tile's BN keys.
    float s[BN / 2];
    const uint32_t k_tile = s_k + (tile & 1) * kKvBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t col = (kk & 3) * 32;  // 16 columns = 32 bytes into the 128-byte rows
      const uint64_t a = SwizzledDesc(q_rows + (kk >> 2) * (kBM * 128) + col, 16, 1024);
      const uint64_t b = SwizzledDesc(k_tile + (kk >> 2) * (BN * 128) + col, 16, 1024);
      WgmmaSS<T, BN>::Run(s, a, b, kk > 0 ? 1 : 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaFenceOperand(s);
    if (tile - 2 >= n_lo && tid < BN) s_slot[((tile - 2) & 3) * BN + tid] = next_slot;

    if (p.soft_cap > 0.f) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] = SoftCap(p, s[i] * p.scale) * inv_scale;
    }
    if (kMask) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        const int row = wr0 + quad_row + ((i >> 1) & 1) * 8;
        const int key = tile * BN + (i >> 2) * 8 + quad_col + (i & 1);
        const int pos = pos0 + row;
        if (key > pos || (has_window && key <= pos - p.window)) s[i] = -INFINITY;
      }
    }

    // Online softmax (as the mma.sync kernel): register i of s is row half (i >> 1) & 1.
    float m_new[2];
    bool grow = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt * 4 + 2 * h], s[nt * 4 + 2 * h + 1]));
      mx = fmaxf(mx, ShflXor(mx, 1));
      mx = fmaxf(mx, ShflXor(mx, 2));
      m_new[h] = fmaxf(row_max[h], mx * scale_log2);
      grow |= m_new[h] > row_max[h] + p.rescale_threshold;
    }
    const bool rescale = !lazy_rescale || AnySync(grow);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m = rescale ? m_new[h] : row_max[h];
      const float m_use = m == -INFINITY ? 0.f : m;
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
      if (rescale) {
        const float alpha = Exp2(row_max[h] - m_use);
        row_max[h] = m;
        row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc_o[dt * 4 + 2 * h] *= alpha;
          acc_o[dt * 4 + 2 * h + 1] *= alpha;
        }
      } else {
        row_sum[h] += sum;
      }
    }

    // O += P V: P's 16-key slices from the S registers, all packed before the first wgmma (a
    // register written between two wgmmas makes the compiler serialize them).
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = Pack2<T>(s[kk * 8 + 2 * i], s[kk * 8 + 2 * i + 1]);
    }
    const uint32_t v_tile = s_v + (tile & 1) * kKvBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      WgmmaRS<T, D>::Run(acc_o, pa[kk], SwizzledDesc(v_tile + kk * 2048, BN * 128, 1024));
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaFenceOperand(acc_o);
  };

  for (int n = n_tiles - 1; n >= n_lo; --n) {
    if (n * BN + BN - 1 > pos0 || n * BN < lower_edge) {
      step(n, std::true_type{});
    } else {
      step(n, std::false_type{});
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
    if (row < rows) {
      Store16(o_ptr + row * token_bytes + c * 16,
              Load16(smem_q + SwizzledChunk(kBM, row, c)));
    }
  }
}

/*! \brief Keys per tile of the Hopper kernel: 128, or 64 at head size 256 (register budget). */
constexpr int WgKeysPerTile(int d) { return d == 256 ? 64 : 128; }

template <class T, int D, bool kFp8, class Launch>
void LaunchWgD(int num_heads, int num_seqs, int64_t max_query_len, Launch&& launch) {
  constexpr int kBN = WgKeysPerTile(D);
  using Tr = WgTraits<D, kBN>;
  launch(&PagedPrefillWgKernel<T, D, kBN, kFp8>, num_heads, num_seqs, max_query_len, Tr::kBM,
         Tr::kThreads, Tr::kSmemBytes);
}

/*!
 * \brief Launches the Hopper kernel of element type T (Fp16 or Bf16) for head size `d`.
 * \return false when `d` has no Hopper kernel (IsWgHeadSize).
 */
template <class T, bool kFp8 = false, class Launch>
bool DispatchWg(int64_t d, int num_heads, int num_seqs, int64_t max_query_len, Launch&& launch) {
  switch (d) {
    case 64: LaunchWgD<T, 64, kFp8>(num_heads, num_seqs, max_query_len, launch); return true;
    case 96: LaunchWgD<T, 96, kFp8>(num_heads, num_seqs, max_query_len, launch); return true;
    case 128: LaunchWgD<T, 128, kFp8>(num_heads, num_seqs, max_query_len, launch); return true;
    case 256: LaunchWgD<T, 256, kFp8>(num_heads, num_seqs, max_query_len, launch); return true;
    default: return false;
  }
}

}  // namespace prefill
}  // namespace cacheflow
