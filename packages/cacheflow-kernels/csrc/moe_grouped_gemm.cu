// Mixture-of-experts ops: the grouped GEMM (every expert's segment of expert-sorted rows times
// that expert's weight, one launch), its fused variants, the device-side sort of the routed
// (token, slot) pairs by expert and the top-k sum. The device code of everything but the WMMA
// kernel is in moe_kernels.cuh (shared with the CPU emulation of the tests).
//
// Exported functions (all tensors C-contiguous on one CUDA device; data float16 or bfloat16;
// every argument checked before any launch, ValueError naming it):
//   moe_grouped_gemm(out, x, w, expert_offsets)
//       out [M, N] = x [M, K] @ w[e] [N, K]^T per segment (the kStore epilogue, or the WMMA
//       kernel). Rows at or past offsets[E] are not written.
//   moe_grouped_gemm_indexed(out, x, w, expert_offsets, row_index?, out_index?, out_scale?)
//       the same GEMM reading row r from x[row_index[r]] (a gather: no gathered copy of the
//       tokens) and writing it, times out_scale[out_index[r]] in float32, to out[out_index[r]]
//       (a scatter; int32 indices, float32 scales; the kIndexed epilogue).
//   moe_grouped_gemm_gated(out, x, w, expert_offsets, row_index?, activation)
//       out [M, I] = act(h[:, :I]) * h[:, I:] with h = x[row_index] @ w[e]^T, w [E, 2 I, K] gate
//       rows then up rows (the gated epilogues: no [M, 2 I] intermediate).
//   moe_sort_by_expert(expert_offsets, sorted_pairs, token_index, topk_ids)
//       the counting sort that produces the segments (no host sync).
//   moe_sum_topk(out, x, topk_ids, num_experts)
//       out [T, H] = sum over the valid slots of x [T, k, H], float32, rounded once.
// Every launch runs on the caller's stream with a grid that depends only on the shapes (no host
// sync): CUDA-graph capturable.
//
// GEMM tiles (BM x BN, warps, warp tile, stages, shared memory), chosen per launch from M / E
// (the average segment), N and the device's SM count:
//   128x256  8 warps 2x4  64x64  4 stages  192 KiB   (3 stages, 144 KiB, where 192 KiB is not
//                                                     available, e.g. A100)
//   128x128  4 warps 2x2  64x64  3 stages   96 KiB   (when 128x256 would not fill the SMs once)
//    64x128  4 warps 2x2  32x64  4 stages   96 KiB   (average segment <= 64 rows)
//    32x128  4 warps 1x4  32x32  4 stages   80 KiB   (average segment <= 32 rows: decode)
//
// CACHEFLOW_MOE_GEMM (read at every call, so one process can A/B by setting os.environ):
//   unset / "auto" / "mma"   the automatic choice above
//   "wmma"                   moe_grouped_gemm only: the original kernel (WMMA 16x16x16,
//                            128x128x32 tiles, 8 warps of 64x32, two-stage cp.async in static
//                            shared memory); the fused variants make the automatic choice
//   "128x256", "128x256s3", "128x128", "64x128", "32x128"   force an mma.sync tile (the
//                            automatic choice where the device lacks its shared memory)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "common.h"
#include "elementwise_common.cuh"
#include "moe_kernels.cuh"
#include "smem_limit.cuh"

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

using tvm::ffi::Optional;

