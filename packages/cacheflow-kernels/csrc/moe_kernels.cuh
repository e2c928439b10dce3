// Device code of the mixture-of-experts ops (no TVM-FFI here; the host side is
// moe_grouped_gemm.cu): the mma.sync grouped GEMM with its three epilogues, the device-side sort
// of the (token, slot) pairs by expert, and the top-k sum.
//
// Written against moe_ptx.cuh / paged_prefill_ptx.cuh only, so that the host emulation of
// tests/emulation (CACHEFLOW_MOE_EMULATE) runs this very source on a CPU.
//
// ---- Grouped GEMM (GroupedGemmKernel) ----
// Rows [0, M) are sorted by expert: rows offsets[e] .. offsets[e+1]-1 belong to expert e (the
// offsets clamped to [0, M]); w is [E, N, K] (nn.Linear layout). A block computes a BM x BN
// product tile of one expert's segment. Grid: x = ceil(M / BM) + E (every segment may end in a
// partial tile; a block finds its tile from the offsets by a warp prefix scan over the experts,
// and blocks past the last tile exit), y = column tiles. The grid depends only on the shapes,
// so launches are CUDA-graph capturable.
//
// Main loop: mma.sync m16n8k16 (float32 accumulation) fed by ldmatrix.x4 from an XOR-swizzled
// shared layout (rows of BK = 64 elements = 128 bytes, 16-byte chunk c of row r stored at chunk
// c ^ (r & 7): conflict-free cp.async writes and ldmatrix reads without padding), a 3-4 stage
// cp.async pipeline in dynamic shared memory (one barrier per K step), fragments double-buffered
// in registers across the four k16 steps of a stage. Tiles: see Tile below.
//
// Epilogues (template parameter):
//   kStore    out[r] = x[r] @ w[e]^T                    (out [M, N]; rows read in place)
//   kIndexed  out[dst(r)] = scale(dst(r)) * (x[src(r)] @ w[e]^T)
//             src(r) = row_index[r] (a gather from x [x_rows, K]; null: r; outside [0, x_rows):
//             the row reads as zeros), dst(r) = out_index[r] (a scatter into out [out_rows, N];
//             null: r; outside [0, out_rows): not written), scale = out_scale[dst] (float32;
//             null: 1), applied to the float32 accumulator before the one rounding.
//   kGatedSilu, kGatedGelu
//             out[r] = act(h[r, :I]) * h[r, I:] with h = x[src(r)] @ w[e]^T, N = 2 I (w holds
//             each expert's gate rows, then its up rows); out [M, I]. The B tile of a block
//             holds matching gate and up rows: tile row t (0 <= t < BN) is w row
//             half * I + n0 + (t / 16) * 8 + t % 8 with half = (t / 8) % 2, so the n8 fragments
//             2j and 2j + 1 of a warp are the gate and up columns of the same 8 outputs and
//             every lane holds both factors of its outputs in registers. act in float32 on the
//             accumulators, rounded once: kGatedSilu g / (1 + e^-g) with the fast exponential
//             and reciprocal (2 MUFU ops an output: the epilogue of a 128 x 256 tile stays a
//             few % of the block), kGatedGelu the erf or tanh GELU of activation.cu (accurate
//             erff / tanhf, chosen at run time).
// All epilogues round once to T through a shared staging tile and store 8-element rows (16
// bytes) where the output rows are 16-byte aligned.
//
// ---- Sort by expert (SortByExpertKernel) ----
// topk_ids [T, k] -> (offsets [E + 1], sorted_pairs [T k], token_index [T k]): the pair indices
// p = t k + s ordered by expert, stable (increasing p within an expert), pairs whose id is outside
// [0, E) last (after offsets[E]); token_index = sorted_pairs / k. One CTA per bucket (E experts
// + 1 for the out-of-range ids): it counts the pairs of lower buckets (its offset), then walks the
// pairs in order, ranking its own with a block-wide exclusive scan. Deterministic, no atomics,
// no host sync; reads the ids (E + 1) x 2 times (from L2).
//
// ---- Top-k sum (SumTopkKernel) ----
// out[t] = sum over s < k with 0 <= ids[t, s] < E of x[t, s] (float32, in slot order), rounded
// once: the combine of the per-(token, slot) rows the kIndexed epilogue scattered.
#pragma once

