// paged_prefill_attention: the kernels and the choice of kernel (device code; no TVM-FFI here).
//
// Causal attention of a ragged batch of new tokens over each sequence's paged KV cache. Query j
// of sequence i (j < q_len_i = query_start_loc[i+1] - query_start_loc[i]) sits at position
// context_lens[i] - q_len_i + j and sees the keys at positions 0..its own; every key and value,
// the new tokens' included, is read from the cache through the sequence's block table.
//
// Tensor-core path (fp16/bf16, head sizes 64, 80, 96, 112, 128, 256), FlashAttention-2 style:
//   * one CTA of NW warps per (query tile of BM = 16 * MT * NW rows, head, sequence); each warp
//     owns 16 * MT query rows. Grid = (ceil(max_query_len / BM), num_heads, num_seqs): the tiles
//     of one (head, sequence) are launched together, so its K/V is read from DRAM about once and
//     then from L2 (heads sharing a KV head are neighbours too), longest (diagonal-most) tile
//     first.
//   * key tiles of BN tokens, gathered through the block table with 16-byte cp.async into shared
//     memory (a 16-byte pad per row keeps ldmatrix conflict-free for every head size); slot
//     numbers of upcoming tiles are looked up two tiles ahead into a small ring in shared memory.
//     With KB = 2 K buffers (head sizes up to 128), K of the next tile loads during the whole
//     current step; with KB = 1 (head size 256: BM = 128 over 8 warps and BN = 64 in 133 KB) it
//     loads once every warp is past S = QK^T, during the softmax's wait and P V. V is
//     single-buffered (it loads during S = QK^T and the softmax). Head size 64 takes BN = 128:
//     half the key steps, barriers and row reductions of BN = 64.
//   * S = Q K^T and O += P V with mma.sync.m16n8k16 (fp32 accumulation); Q and K fragments come
//     from ldmatrix, V fragments from ldmatrix.trans, P stays in registers (the accumulator
//     layout of S is the A-operand layout of P V).
//   * online softmax in the log2 domain (ex2.approx) with lazy rescaling: a warp rescales O and
//     the sums only when some row's maximum grew by more than `rescale_threshold` (log2 units)
//     since the last rescale; otherwise it keeps the old maximum, and P stays <= 2^threshold.
//     Key tiles run from the diagonal down to 0,
//     so only the first ceil(BM / BN) + 1 of them need the causal mask; key tiles wholly above
//     the diagonal are never visited. With a sliding window W (a row at position p sees keys
//     p - W + 1 .. p) tiles wholly below the window are never visited either, and those that
//     reach below some row's window are masked too.
//   * the output tile goes through shared memory (each warp reuses its own Q rows) and leaves in
//     16-byte stores.
// CUDA-core path (fp32, other head sizes up to 256, or pointers not 16-byte aligned): one warp per
// query row, one key at a time, exact expf.
//
// FP8 E4M3 caches (kFp8): the K/V tiles are read with 8-byte loads, widened to the query's type
// (exactly) and stored to shared memory by the threads themselves instead of cp.async; the rest
// of the kernel is unchanged. The K scale is folded into the softmax scale, the V scale into the
// final normalization. Soft-capping (Gemma 2): scores become cap * tanh(score / cap) before the
// mask.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "paged_prefill_ptx.cuh"
#include "pdl.cuh"

#ifndef CF_LAUNCH_BOUNDS
#define CF_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#endif
#ifndef CF_LAUNCH_BOUNDS_MIN
#define CF_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads, blocks)
#endif

