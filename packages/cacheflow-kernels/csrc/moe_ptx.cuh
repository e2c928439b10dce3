// Warp-level primitives of the mixture-of-experts kernels (moe_kernels.cuh) beyond those of
// paged_prefill_ptx.cuh (ldmatrix, mma.sync, cp.async, packing, barriers), which they share:
// the dynamic shared memory of a CTA, integer shuffles and ballots, and 16-bit unpacking.
//
// Like paged_prefill_ptx.cuh, the kernels touch the hardware only through these functions, so
// the host emulation of tests/emulation (selected by CACHEFLOW_MOE_EMULATE, which also needs
// CACHEFLOW_PREFILL_EMULATE for the shared primitives) runs the same kernel source on a CPU.
#pragma once

#include <cstdint>

#include "paged_prefill_ptx.cuh"

#if defined(CACHEFLOW_MOE_EMULATE)
#include "moe_emu.h"
#else

#define MOE_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)

namespace cacheflow {
namespace moe {

/*!
 * \brief The dynamic shared memory of the CTA. 128-byte aligned: a swizzle period of the GEMM's
 * stage tiles is 8 rows of 128 bytes.
 */
CF_DEVICE unsigned char* MoeSmem() {
  extern __shared__ __align__(128) unsigned char cf_moe_smem[];
  return cf_moe_smem;
}

/*! \brief __shfl_up_sync over the full warp (lanes below `delta` keep their own value). */
CF_DEVICE int64_t ShflUp(int64_t v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
CF_DEVICE int ShflUp(int v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }

/*! \brief The value of lane `src` (full warp). */
CF_DEVICE int64_t ShflIdx(int64_t v, int src) { return __shfl_sync(0xffffffffu, v, src); }

/*! \brief The value of lane (lane ^ mask) (full warp). */
CF_DEVICE int ShflXorInt(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

/*! \brief Bit i set where lane i's predicate holds (full warp). */
CF_DEVICE uint32_t Ballot(bool pred) { return __ballot_sync(0xffffffffu, pred); }

/*! \brief 1 + the index of the lowest set bit (0 for 0), and the number of set bits. */
CF_DEVICE int Ffs(uint32_t v) { return __ffs(static_cast<int>(v)); }
CF_DEVICE int Popc(uint32_t v) { return __popc(v); }

/*! \brief e^x with the fast approximate exponential (MUFU.EX2, about 2 ulp). */
CF_DEVICE float ExpApprox(float x) { return __expf(x); }

/*! \brief a / b with one reciprocal (MUFU.RCP); 0 for |b| > 2^126 (e.g. +inf). */
CF_DEVICE float DivApprox(float a, float b) { return __fdividef(a, b); }

/*! \brief The low / high 16-bit element of a packed pair of T (a prefill::Fp16/Bf16 tag). */
template <class T>
CF_DEVICE float LowToFloat(uint32_t w);
template <class T>
CF_DEVICE float HighToFloat(uint32_t w);
template <>
CF_DEVICE float LowToFloat<prefill::Fp16>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <>
CF_DEVICE float HighToFloat<prefill::Fp16>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <>
CF_DEVICE float LowToFloat<prefill::Bf16>(uint32_t w) { return __uint_as_float(w << 16); }
template <>
CF_DEVICE float HighToFloat<prefill::Bf16>(uint32_t w) {
  return __uint_as_float(w & 0xffff0000u);
}

}  // namespace moe
}  // namespace cacheflow

#endif  // CACHEFLOW_MOE_EMULATE
