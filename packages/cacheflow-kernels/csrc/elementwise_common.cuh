// Helpers of the element-wise kernels (norms, rotary embedding, activations, block copies):
// vector types, float conversions, dtype dispatch, host-side argument checks.
//
// Host checks raise ValueError with messages of the form
// "<op>: argument '<name>' must be <expected>, got <actual>", like those of common.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "common.h"
#include "pdl.cuh"
#include "pdl_launch.cuh"

namespace cacheflow {
namespace elementwise {

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

/*! \brief Fetches the 128-byte lines of [p, p + bytes) into L2 (no registers, no result): thread
 * `lane` of `stride` threads takes lines lane, lane + stride, ... A kernel launched with PDL
 * issues this before its wait for data the kernel before it does not write (weights), so the
 * DRAM round trip overlaps that kernel's tail. */
__device__ __forceinline__ void PrefetchL2(const void* p, int64_t bytes, int lane, int stride) {
  const char* base = static_cast<const char*>(p);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes;
       off += static_cast<int64_t>(stride) * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
  }
}

/*! \brief N elements of T, aligned to their total size: one 16/8/4/2-byte access. */
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

/*! \brief float -> T, round to nearest even (what torch's `.to(dtype)` does). */
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/*! \brief x rounded to T and back: the value a torch op with output dtype T would produce. */
template <typename T>
__device__ __forceinline__ float RoundTo(float x) {
  return ToFloat(FromFloat<T>(x));
}

/*! \brief a*c - b*s (kMinus) or a*c + b*s, each step rounded to T like torch's eager ops (the
 * rotary embedding's arithmetic). */
template <typename T, bool kMinus>
__device__ __forceinline__ float Rotate(float a, float c, float b, float s) {
  const float ac = RoundTo<T>(__fmul_rn(a, c));
  const float bs = RoundTo<T>(__fmul_rn(b, s));
  return kMinus ? __fsub_rn(ac, bs) : __fadd_rn(ac, bs);
}

/*!
 * \brief Rotates one neox-style unit of a head: x1 = its N features from i0, x2 = their partners
 * `half` further; `cos_sin` is the token's [cos | sin] row (half values each), rounded to T.
 */
template <typename T, int N>
__device__ __forceinline__ void RotateNeoxUnit(const float* cos_sin, int half, int i0,
                                               const Vec<T, N>& x1, const Vec<T, N>& x2,
                                               Vec<T, N>& y1, Vec<T, N>& y2) {
#pragma unroll
  for (int m = 0; m < N; ++m) {
    const float c = cos_sin[i0 + m];
    const float s = cos_sin[half + i0 + m];
    const float a = ToFloat(x1.v[m]);
    const float b = ToFloat(x2.v[m]);
    y1.v[m] = FromFloat<T>(Rotate<T, true>(a, c, b, s));   // x1*cos - x2*sin
    y2.v[m] = FromFloat<T>(Rotate<T, false>(b, c, a, s));  // x2*cos + x1*sin
  }
}

/*! \brief Rotates one gpt-j-style unit: N interleaved features (N / 2 pairs) from i0. */
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> RotateGptjUnit(const float* cos_sin, int half, int i0,
                                                    const Vec<T, N>& x) {
  Vec<T, N> y;
#pragma unroll
  for (int m = 0; m < N / 2; ++m) {
    const int p = i0 / 2 + m;
    const float c = cos_sin[p];
    const float s = cos_sin[half + p];
    const float a = ToFloat(x.v[2 * m]);
    const float b = ToFloat(x.v[2 * m + 1]);
    y.v[2 * m] = FromFloat<T>(Rotate<T, true>(a, c, b, s));
    y.v[2 * m + 1] = FromFloat<T>(Rotate<T, false>(b, c, a, s));
  }
  return y;
}

/*! \brief x / scale as an E4M3 byte (round to nearest even, saturating at +-448): what an FP8 KV
 * cache stores. */
__device__ __forceinline__ uint8_t QuantizeFp8(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, __NV_E4M3));
}