namespace cacheflow {
namespace prefill {

/*! \brief Everything a prefill kernel reads; pointers are to the first element. */
struct PrefillParams {
  const unsigned char* query;        // [num_tokens, num_heads, head_size]
  const unsigned char* key_cache;    // [num_blocks, block_size, num_kv_heads, head_size]
  const unsigned char* value_cache;  // like key_cache
  unsigned char* out;                // like query
  const int32_t* block_tables;       // [num_seqs, max_blocks_per_seq]
  const int32_t* query_start_loc;    // [num_seqs + 1]
  const int32_t* context_lens;       // [num_seqs]
  int64_t token_stride;              // elements between tokens of out: num_heads * head_size
  int64_t q_token_stride;            // elements between tokens of query (>= token_stride: its
                                     // rows may be views into a fused QKV output)
  int64_t slot_stride;               // elements between cache slots: num_kv_heads * head_size
  int32_t head_size;
  int32_t group;                     // num_heads / num_kv_heads
  int32_t num_blocks;
  int32_t block_size;
  int32_t block_shift;               // log2(block_size) for a power of two, else -1
  int32_t max_blocks_per_seq;
  int32_t window;                    // sliding window W (keys > position - W), 0: none
  float scale;                       // softmax scale * k_scale
  float scale_log2;                  // scale * k_scale * log2(e)
  float v_scale;                     // multiplies the output (FP8 V dequantization; else 1)
  float soft_cap;                    // logits soft cap (0: none), in score units
  float inv_soft_cap;                // 1 / soft_cap (0: none)
  float rescale_threshold;           // lazy-rescale threshold (log2 units); < 0: every tile
  int32_t order_sms;                 // CTA order (TileOf): the device's SMs; 0: group-major
};

/*! \brief One byte of an FP8 E4M3 cache (the CUDA-core kernel's cache element type). */
struct Fp8E4m3Byte {
  uint8_t bits;
};

CF_DEVICE float ToFloat(Fp8E4m3Byte b) { return Fp8ByteToFloat(b.bits); }

/*! \brief A score (q.k * scale, natural units) soft-capped when the launch asks for it. */
CF_DEVICE float SoftCap(const PrefillParams& p, float score) {
  return p.soft_cap > 0.f ? p.soft_cap * Tanh(score * p.inv_soft_cap) : score;
}

CF_DEVICE int IMin(int a, int b) { return a < b ? a : b; }

/*!
 * \brief Row and 16-byte chunk of the j-th chunk a thread copies when `kStep` threads copy rows
 * of `kChunks` chunks, chunk index `idx + j * kStep` (idx = the thread's index among them).
 */
template <int kChunks, int kStep>
CF_DEVICE void ChunkCoords(int idx, int j, int& r, int& c) {
  const unsigned u = static_cast<unsigned>(idx);
  if (kStep % kChunks == 0) {  // every thread keeps its chunk column
    r = static_cast<int>(u / kChunks) + j * (kStep / kChunks);
    c = static_cast<int>(u % kChunks);
  } else {
    const unsigned i = u + static_cast<unsigned>(j) * kStep;
    r = static_cast<int>(i / kChunks);
    c = static_cast<int>(i % kChunks);
  }
}

/*!
 * \brief Cache slot (block * block_size + offset) of token `t` of a sequence with `ctx` tokens,
 * or -1 when t >= ctx or the block table entry is out of range (the token then reads as zeros).
 */
CF_DEVICE int SlotOf(const PrefillParams& p, const int32_t* table, int t, int ctx) {
  if (t >= ctx) return -1;
  int b, off;
  if (p.block_shift >= 0) {
    b = t >> p.block_shift;
    off = t & (p.block_size - 1);
  } else {
    b = t / p.block_size;
    off = t - b * p.block_size;
  }
  if (b >= p.max_blocks_per_seq) return -1;
  const int blk = table[b];
  if (blk < 0 || blk >= p.num_blocks) return -1;
  return blk * p.block_size + off;
}

/*!
 * \brief The (query tile, head, sequence) of this CTA. The grid is (m-blocks, heads, seqs); CTAs
 * start roughly in linear block order. order_sms = 0: (head, seq) groups one after the other,
 * each group's tiles longest (diagonal-most) first. order_sms = S > 0: the groups (heads of a
 * sequence adjacent) in chunks of C = ceil(2 S / m-blocks) (about two CTAs per SM), and within a
 * chunk all its groups' longest tiles first, then the next longest, ...: the last CTAs to start
 * are short ones, so the grid's tail does not wait for a long tile started last, while the K/V
 * of the few groups in flight stays in L2.
 */
CF_DEVICE void TileOf(const PrefillParams& p, int& m_block, int& head, int& seq) {
  const int m_blocks = static_cast<int>(gridDim.x);
  if (p.order_sms <= 0) {
    m_block = m_blocks - 1 - static_cast<int>(blockIdx.x);
    head = static_cast<int>(blockIdx.y);
    seq = static_cast<int>(blockIdx.z);
    return;
  }
  // 32-bit: the host sets order_sms only for grids of fewer than 2^31 CTAs (a 64-bit division
  // is a subroutine call, which costs registers around it).
  const uint32_t mbs = gridDim.x;
  const uint32_t heads = gridDim.y;
  const uint32_t groups = heads * gridDim.z;
  const uint32_t linear = blockIdx.x + mbs * (blockIdx.y + heads * blockIdx.z);
  const uint32_t chunk_groups = (2 * static_cast<uint32_t>(p.order_sms) + mbs - 1) / mbs;
  const uint32_t per_chunk = chunk_groups * mbs;
  const uint32_t chunk = linear / per_chunk;
  const uint32_t r = linear - chunk * per_chunk;
  const uint32_t first = chunk * chunk_groups;
  const uint32_t size = groups - first < chunk_groups ? groups - first : chunk_groups;
  const uint32_t g = first + r % size;
  m_block = m_blocks - 1 - static_cast<int>(r / size);
  head = static_cast<int>(g % heads);
  seq = static_cast<int>(g / heads);
}

/*!
 * \brief What a tensor-core CTA needs to know of its query tile: its rows and positions, the key
 * tiles it visits, its sequence's block table and the byte addresses of its Q / O rows and of
 * its KV head in the caches.
 */
struct QueryTile {
  int ctx;                    // context length of the sequence
  int rows;                   // valid query rows of this tile
  int pos0;                   // position of the tile's row 0
  int n_tiles;                // key tiles up to the diagonal (0: no key visible)
  int n_lo;                   // lowest key tile visited (sliding window)
  int lower_edge;             // tiles starting below it reach below the last row's window
  bool has_window;
  const int32_t* table;       // the sequence's block table
  int64_t token_bytes;        // between tokens of out
  int64_t q_token_bytes;      // between tokens of query
  int64_t slot_bytes;         // between cache slots
  const unsigned char* q_ptr;  // row 0 of the tile, this head
  unsigned char* o_ptr;
  const unsigned char* k_base;  // this KV head in slot 0
  const unsigned char* v_base;
};

/*!
 * \brief The query tile of this CTA (TileOf) for tiles of BM query rows and BN keys and head
 * size D over caches of kCacheBytes per element; false when the tile starts past its
 * sequence's query (the CTA has nothing to do; uniform over the CTA).
 */
template <int BM, int BN, int D, int kCacheBytes>
CF_DEVICE bool LocateQueryTile(const PrefillParams& p, QueryTile& t) {
  int m_block, head, seq;
  TileOf(p, m_block, head, seq);
  const int q_begin = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_begin;
  const int m0 = m_block * BM;
  if (m0 >= q_len) return false;
  t.ctx = p.context_lens[seq];
  t.rows = IMin(BM, q_len - m0);
  t.pos0 = t.ctx - q_len + m0;
  const int last_pos = t.pos0 + t.rows - 1;
  t.n_tiles = last_pos >= 0 ? last_pos / BN + 1 : 0;
  // Sliding window W: row r sees keys > pos0 + r - W; tiles below the first row's window are
  // never visited, tiles reaching below the last row's window need the mask.
  t.has_window = p.window > 0;
  const int first_key = t.has_window ? t.pos0 - p.window + 1 : 0;
  t.n_lo = first_key > 0 ? first_key / BN : 0;
  t.lower_edge = t.has_window ? last_pos - p.window + 1 : INT_MIN;
  const int kv_head = head / p.group;
  t.table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  t.token_bytes = p.token_stride * 2;
  t.q_token_bytes = p.q_token_stride * 2;
  t.slot_bytes = p.slot_stride * kCacheBytes;
  const int64_t head_offset = static_cast<int64_t>(head) * D * 2;
  t.q_ptr = p.query + static_cast<int64_t>(q_begin + m0) * t.q_token_bytes + head_offset;
  t.o_ptr = p.out + static_cast<int64_t>(q_begin + m0) * t.token_bytes + head_offset;
  t.k_base = p.key_cache + static_cast<int64_t>(kv_head) * D * kCacheBytes;
  t.v_base = p.value_cache + static_cast<int64_t>(kv_head) * D * kCacheBytes;
  return true;
}

/*! \brief Zeros the tile's output rows (no key visible at all: context_lens[seq] < q_len). */
template <int kChunks, int kThreads>
CF_DEVICE void ZeroTileRows(const QueryTile& t, int tid) {
  for (int i = tid; i < t.rows * kChunks; i += kThreads) {
    Store16(t.o_ptr + (i / kChunks) * t.token_bytes + (i % kChunks) * 16, uint4{0, 0, 0, 0});
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core path.
// ------------------------------------------------------------------------------------------------

/*! \brief Tile shapes and the shared-memory plan of one tensor-core configuration. */
template <int D, int MT, int NW, int BN, int KB>
struct TcTraits {
  static constexpr int kThreads = NW * 32;
  static constexpr int kBM = 16 * MT * NW;     // query rows per CTA
  static constexpr int kBN = BN;               // keys per tile
  static constexpr int kRowBytes = (D + 8) * 2;  // smem row pitch: 16-byte pad, no bank conflicts
  static constexpr int kChunks = D / 8;        // 16-byte chunks per row
  static constexpr int kQBytes = kBM * kRowBytes;
  static constexpr int kKvBytes = kBN * kRowBytes;
  static constexpr int kSlotRing = 4;          // slot lists of 4 tiles (indexed tile & 3)
  // Q, K (KB buffers), V (1 buffer), slot ring.
  static constexpr int kSmemBytes = kQBytes + (KB + 1) * kKvBytes + kSlotRing * kBN * 4;
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile sizes must be multiples of 16");
  static_assert(KB == 1 || KB == 2, "one or two K buffers");
  static_assert((kBM * kChunks) % kThreads == 0, "Q tile must split evenly over the threads");
  static_assert((kBN * kChunks) % kThreads == 0, "KV tile must split evenly over the threads");
  static_assert((16 * MT * kChunks) % 32 == 0, "output rows must split evenly over a warp");
  static_assert(kBN <= kThreads, "one thread per key looks up the slots");
};

template <class T, int D, int MT, int NW, int BN, int KB, bool kFp8>
CF_GLOBAL void CF_LAUNCH_BOUNDS(NW * 32) PagedPrefillTcKernel(const PrefillParams p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  using Tr = TcTraits<D, MT, NW, BN, KB>;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kBM = Tr::kBM;
  constexpr int kBN = Tr::kBN;
  constexpr int kRowBytes = Tr::kRowBytes;
  constexpr int kChunks = Tr::kChunks;
  constexpr int kQBytes = Tr::kQBytes;
  constexpr int kKvBytes = Tr::kKvBytes;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  constexpr int kCacheBytes = kFp8 ? 1 : 2;  // bytes of one cache element
  QueryTile t;
  if (!LocateQueryTile<kBM, kBN, D, kCacheBytes>(p, t)) return;  // (before any barrier)
  unsigned char* smem = DynamicSmem();
  int32_t* s_slot = reinterpret_cast<int32_t*>(smem + kQBytes + (KB + 1) * kKvBytes);
  const uint32_t s_q = SmemU32(smem);
  const uint32_t s_k = s_q + kQBytes;        // KB buffers: tile n in buffer n % KB
  const uint32_t s_v = s_k + KB * kKvBytes;
  auto k_buffer = [&](int tile) { return s_k + (KB == 2 ? (tile & 1) : 0) * kKvBytes; };

  if (t.n_tiles == 0) {
    ZeroTileRows<kChunks, kThreads>(t, tid);
    return;
  }

  // Issues the cp.async of one K or V tile whose slots are `slots[0..kBN)`; slot < 0 zero-fills.
  auto load_kv = [&](uint32_t dst, const unsigned char* base, const int32_t* slots) {
#pragma unroll
    for (int j = 0; j < kBN * kChunks / kThreads; ++j) {
      int r, c;
      ChunkCoords<kChunks, kThreads>(tid, j, r, c);
      const int slot = slots[r];
      const bool valid = slot >= 0;
      if constexpr (kFp8) {
        Fp8Io<T>::Fill16(dst + r * kRowBytes + c * 16, base + slot * t.slot_bytes + c * 8, valid);
      } else {
        CpAsync16(dst + r * kRowBytes + c * 16, valid ? base + slot * t.slot_bytes + c * 16 : base,
                  valid);
      }
    }
  };

  // ---- Prologue: slots of the first two tiles, Q, K of the first tile. ----
  if (tid < kBN) {
    const int n = t.n_tiles - 1;
    s_slot[(n & 3) * kBN + tid] = SlotOf(p, t.table, n * kBN + tid, t.ctx);
    if (n - 1 >= t.n_lo) {
      s_slot[((n - 1) & 3) * kBN + tid] = SlotOf(p, t.table, (n - 1) * kBN + tid, t.ctx);
    }
  }
#pragma unroll
  for (int j = 0; j < kBM * kChunks / kThreads; ++j) {
    int r, c;
    ChunkCoords<kChunks, kThreads>(tid, j, r, c);
    const bool valid = r < t.rows;  // rows past the sequence are zero-filled
    CpAsync16(s_q + r * kRowBytes + c * 16, valid ? t.q_ptr + r * t.q_token_bytes + c * 16 : p.query,
              valid);
  }
  SyncCta();  // slots visible
  load_kv(k_buffer(t.n_tiles - 1), t.k_base, s_slot + ((t.n_tiles - 1) & 3) * kBN);
  CpAsyncCommit();

  // ---- Per-thread fragment addresses. ----
  const int wr0 = warp * 16 * MT;  // first query row of this warp in the tile
  // A = Q (row-major 16x16 per m-tile): lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8.
  const uint32_t q_frag = s_q + (wr0 + (lane & 15)) * kRowBytes + (lane >> 4) * 16;
  // B = K^T: matrices (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7),
  // (keys 8-15, k 8-15).
  const uint32_t k_frag = ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
  // B = V (trans): matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15),
  // (keys 8-15, d 8-15).
  const uint32_t v_frag = s_v + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
  const int quad_row = lane >> 2;      // accumulator row within an m-tile (and +8)
  const int quad_col = (lane & 3) * 2;  // accumulator column within an n-tile (and +1)

  float acc_o[MT][D / 8][4];
  float row_max[MT][2];  // running max of the scaled scores (log2 domain)
  float row_sum[MT][2];  // this thread's part of the running softmax denominator
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[mt][h] = -INFINITY;
      row_sum[mt][h] = 0.f;
    }
  }
  const float scale_log2 = p.scale_log2;
  const float inv_scale = 1.f / p.scale;  // soft-capped scores go back to q.k units
  const bool lazy_rescale = p.rescale_threshold >= 0.f;

  // One key tile: kMask applies the causal mask (only tiles that reach past row 0's position).
  auto step = [&](const int tile, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    CpAsyncWait<0>();
    SyncCta();  // K[tile] (and Q) landed; everyone is past P V of the previous step (V is free)
    load_kv(s_v, t.v_base, s_slot + (tile & 3) * kBN);
    CpAsyncCommit();
    if constexpr (KB == 2) {
      if (tile - 1 >= t.n_lo) load_kv(k_buffer(tile - 1), t.k_base, s_slot + ((tile - 1) & 3) * kBN);
      CpAsyncCommit();  // (possibly empty: keeps the group count uniform)
    }
    int next_slot = -1;
    if (tile - 2 >= t.n_lo && tid < kBN) next_slot = SlotOf(p, t.table, (tile - 2) * kBN + tid, t.ctx);

    // S = Q K^T for this warp's rows and the tile's kBN keys.
    float s[MT][kBN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
      }
    }
    const uint32_t k_tile = k_buffer(tile) + k_frag;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) LdMatrixX4(a[mt], q_frag + mt * 16 * kRowBytes + kk * 32);
#pragma unroll
      for (int nt2 = 0; nt2 < kBN / 16; ++nt2) {
        uint32_t b[4];
        LdMatrixX4(b, k_tile + nt2 * 16 * kRowBytes + kk * 32);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma16816<T>(s[mt][2 * nt2], a[mt], b[0], b[1]);
          Mma16816<T>(s[mt][2 * nt2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
    if (tile - 2 >= t.n_lo && tid < kBN) s_slot[((tile - 2) & 3) * kBN + tid] = next_slot;

    if (p.soft_cap > 0.f) {  // cap the scores in units of q.k: cap / scale * tanh(...)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = SoftCap(p, s[mt][nt][e] * p.scale) * inv_scale;
          }
        }
      }
    }