#include <cmath>
#include <cstdint>

#include "moe_ptx.cuh"

namespace cacheflow {
namespace moe {

using prefill::Bf16;
using prefill::CpAsync16;
using prefill::CpAsyncCommit;
using prefill::CpAsyncWait;
using prefill::Fp16;
using prefill::LdMatrixX4;
using prefill::Load16;
using prefill::Mma16816;
using prefill::Pack2;
using prefill::SmemU32;
using prefill::Store16;
using prefill::SyncCta;

constexpr int kBK = 64;            // reduction step: one 128-byte shared-memory row per tile row
constexpr int kChunksPerRow = 8;   // 16-byte chunks of a row (8 elements each)
constexpr int kRowElems = kBK;     // shared row stride in elements (no padding: swizzled)

/*!
 * \brief A tile configuration: a BM x BN block tile split among WM x WN warps (each a
 * (BM/WM) x (BN/WN) warp tile of m16n8k16 products), STAGES cp.async stages of BK = 64.
 */
template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MIN_BLOCKS_>
struct Tile {
  static constexpr int BM = BM_;
  static constexpr int BN = BN_;
  static constexpr int kWarpsM = WM_;
  static constexpr int kWarpsN = WN_;
  static constexpr int kStages = STAGES_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;
  static constexpr int kThreads = 32 * WM_ * WN_;
  static constexpr int kWarpTileM = BM / WM_;
  static constexpr int kWarpTileN = BN / WN_;
  static constexpr int kMI = kWarpTileM / 16;  // m16 fragments of a warp tile
  static constexpr int kNI = kWarpTileN / 8;   // n8 fragments of a warp tile
  static constexpr int kRowStep = kThreads / kChunksPerRow;  // tile rows one load pass covers
  static constexpr int kALoads = BM / kRowStep;              // 16-byte copies per thread (A)
  static constexpr int kBLoads = BN / kRowStep;              // 16-byte copies per thread (B)
  static constexpr int kStageBytes = (BM + BN) * kRowElems * 2;
  static constexpr int kOutLd = BN + 8;  // epilogue staging row stride (elements)
  static constexpr int kOutBytes = BM * kOutLd * 2;
  static constexpr int kSmemBytes =
      kStages * kStageBytes > kOutBytes ? kStages * kStageBytes : kOutBytes;

