// Grouped GEMM of a mixture-of-experts layer: one launch multiplies every expert's segment of
// expert-sorted rows by that expert's weight matrix.
//
// Layouts (all C-contiguous, one dtype: float16 or bfloat16; offsets int64):
//   x               [M, K]      rows sorted by expert: rows offsets[e] .. offsets[e+1]-1 go to e
//   w               [E, N, K]   per-expert weights in nn.Linear layout (out features, in features)
//   expert_offsets  [E + 1]     offsets[0] = 0 <= offsets[1] <= ... <= offsets[E] <= M
//   out             [M, N]      out[r, :] = x[r, :] @ w[e, :, :]^T for the expert e of row r
// Rows at or past offsets[E] are not written. Products accumulate in float32 on tensor cores and
// are rounded once to the dtype. K must be a multiple of 8 (whole 16-byte chunks); M, N and the
// segment sizes are arbitrary (partial tiles are zero-filled on load and masked on store).
//
// Scheduling (both kernels): a block computes a BM x BN tile of one expert's segment. Grid: x =
// M tiles (an upper bound, ceil(M / BM) + E: every segment may end in a partial tile), y = N
// tiles. A block finds its expert from the offsets; blocks past the last segment tile exit. The
// grid depends only on M, N and E, so a launch is CUDA-graph capturable (no host sync).
//
// Default kernel (mma_path): mma.sync m16n8k16 (sm_80+) fed by ldmatrix.x4 from an XOR-swizzled
// shared layout (rows of BK = 64 elements = 128 bytes, 16-byte chunk c of row r stored at chunk
// c ^ (r & 7): conflict-free cp.async writes and ldmatrix reads without padding), a 3-4 stage
// cp.async pipeline in dynamic shared memory (one __syncthreads per K step), fragments
// double-buffered in registers across the four k16 steps of a stage, and an epilogue that
// rounds through a shared staging tile for 16-byte row stores. Tiles (BM x BN, warps, warp
// tile, stages, shared memory):
//   128x256  8 warps 2x4  64x64  4 stages  192 KiB   (3 stages, 144 KiB, where 192 KiB is not
//                                                     available, e.g. A100)
//   128x128  4 warps 2x2  64x64  3 stages   96 KiB   (when 128x256 would not fill the SMs once)
//    64x128  4 warps 2x2  32x64  4 stages   96 KiB   (average segment <= 64 rows)
//    32x128  4 warps 1x4  32x32  4 stages   80 KiB   (average segment <= 32 rows: decode)
// chosen per launch from M / E (the average segment), N and the device's SM count.
//
// CACHEFLOW_MOE_GEMM (read at every call, so one process can A/B by setting os.environ):
//   unset / "auto" / "mma"   the automatic choice above
//   "wmma"                   the original kernel: WMMA 16x16x16, 128x128x32 tiles, 8 warps of
//                            64x32, two-stage cp.async in static shared memory
//   "128x256", "128x256s3", "128x128", "64x128", "32x128"   force an mma.sync tile (the
//                            automatic choice where the device lacks its shared memory)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using elementwise::CheckDtypeLike;
using elementwise::CheckLaunch;
using elementwise::EnvStream;
using elementwise::FromFloat;
using elementwise::IsAligned;

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// The original WMMA kernel (CACHEFLOW_MOE_GEMM=wmma), unchanged.
// ---------------------------------------------------------------------------------------------
namespace wmma_path {

constexpr int kBM = 128;  // rows of a block tile
constexpr int kBN = 128;  // output features of a block tile
constexpr int kBK = 32;   // reduction step
constexpr int kPad = 8;   // smem row padding (elements): keeps 16/32-byte alignment, fewer conflicts
constexpr int kLds = kBK + kPad;  // smem row stride in elements (80 bytes)
constexpr int kThreads = 256;     // 8 warps: 2 along M (64 rows each) x 4 along N (32 columns each)
constexpr int kWarpM = 64;
constexpr int kWarpN = 32;
constexpr int kFragsM = kWarpM / 16;  // 4
constexpr int kFragsN = kWarpN / 16;  // 2
constexpr int kChunk = 8;             // elements of one 16-byte cp.async
constexpr int kChunksPerRow = kBK / kChunk;  // 4
constexpr int kStageElems = (kBM + kBN) * kLds;

static_assert(kBM * kChunksPerRow == 2 * kThreads, "two A chunks per thread");
static_assert(kBN * kChunksPerRow == 2 * kThreads, "two B chunks per thread");

/*! \brief 16-byte global -> shared copy; `valid` false fills the 16 bytes with zeros. */
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    MoeGroupedGemmWmmaKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                         const int64_t* __restrict__ offsets, int64_t M, int64_t N, int64_t K,
                         int64_t E, bool out_vec) {
  using namespace nvcuda;  // NOLINT(build/namespaces)
  __shared__ __align__(128) T smem[2 * kStageElems];
  __shared__ int64_t tile_info[3];  // expert, first row of the tile, end of the segment

  if (threadIdx.x == 0) {
    int64_t t = blockIdx.x;
    int64_t found = -1, row0 = 0, seg_end = 0;
    for (int64_t e = 0; e < E; ++e) {
      int64_t begin = offsets[e], end = offsets[e + 1];
      begin = begin < 0 ? 0 : (begin > M ? M : begin);
      end = end < begin ? begin : (end > M ? M : end);
      const int64_t tiles = (end - begin + kBM - 1) / kBM;
      if (t < tiles) {
        found = e;
        row0 = begin + t * kBM;
        seg_end = end;
        break;
      }
      t -= tiles;
    }
    tile_info[0] = found;
    tile_info[1] = row0;
    tile_info[2] = seg_end;
  }
  __syncthreads();
  const int64_t expert = tile_info[0];
  if (expert < 0) return;  // the whole block: past the last segment tile
  const int64_t row0 = tile_info[1];
  const int64_t seg_end = tile_info[2];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* we = w + expert * N * K;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int warp_m = warp / (kBN / kWarpN);  // 0..1
  const int warp_n = warp % (kBN / kWarpN);  // 0..3

  // Loads of one K step into stage `s`: A rows of the segment, B rows of the expert's weight.
  auto load_stage = [&](int s, int64_t k0) {
    T* as = smem + s * kStageElems;
    T* bs = as + kBM * kLds;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunksPerRow;
      const int kc = (c % kChunksPerRow) * kChunk;
      const int64_t gr = row0 + r;
      const bool ok = gr < seg_end && k0 + kc < K;
      CpAsync16(as + r * kLds + kc, ok ? x + gr * K + k0 + kc : x, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunksPerRow;
      const int kc = (c % kChunksPerRow) * kChunk;
      const int64_t gn = n0 + r;
      const bool ok = gn < N && k0 + kc < K;
      CpAsync16(bs + r * kLds + kc, ok ? we + gn * K + k0 + kc : w, ok);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  const int64_t k_tiles = (K + kBK - 1) / kBK;
  load_stage(0, 0);
  CpAsyncCommit();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) load_stage(static_cast<int>((kt + 1) & 1), (kt + 1) * kBK);
    CpAsyncCommit();  // possibly empty: keeps the group count uniform
    CpAsyncWait<1>();  // every group but the newest has landed: stage kt is ready
    __syncthreads();
    const T* as = smem + (kt & 1) * kStageElems;
    const T* bs = as + kBM * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        wmma::load_matrix_sync(a[i], as + (warp_m * kWarpM + i * 16) * kLds + kk, kLds);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        // B = w^T (K x N); w's rows [n][k] are B's columns: column-major with ld kLds.
        wmma::load_matrix_sync(b[j], bs + (warp_n * kWarpN + j * 16) * kLds + kk, kLds);
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // everyone is done with this stage before the next load overwrites it
  }
  CpAsyncWait<0>();
  __syncthreads();

  // Epilogue through a per-warp 16x16 float staging tile (reusing the pipeline's smem).
  float* stage = reinterpret_cast<float*>(smem) + warp * 256;
  const int sr = lane >> 1;        // staging row of this lane
  const int sc = (lane & 1) * 8;   // first of its 8 columns
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t gr = row0 + warp_m * kWarpM + i * 16 + sr;
      const int64_t gc = n0 + warp_n * kWarpN + j * 16 + sc;
      if (gr < seg_end && gc < N) {
        T* dst = out + gr * N + gc;
        if (out_vec && gc + 8 <= N) {
          elementwise::Vec<T, 8> v;
#pragma unroll
          for (int q = 0; q < 8; ++q) v.v[q] = FromFloat<T>(stage[sr * 16 + sc + q]);
          *reinterpret_cast<elementwise::Vec<T, 8>*>(dst) = v;
        } else {
          for (int q = 0; q < 8 && gc + q < N; ++q) dst[q] = FromFloat<T>(stage[sr * 16 + sc + q]);
        }
      }
      __syncwarp();
    }
  }
}

}  // namespace wmma_path