inline bool IsHalfDtype(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
}
inline bool IsInt32(DLDataType dt) { return dt.code == kDLInt && dt.bits == 32 && dt.lanes == 1; }
inline bool IsFloat32(DLDataType dt) {
  return dt.code == kDLFloat && dt.bits == 32 && dt.lanes == 1;
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

/*! \brief Whether the device has the shared memory of tile `Cfg` (any epilogue: the largest). */
template <typename Cfg>
bool Fits(const DeviceInfo& dev) {
  return moe::GemmSmem<Cfg, moe::Epilogue::kIndexed>::kBytes <= dev.smem_optin;
}

bool FitsVariant(Variant v, const DeviceInfo& dev) {
  using namespace moe;  // NOLINT(build/namespaces)
  switch (v) {
    case Variant::kMma128x256s4: return Fits<Tile128x256s4>(dev);
    case Variant::kMma128x256s3: return Fits<Tile128x256s3>(dev);
    case Variant::kMma128x128: return Fits<Tile128x128>(dev);
    case Variant::kMma64x128: return Fits<Tile64x128>(dev);
    case Variant::kMma32x128: return Fits<Tile32x128>(dev);
    default: return true;
  }
}

/*!
 * \brief The kernel of a launch, from the shapes alone (no look at the routing): the average
 * segment (M / E rows) picks the tile height: decode-sized segments a 32- or 64-row tile, whose
 * blocks stream the weights with little wasted work; larger ones 128 x 128 tiles. (On an H200,
 * 2026-12-03, 128 x 128 beat the 128 x 256 tiles, three and four stages, at every shape of
 * bench_moe.py by 1-23%: twice the blocks keep more of them resident per SM; the wide tiles
 * stay available through CACHEFLOW_MOE_GEMM.) A requested tile the device cannot hold falls
 * back to this choice. kWmma where no mma tile fits (devices with < 80 KiB of shared memory per
 * block; the fused variants raise instead).
 */
Variant ChooseVariant(Variant requested, const DeviceInfo& dev, int64_t M, int64_t N,
                      int64_t E) {
  if (requested == Variant::kWmma) return Variant::kWmma;
  if (requested != Variant::kAuto && FitsVariant(requested, dev)) return requested;
  (void)N;
  const int64_t rows_per_expert = (M + E - 1) / E;
  Variant v;
  if (rows_per_expert <= 32) {
    v = Variant::kMma32x128;
  } else if (rows_per_expert <= 64) {
    v = Variant::kMma64x128;
  } else {
    v = Variant::kMma128x128;
  }
  return FitsVariant(v, dev) ? v : Variant::kWmma;
}

template <typename T, typename Cfg, moe::Epilogue kEpi>
void LaunchMma(const moe::GemmParams& p, int device, cudaStream_t stream) {
  auto kernel = moe::GroupedGemmKernel<T, Cfg, kEpi>;
  constexpr int kSmem = moe::GemmSmem<Cfg, kEpi>::kBytes;
  RaiseSmemLimit(reinterpret_cast<const void*>(kernel), kSmem, device);
  constexpr bool kGated = moe::kIsGated<kEpi>;
  constexpr int64_t kTileCols = kGated ? Cfg::BN / 2 : Cfg::BN;
  const int64_t out_cols = kGated ? p.N / 2 : p.N;
  const int64_t m_tiles = (p.M + Cfg::BM - 1) / Cfg::BM + p.E;
  const int64_t n_tiles = (out_cols + kTileCols - 1) / kTileCols;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
}

template <typename T>
void LaunchWmma(const moe::GemmParams& p, cudaStream_t stream) {
  using namespace wmma_path;  // NOLINT(build/namespaces)
  using Storage = std::conditional_t<std::is_same_v<T, moe::Bf16>, __nv_bfloat16, __half>;
  const int64_t m_tiles = (p.M + kBM - 1) / kBM + p.E;
  const int64_t n_tiles = (p.N + kBN - 1) / kBN;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  MoeGroupedGemmWmmaKernel<Storage><<<grid, kThreads, 0, stream>>>(
      static_cast<Storage*>(p.out), static_cast<const Storage*>(p.x),
      static_cast<const Storage*>(p.w), p.offsets, p.M, p.N, p.K, p.E, p.out_vec);
}

template <typename T, moe::Epilogue kEpi>
void Launch(Variant v, const moe::GemmParams& p, int device, cudaStream_t stream) {
  using namespace moe;  // NOLINT(build/namespaces)
  switch (v) {
    case Variant::kMma128x256s4: LaunchMma<T, Tile128x256s4, kEpi>(p, device, stream); break;
    case Variant::kMma128x256s3: LaunchMma<T, Tile128x256s3, kEpi>(p, device, stream); break;
    case Variant::kMma128x128: LaunchMma<T, Tile128x128, kEpi>(p, device, stream); break;
    case Variant::kMma64x128: LaunchMma<T, Tile64x128, kEpi>(p, device, stream); break;
    case Variant::kMma32x128: LaunchMma<T, Tile32x128, kEpi>(p, device, stream); break;
    default:
      if constexpr (kEpi == Epilogue::kStore) {
        LaunchWmma<T>(p, stream);
      } else {
        TVM_FFI_THROW(RuntimeError)
            << "the fused grouped-GEMM variants need a device with at least "
            << GemmSmem<Tile32x128, Epilogue::kIndexed>::kBytes
            << " bytes of shared memory per block (compute capability 8.0 or newer)";
      }
  }
}

/*! \brief Checks shared by the GEMM ops: x [rows, K], w [E, N, K], offsets [E + 1]. */
void CheckGemmOperands(const char* op, const TensorView& x, const TensorView& w,
                       const TensorView& expert_offsets, const char* w_layout) {
  CheckNdim(op, "x", x, 2, "[num_rows, in_features]");
  TVM_FFI_CHECK(IsHalfDtype(x.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "float16 or bfloat16, got " << x.dtype();
  CheckNdim(op, "w", w, 3, w_layout);
  elementwise::CheckDtypeLike(op, "w", w, "x", x);
  const int64_t K = x.shape()[1];
  const int64_t E = w.shape()[0];
  TVM_FFI_CHECK(w.shape()[2] == K, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "w") << "of shape [num_experts, out_features, " << K
      << "] (in_features of 'x'), got " << ShapeStr(w);
  TVM_FFI_CHECK(K > 0 && K % 8 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "of shape [num_rows, in_features] with in_features a "
      << "positive multiple of 8, got " << ShapeStr(x);
  TVM_FFI_CHECK(E > 0, ValueError) << CACHEFLOW_ARG_ERROR(op, "w")
                                   << "a tensor with at least one expert, got " << ShapeStr(w);
  CheckNdim(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  TVM_FFI_CHECK(IsInt64(expert_offsets.dtype()) && expert_offsets.shape()[0] == E + 1, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "expert_offsets") << "an int64 tensor of shape [" << E + 1
      << "], got " << expert_offsets.dtype() << " of shape " << ShapeStr(expert_offsets);
}

/*! \brief Checks of an optional int32 row index `[rows]` (rows: the GEMM's M). */
void CheckRowIndex(const char* op, const char* name, const TensorView& t, int64_t rows) {
  CheckNdim(op, name, t, 1, "[num_rows]");
  TVM_FFI_CHECK(IsInt32(t.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "of dtype int32, got " << t.dtype();
  TVM_FFI_CHECK(t.shape()[0] == rows, ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "of shape [" << rows << "], got " << ShapeStr(t);
}

/*! \brief Contiguity and device checks of the GEMM operands and the output. */
void CheckGemmLayout(const char* op, const TensorView& out, const TensorView& x,
                     const TensorView& w, const TensorView& expert_offsets) {
  CheckContiguous(op, "out", out);
  CheckContiguous(op, "x", x);
  CheckContiguous(op, "w", w);
  CheckContiguous(op, "expert_offsets", expert_offsets);
  CheckCuda(op, "x", x);
  CheckSameDevice(op, "w", w, "x", x);
  CheckSameDevice(op, "out", out, "x", x);
  CheckSameDevice(op, "expert_offsets", expert_offsets, "x", x);
  TVM_FFI_CHECK(elementwise::IsAligned(DataPtr(x), 16) && elementwise::IsAligned(DataPtr(w), 16),
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "and 'w' 16-byte aligned (fresh or contiguous "
      << "allocations are), got a view at an unaligned offset";
}

/*! \brief Column tiles of the grid (the narrowest output tile: 128, or 64 gated columns). */
void CheckColumnTiles(const char* op, int64_t out_cols, int64_t narrowest_tile) {
  const int64_t n_tiles = (out_cols + narrowest_tile - 1) / narrowest_tile;
  TVM_FFI_CHECK(n_tiles <= 65535, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "w") << "at most " << 65535 * narrowest_tile
      << " output features, got " << out_cols;
}

moe::GemmParams BaseParams(const TensorView& out, const TensorView& x, const TensorView& w,
                           const TensorView& expert_offsets) {
  moe::GemmParams p{};
  p.out = DataPtr(out);
  p.x = DataPtr(x);
  p.w = DataPtr(w);
  p.offsets = reinterpret_cast<const int64_t*>(DataPtr(expert_offsets));
  p.K = x.shape()[1];
  p.E = w.shape()[0];
  p.N = w.shape()[1];
  p.x_rows = x.shape()[0];
  p.M = p.x_rows;
  p.out_rows = out.shape()[0];
  return p;
}

template <moe::Epilogue kEpi>
void Dispatch(Variant requested, const TensorView& x, const moe::GemmParams& p) {
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const Variant v = ChooseVariant(requested, GetDeviceInfo(dev.device_id), p.M, p.N, p.E);
  const cudaStream_t stream = elementwise::EnvStream(dev);
  if (x.dtype().code == kDLBfloat) {
    Launch<moe::Bf16, kEpi>(v, p, dev.device_id, stream);
  } else {
    Launch<moe::Fp16, kEpi>(v, p, dev.device_id, stream);
  }
  elementwise::CheckLaunch();
}

/*! \brief CACHEFLOW_MOE_GEMM for the fused variants: "wmma" means the automatic choice. */
Variant FusedVariantFromEnv() {
  const Variant v = VariantFromEnv();
  return v == Variant::kWmma ? Variant::kAuto : v;
}

void MoeGroupedGemm(TensorView out, TensorView x, TensorView w, TensorView expert_offsets) {
  constexpr const char* kOp = "moe_grouped_gemm";
  CheckGemmOperands(kOp, x, w, expert_offsets, "[num_experts, out_features, in_features]");
  const int64_t M = x.shape()[0];
  const int64_t N = w.shape()[1];
  CheckNdim(kOp, "out", out, 2, "[num_rows, out_features]");
  TVM_FFI_CHECK(out.shape()[0] == M && out.shape()[1] == N, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << M << ", " << N << "], got "
      << ShapeStr(out);
  elementwise::CheckDtypeLike(kOp, "out", out, "x", x);
  CheckGemmLayout(kOp, out, x, w, expert_offsets);
  if (M == 0 || N == 0) return;
  CheckColumnTiles(kOp, N, 128);
  moe::GemmParams p = BaseParams(out, x, w, expert_offsets);
  // 16-byte stores of 8 outputs when every row starts aligned.
  p.out_vec = N % 8 == 0 && elementwise::IsAligned(DataPtr(out), 16);
  Dispatch<moe::Epilogue::kStore>(VariantFromEnv(), x, p);
}

void MoeGroupedGemmIndexed(TensorView out, TensorView x, TensorView w, TensorView expert_offsets,
                           Optional<TensorView> row_index, Optional<TensorView> out_index,
                           Optional<TensorView> out_scale) {
  constexpr const char* kOp = "moe_grouped_gemm";
  CheckGemmOperands(kOp, x, w, expert_offsets, "[num_experts, out_features, in_features]");
  const int64_t x_rows = x.shape()[0];
  const int64_t N = w.shape()[1];
  // The GEMM's rows: those of the index arrays, else those of x.
  int64_t M = x_rows;
  if (row_index.has_value()) {
    CheckNdim(kOp, "row_index", *row_index, 1, "[num_rows]");
    M = (*row_index).shape()[0];
  } else if (out_index.has_value()) {
    CheckNdim(kOp, "out_index", *out_index, 1, "[num_rows]");
    M = (*out_index).shape()[0];
  }
  if (row_index.has_value()) CheckRowIndex(kOp, "row_index", *row_index, M);
  if (out_index.has_value()) CheckRowIndex(kOp, "out_index", *out_index, M);
  CheckNdim(kOp, "out", out, 2, "[out_rows, out_features]");
  const int64_t out_rows = out.shape()[0];
  if (out_index.has_value()) {
    TVM_FFI_CHECK(out.shape()[1] == N, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [out_rows, " << N << "], got "
        << ShapeStr(out);
  } else {
    TVM_FFI_CHECK(out_rows == M && out.shape()[1] == N, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << M << ", " << N << "], got "
        << ShapeStr(out);
  }
  elementwise::CheckDtypeLike(kOp, "out", out, "x", x);
  if (out_scale.has_value()) {
    CheckNdim(kOp, "out_scale", *out_scale, 1, "[out_rows]");
    TVM_FFI_CHECK(IsFloat32((*out_scale).dtype()) && (*out_scale).shape()[0] == out_rows,
                  ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "out_scale") << "a float32 tensor of shape [" << out_rows
        << "], got " << (*out_scale).dtype() << " of shape " << ShapeStr(*out_scale);
  }
  TVM_FFI_CHECK(M <= INT32_MAX && x_rows <= INT32_MAX && out_rows <= INT32_MAX, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "and 'out' of fewer than 2^31 rows with indices, got "
      << ShapeStr(x) << " and " << ShapeStr(out);
  CheckGemmLayout(kOp, out, x, w, expert_offsets);
  for (const auto& [name, t] : {std::make_pair("row_index", row_index),
                                std::make_pair("out_index", out_index),
                                std::make_pair("out_scale", out_scale)}) {
    if (!t.has_value()) continue;
    CheckContiguous(kOp, name, *t);
    CheckSameDevice(kOp, name, *t, "x", x);
  }
  if (M == 0 || N == 0) return;
  CheckColumnTiles(kOp, N, 128);
  moe::GemmParams p = BaseParams(out, x, w, expert_offsets);
  p.M = M;
  p.row_index = row_index.has_value()
                    ? reinterpret_cast<const int32_t*>(DataPtr(*row_index)) : nullptr;
  p.out_index = out_index.has_value()
                    ? reinterpret_cast<const int32_t*>(DataPtr(*out_index)) : nullptr;
  p.out_scale = out_scale.has_value()
                    ? reinterpret_cast<const float*>(DataPtr(*out_scale)) : nullptr;
  p.out_vec = N % 8 == 0 && elementwise::IsAligned(DataPtr(out), 16);
  Dispatch<moe::Epilogue::kIndexed>(FusedVariantFromEnv(), x, p);
}

void MoeGroupedGemmGated(TensorView out, TensorView x, TensorView w, TensorView expert_offsets,
                         Optional<TensorView> row_index, tvm::ffi::String activation) {
  constexpr const char* kOp = "moe_grouped_gemm_gated";
  CheckGemmOperands(kOp, x, w, expert_offsets,
                    "[num_experts, 2 * intermediate, in_features]");
  const int64_t x_rows = x.shape()[0];
  const int64_t N = w.shape()[1];
  TVM_FFI_CHECK(N % 2 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "w") << "of shape [num_experts, 2 * intermediate, "
      << "in_features] (gate rows, then up rows: an even count), got " << ShapeStr(w);
  const int64_t inter = N / 2;
  const std::string act(activation);
  moe::Activation a;
  if (act == "silu") {
    a = moe::Activation::kSilu;
  } else if (act == "gelu") {
    a = moe::Activation::kGelu;
  } else if (act == "gelu_tanh") {
    a = moe::Activation::kGeluTanh;
  } else {
    TVM_FFI_THROW(ValueError) << CACHEFLOW_ARG_ERROR(kOp, "activation")
                              << "'silu', 'gelu' or 'gelu_tanh', got '" << act << "'";
  }
  int64_t M = x_rows;
  if (row_index.has_value()) {
    CheckNdim(kOp, "row_index", *row_index, 1, "[num_rows]");
    M = (*row_index).shape()[0];
    CheckRowIndex(kOp, "row_index", *row_index, M);
  }
  CheckNdim(kOp, "out", out, 2, "[num_rows, intermediate]");
  TVM_FFI_CHECK(out.shape()[0] == M && out.shape()[1] == inter, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << M << ", " << inter << "], got "
      << ShapeStr(out);
  elementwise::CheckDtypeLike(kOp, "out", out, "x", x);
  TVM_FFI_CHECK(M <= INT32_MAX && x_rows <= INT32_MAX, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "of fewer than 2^31 rows, got " << ShapeStr(x);
  CheckGemmLayout(kOp, out, x, w, expert_offsets);
  if (row_index.has_value()) {
    CheckContiguous(kOp, "row_index", *row_index);
    CheckSameDevice(kOp, "row_index", *row_index, "x", x);
  }
  if (M == 0 || inter == 0) return;
  CheckColumnTiles(kOp, inter, 64);
  moe::GemmParams p = BaseParams(out, x, w, expert_offsets);
  p.M = M;
  p.row_index = row_index.has_value()
                    ? reinterpret_cast<const int32_t*>(DataPtr(*row_index)) : nullptr;
  p.act = static_cast<int>(a);
  p.out_vec = inter % 8 == 0 && elementwise::IsAligned(DataPtr(out), 16);
  if (a == moe::Activation::kSilu) {
    Dispatch<moe::Epilogue::kGatedSilu>(FusedVariantFromEnv(), x, p);
  } else {
    Dispatch<moe::Epilogue::kGatedGelu>(FusedVariantFromEnv(), x, p);
  }
}

/*! \brief int32 or int64 (the expert ids torch.topk returns, or their int32 copy). */
inline bool IsIdDtype(DLDataType dt) {
  return dt.lanes == 1 && dt.code == kDLInt && (dt.bits == 32 || dt.bits == 64);
}

void MoeSortByExpert(TensorView expert_offsets, TensorView sorted_pairs, TensorView token_index,
                     TensorView topk_ids) {
  constexpr const char* kOp = "moe_sort_by_expert";
  CheckNdim(kOp, "topk_ids", topk_ids, 2, "[num_tokens, top_k]");
  TVM_FFI_CHECK(IsIdDtype(topk_ids.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "topk_ids") << "of dtype int32 or int64, got "
      << topk_ids.dtype();
  const int64_t top_k = topk_ids.shape()[1];
  const int64_t pairs = topk_ids.shape()[0] * top_k;
  TVM_FFI_CHECK(top_k > 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "topk_ids") << "of shape [num_tokens, top_k] with top_k >= 1, "
      << "got " << ShapeStr(topk_ids);
  TVM_FFI_CHECK(pairs <= INT32_MAX, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "topk_ids") << "of fewer than 2^31 elements, got "
      << ShapeStr(topk_ids);
  CheckNdim(kOp, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  TVM_FFI_CHECK(IsInt64(expert_offsets.dtype()) && expert_offsets.shape()[0] >= 2, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "expert_offsets") << "an int64 tensor of shape "
      << "[num_experts + 1] with num_experts >= 1, got " << expert_offsets.dtype()
      << " of shape " << ShapeStr(expert_offsets);
  const int64_t E = expert_offsets.shape()[0] - 1;
  TVM_FFI_CHECK(E < INT32_MAX, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "expert_offsets") << "of fewer than 2^31 elements, got "
      << ShapeStr(expert_offsets);
  for (const auto& [name, t] : {std::make_pair("sorted_pairs", sorted_pairs),
                                std::make_pair("token_index", token_index)}) {
    CheckNdim(kOp, name, t, 1, "[num_tokens * top_k]");
    TVM_FFI_CHECK(IsInt32(t.dtype()) && t.shape()[0] == pairs, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, name) << "an int32 tensor of shape [" << pairs << "], got "
        << t.dtype() << " of shape " << ShapeStr(t);
  }
  for (const auto& [name, t] : {std::make_pair("expert_offsets", expert_offsets),
                                std::make_pair("sorted_pairs", sorted_pairs),
                                std::make_pair("token_index", token_index),
                                std::make_pair("topk_ids", topk_ids)}) {
    CheckContiguous(kOp, name, t);
  }
  CheckCuda(kOp, "topk_ids", topk_ids);
  CheckSameDevice(kOp, "expert_offsets", expert_offsets, "topk_ids", topk_ids);
  CheckSameDevice(kOp, "sorted_pairs", sorted_pairs, "topk_ids", topk_ids);
  CheckSameDevice(kOp, "token_index", token_index, "topk_ids", topk_ids);
  const DLDevice dev = topk_ids.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const cudaStream_t stream = elementwise::EnvStream(dev);
  auto* offsets = reinterpret_cast<int64_t*>(DataPtr(expert_offsets));
  auto* sorted = reinterpret_cast<int32_t*>(DataPtr(sorted_pairs));
  auto* tokens = reinterpret_cast<int32_t*>(DataPtr(token_index));
  // Launched even without pairs: the offsets are written (all zero).
  const dim3 grid(static_cast<unsigned>(E + 1));
  if (topk_ids.dtype().bits == 64) {
    moe::SortByExpertKernel<int64_t><<<grid, moe::kSortThreads, moe::kSortSmemBytes, stream>>>(
        reinterpret_cast<const int64_t*>(DataPtr(topk_ids)), pairs, top_k, E, offsets, sorted,
        tokens);
  } else {
    moe::SortByExpertKernel<int32_t><<<grid, moe::kSortThreads, moe::kSortSmemBytes, stream>>>(
        reinterpret_cast<const int32_t*>(DataPtr(topk_ids)), pairs, top_k, E, offsets, sorted,
        tokens);
  }
  elementwise::CheckLaunch();
}

template <typename T, typename IdT, bool kVec>
void LaunchSum(uint16_t* out, const uint16_t* x, const void* ids, int64_t tokens, int64_t top_k,
               int64_t H, int64_t E, cudaStream_t stream) {
  const int64_t threads = tokens * (kVec ? H / 8 : H);
  const dim3 grid(static_cast<unsigned>((threads + moe::kSumThreads - 1) / moe::kSumThreads));
  moe::SumTopkKernel<T, IdT, kVec><<<grid, moe::kSumThreads, 0, stream>>>(
      out, x, static_cast<const IdT*>(ids), tokens, top_k, H, E);
}

template <typename T>
void LaunchSumFor(bool ids64, bool vec, uint16_t* out, const uint16_t* x, const void* ids,
                  int64_t tokens, int64_t top_k, int64_t H, int64_t E, cudaStream_t stream) {
  if (ids64) {
    if (vec) {
      LaunchSum<T, int64_t, true>(out, x, ids, tokens, top_k, H, E, stream);
    } else {
      LaunchSum<T, int64_t, false>(out, x, ids, tokens, top_k, H, E, stream);
    }
  } else if (vec) {
    LaunchSum<T, int32_t, true>(out, x, ids, tokens, top_k, H, E, stream);
  } else {
    LaunchSum<T, int32_t, false>(out, x, ids, tokens, top_k, H, E, stream);
  }
}

void MoeSumTopk(TensorView out, TensorView x, TensorView topk_ids, int64_t num_experts) {
  constexpr const char* kOp = "moe_sum_topk";
  CheckNdim(kOp, "x", x, 3, "[num_tokens, top_k, hidden]");
  TVM_FFI_CHECK(IsHalfDtype(x.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "float16 or bfloat16, got " << x.dtype();
  const int64_t tokens = x.shape()[0];
  const int64_t top_k = x.shape()[1];
  const int64_t H = x.shape()[2];
  CheckNdim(kOp, "out", out, 2, "[num_tokens, hidden]");
  TVM_FFI_CHECK(out.shape()[0] == tokens && out.shape()[1] == H, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << tokens << ", " << H << "], got "
      << ShapeStr(out);
  elementwise::CheckDtypeLike(kOp, "out", out, "x", x);
  CheckNdim(kOp, "topk_ids", topk_ids, 2, "[num_tokens, top_k]");
  TVM_FFI_CHECK(IsIdDtype(topk_ids.dtype()) && topk_ids.shape()[0] == tokens &&
                    topk_ids.shape()[1] == top_k,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "topk_ids") << "an int32 or int64 tensor of shape [" << tokens
      << ", " << top_k << "], got " << topk_ids.dtype() << " of shape " << ShapeStr(topk_ids);
  TVM_FFI_CHECK(num_experts > 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "num_experts") << "positive, got " << num_experts;
  CheckContiguous(kOp, "out", out);
  CheckContiguous(kOp, "x", x);
  CheckContiguous(kOp, "topk_ids", topk_ids);
  CheckCuda(kOp, "x", x);
  CheckSameDevice(kOp, "out", out, "x", x);
  CheckSameDevice(kOp, "topk_ids", topk_ids, "x", x);
  if (tokens == 0 || H == 0) return;
  const bool vec = H % 8 == 0 && elementwise::IsAligned(DataPtr(x), 16) &&
                   elementwise::IsAligned(DataPtr(out), 16);
  const int64_t threads = tokens * (vec ? H / 8 : H);
  TVM_FFI_CHECK((threads + moe::kSumThreads - 1) / moe::kSumThreads <= INT32_MAX, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "smaller, got " << ShapeStr(x);
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const cudaStream_t stream = elementwise::EnvStream(dev);
  auto* o = reinterpret_cast<uint16_t*>(DataPtr(out));
  const auto* xs = reinterpret_cast<const uint16_t*>(DataPtr(x));
  const void* ids = DataPtr(topk_ids);
  const bool ids64 = topk_ids.dtype().bits == 64;
  if (x.dtype().code == kDLBfloat) {
    LaunchSumFor<moe::Bf16>(ids64, vec, o, xs, ids, tokens, top_k, H, num_experts, stream);
  } else {
    LaunchSumFor<moe::Fp16>(ids64, vec, o, xs, ids, tokens, top_k, H, num_experts, stream);
  }
  elementwise::CheckLaunch();
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_grouped_gemm, cacheflow::MoeGroupedGemm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_grouped_gemm_indexed, cacheflow::MoeGroupedGemmIndexed);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_grouped_gemm_gated, cacheflow::MoeGroupedGemmGated);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_sort_by_expert, cacheflow::MoeSortByExpert);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(moe_sum_topk, cacheflow::MoeSumTopk);