  static_assert(kWarpsM * kWarpTileM == BM && kWarpsN * kWarpTileN == BN, "whole warp tiles");
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 16 == 0, "warp tile of m16 x n16 steps");
  // Multiples of 16 (not only of the swizzle period 8): the gated B mapping needs every load
  // row of a thread in the same gate/up half.
  static_assert(kRowStep % 16 == 0, "a load pass covers whole gate/up row groups of 16");
  static_assert(BM % kRowStep == 0 && BN % kRowStep == 0, "whole load passes");
  static_assert(kStages >= 2, "at least double buffering");
};

//                    BM   BN  WM WN stages min blocks/SM   smem     warp tile
using Tile128x256s4 = Tile<128, 256, 2, 4, 4, 1>;   // 192 KiB  64 x 64
using Tile128x256s3 = Tile<128, 256, 2, 4, 3, 1>;   // 144 KiB  64 x 64
using Tile128x128 = Tile<128, 128, 2, 2, 3, 2>;     //  96 KiB  64 x 64
using Tile64x128 = Tile<64, 128, 2, 2, 4, 2>;       //  96 KiB  32 x 64
using Tile32x128 = Tile<32, 128, 1, 4, 4, 2>;       //  80 KiB  32 x 32

/*! \brief What the grouped GEMM does with its product tile (see the file comment). */
enum class Epilogue : int { kStore = 0, kIndexed = 1, kGatedSilu = 2, kGatedGelu = 3 };

/*! \brief Whether the epilogue is a gated activation (N = 2 I, output [M, I]). */
template <Epilogue kEpi>
constexpr bool kIsGated = kEpi == Epilogue::kGatedSilu || kEpi == Epilogue::kGatedGelu;

/*! \brief The gate activation of a gated epilogue. */
enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

/*! \brief Arguments of GroupedGemmKernel (pointers to the first element; 16-bit data raw). */
struct GemmParams {
  void* out;                  // kStore [M, N]; kIndexed [out_rows, N]; gated [M, N / 2]
  const void* x;              // kStore [M, K]; else [x_rows, K]
  const void* w;              // [E, N, K]
  const int64_t* offsets;     // [E + 1]
  const int32_t* row_index;   // kIndexed / gated: [M] x row of each row; null: the row itself
  const int32_t* out_index;   // kIndexed: [M] out row of each row; null: the row itself
  const float* out_scale;     // kIndexed: [out_rows] scale of each out row; null: 1
  int64_t M, N, K, E;
  int64_t x_rows;             // rows of x (the gather's bound)
  int64_t out_rows;           // rows of out (the scatter's bound)
  int act;                    // kGatedGelu: Activation::kGelu or kGeluTanh
  bool out_vec;               // output rows 16-byte aligned: 8-element stores
};

/*!
 * \brief Dynamic shared memory of a GEMM block: the pipeline stages (reused by the staging
 * tile), the tile lookup (int64 [3]) and, for kIndexed, each tile row's out row and scale.
 */
template <class Cfg, Epilogue kEpi>
struct GemmSmem {
  static constexpr int kTileInfo = Cfg::kSmemBytes;
  static constexpr int kRowDst = kTileInfo + 32;           // int32 [BM]
  static constexpr int kRowScale = kRowDst + 4 * Cfg::BM;  // float [BM]
  static constexpr int kBytes =
      kEpi == Epilogue::kIndexed ? kRowScale + 4 * Cfg::BM : kRowDst;
};

/*!
 * \brief Element offset of 16-byte chunk `chunk` (0..7) of row `row` in a swizzled stage tile:
 * rows of 64 elements (128 bytes), chunk c of row r stored at chunk c ^ (r & 7). The 8 rows an
 * ldmatrix reads at one logical chunk then hit 8 distinct bank groups.
 */
CF_DEVICE int Swizzle(int row, int chunk) { return row * kRowElems + ((chunk ^ (row & 7)) << 3); }

/*!
 * \brief The tile of this block into info[0..2]: its expert (-1: past the last segment tile),
 * first row and segment end. Warp 0 scans the clamped segment sizes 32 experts at a time (a warp
 * prefix sum of their tile counts); the result is broadcast through shared memory.
 */
template <int BM>
CF_DEVICE void FindTile(const int64_t* __restrict__ offsets, int64_t M, int64_t E, int64_t* info) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int64_t t = blockIdx.x;
    int64_t found = -1, row0 = 0, seg_end = 0;
    for (int64_t base = 0; base < E; base += 32) {
      const int64_t e = base + lane;
      int64_t begin = 0, end = 0, tiles = 0;
      if (e < E) {
        begin = offsets[e];
        end = offsets[e + 1];
        begin = begin < 0 ? 0 : (begin > M ? M : begin);
        end = end < begin ? begin : (end > M ? M : end);
        tiles = (end - begin + BM - 1) / BM;
      }
      int64_t incl = tiles;  // inclusive prefix sum of the tile counts over the lanes
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int64_t v = ShflUp(incl, d);
        if (lane >= d) incl += v;
      }
      const uint32_t hit = Ballot(incl > t);
      if (hit != 0) {  // warp-uniform
        const int src = Ffs(hit) - 1;
        const int64_t my_row0 = begin + (t - (incl - tiles)) * BM;
        found = base + src;
        row0 = ShflIdx(my_row0, src);
        seg_end = ShflIdx(end, src);
        break;
      }
      t -= ShflIdx(incl, 31);
    }
    if (lane == 0) {
      info[0] = found;
      info[1] = row0;
      info[2] = seg_end;
    }
  }
  SyncCta();
}