// ---------------------------------------------------------------------------------------------
// The mma.sync kernel (default).
// ---------------------------------------------------------------------------------------------
namespace mma_path {

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
  static_assert(kRowStep % 8 == 0, "a load pass covers whole swizzle periods of 8 rows");
  static_assert(BM % kRowStep == 0 && BN % kRowStep == 0, "whole load passes");
  static_assert(kStages >= 2, "at least double buffering");
};

//                    BM   BN  WM WN stages min blocks/SM   smem     warp tile
using Tile128x256s4 = Tile<128, 256, 2, 4, 4, 1>;   // 192 KiB  64 x 64
using Tile128x256s3 = Tile<128, 256, 2, 4, 3, 1>;   // 144 KiB  64 x 64
using Tile128x128 = Tile<128, 128, 2, 2, 3, 2>;     //  96 KiB  64 x 64
using Tile64x128 = Tile<64, 128, 2, 2, 4, 2>;       //  96 KiB  32 x 64
using Tile32x128 = Tile<32, 128, 1, 4, 4, 2>;       //  80 KiB  32 x 32

__device__ __forceinline__ uint32_t SmemU32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/*! \brief cp.async of 16 bytes to a 32-bit shared address; `valid` false writes 16 zeros. */
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

/*! \brief Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. */
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/*! \brief d += a (16x16, row) * b (16x8, col), float32 accumulation. */
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void Mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/*! \brief Two floats rounded (to nearest even) to T, packed low = `lo`, high = `hi`. */
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t PackPair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t PackPair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

