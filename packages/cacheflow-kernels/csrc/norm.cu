// rms_norm and fused_add_rms_norm: RMS layer norm of LLaMA, computed like HF LlamaRMSNorm.
//
// Layouts (all C-contiguous, one dtype: float16, bfloat16 or float32):
//   x, out, residual:  [num_tokens, hidden]
//   weight:            [hidden]
//
//   rms_norm:            out = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(dtype)
//   fused_add_rms_norm:  residual = (x + residual).to(dtype)     (in place)
//                        x = rms_norm(residual)                   (in place)
// The sum of squares is reduced in float32; the final product with the weight is rounded like a
// torch multiply in the input dtype (float32 math, one rounding).
//
// Work split: a warp per token when the row has at most 128 accesses (four tokens per 128-thread
// block), else a block per token. Rows are read in 16-byte accesses when the hidden size and all
// pointers allow it, else element by element. A row of up to 16 accesses per thread of a
// 256-thread block (hidden <= 16k for float32, 32k for 16-bit types with 16-byte accesses, 4k
// element by element) stays in registers between the reduction and the write, so x (and
// residual) are read from memory once; longer rows are read twice (512-thread blocks).
// rms_norm prefers 128-thread blocks with up to 8 accesses per thread (hidden 4096 in 16-bit
// types: 4 loads per thread in flight instead of 2): fused_add_rms_norm already has twice the
// loads in flight (x and residual) and keeps the 256-thread choice.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using namespace elementwise;  // NOLINT(build/namespaces)

constexpr int kCachedThreads = 256;    // block per token, row cached in registers
constexpr int kUncachedThreads = 512;  // block per token, row read twice
constexpr int kWarpBlockThreads = 128;  // warp per token: 4 tokens per block
constexpr int kMaxWarpVecs = 32 * 4;  // rows of at most this many accesses use a warp
constexpr int kMaxVpt = 16;            // accesses per thread cached in registers, at most
constexpr int kNormTargetThreads = 128;  // rms_norm: preferred block size, block per token
constexpr int kNormMaxVpt = 8;           // ... with at most this many accesses per thread

/*! \brief Sum over the threads of one token: its warp, or its block. */
template <bool kWarp>
__device__ __forceinline__ float TokenSum(float v) {
  if constexpr (kWarp) {
    return WarpSum(v);
  } else {
    return BlockSum(v);
  }
}

/*!
 * \brief RMS norm of one token per warp (kWarp) or per block.
 * \tparam N elements per access (16 bytes, or 1 when unaligned).
 * \tparam VPT accesses per thread kept in registers; 0: no cache, x is read twice.
 * \tparam kAdd fused_add_rms_norm: residual += x first (written back), normalise the sum.
 *
 * `out` may equal `x` (fused_add_rms_norm writes x in place): every element is read and later
 * written by the same thread, so the pointers are not __restrict__.
 */