/*! \brief act(g) of a gated epilogue in float32 (`act`: kGatedGelu's run-time choice). */
template <Epilogue kEpi>
CF_DEVICE float Activate(int act, float g) {
  if constexpr (kEpi == Epilogue::kGatedSilu) {
    return DivApprox(g, 1.0f + ExpApprox(-g));
  } else {
    if (act == static_cast<int>(Activation::kGelu)) {
      return 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f));
    }
    constexpr float kBeta = 0.79788456080286535588f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(kBeta * (g + 0.044715f * g * g * g)));
  }
}

template <class T, class Cfg, Epilogue kEpi>
CF_GLOBAL void MOE_LAUNCH_BOUNDS(Cfg::kThreads, Cfg::kMinBlocks)
    GroupedGemmKernel(const GemmParams p) {
  constexpr int BM = Cfg::BM;
  constexpr int kMI = Cfg::kMI;
  constexpr int kNI = Cfg::kNI;
  constexpr int kStages = Cfg::kStages;
  constexpr bool kGated = kIsGated<kEpi>;
  constexpr bool kIndexed = kEpi == Epilogue::kIndexed;
  constexpr bool kAffineA = kEpi == Epilogue::kStore;  // A rows read in place, no row index
  constexpr int kOutCols = kGated ? Cfg::BN / 2 : Cfg::BN;  // output columns of a block tile
  // B tile rows one load pass advances in w: gated tiles interleave gate and up rows by 8.
  constexpr int kBStep = kGated ? Cfg::kRowStep / 2 : Cfg::kRowStep;
  using Smem = GemmSmem<Cfg, kEpi>;
  static_assert(!kGated || kNI % 2 == 0, "gated warp tiles pair n8 fragments");

  unsigned char* const smem_ptr = MoeSmem();
  int64_t* const tile_info = reinterpret_cast<int64_t*>(smem_ptr + Smem::kTileInfo);
  FindTile<BM>(p.offsets, p.M, p.E, tile_info);
  const int64_t expert = tile_info[0];
  if (expert < 0) return;  // the whole block: past the last segment tile
  const int64_t row0 = tile_info[1];
  const int64_t seg_end = tile_info[2];
  const int64_t N = p.N;
  const int64_t K = p.K;
  const int64_t out_cols = kGated ? N / 2 : N;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kOutCols;  // first output column

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const uint32_t smem = SmemU32(smem_ptr);
  const uint16_t* const x = static_cast<const uint16_t*>(p.x);
  const uint16_t* const w = static_cast<const uint16_t*>(p.w);

  if constexpr (kIndexed) {
    int32_t* row_dst = reinterpret_cast<int32_t*>(smem_ptr + Smem::kRowDst);
    float* row_scale = reinterpret_cast<float*>(smem_ptr + Smem::kRowScale);
    for (int r = tid; r < BM; r += Cfg::kThreads) {
      const int64_t gr = row0 + r;
      int32_t dst = -1;
      float scale = 0.0f;
      if (gr < seg_end) {
        const int64_t d = p.out_index != nullptr ? static_cast<int64_t>(p.out_index[gr]) : gr;
        if (d >= 0 && d < p.out_rows) {
          dst = static_cast<int32_t>(d);
          scale = p.out_scale != nullptr ? p.out_scale[d] : 1.0f;
        }
      }
      row_dst[r] = dst;
      row_scale[r] = scale;
    }  // read in the epilogue, after the main loop's barriers
  }

  // ---- Global -> shared: thread `tid` copies chunk tid % 8 of rows tid / 8 + i * kRowStep. ----
  const int ld_row = tid >> 3;
  const int ld_chunk = tid & 7;
  // Rows step by a multiple of 8, so every row of this thread has the same swizzled chunk.
  const uint32_t ld_dst = static_cast<uint32_t>(Swizzle(ld_row, ld_chunk)) * 2u;
  const int64_t row_step_k = static_cast<int64_t>(Cfg::kRowStep) * K;
  // A, rows in place: copies i with i * kRowStep < a_rows are inside the segment.
  const uint16_t* const a_src = x + (row0 + ld_row) * K + ld_chunk * kChunksPerRow;
  const int64_t a_rows = seg_end - row0 - ld_row;
  // A, indexed rows: the x row of copy i, -1 outside the segment or outside x (zero-filled).
  int32_t a_row[kAffineA ? 1 : Cfg::kALoads];
  if constexpr (!kAffineA) {
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      const int64_t r = row0 + ld_row + i * Cfg::kRowStep;
      int32_t src = -1;
      if (r < seg_end) {
        const int64_t s = p.row_index != nullptr ? static_cast<int64_t>(p.row_index[r]) : r;
        src = s >= 0 && s < p.x_rows ? static_cast<int32_t>(s) : -1;
      }
      a_row[i] = src;
    }
  }
  // B: w row of copy 0 and the rows of this thread still inside the expert's columns.
  int64_t b_first, b_rows;
  if constexpr (kGated) {
    const int64_t inter = N / 2;
    const int64_t half = (ld_row >> 3) & 1;                  // 0: gate rows, 1: up rows
    const int64_t j0 = ((ld_row >> 4) << 3) + (ld_row & 7);  // output column in the tile
    b_first = expert * N + half * inter + n0 + j0;
    b_rows = inter - n0 - j0;
  } else {
    b_first = expert * N + n0 + ld_row;
    b_rows = N - n0 - ld_row;
  }
  const uint16_t* const b_src = w + b_first * K + ld_chunk * kChunksPerRow;
  const int64_t b_step_k = static_cast<int64_t>(kBStep) * K;

  auto load_stage = [&](int slot, int64_t k0) {
    const uint32_t as = smem + static_cast<uint32_t>(slot * Cfg::kStageBytes) + ld_dst;
    const uint32_t bs = as + BM * kRowElems * 2;
    const bool k_ok = k0 + ld_chunk * kChunksPerRow < K;  // K % 8 == 0: whole chunks
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      bool ok;
      const uint16_t* src;
      if constexpr (kAffineA) {
        ok = k_ok && i * Cfg::kRowStep < a_rows;
        src = a_src + i * row_step_k + k0;
      } else {
        ok = k_ok && a_row[i] >= 0;
        src = x + static_cast<int64_t>(a_row[i]) * K + ld_chunk * kChunksPerRow + k0;
      }
      CpAsync16(as + i * Cfg::kRowStep * kRowElems * 2, ok ? src : x, ok);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBLoads; ++i) {
      const bool ok = k_ok && i * kBStep < b_rows;
      CpAsync16(bs + i * Cfg::kRowStep * kRowElems * 2, ok ? b_src + i * b_step_k + k0 : w, ok);
    }
  };

  // ---- Shared -> registers (ldmatrix.x4), per lane. ----
  // A fragment (16 rows x 16 k) of m-step mi: lane l reads row (l & 15), chunk 2 * kk + (l >> 4)
  // (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 = mma's a0..a3).
  // B fragments of n-steps 2j, 2j + 1 (w rows = B columns): lane l reads w row
  // (l & 7) + 8 * (l >> 4), chunk 2 * kk + ((l >> 3) & 1) (matrices: b0, b1 of n-step 2j, then
  // b0, b1 of 2j + 1).
  const int a_frag_row = warp_m * Cfg::kWarpTileM + (lane & 15);
  const int a_frag_hi = lane >> 4;
  const int b_frag_row = warp_n * Cfg::kWarpTileN + (lane & 7) + ((lane >> 4) << 3);
  const int b_frag_hi = (lane >> 3) & 1;

  auto load_frags = [&](uint32_t (&af)[kMI][4], uint32_t (&bf)[kNI][2], uint32_t as, int kk) {
    const uint32_t bs = as + BM * kRowElems * 2;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
      LdMatrixX4(af[mi], as + static_cast<uint32_t>(
                                  Swizzle(a_frag_row + mi * 16, 2 * kk + a_frag_hi)) * 2u);
    }
