// Warp-level primitives of the paged prefill attention kernel: ldmatrix, mma.sync m16n8k16,
// cp.async, ex2.approx, fp16/bf16 packing, shuffles and barriers.
//
// The kernel (paged_prefill_kernel.cuh) touches the hardware only through these functions, so a
// host emulation of them (tests/emulation/prefill_emu.h, selected by CACHEFLOW_PREFILL_EMULATE)
// can run the very same kernel source on a CPU: 32 host threads per warp, one CTA at a time. That
// is how the fragment layouts, the block-table gather and the pipeline are tested without a GPU.
//
// Shared-memory addresses are 32-bit offsets in the shared window (`smem_u32`), as PTX wants them.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(CACHEFLOW_PREFILL_EMULATE)
#include "prefill_emu.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#define CF_DEVICE __device__ __forceinline__
#define CF_GLOBAL __global__

namespace cacheflow {
namespace prefill {

/*! \brief Element-type tags of the tensor-core path (storage is 16-bit either way). */
struct Fp16 {};
struct Bf16 {};

/*! \brief The dynamic shared memory of the CTA (16-byte aligned). */
CF_DEVICE unsigned char* DynamicSmem() {
  extern __shared__ __align__(16) unsigned char cf_prefill_smem[];
  return cf_prefill_smem;
}

/*! \brief A generic pointer into shared memory as a 32-bit shared-window address. */
CF_DEVICE uint32_t SmemU32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

CF_DEVICE void SyncCta() { __syncthreads(); }
CF_DEVICE void SyncWarp() { __syncwarp(); }

CF_DEVICE float ShflXor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

/*! \brief Whether `pred` holds in any lane of the (full) warp. */
CF_DEVICE bool AnySync(bool pred) { return __any_sync(0xffffffffu, pred) != 0; }

/*! \brief Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. */
CF_DEVICE void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/*! \brief LdMatrixX4 with each 8x8 matrix transposed. */
CF_DEVICE void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/*! \brief d += a (16x16, row) * b (16x8, col), fp32 accumulators. */
template <class T>
CF_DEVICE void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
CF_DEVICE void Mma16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
CF_DEVICE void Mma16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/*! \brief Two floats rounded to the 16-bit type, `lo` in the low half (the lower column). */
template <class T>
CF_DEVICE uint32_t Pack2(float lo, float hi);

template <>
CF_DEVICE uint32_t Pack2<Fp16>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
CF_DEVICE uint32_t Pack2<Bf16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

/*!
 * \brief 16-byte asynchronous global->shared copy (L2 only). With `valid` false nothing is read
 * and the 16 bytes are zero-filled (`src` must still be a valid address).
 */
CF_DEVICE void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

CF_DEVICE void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/*! \brief Wait until at most N of this thread's committed groups are still in flight. */
template <int N>
CF_DEVICE void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/*! \brief 2^x (MUFU.EX2; -inf gives +0). */
CF_DEVICE float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/*! \brief A 16-byte word read from / written to a generic address (shared or global). */
CF_DEVICE uint4 Load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
CF_DEVICE void Store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

/*! \brief Storage type of an element-type tag, and conversions for the CUDA-core path. */
struct Fp32 {};
template <class Tag>
struct StorageOf;
template <>
struct StorageOf<Fp16> { using type = __half; };
template <>
struct StorageOf<Bf16> { using type = __nv_bfloat16; };
template <>
struct StorageOf<Fp32> { using type = float; };

CF_DEVICE float ToFloat(float x) { return x; }
CF_DEVICE float ToFloat(__half x) { return __half2float(x); }
CF_DEVICE float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class Tag>
CF_DEVICE typename StorageOf<Tag>::type FromFloat(float x);
template <>
CF_DEVICE float FromFloat<Fp32>(float x) { return x; }
template <>
CF_DEVICE __half FromFloat<Fp16>(float x) { return __float2half_rn(x); }
template <>
CF_DEVICE __nv_bfloat16 FromFloat<Bf16>(float x) { return __float2bfloat16_rn(x); }

/*! \brief exp(x), accurate (CUDA-core path). */
CF_DEVICE float Exp(float x) { return expf(x); }

/*! \brief tanh(x) (MUFU.TANH, max relative error about 2^-11): the logits soft cap. */
CF_DEVICE float Tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/*! \brief An FP8 E4M3 byte (low 8 bits) as a float (exact). */
CF_DEVICE float Fp8ByteToFloat(uint32_t b) {
  return __half2float(
      __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b & 0xffu), __NV_E4M3)));
}

/*!
 * \brief FP8 E4M3 caches on the tensor-core path: 8 cache bytes widened (exactly) to 8 elements
 * of T in one 16-byte shared-memory chunk; zeros when `valid` is false (nothing is read).
 */
template <class T>
struct Fp8Io {
  CF_DEVICE static uint32_t Widen2(uint32_t b) {
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(b & 0xffffu), __NV_E4M3);
    if constexpr (std::is_same<T, Fp16>::value) {
      return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
    } else {
      return Pack2<T>(__half2float(__half(__half_raw{h.x})), __half2float(__half(__half_raw{h.y})));
    }
  }
  CF_DEVICE static void Fill16(uint32_t dst, const unsigned char* src, bool valid) {
    uint4 w = make_uint4(0, 0, 0, 0);
    if (valid) {
      const uint2 b = *reinterpret_cast<const uint2*>(src);
      w = make_uint4(Widen2(b.x), Widen2(b.x >> 16), Widen2(b.y), Widen2(b.y >> 16));
    }
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(w.x), "r"(w.y),
                 "r"(w.z), "r"(w.w)
                 : "memory");
  }
};

}  // namespace prefill
}  // namespace cacheflow

#endif  // CACHEFLOW_PREFILL_EMULATE