/*! \brief Load N elements at `p` with accesses of W elements (W divides N; p aligned to W). */
template <typename T, int N, int W>
__device__ __forceinline__ Vec<T, N> LoadVec(const T* p) {
  static_assert(N % W == 0, "W must divide N");
  Vec<T, N> out;
#pragma unroll
  for (int q = 0; q < N / W; ++q) {
    reinterpret_cast<Vec<T, W>*>(out.v)[q] = reinterpret_cast<const Vec<T, W>*>(p)[q];
  }
  return out;
}

/*! \brief Store N elements at `p` with accesses of W elements. */
template <typename T, int N, int W>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, N>& x) {
  static_assert(N % W == 0, "W must divide N");
#pragma unroll
  for (int q = 0; q < N / W; ++q) {
    reinterpret_cast<Vec<T, W>*>(p)[q] = reinterpret_cast<const Vec<T, W>*>(x.v)[q];
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/*!
 * \brief Sum over the block, returned to every thread. blockDim.x must be a multiple of 32
 * (at most 1024); call at most once per kernel (the shared scratch is not re-synchronised).
 */
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[32];
  v = WarpSum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  return WarpSum(lane < num_warps ? partial[lane] : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

/*! \brief 16 / sizeof(T): elements in one 16-byte access. */
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

/*!
 * \brief Call `f(T{})` with T = __half, __nv_bfloat16 or float for a float16 / bfloat16 /
 * float32 dtype (checked by the caller with IsFloatKvDtype).
 */
template <typename F>
void DispatchFloat(DLDataType dtype, F&& f) {
  if (dtype.code == kDLBfloat) {
    f(__nv_bfloat16{});
  } else if (dtype.bits == 16) {
    f(__half{});
  } else {
    f(float{});
  }
}

/*! \brief True when `p` is a multiple of `bytes`. */
inline bool IsAligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

/*! \brief True when every pointer is a multiple of `bytes`. */
inline bool AllAligned(std::initializer_list<const void*> ptrs, int64_t bytes) {
  for (const void* p : ptrs) {
    if (!IsAligned(p, bytes)) return false;
  }
  return true;
}

/*! \brief Require float16, bfloat16 or float32. */
inline void CheckFloatDtype(const char* op, const char* name, const TensorView& t) {
  TVM_FFI_CHECK(IsFloatKvDtype(t.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "float16, bfloat16 or float32, got " << t.dtype();
}

/*! \brief Require the dtype of `ref` (named `ref_name`). */
inline void CheckDtypeLike(const char* op, const char* name, const TensorView& t,
                           const char* ref_name, const TensorView& ref) {
  TVM_FFI_CHECK(t.dtype() == ref.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << ref.dtype() << " like '" << ref_name << "', got "
      << t.dtype();
}

/*! \brief Require the shape of `ref` (named `ref_name`). */
inline void CheckShapeLike(const char* op, const char* name, const TensorView& t,
                           const char* ref_name, const TensorView& ref) {
  bool same = t.ndim() == ref.ndim();
  for (int32_t i = 0; same && i < t.ndim(); ++i) same = t.shape()[i] == ref.shape()[i];
  TVM_FFI_CHECK(same, ValueError) << CACHEFLOW_ARG_ERROR(op, name) << "of shape "
                                  << ShapeStr(ref) << " like '" << ref_name << "', got "
                                  << ShapeStr(t);
}

/*! \brief Launch check: surfaces launch errors (bad configuration, no device) as exceptions. */
/*! \brief The rotary ops' int32 index ranges: tokens, and features of a token's heads. */
inline void CheckRotaryExtent(const char* op, int64_t num_tokens, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_size) {
  TVM_FFI_CHECK(num_tokens <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "positions") << "at most 2^31-1 tokens, got " << num_tokens;
  TVM_FFI_CHECK((num_heads + num_kv_heads) * head_size <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "query") << "with (num_heads + num_kv_heads) * head_size "
      << "< 2^31, got " << (num_heads + num_kv_heads) * head_size;
}

inline void CheckLaunch() { TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError()); }

/*! \brief Stream of the current TVM-FFI environment (torch's current stream) for `dev`. */
inline cudaStream_t EnvStream(DLDevice dev) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));
}

}  // namespace elementwise
}  // namespace cacheflow