/*!
 * \brief Element offset of 16-byte chunk `chunk` (0..7) of row `row` in a swizzled stage tile:
 * rows of 64 elements (128 bytes), chunk c of row r stored at chunk c ^ (r & 7). The 8 rows an
 * ldmatrix reads at one logical chunk then hit 8 distinct bank groups.
 */
__device__ __forceinline__ int Swizzle(int row, int chunk) {
  return row * kRowElems + ((chunk ^ (row & 7)) << 3);
}

/*!
 * \brief The tile of this block: its expert (-1: past the last segment tile), first row and
 * segment end. Warp 0 scans the clamped segment sizes 32 experts at a time (a warp prefix sum
 * of their tile counts); the result is broadcast through shared memory.
 */
template <int BM>
__device__ __forceinline__ void FindTile(const int64_t* __restrict__ offsets, int64_t M,
                                         int64_t E, int64_t (&info)[3]) {
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
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, incl > t);
      if (hit != 0) {  // warp-uniform
        const int src = __ffs(hit) - 1;
        const int64_t my_row0 = begin + (t - (incl - tiles)) * BM;
        found = base + src;
        row0 = __shfl_sync(0xffffffffu, my_row0, src);
        seg_end = __shfl_sync(0xffffffffu, end, src);
        break;
      }
      t -= __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      info[0] = found;
      info[1] = row0;
      info[2] = seg_end;
    }
  }
  __syncthreads();
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    MoeGroupedGemmMmaKernel(T* __restrict__ out, const T* __restrict__ x,
                            const T* __restrict__ w, const int64_t* __restrict__ offsets,
                            int64_t M, int64_t N, int64_t K, int64_t E, bool out_vec) {
  constexpr int BM = Cfg::BM;
  constexpr int BN = Cfg::BN;
  constexpr int kMI = Cfg::kMI;
  constexpr int kNI = Cfg::kNI;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char moe_smem[];
  __shared__ int64_t tile_info[3];  // expert, first row of the tile, end of the segment

  FindTile<BM>(offsets, M, E, tile_info);
  const int64_t expert = tile_info[0];
  if (expert < 0) return;  // the whole block: past the last segment tile
  const int64_t row0 = tile_info[1];
  const int64_t seg_end = tile_info[2];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const uint32_t smem = SmemU32(moe_smem);

  // ---- Global -> shared: thread `tid` copies chunk tid % 8 of rows tid / 8 + i * kRowStep. ----
  const int ld_row = tid >> 3;
  const int ld_chunk = tid & 7;
  // Rows step by a multiple of 8, so every row of this thread has the same swizzled chunk.
  const uint32_t ld_dst = static_cast<uint32_t>(Swizzle(ld_row, ld_chunk)) * 2u;
  const T* a_src = x + (row0 + ld_row) * K + ld_chunk * kChunksPerRow;
  const T* b_src = w + (expert * N + n0 + ld_row) * K + ld_chunk * kChunksPerRow;
  // Rows of this thread still inside the segment / inside N: copies i with i * kRowStep < these.
  const int64_t a_rows = seg_end - row0 - ld_row;
  const int64_t b_rows = N - n0 - ld_row;
  const int64_t row_step_k = static_cast<int64_t>(Cfg::kRowStep) * K;

  auto load_stage = [&](int slot, int64_t k0) {
    const uint32_t as = smem + static_cast<uint32_t>(slot * Cfg::kStageBytes) + ld_dst;
    const uint32_t bs = as + BM * kRowElems * 2;
    const bool k_ok = k0 + ld_chunk * kChunksPerRow < K;  // K % 8 == 0: whole chunks
#pragma unroll
    for (int i = 0; i < Cfg::kALoads; ++i) {
      const bool ok = k_ok && i * Cfg::kRowStep < a_rows;
      CpAsync16(as + i * Cfg::kRowStep * kRowElems * 2, ok ? a_src + i * row_step_k + k0 : x,
                ok);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBLoads; ++i) {
      const bool ok = k_ok && i * Cfg::kRowStep < b_rows;
      CpAsync16(bs + i * Cfg::kRowStep * kRowElems * 2, ok ? b_src + i * row_step_k + k0 : w,
                ok);
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
    __syncthreads();
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
  __syncthreads();  // every warp is done reading the stages: the epilogue reuses them

  // ---- Epilogue: round to T into a [BM][BN + 8] staging tile, then 16-byte row stores. ----
  // Accumulator (mi, ni): lane l holds rows l / 4 and l / 4 + 8, columns 2 (l % 4) + {0, 1}.
  uint32_t* stage = reinterpret_cast<uint32_t*>(moe_smem);
  {
    const int r_base = warp_m * Cfg::kWarpTileM + (lane >> 2);
    const int c_base = warp_n * Cfg::kWarpTileN + (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int r = r_base + mi * 16;
        const int c = c_base + ni * 8;
        stage[(r * Cfg::kOutLd + c) >> 1] = PackPair<T>(acc[mi][ni][0], acc[mi][ni][1]);
        stage[((r + 8) * Cfg::kOutLd + c) >> 1] = PackPair<T>(acc[mi][ni][2], acc[mi][ni][3]);
      }
    }
  }
  __syncthreads();
  const T* stage_t = reinterpret_cast<const T*>(moe_smem);
  constexpr int kOutChunks = BN / 8;  // 8-element chunks of a tile row
#pragma unroll 4
  for (int c = tid; c < BM * kOutChunks; c += Cfg::kThreads) {
    const int r = c / kOutChunks;
    const int cc = (c % kOutChunks) * 8;
    const int64_t gr = row0 + r;
    const int64_t gc = n0 + cc;
    if (gr >= seg_end || gc >= N) continue;
    const T* src = stage_t + r * Cfg::kOutLd + cc;
    T* dst = out + gr * N + gc;
    if (out_vec && gc + 8 <= N) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int q = 0; q < 8 && gc + q < N; ++q) dst[q] = src[q];
    }
  }
}

}  // namespace mma_path