    if (kMask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = wr0 + mt * 16 + quad_row + (e >> 1) * 8;
            const int key = tile * kBN + nt * 8 + quad_col + (e & 1);
            const int pos = t.pos0 + row;
            if (key > pos || (t.has_window && key <= pos - p.window)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax: each row's new maximum; the warp rescales O and the sums (alpha =
    // 2^(old max - new max)) when lazy rescaling is off or some row's maximum grew past the
    // threshold, else every row keeps its old maximum; P = 2^(S * scale_log2 - max).
    float m_new[MT][2];
    bool grow = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
          mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        }
        mx = fmaxf(mx, ShflXor(mx, 1));  // the 4 threads of a quad share a row
        mx = fmaxf(mx, ShflXor(mx, 2));
        m_new[mt][h] = fmaxf(row_max[mt][h], mx * scale_log2);
        // (-inf > -inf + t is false: a row still without keys asks for nothing.)
        grow |= m_new[mt][h] > row_max[mt][h] + p.rescale_threshold;
      }
    }
    const bool rescale = !lazy_rescale || AnySync(grow);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m = rescale ? m_new[mt][h] : row_max[mt][h];
        // A row with no visible key so far keeps max -inf: use 0 so that -inf - max stays -inf.
        const float m_use = m == -INFINITY ? 0.f : m;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const float pr = Exp2(fmaf(s[mt][nt][e], scale_log2, -m_use));
            s[mt][nt][e] = pr;
            sum += pr;
          }
        }
        if (rescale) {
          const float alpha = Exp2(row_max[mt][h] - m_use);
          row_max[mt][h] = m;
          row_sum[mt][h] = row_sum[mt][h] * alpha + sum;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            acc_o[mt][dt][2 * h] *= alpha;
            acc_o[mt][dt][2 * h + 1] *= alpha;
          }
        } else {
          row_sum[mt][h] += sum;
        }
      }
    }

    if constexpr (KB == 2) {
      CpAsyncWait<1>();
      SyncCta();  // V[tile] landed (K[tile-1] may still be in flight)
    } else {
      CpAsyncWait<0>();
      SyncCta();  // V[tile] landed; every warp is past S = Q K^T: the K buffer is free
      if (tile - 1 >= t.n_lo) load_kv(k_buffer(tile - 1), t.k_base, s_slot + ((tile - 1) & 3) * kBN);
      CpAsyncCommit();
    }

    // O += P V: the S accumulators of two adjacent tile-tiles form one 16x16 A fragment.