#pragma unroll
    for (int nj = 0; nj < kNI / 2; ++nj) {
      uint32_t r[4];
      LdMatrixX4(r, bs + static_cast<uint32_t>(
                             Swizzle(b_frag_row + nj * 16, 2 * kk + b_frag_hi)) * 2u);
      bf[2 * nj][0] = r[0];
      bf[2 * nj][1] = r[1];
      bf[2 * nj + 1][0] = r[2];
      bf[2 * nj + 1][1] = r[3];
    }
  };

  float acc[kMI][kNI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni) {
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;
    }
  }

  // ---- Main loop: kStages - 1 tiles in flight ahead of the one being multiplied. ----
  const int64_t k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, static_cast<int64_t>(s) * kBK);
    CpAsyncCommit();
  }
  int read_slot = 0;
  int write_slot = kStages - 1;
  uint32_t af[2][kMI][4];
  uint32_t bf[2][kNI][2];
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    // Groups committed so far: kt + kStages - 1; at most kStages - 2 pending => tile kt landed.
    CpAsyncWait<kStages - 2>();
    // Tile kt is visible to every thread, and every thread is done with tile kt - 1, whose slot
    // (write_slot) the next load overwrites.
    SyncCta();
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(write_slot, next * kBK);
    CpAsyncCommit();  // possibly empty: keeps the group count uniform

    const uint32_t as = smem + static_cast<uint32_t>(read_slot * Cfg::kStageBytes);
    load_frags(af[0], bf[0], as, 0);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      if (kk + 1 < kBK / 16) load_frags(af[(kk + 1) & 1], bf[(kk + 1) & 1], as, kk + 1);
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) {
          Mma16816<T>(acc[mi][ni], af[kk & 1][mi], bf[kk & 1][ni][0], bf[kk & 1][ni][1]);
        }
      }
    }
    read_slot = read_slot + 1 == kStages ? 0 : read_slot + 1;
    write_slot = write_slot + 1 == kStages ? 0 : write_slot + 1;
  }
  CpAsyncWait<0>();
  SyncCta();  // every warp is done reading the stages: the epilogue reuses them

  // ---- Epilogue: round to T into a [BM][kOutCols + 8] staging tile, then row stores. ----
  // Accumulator (mi, ni): lane l holds rows l / 4 and l / 4 + 8, columns 2 (l % 4) + {0, 1}.
  constexpr int kOutLd = kOutCols + 8;
  uint32_t* const stage = reinterpret_cast<uint32_t*>(smem_ptr);
  const int r_base = warp_m * Cfg::kWarpTileM + (lane >> 2);
  if constexpr (kGated) {
    // Fragment 2j holds gate, 2j + 1 up of output columns warp_n * WTN / 2 + 8 j + 2 (l % 4).
    const int c_base = warp_n * (Cfg::kWarpTileN / 2) + (lane & 3) * 2;
    const int act = p.act;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int nj = 0; nj < kNI / 2; ++nj) {
        const int r = r_base + mi * 16;
        const int c = c_base + nj * 8;
        const float(&g)[4] = acc[mi][2 * nj];
        const float(&u)[4] = acc[mi][2 * nj + 1];
        stage[(r * kOutLd + c) >> 1] = Pack2<T>(Activate<kEpi>(act, g[0]) * u[0],
                                                Activate<kEpi>(act, g[1]) * u[1]);
        stage[((r + 8) * kOutLd + c) >> 1] = Pack2<T>(Activate<kEpi>(act, g[2]) * u[2],
                                                      Activate<kEpi>(act, g[3]) * u[3]);
      }
    }
  } else {
    const int c_base = warp_n * Cfg::kWarpTileN + (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
      const int r = r_base + mi * 16;
      float s_lo = 1.0f, s_hi = 1.0f;  // scales of rows r and r + 8
      if constexpr (kIndexed) {
        const float* row_scale = reinterpret_cast<const float*>(smem_ptr + Smem::kRowScale);
        s_lo = row_scale[r];
        s_hi = row_scale[r + 8];
      }
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int c = c_base + ni * 8;
        if constexpr (kIndexed) {
          stage[(r * kOutLd + c) >> 1] = Pack2<T>(acc[mi][ni][0] * s_lo, acc[mi][ni][1] * s_lo);
          stage[((r + 8) * kOutLd + c) >> 1] =
              Pack2<T>(acc[mi][ni][2] * s_hi, acc[mi][ni][3] * s_hi);
        } else {
          stage[(r * kOutLd + c) >> 1] = Pack2<T>(acc[mi][ni][0], acc[mi][ni][1]);
          stage[((r + 8) * kOutLd + c) >> 1] = Pack2<T>(acc[mi][ni][2], acc[mi][ni][3]);
        }
      }
    }
  }
  SyncCta();
  const uint16_t* const stage_t = reinterpret_cast<const uint16_t*>(smem_ptr);
  const int32_t* const row_dst = reinterpret_cast<const int32_t*>(smem_ptr + Smem::kRowDst);
  uint16_t* const out = static_cast<uint16_t*>(p.out);
  constexpr int kOutChunks = kOutCols / 8;  // 8-element chunks of a tile row
