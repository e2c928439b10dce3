// Primitives of the skinny GEMM kernel (skinny_gemm_kernel.cuh): TMA bulk copies completed
// through mbarriers (sm_90) and number conversions; the element tags, shared-memory addresses,
// barriers, shuffles and 16-byte loads are the prefill kernels' (paged_prefill_ptx.cuh). The
// kernel touches the hardware only through these, so tests/emulation/skinny_emu.h can run the
// same source on a CPU.
#pragma once

#include <cstdint>

#include "paged_prefill_ptx.cuh"

namespace cacheflow {
namespace skinny {

using prefill::Bf16;
using prefill::DynamicSmem;
using prefill::Fp16;
using prefill::Load16;
using prefill::ShflXor;
using prefill::SmemU32;
using prefill::SyncCta;

}  // namespace skinny
}  // namespace cacheflow

#if defined(CACHEFLOW_SKINNY_EMULATE)
#include "skinny_emu.h"
#else

// TMA bulk copies and mbarrier transaction counts need sm_90; the library's older targets compile
// the kernel with traps in their place (the host launches it on 9.0+ only).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CF_SKINNY_SM90 1
#else
#define CF_SKINNY_SM90 0
#endif

namespace cacheflow {
namespace skinny {

/*! \brief An mbarrier expecting `count` arrivals per phase. */
CF_DEVICE void MbarInit(uint32_t bar, unsigned count) {
#if CF_SKINNY_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief Makes the mbarrier initializations visible to the async proxy (the bulk copies). */
CF_DEVICE void FenceMbarInit() {
#if CF_SKINNY_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief Orders this thread's generic-proxy shared-memory reads before later async-proxy
 * writes (the bulk copy that refills a slot just read): what the PTX memory model asks for
 * between accesses to one location through the two proxies. */
CF_DEVICE void FenceProxyAsync() {
#if CF_SKINNY_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief This thread's arrival on `bar`, announcing `bytes` of bulk copies to complete on it. */
CF_DEVICE void MbarArriveExpectTx(uint32_t bar, unsigned bytes) {
#if CF_SKINNY_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to
 * shared memory with the TMA engine; completes on `bar`. */
CF_DEVICE void BulkCopyG2S(uint32_t dst, const void* src, unsigned bytes, uint32_t bar) {
#if CF_SKINNY_SM90
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief Waits until the phase of `bar` with parity `parity` has completed. */
CF_DEVICE void MbarWait(uint32_t bar, unsigned parity) {
#if CF_SKINNY_SM90
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
#endif
}

/*! \brief 16 bytes of global memory read through L2 (x, bias). Not the read-only path (__ldg,
 * ld.global.nc): under PDL this kernel is already running while the kernel before it writes x,
 * and .nc requires data that no one writes during the kernel's lifetime (on an H200 it returned
 * the previous replay's x in a CUDA graph, 2026-12-05). */
CF_DEVICE uint4 LoadGlobal16(const void* p) {
#if CF_SKINNY_SM90
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
#else
  __trap();  // the host launches the kernel on compute capability 9.0+ only
  return uint4{};
#endif
}

/*! \brief The two 16-bit elements of `v` as floats (low half first). */
template <class T>
CF_DEVICE float2 Unpack2(uint32_t v);
template <>
CF_DEVICE float2 Unpack2<Fp16>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <>
CF_DEVICE float2 Unpack2<Bf16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

/*! \brief One element of type T from its 16 bits (the bias), and a float rounded to T. */
template <class T>
CF_DEVICE float ToFloat16Bits(uint16_t b);
template <>
CF_DEVICE float ToFloat16Bits<Fp16>(uint16_t b) { return __half2float(__ushort_as_half(b)); }
template <>
CF_DEVICE float ToFloat16Bits<Bf16>(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }
template <class T>
CF_DEVICE uint16_t FromFloat(float x);
template <>
CF_DEVICE uint16_t FromFloat<Fp16>(float x) { return __half_as_ushort(__float2half_rn(x)); }
template <>
CF_DEVICE uint16_t FromFloat<Bf16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

}  // namespace skinny
}  // namespace cacheflow

#endif  // CACHEFLOW_SKINNY_EMULATE