#pragma unroll
    for (int kk2 = 0; kk2 < kBN / 16; ++kk2) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = Pack2<T>(s[mt][2 * kk2][0], s[mt][2 * kk2][1]);
        pa[mt][1] = Pack2<T>(s[mt][2 * kk2][2], s[mt][2 * kk2][3]);
        pa[mt][2] = Pack2<T>(s[mt][2 * kk2 + 1][0], s[mt][2 * kk2 + 1][1]);
        pa[mt][3] = Pack2<T>(s[mt][2 * kk2 + 1][2], s[mt][2 * kk2 + 1][3]);
      }
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        uint32_t b[4];
        LdMatrixX4Trans(b, v_frag + kk2 * 16 * kRowBytes + dt2 * 32);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma16816<T>(acc_o[mt][2 * dt2], pa[mt], b[0], b[1]);
          Mma16816<T>(acc_o[mt][2 * dt2 + 1], pa[mt], b[2], b[3]);
        }
      }
    }
  };

  // Tiles reaching past row 0's position (the diagonal) or below the last row's window need
  // the mask; the others (all of them, without a window, once the diagonal is passed) do not.
  for (int n = t.n_tiles - 1; n >= t.n_lo; --n) {
    if (n * kBN + kBN - 1 > t.pos0 || n * kBN < t.lower_edge) {
      step(n, std::true_type{});
    } else {
      step(n, std::false_type{});
    }
  }
  CpAsyncWait<0>();

  // ---- Epilogue: O / sum, staged through this warp's own Q rows, 16-byte stores. ----
  float inv[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = row_sum[mt][h];
      l += ShflXor(l, 1);
      l += ShflXor(l, 2);
      inv[mt][h] = l > 0.f ? p.v_scale / l : 0.f;
    }
  }
  SyncWarp();  // this warp's last ldmatrix of its Q rows is done
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wr0 + mt * 16 + quad_row + h * 8;
        *reinterpret_cast<uint32_t*>(smem + row * kRowBytes + (dt * 8 + quad_col) * 2) =
            Pack2<T>(acc_o[mt][dt][2 * h] * inv[mt][h], acc_o[mt][dt][2 * h + 1] * inv[mt][h]);
      }
    }
  }
  SyncWarp();