#pragma unroll 4
  for (int c = tid; c < BM * kOutChunks; c += Cfg::kThreads) {
    const int r = c / kOutChunks;
    const int cc = (c % kOutChunks) * 8;
    const int64_t gr = row0 + r;
    const int64_t gc = n0 + cc;
    if (gr >= seg_end || gc >= out_cols) continue;
    int64_t dst_row = gr;
    if constexpr (kIndexed) {
      dst_row = row_dst[r];
      if (dst_row < 0) continue;
    }
    const uint16_t* src = stage_t + r * kOutLd + cc;
    uint16_t* dst = out + dst_row * out_cols + gc;
    if (p.out_vec && gc + 8 <= out_cols) {
      Store16(dst, Load16(src));
    } else {
      for (int q = 0; q < 8 && gc + q < out_cols; ++q) dst[q] = src[q];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sort by expert.
// ---------------------------------------------------------------------------------------------

constexpr int kSortThreads = 512;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kSortPerThread = 8;  // consecutive pairs a thread ranks per pass
constexpr int kSortSmemBytes = (kSortWarps + 1) * 4;

/*! \brief The sum of `v` over the CTA, in every thread (`scratch`: kSortWarps + 1 ints). */
CF_DEVICE int BlockSum(int v, int* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += ShflXorInt(v, d);
  if (lane == 0) scratch[warp] = v;
  SyncCta();
  int total = 0;
#pragma unroll
  for (int i = 0; i < kSortWarps; ++i) total += scratch[i];
  SyncCta();  // scratch may be reused
  return total;
}

/*! \brief Exclusive prefix sum of `v` over the threads in order; `total` gets the sum. */
CF_DEVICE int BlockExclusiveScan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = ShflUp(incl, d);
    if (lane >= d) incl += u;
  }
  if (lane == 31) scratch[warp] = incl;
  SyncCta();
  int before = 0;
  total = 0;
#pragma unroll
  for (int i = 0; i < kSortWarps; ++i) {
    const int s = scratch[i];
    before += i < warp ? s : 0;
    total += s;
  }
  SyncCta();
  return before + incl - v;
}