template <typename T, int N, int VPT, bool kWarp, bool kAdd>
__global__ void __launch_bounds__(kWarp ? kWarpBlockThreads
                                         : (VPT > 0 ? kCachedThreads : kUncachedThreads))
    RmsNormKernel(T* out, const T* x, T* residual, const T* __restrict__ weight,
                  int64_t num_tokens, int64_t hidden, float eps) {
  // The weight is read only after the reduction; the first block fetches it into L2 before the
  // wait (the kernel before this one does not write it), so that read is not a DRAM round trip:
  // in a decode step each layer's norm weight has left L2 since the step before. One block
  // suffices: every block reads the same weight.
  if (blockIdx.x == 0) {
    PrefetchL2(weight, hidden * static_cast<int64_t>(sizeof(T)), threadIdx.x, blockDim.x);
  }
  PdlWaitForPrevious();  // before reading the activations (pdl.cuh)
  using V = Vec<T, N>;
  int64_t token;
  int lane, stride;
  if constexpr (kWarp) {
    token = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    lane = threadIdx.x & 31;
    stride = 32;
    if (token >= num_tokens) return;  // whole warps only: no block barrier in this mode
  } else {
    token = blockIdx.x;
    lane = threadIdx.x;
    stride = blockDim.x;
  }
  const int64_t vecs = hidden / N;
  const V* xv = reinterpret_cast<const V*>(x + token * hidden);
  V* rv = kAdd ? reinterpret_cast<V*>(residual + token * hidden) : nullptr;
  V* ov = reinterpret_cast<V*>(out + token * hidden);
  const V* wv = reinterpret_cast<const V*>(weight);

  float sum_sq = 0.0f;
  if constexpr (VPT > 0) {
    // Zero-initialised: lanes past the row keep defined values (ptxas otherwise spills them).
    V cache[VPT] = {};
    V res[kAdd ? VPT : 1] = {};
    // All loads first, so that they are in flight together.
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = lane + static_cast<int64_t>(k) * stride;
      if (i < vecs) {
        cache[k] = xv[i];
        if constexpr (kAdd) res[k] = rv[i];
      }
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = lane + static_cast<int64_t>(k) * stride;
      if (i < vecs) {
        if constexpr (kAdd) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            cache[k].v[j] = FromFloat<T>(ToFloat(cache[k].v[j]) + ToFloat(res[k].v[j]));
          }
          rv[i] = cache[k];
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float f = ToFloat(cache[k].v[j]);
          sum_sq += f * f;
        }
      }
    }
    sum_sq = TokenSum<kWarp>(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = lane + static_cast<int64_t>(k) * stride;
      if (i < vecs) {
        // The weight is read after the reduction (an L2 hit: fetched before the wait, and
        // shared by all tokens): loading it up front costs registers, and occupancy matters
        // more here.
        const V w = wv[i];
        V o;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float normed = RoundTo<T>(ToFloat(cache[k].v[j]) * inv_rms);
          o.v[j] = FromFloat<T>(normed * ToFloat(w.v[j]));
        }
        ov[i] = o;
      }
    }
  } else {
    for (int64_t i = lane; i < vecs; i += stride) {
      V v = xv[i];
      if constexpr (kAdd) {
        const V r = rv[i];
#pragma unroll
        for (int j = 0; j < N; ++j) v.v[j] = FromFloat<T>(ToFloat(v.v[j]) + ToFloat(r.v[j]));
        rv[i] = v;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float f = ToFloat(v.v[j]);
        sum_sq += f * f;
      }
    }
    sum_sq = TokenSum<kWarp>(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(hidden) + eps);
    for (int64_t i = lane; i < vecs; i += stride) {
      // The same thread wrote rv[i] / reads xv[i] above: program order suffices.
      const V v = kAdd ? rv[i] : xv[i];
      const V w = wv[i];
      V o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float normed = RoundTo<T>(ToFloat(v.v[j]) * inv_rms);
        o.v[j] = FromFloat<T>(normed * ToFloat(w.v[j]));
      }
      ov[i] = o;
    }
  }
}

template <typename T, int N, bool kAdd>
void LaunchWithWidth(T* out, const T* x, T* residual, const T* weight, int64_t num_tokens,
                     int64_t hidden, float eps, cudaStream_t stream) {
  const int64_t vecs = hidden / N;
  const auto launch = [&](auto kernel, unsigned grid, unsigned block) {
    LaunchChained(kernel, dim3(grid), dim3(block), 0, stream, out, x, residual, weight,
                  num_tokens, hidden, eps);
  };
  if (vecs <= kMaxWarpVecs) {
    constexpr int kTokensPerBlock = kWarpBlockThreads / 32;
    const auto grid = static_cast<unsigned>((num_tokens + kTokensPerBlock - 1) / kTokensPerBlock);
    const unsigned threads = kWarpBlockThreads;
    if (vecs <= 32) {
      launch(RmsNormKernel<T, N, 1, true, kAdd>, grid, threads);
    } else if (vecs <= 64) {
      launch(RmsNormKernel<T, N, 2, true, kAdd>, grid, threads);
    } else {
      launch(RmsNormKernel<T, N, 4, true, kAdd>, grid, threads);
    }
    return;
  }
  // Block per token: the fewest accesses per thread (1..16) that keep the block at <= 256
  // threads; longer rows go uncached with 512 threads.
  // bfloat16 with the residual add needs too many registers for 16 (ptxas spills): 8 at most.
  constexpr int kVptLimit = kAdd && std::is_same_v<T, __nv_bfloat16> ? kMaxVpt / 2 : kMaxVpt;
  int vpt = 0;
  // rms_norm (one input stream) first tries blocks of <= kNormTargetThreads threads with up to
  // kNormMaxVpt accesses each: more loads in flight per thread before the reduction, and more,
  // smaller blocks per SM (a block's barrier stalls fewer warps).
  if constexpr (!kAdd) {
    for (int v = 1; v <= kNormMaxVpt; v *= 2) {
      if ((vecs + v - 1) / v <= kNormTargetThreads) {
        vpt = v;
        break;
      }
    }
  }
  for (int v = 1; vpt == 0 && v <= kVptLimit; v *= 2) {
    if ((vecs + v - 1) / v <= kCachedThreads) {
      vpt = v;
      break;
    }
  }
  int64_t threads = kUncachedThreads;
  if (vpt > 0) threads = ((vecs + vpt - 1) / vpt + 31) / 32 * 32;
  const auto grid = static_cast<unsigned>(num_tokens);
  const auto block = static_cast<unsigned>(threads);
  switch (vpt) {
    case 1:
      launch(RmsNormKernel<T, N, 1, false, kAdd>, grid, block);
      break;
    case 2:
      launch(RmsNormKernel<T, N, 2, false, kAdd>, grid, block);
      break;
    case 4:
      launch(RmsNormKernel<T, N, 4, false, kAdd>, grid, block);
      break;
    case 8:
      launch(RmsNormKernel<T, N, 8, false, kAdd>, grid, block);
      break;
    case 16:
      if constexpr (kVptLimit >= 16) {
        launch(RmsNormKernel<T, N, 16, false, kAdd>, grid, block);
      }
      break;
    default:
      launch(RmsNormKernel<T, N, 0, false, kAdd>, grid, block);
  }
}