#pragma unroll
  for (int j = 0; j < 16 * MT * kChunks / 32; ++j) {
    int r, c;
    ChunkCoords<kChunks, 32>(lane, j, r, c);
    const int row = wr0 + r;
    if (row < t.rows) {
      Store16(t.o_ptr + row * t.token_bytes + c * 16, Load16(smem + row * kRowBytes + c * 16));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// CUDA-core path: one warp per query row, one key at a time (fp32; any head size <= 256).
// ------------------------------------------------------------------------------------------------

constexpr int kSimpleWarps = 4;         // query rows per CTA
constexpr int kSimpleMaxHeadSize = 256;  // 8 elements per lane

template <class Tag, class CacheT>
CF_GLOBAL void CF_LAUNCH_BOUNDS(kSimpleWarps * 32) PagedPrefillSimpleKernel(const PrefillParams p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  using S = typename StorageOf<Tag>::type;
  constexpr int kPerLane = kSimpleMaxHeadSize / 32;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int row = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kSimpleWarps + warp;
  const int head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const int q_begin = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_begin;
  if (row >= q_len) return;  // (uniform over the warp; no CTA barriers in this kernel)
  const int ctx = p.context_lens[seq];
  const int pos = ctx - q_len + row;
  const int n_keys = IMin(pos + 1, ctx);
  const int d_size = p.head_size;
  const int kv_head = head / p.group;
  const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  const int64_t head_offset = static_cast<int64_t>(head) * d_size;
  const S* q = reinterpret_cast<const S*>(p.query) +
               static_cast<int64_t>(q_begin + row) * p.q_token_stride + head_offset;
  const int64_t kv_offset = static_cast<int64_t>(kv_head) * d_size;
  const CacheT* k_cache = reinterpret_cast<const CacheT*>(p.key_cache) + kv_offset;
  const CacheT* v_cache = reinterpret_cast<const CacheT*>(p.value_cache) + kv_offset;

  float qv[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < d_size ? ToFloat(q[d]) * p.scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY;
  float l = 0.f;
  const int t0 = p.window > 0 && pos - p.window + 1 > 0 ? pos - p.window + 1 : 0;
  for (int t = t0; t < n_keys; ++t) {
    const int slot = SlotOf(p, table, t, ctx);
    if (slot < 0) continue;  // (uniform over the warp)
    const CacheT* kr = k_cache + static_cast<int64_t>(slot) * p.slot_stride;
    const CacheT* vr = v_cache + static_cast<int64_t>(slot) * p.slot_stride;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < d_size) dot += qv[i] * ToFloat(kr[d]);
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) dot += ShflXor(dot, off);
    dot = SoftCap(p, dot);
    const float m_new = fmaxf(m, dot);
    const float alpha = Exp(m - m_new);  // 0 for the first key (m = -inf)
    const float pr = Exp(dot - m_new);
    l = l * alpha + pr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < d_size) acc[i] = acc[i] * alpha + pr * ToFloat(vr[d]);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? p.v_scale / l : 0.f;
  S* o = reinterpret_cast<S*>(p.out) + static_cast<int64_t>(q_begin + row) * p.token_stride +
         head_offset;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < d_size) o[d] = FromFloat<Tag>(acc[i] * inv);
  }
}