constexpr const char* kOp = "moe_grouped_gemm";

inline bool IsHalfDtype(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
}

/*! \brief The kernels a launch can run (CACHEFLOW_MOE_GEMM picks one; kAuto chooses). */
enum class Variant { kAuto, kWmma, kMma128x256s4, kMma128x256s3, kMma128x128, kMma64x128, kMma32x128 };

/*!
 * \brief CACHEFLOW_MOE_GEMM, read at every call (a getenv, no allocation) so that one process
 * can A/B the kernels by setting os.environ between calls: "wmma" is the original WMMA kernel;
 * "128x256", "128x256s3", "128x128", "64x128", "32x128" force a tile of the mma.sync kernel
 * (falling back to the automatic choice when the device lacks its shared memory); unset,
 * "auto", "mma" or anything else: the automatic choice.
 */
Variant VariantFromEnv() {
  const char* v = std::getenv("CACHEFLOW_MOE_GEMM");
  if (v == nullptr) return Variant::kAuto;
  if (std::strcmp(v, "wmma") == 0) return Variant::kWmma;
  if (std::strcmp(v, "128x256") == 0) return Variant::kMma128x256s4;
  if (std::strcmp(v, "128x256s3") == 0) return Variant::kMma128x256s3;
  if (std::strcmp(v, "128x128") == 0) return Variant::kMma128x128;
  if (std::strcmp(v, "64x128") == 0) return Variant::kMma64x128;
  if (std::strcmp(v, "32x128") == 0) return Variant::kMma32x128;
  return Variant::kAuto;
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // largest dynamic shared memory a block may opt in to (bytes)
};

