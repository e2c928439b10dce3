// Grouped GEMM of a mixture-of-experts layer: one launch multiplies every expert's segment of
// expert-sorted rows by that expert's weight matrix.
//
// Layouts (all C-contiguous, one dtype: float16 or bfloat16; offsets int64):
//   x               [M, K]      rows sorted by expert: rows offsets[e] .. offsets[e+1]-1 go to e
//   w               [E, N, K]   per-expert weights in nn.Linear layout (out features, in features)
//   expert_offsets  [E + 1]     offsets[0] = 0 <= offsets[1] <= ... <= offsets[E] <= M
//   out             [M, N]      out[r, :] = x[r, :] @ w[e, :, :]^T for the expert e of row r
// Rows at or past offsets[E] are not written. Products accumulate in float32 (tensor cores,
// WMMA 16x16x16) and are rounded once to the dtype.
//
// Tiling: a block computes a kBM x kBN tile of one expert's segment; K advances kBK at a time
// through a two-stage cp.async pipeline (the next tile loads while the current one multiplies).
// Grid: x = M tiles (an upper bound, ceil(M / kBM) + E: every segment may end in a partial
// tile), y = N tiles. A block finds its expert by walking the offsets; blocks past the last
// segment tile exit. The grid depends only on M, N and E, so a launch is CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <cstdint>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using elementwise::CheckDtypeLike;
using elementwise::CheckLaunch;
using elementwise::EnvStream;
using elementwise::FromFloat;
using elementwise::IsAligned;

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

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    MoeGroupedGemmKernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
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

constexpr const char* kOp = "moe_grouped_gemm";

inline bool IsHalfDtype(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
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
  const int64_t m_tiles = (M + kBM - 1) / kBM + E;
  const int64_t n_tiles = (N + kBN - 1) / kBN;
  TVM_FFI_CHECK(n_tiles <= 65535, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "w") << "at most " << 65535 * kBN << " out_features, got "
      << N;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  const auto* offs = reinterpret_cast<const int64_t*>(DataPtr(expert_offsets));
  cudaStream_t stream = EnvStream(dev);
  // 16-byte stores of 8 outputs when every row starts aligned.
  const bool out_vec = N % 8 == 0 && IsAligned(DataPtr(out), 16);
  if (x.dtype().code == kDLBfloat) {
    using T = __nv_bfloat16;
    MoeGroupedGemmKernel<T><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<T*>(DataPtr(out)), reinterpret_cast<const T*>(DataPtr(x)),
        reinterpret_cast<const T*>(DataPtr(w)), offs, M, N, K, E, out_vec);
  } else {
    using T = __half;
    MoeGroupedGemmKernel<T><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<T*>(DataPtr(out)), reinterpret_cast<const T*>(DataPtr(x)),
        reinterpret_cast<const T*>(DataPtr(w)), offs, M, N, K, E, out_vec);
  }
  CheckLaunch();
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_grouped_gemm, cacheflow::MoeGroupedGemm);