// ------------------------------------------------------------------------------------------------
// Choosing and launching a kernel. The caller supplies `launch(kernel, num_heads, num_seqs,
// max_query_len, rows_per_cta, threads, smem_bytes)`, which runs `kernel` on the grid
// (ceil(max_query_len / rows_per_cta), num_heads, num_seqs): a CUDA launch on a stream, or the
// host emulation of the tests.
// ------------------------------------------------------------------------------------------------

/*! \brief Head sizes with a tensor-core kernel (fp16/bf16). */
constexpr bool IsTcHeadSize(int64_t d) {
  return d == 64 || d == 80 || d == 96 || d == 112 || d == 128 || d == 256;
}

/*! \brief Head sizes with a Hopper kernel (paged_prefill_wg_kernel.cuh; fp16/bf16). */
constexpr bool IsWgHeadSize(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

/*!
 * \brief Whether a call takes the tensor-core path: fp16/bf16, a head size of IsTcHeadSize, and
 * the four data pointers 16-byte aligned (cp.async and the 16-byte output stores need it).
 */
inline bool UseTensorCores(bool half_or_bf16, int64_t head_size, bool pointers_aligned16) {
  return half_or_bf16 && IsTcHeadSize(head_size) && pointers_aligned16;
}

/*!
 * \brief Alternative tile shapes of the fp16 head-size-128 kernel, for benchmarking only
 * (environment variable CACHEFLOW_PREFILL_VARIANT=m64 or w8; see paged_prefill.cu).
 */
enum TcVariant : int {
  kTcDefault = 0,  // BM 128 = 4 warps x 32 rows, BN 64; head size 64: BN 128; head size 256:
                   // BM 128 = 8 warps x 16 rows, BN 64, 1 K buffer (133 KB: 1 CTA per SM)
  kTcM64 = 1,      // fp16 head size 96 or 128: BM 64 = 4 warps x 16 rows, BN 64
  kTcW8 = 2,       // fp16 head size 96 or 128: BM 128 = 8 warps x 16 rows, BN 64
  kTcBn32 = 3,     // head size 256: BM 64, BN 32 with 2 K buffers (the tiling before 2026-12-03)
  kTcBn64 = 4,     // head size 64: BN 64 (the tiling before 2026-12-04)
  kTcW4 = 5,       // head size 256: BM 64 = 4 warps x 16 rows, BN 64, 1 K buffer (100 KB: 2 CTAs
                   // per SM; the tiling before 2026-12-04)
  kTcWgmma = 6,    // the Hopper kernel (paged_prefill_wg_kernel.cuh): head sizes 64, 96, 128, 256
                   // on compute capability 9.0 with a library built for sm_90a
  kTcWgmmaSerial = 7,  // the Hopper kernel without the softmax / P V overlap
  kTcMma = 8,      // the mma.sync kernels even where the default is the Hopper kernel
};

/*!
 * \brief Whether the default (kTcDefault) is the Hopper kernel's serial schedule on a device that
 * has it: head sizes 64, 96, 128 and 256 with a 16-bit cache. On an H200 (2026-12-05) it ran at
 * 1.06-1.12x SDPA at 128, 0.95x at 96 and 1.26x at 256 (mma.sync: 0.89-0.90x, 0.84x, 0.86x) and
 * faster than the overlapped schedule; at 64, with 64-key tiles and two CTAs per SM, 1.01x
 * (mma.sync 0.88x, overlapped 0.98x). FP8 caches were not measured.
 */
constexpr bool WgIsDefault(int64_t d, bool fp8_cache) {
  return !fp8_cache && (d == 64 || d == 96 || d == 128 || d == 256);
}

/*! \brief Shared memory of the default head-size-256 kernel (the host checks the device's). */
constexpr int kD256SmemBytes = TcTraits<256, 1, 8, 64, 1>::kSmemBytes;
/*! \brief Shared memory of the head-size-256 kernel of kTcW4. */
constexpr int kD256W4SmemBytes = TcTraits<256, 1, 4, 64, 1>::kSmemBytes;

/*! \brief Lazy-rescale threshold of the tensor-core kernels, in log2 units (P <= 2^8). */
constexpr float kDefaultRescaleThreshold = 8.f;

/*!
 * \brief CACHEFLOW_PREFILL_RESCALE_THRESHOLD (a float; negative: rescale at every key tile, the
 * kernel before 2026-12-03), read at every call so one process can A/B it; default
 * kDefaultRescaleThreshold. Capped at 15: P must stay far below float16's 65504.
 */
inline float RescaleThresholdFromEnv() {
  const char* env = std::getenv("CACHEFLOW_PREFILL_RESCALE_THRESHOLD");
  if (env == nullptr || *env == '\0') return kDefaultRescaleThreshold;
  const float v = std::strtof(env, nullptr);
  if (!(v == v)) return kDefaultRescaleThreshold;  // NaN
  return v < 15.f ? v : 15.f;
}

/*!
 * \brief Host side: PrefillParams::order_sms on a device of `num_sms` multiprocessors: 0
 * (group-major), or num_sms (chunked longest-first CTA order) with CACHEFLOW_PREFILL_GRID=chunked,
 * read at every call. Group-major stays the default: on the H200 (2026-12-03) the chunked order
 * was 0.5-5% slower on every case but the prefix-cached one.
 */
inline int32_t OrderSms(int num_sms) {
  const char* env = std::getenv("CACHEFLOW_PREFILL_GRID");
  if (num_sms <= 0 || env == nullptr || std::strcmp(env, "chunked") != 0) return 0;
  return num_sms;
}

/*! \brief Host side: the kernel parameters of a call whose arguments were checked. */
inline PrefillParams MakePrefillParams(void* out, const void* query, const void* key_cache,
                                       const void* value_cache, const int32_t* block_tables,
                                       const int32_t* query_start_loc,
                                       const int32_t* context_lens, int64_t num_heads,
                                       int64_t head_size, int64_t num_kv_heads, int64_t num_blocks,
                                       int64_t block_size, int64_t max_blocks_per_seq,
                                       double scale, int64_t sliding_window,
                                       double k_scale = 1.0, double v_scale = 1.0,
                                       double logits_soft_cap = 0.0) {
  PrefillParams p{};
  p.query = static_cast<const unsigned char*>(query);
  p.key_cache = static_cast<const unsigned char*>(key_cache);
  p.value_cache = static_cast<const unsigned char*>(value_cache);
  p.out = static_cast<unsigned char*>(out);
  p.block_tables = block_tables;
  p.query_start_loc = query_start_loc;
  p.context_lens = context_lens;
  p.token_stride = num_heads * head_size;
  p.q_token_stride = p.token_stride;  // the caller sets a strided query's own row stride
  p.slot_stride = num_kv_heads * head_size;
  p.head_size = static_cast<int32_t>(head_size);
  p.group = static_cast<int32_t>(num_heads / num_kv_heads);
  p.num_blocks = static_cast<int32_t>(num_blocks);
  p.block_size = static_cast<int32_t>(block_size);
  p.block_shift = -1;
  if ((block_size & (block_size - 1)) == 0) {
    int shift = 0;
    while ((int64_t{1} << shift) < block_size) ++shift;
    p.block_shift = shift;
  }
  p.max_blocks_per_seq = static_cast<int32_t>(max_blocks_per_seq);
  // A window of 2^30 or more covers any context the kernels can index: no window.
  p.window = (sliding_window > 0 && sliding_window < (int64_t{1} << 30))
                 ? static_cast<int32_t>(sliding_window)
                 : 0;
  p.scale = static_cast<float>(scale * k_scale);
  p.scale_log2 = static_cast<float>(scale * k_scale * 1.4426950408889634);  // log2(e)
  p.v_scale = static_cast<float>(v_scale);
  p.soft_cap = logits_soft_cap > 0.0 ? static_cast<float>(logits_soft_cap) : 0.f;
  p.inv_soft_cap = logits_soft_cap > 0.0 ? static_cast<float>(1.0 / logits_soft_cap) : 0.f;
  p.rescale_threshold = RescaleThresholdFromEnv();
  return p;
}

template <class T, int D, int MT, int NW, int BN, bool kFp8, int KB = 2, class Launch>
void LaunchTc(int num_heads, int num_seqs, int64_t max_query_len, Launch&& launch) {
  using Tr = TcTraits<D, MT, NW, BN, KB>;
  launch(&PagedPrefillTcKernel<T, D, MT, NW, BN, KB, kFp8>, num_heads, num_seqs, max_query_len,
         Tr::kBM, Tr::kThreads, Tr::kSmemBytes);
}

/*!
 * \brief Launches the tensor-core kernel of element type T (Fp16 or Bf16) for head size `d`.
 * Tiles: BM = 128 query rows (4 warps x 32 rows), BN = 64 keys; head size 64: BN = 128 keys
 * (FlashAttention-2's tile there: half the key steps, barriers and row reductions); head size
 * 256: BM = 128 (8 warps x 16 rows), BN = 64 with one K buffer (133 KB of shared memory: one CTA
 * per SM, each K/V tile read from shared memory by twice the rows of the 4-warp tile). The host
 * passes kTcW4 (100 KB) or kTcBn32 (83 KB) where a CTA cannot have that much (sm_86/89).
 * `variant` (TcVariant) picks another tiling: m64 / w8 for fp16 with head size 96 or 128, bn64
 * for head size 64, w4 and bn32 for head size 256.
 * \return false when `d` has no tensor-core kernel.
 */
template <class T, bool kFp8 = false, class Launch>
bool DispatchTc(int64_t d, int variant, int num_heads, int num_seqs, int64_t max_query_len,
                Launch&& launch) {
  switch (d) {
    case 64:
      if (variant == kTcBn64) {
        LaunchTc<T, 64, 2, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
      } else {
        LaunchTc<T, 64, 2, 4, 128, kFp8>(num_heads, num_seqs, max_query_len, launch);
      }
      return true;
    case 80:
      LaunchTc<T, 80, 2, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
      return true;
    case 96:
      if constexpr (std::is_same<T, Fp16>::value) {
        if (variant == kTcM64) {  // (the default spills at 255 registers; these do not)
          LaunchTc<T, 96, 1, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
          return true;
        }
        if (variant == kTcW8) {
          LaunchTc<T, 96, 1, 8, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
          return true;
        }
      }
      LaunchTc<T, 96, 2, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
      return true;
    case 112:
      LaunchTc<T, 112, 2, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
      return true;
    case 128:
      if constexpr (std::is_same<T, Fp16>::value) {
        if (variant == kTcM64) {
          LaunchTc<T, 128, 1, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
          return true;
        }
        if (variant == kTcW8) {
          LaunchTc<T, 128, 1, 8, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
          return true;
        }
      }
      LaunchTc<T, 128, 2, 4, 64, kFp8>(num_heads, num_seqs, max_query_len, launch);
      return true;
    case 256:
      if (variant == kTcBn32) {
        LaunchTc<T, 256, 1, 4, 32, kFp8>(num_heads, num_seqs, max_query_len, launch);
      } else if (variant == kTcW4) {
        LaunchTc<T, 256, 1, 4, 64, kFp8, 1>(num_heads, num_seqs, max_query_len, launch);
      } else {
        LaunchTc<T, 256, 1, 8, 64, kFp8, 1>(num_heads, num_seqs, max_query_len, launch);
      }
      return true;
    default: return false;
  }
}

/*!
 * \brief Launches the CUDA-core kernel of element type Tag (Fp32, Fp16 or Bf16) over caches of
 * that type, or (kFp8) of FP8 E4M3.
 */
template <class Tag, bool kFp8 = false, class Launch>
void LaunchSimple(int num_heads, int num_seqs, int64_t max_query_len, Launch&& launch) {
  using CacheT = std::conditional_t<kFp8, Fp8E4m3Byte, typename StorageOf<Tag>::type>;
  launch(&PagedPrefillSimpleKernel<Tag, CacheT>, num_heads, num_seqs, max_query_len,
         kSimpleWarps, kSimpleWarps * 32, 0);
}

}  // namespace prefill
}  // namespace cacheflow
