// sm_90a warpgroup primitives of the Hopper prefill kernel (paged_prefill_wg_kernel.cuh) besides
// the MMAs themselves (wgmma_ops.cuh): wgmma fences, commit and wait, the generic-to-async proxy
// fence, and a 4-byte shared store. The CPU emulation (tests/emulation/prefill_emu.h) defines
// the same names.
#pragma once

#include <cstdint>

#include "wgmma_ops.cuh"

namespace cacheflow {
namespace prefill {

/*! \brief Orders this warpgroup's register accesses before the wgmmas that follow. */
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

/*! \brief Closes the group of this warpgroup's wgmmas issued since the last commit. */
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/*! \brief Waits until at most N committed wgmma groups of this warpgroup are in flight. */
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/*!
 * \brief Keeps the compiler from moving accesses of these accumulators across a wgmma wait:
 * the registers an asm wgmma names are written by the tensor cores only when the wait returns.
 */
template <int N>
__device__ __forceinline__ void WgmmaFenceOperand(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

/*!
 * \brief Keeps the registers of an A operand (P of O += P V) alive until here: a wgmma reads them
 * after it is issued, up to its wait, so nothing may be allocated into them before that.
 */
template <int N>
__device__ __forceinline__ void WgmmaFenceOperand(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
}

/*! \brief Makes this thread's shared-memory writes (cp.async, st.shared) visible to wgmma. */
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/*! \brief A 4-byte store to a shared-window address. */
__device__ __forceinline__ void StoreShared32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

}  // namespace prefill
}  // namespace cacheflow