template <bool kAdd>
void Launch(char* out, char* x, char* residual, char* weight, DLDataType dtype,
            int64_t num_tokens, int64_t hidden, float eps, cudaStream_t stream) {
  DispatchFloat(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kN = kVec16<T>;
    const bool wide = hidden % kN == 0 &&
                      AllAligned({out, x, weight, kAdd ? residual : out}, 16);
    T* o = reinterpret_cast<T*>(out);
    const T* xi = reinterpret_cast<const T*>(x);
    T* r = reinterpret_cast<T*>(residual);
    const T* w = reinterpret_cast<const T*>(weight);
    if (wide) {
      LaunchWithWidth<T, kN, kAdd>(o, xi, r, w, num_tokens, hidden, eps, stream);
    } else {
      LaunchWithWidth<T, 1, kAdd>(o, xi, r, w, num_tokens, hidden, eps, stream);
    }
  });
  CheckLaunch();
}

void CheckEps(const char* op, double eps) {
  TVM_FFI_CHECK(std::isfinite(eps) && eps >= 0.0, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "eps") << "a finite float >= 0, got " << eps;
}

/*!
 * \brief The checks both ops share: x [num_tokens, hidden] (float), `other` (out or residual)
 * like x, weight [hidden] of x's dtype, eps, contiguity, one CUDA device, 32-bit token count.
 * \return false when there is nothing to compute (no tokens or hidden == 0).
 */
bool CheckNormArgs(const char* op, const TensorView& x, const char* other_name,
                   const TensorView& other, const TensorView& weight, double eps) {
  CheckNdim(op, "x", x, 2, "[num_tokens, hidden]");
  CheckFloatDtype(op, "x", x);
  CheckNdim(op, "weight", weight, 1, "[hidden]");
  CheckDtypeLike(op, "weight", weight, "x", x);
  TVM_FFI_CHECK(weight.shape()[0] == x.shape()[1], ValueError)
      << CACHEFLOW_ARG_ERROR(op, "weight") << "of shape [" << x.shape()[1]
      << "] (hidden of 'x'), got " << ShapeStr(weight);
  CheckNdim(op, other_name, other, 2, "[num_tokens, hidden]");
  CheckDtypeLike(op, other_name, other, "x", x);
  CheckShapeLike(op, other_name, other, "x", x);
  CheckEps(op, eps);
  CheckContiguous(op, "x", x);
  CheckContiguous(op, other_name, other);
  CheckContiguous(op, "weight", weight);
  CheckCuda(op, "x", x);
  CheckSameDevice(op, other_name, other, "x", x);
  CheckSameDevice(op, "weight", weight, "x", x);
  const int64_t num_tokens = x.shape()[0];
  TVM_FFI_CHECK(num_tokens <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "at most 2^31-1 tokens, got " << num_tokens;
  return num_tokens != 0 && x.shape()[1] != 0;
}

void RmsNorm(TensorView out, TensorView x, TensorView weight, double eps) {
  if (!CheckNormArgs("rms_norm", x, "out", out, weight, eps)) return;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  Launch<false>(DataPtr(out), DataPtr(x), nullptr, DataPtr(weight), x.dtype(), x.shape()[0],
                x.shape()[1], static_cast<float>(eps), EnvStream(dev));
}

void FusedAddRmsNorm(TensorView x, TensorView residual, TensorView weight, double eps) {
  if (!CheckNormArgs("fused_add_rms_norm", x, "residual", residual, weight, eps)) return;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  Launch<true>(DataPtr(x), DataPtr(x), DataPtr(residual), DataPtr(weight), x.dtype(),
               x.shape()[0], x.shape()[1], static_cast<float>(eps), EnvStream(dev));
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(rms_norm, cacheflow::RmsNorm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(fused_add_rms_norm, cacheflow::FusedAddRmsNorm);