/*!
 * \brief CTA b (0 <= b <= E) places the pairs of bucket b (expert b; b = E: ids outside
 * [0, E)) at offsets[b] ... in pair order, and writes offsets[b].
 */
template <class IdT>
CF_GLOBAL void MOE_LAUNCH_BOUNDS(kSortThreads, 1)
    SortByExpertKernel(const IdT* __restrict__ ids, int64_t num_pairs, int64_t top_k, int64_t E,
                       int64_t* __restrict__ offsets, int32_t* __restrict__ sorted_pairs,
                       int32_t* __restrict__ token_index) {
  int* scratch = reinterpret_cast<int*>(MoeSmem());
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  auto bucket = [E](int64_t id) { return id >= 0 && id < E ? id : E; };

  int lower = 0;  // pairs of lower buckets seen by this thread
  for (int64_t i = tid; i < num_pairs; i += kSortThreads) {
    lower += bucket(static_cast<int64_t>(ids[i])) < b ? 1 : 0;
  }
  const int first = BlockSum(lower, scratch);
  if (tid == 0) offsets[b] = first;

  int64_t placed = first;  // next position of this bucket
  for (int64_t base = 0; base < num_pairs; base += kSortThreads * kSortPerThread) {
    const int64_t mine = base + static_cast<int64_t>(tid) * kSortPerThread;
    uint32_t hits = 0;
#pragma unroll
    for (int v = 0; v < kSortPerThread; ++v) {
      const int64_t i = mine + v;
      if (i < num_pairs && bucket(static_cast<int64_t>(ids[i])) == b) hits |= 1u << v;
    }
    int total = 0;
    int64_t pos = placed + BlockExclusiveScan(Popc(hits), scratch, total);
#pragma unroll
    for (int v = 0; v < kSortPerThread; ++v) {
      if ((hits >> v) & 1u) {
        const int64_t pair = mine + v;
        sorted_pairs[pos] = static_cast<int32_t>(pair);
        token_index[pos] = static_cast<int32_t>(pair / top_k);
        ++pos;
      }
    }
    placed += total;
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k sum.
// ---------------------------------------------------------------------------------------------

constexpr int kSumThreads = 256;

/*!
 * \brief out[t, c] = round(sum_s x[t, s, c]) over the slots s with 0 <= ids[t, s] < E. Thread
 * i handles 8 columns (kVec: 16-byte accesses, H % 8 == 0) or one column of one token.
 */
template <class T, class IdT, bool kVec>
CF_GLOBAL void MOE_LAUNCH_BOUNDS(kSumThreads, 1)
    SumTopkKernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ x,
                  const IdT* __restrict__ ids, int64_t num_tokens, int64_t top_k, int64_t H,
                  int64_t E) {
  constexpr int kCols = kVec ? 8 : 1;
  const int64_t chunks = H / kCols;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (i >= num_tokens * chunks) return;
  const int64_t t = i / chunks;
  const int64_t c = (i - t * chunks) * kCols;
  float acc[kCols];
#pragma unroll
  for (int q = 0; q < kCols; ++q) acc[q] = 0.0f;
  for (int64_t s = 0; s < top_k; ++s) {
    const int64_t id = static_cast<int64_t>(ids[t * top_k + s]);
    if (id < 0 || id >= E) continue;
    const uint16_t* row = x + (t * top_k + s) * H + c;
    if constexpr (kVec) {
      const uint4 v = Load16(row);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc[2 * q] += LowToFloat<T>(words[q]);
        acc[2 * q + 1] += HighToFloat<T>(words[q]);
      }
    } else {
      acc[0] += LowToFloat<T>(static_cast<uint32_t>(row[0]));
    }
  }
  uint16_t* dst = out + t * H + c;
  if constexpr (kVec) {
    uint4 v;
    v.x = Pack2<T>(acc[0], acc[1]);
    v.y = Pack2<T>(acc[2], acc[3]);
    v.z = Pack2<T>(acc[4], acc[5]);
    v.w = Pack2<T>(acc[6], acc[7]);
    Store16(dst, v);
  } else {
    dst[0] = static_cast<uint16_t>(Pack2<T>(acc[0], 0.0f) & 0xffffu);
  }
}

}  // namespace moe
}  // namespace cacheflow