/*! \brief SM count and opt-in shared memory of `device`, queried once per device. */
DeviceInfo GetDeviceInfo(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  TVM_FFI_CHECK_CUDA_ERROR(
      cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  TVM_FFI_CHECK_CUDA_ERROR(
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, info);
  return info;
}

/*! \brief Raises `kernel`'s dynamic shared-memory limit to `bytes` on `device`, once each. */
void EnsureSmemLimit(const void* kernel, int device, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, bytes);
  if (done.count(key) != 0) return;
  TVM_FFI_CHECK_CUDA_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

template <typename Cfg>
bool Fits(const DeviceInfo& dev) {
  return Cfg::kSmemBytes <= dev.smem_optin;
}

/*!
 * \brief The tile for a launch, from the shapes alone (no look at the routing): the average
 * segment (M / E rows) picks the tile height: decode-sized segments a 32- or 64-row tile, whose
 * blocks stream the weights with little wasted work; larger ones 128 x 256 tiles (the fewest
 * shared-memory bytes per product), or 128 x 128 when 128 x 256 would not fill every SM once.
 */
Variant ChooseVariant(Variant requested, const DeviceInfo& dev, int64_t M, int64_t N,
                      int64_t E) {
  using namespace mma_path;  // NOLINT(build/namespaces)
  switch (requested) {
    case Variant::kWmma: return Variant::kWmma;
    case Variant::kMma128x256s4:
      if (Fits<Tile128x256s4>(dev)) return requested;
      break;
    case Variant::kMma128x256s3:
      if (Fits<Tile128x256s3>(dev)) return requested;
      break;
    case Variant::kMma128x128:
      if (Fits<Tile128x128>(dev)) return requested;
      break;
    case Variant::kMma64x128:
      if (Fits<Tile64x128>(dev)) return requested;
      break;
    case Variant::kMma32x128:
      if (Fits<Tile32x128>(dev)) return requested;
      break;
    case Variant::kAuto: break;
  }
  const int64_t rows_per_expert = (M + E - 1) / E;
  Variant v;
  if (rows_per_expert <= 32) {
    v = Variant::kMma32x128;
  } else if (rows_per_expert <= 64) {
    v = Variant::kMma64x128;
  } else {
    const int64_t big_blocks = ((M + 127) / 128) * ((N + 255) / 256);
    if (big_blocks >= dev.sms && Fits<Tile128x256s4>(dev)) {
      v = Variant::kMma128x256s4;
    } else if (big_blocks >= dev.sms && Fits<Tile128x256s3>(dev)) {
      v = Variant::kMma128x256s3;
    } else {
      v = Variant::kMma128x128;
    }
  }
  // Every mma tile needs >= 80 KiB of shared memory (sm_80 and newer have it); else WMMA.
  const bool fits = (v == Variant::kMma32x128 && Fits<Tile32x128>(dev)) ||
                    (v == Variant::kMma64x128 && Fits<Tile64x128>(dev)) ||
                    (v == Variant::kMma128x128 && Fits<Tile128x128>(dev)) ||
                    v == Variant::kMma128x256s4 || v == Variant::kMma128x256s3;
  return fits ? v : Variant::kWmma;
}

struct LaunchArgs {
  void* out;
  const void* x;
  const void* w;
  const int64_t* offsets;
  int64_t M, N, K, E;
  bool out_vec;
  int device;
  cudaStream_t stream;
};

template <typename T, typename Cfg>
void LaunchMma(const LaunchArgs& a) {
  auto kernel = mma_path::MoeGroupedGemmMmaKernel<T, Cfg>;
  EnsureSmemLimit(reinterpret_cast<const void*>(kernel), a.device, Cfg::kSmemBytes);
  const int64_t m_tiles = (a.M + Cfg::BM - 1) / Cfg::BM + a.E;
  const int64_t n_tiles = (a.N + Cfg::BN - 1) / Cfg::BN;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, a.stream>>>(
      static_cast<T*>(a.out), static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.offsets,
      a.M, a.N, a.K, a.E, a.out_vec);
}

template <typename T>
void LaunchWmma(const LaunchArgs& a) {
  using namespace wmma_path;  // NOLINT(build/namespaces)
  const int64_t m_tiles = (a.M + kBM - 1) / kBM + a.E;
  const int64_t n_tiles = (a.N + kBN - 1) / kBN;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  MoeGroupedGemmWmmaKernel<T><<<grid, kThreads, 0, a.stream>>>(
      static_cast<T*>(a.out), static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.offsets,
      a.M, a.N, a.K, a.E, a.out_vec);
}

template <typename T>
void Launch(Variant v, const LaunchArgs& a) {
  using namespace mma_path;  // NOLINT(build/namespaces)
  switch (v) {
    case Variant::kMma128x256s4: LaunchMma<T, Tile128x256s4>(a); break;
    case Variant::kMma128x256s3: LaunchMma<T, Tile128x256s3>(a); break;
    case Variant::kMma128x128: LaunchMma<T, Tile128x128>(a); break;
    case Variant::kMma64x128: LaunchMma<T, Tile64x128>(a); break;
    case Variant::kMma32x128: LaunchMma<T, Tile32x128>(a); break;
    default: LaunchWmma<T>(a); break;
  }
}

void MoeGroupedGemm(TensorView out, TensorView x, TensorView w, TensorView expert_offsets) {
  CheckNdim(kOp, "x", x, 2, "[num_rows, in_features]");
  TVM_FFI_CHECK(IsHalfDtype(x.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "float16 or bfloat16, got " << x.dtype();
  CheckNdim(kOp, "w", w, 3, "[num_experts, out_features, in_features]");
  CheckDtypeLike(kOp, "w", w, "x", x);
  const int64_t M = x.shape()[0], K = x.shape()[1];
  const int64_t E = w.shape()[0], N = w.shape()[1];
  TVM_FFI_CHECK(w.shape()[2] == K, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "w") << "of shape [num_experts, out_features, " << K
      << "] (in_features of 'x'), got " << ShapeStr(w);
  TVM_FFI_CHECK(K > 0 && K % 8 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "of shape [num_rows, in_features] with in_features a "
      << "positive multiple of 8, got " << ShapeStr(x);
  TVM_FFI_CHECK(E > 0, ValueError) << CACHEFLOW_ARG_ERROR(kOp, "w")
                                   << "a tensor with at least one expert, got " << ShapeStr(w);
  CheckNdim(kOp, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  TVM_FFI_CHECK(IsInt64(expert_offsets.dtype()) && expert_offsets.shape()[0] == E + 1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "expert_offsets") << "an int64 tensor of shape [" << E + 1
      << "], got " << expert_offsets.dtype() << " of shape " << ShapeStr(expert_offsets);
  CheckNdim(kOp, "out", out, 2, "[num_rows, out_features]");
  TVM_FFI_CHECK(out.shape()[0] == M && out.shape()[1] == N, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << M << ", " << N << "], got "
      << ShapeStr(out);
  CheckDtypeLike(kOp, "out", out, "x", x);
  CheckContiguous(kOp, "out", out);
  CheckContiguous(kOp, "x", x);
  CheckContiguous(kOp, "w", w);
  CheckContiguous(kOp, "expert_offsets", expert_offsets);
  CheckCuda(kOp, "x", x);
  CheckSameDevice(kOp, "w", w, "x", x);
  CheckSameDevice(kOp, "out", out, "x", x);
  CheckSameDevice(kOp, "expert_offsets", expert_offsets, "x", x);
  TVM_FFI_CHECK(IsAligned(DataPtr(x), 16) && IsAligned(DataPtr(w), 16), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "and 'w' 16-byte aligned (fresh or contiguous "
      << "allocations are), got a view at an unaligned offset";
  if (M == 0 || N == 0) return;
  // The narrowest tile of any kernel is 128 columns: every choice's grid y fits.
  constexpr int64_t kMinBN = 128;
  const int64_t n_tiles = (N + kMinBN - 1) / kMinBN;
  TVM_FFI_CHECK(n_tiles <= 65535, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "w") << "at most " << 65535 * kMinBN << " out_features, got "
      << N;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  LaunchArgs args;
  args.out = DataPtr(out);
  args.x = DataPtr(x);
  args.w = DataPtr(w);
  args.offsets = reinterpret_cast<const int64_t*>(DataPtr(expert_offsets));
  args.M = M;
  args.N = N;
  args.K = K;
  args.E = E;
  // 16-byte stores of 8 outputs when every row starts aligned.
  args.out_vec = N % 8 == 0 && IsAligned(DataPtr(out), 16);
  args.device = dev.device_id;
  args.stream = EnvStream(dev);
  const Variant v = ChooseVariant(VariantFromEnv(), GetDeviceInfo(dev.device_id), M, N, E);
  if (x.dtype().code == kDLBfloat) {
    Launch<__nv_bfloat16>(v, args);
  } else {
    Launch<__half>(v, args);
  }
  CheckLaunch();
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_grouped_gemm, cacheflow::MoeGroupedGemm);
