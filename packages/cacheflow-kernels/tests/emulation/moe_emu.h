// Host emulation of the primitives of csrc/moe_ptx.cuh, on top of prefill_emu.h (fibers, warp
// barriers, ldmatrix / mma.sync / cp.async), so that the mixture-of-experts kernels of
// csrc/moe_kernels.cuh run unchanged on a CPU (tests/test_kernels_moe_emulated.py).
//
// Shuffles and ballots exchange values through a per-warp slot array between two warp barriers,
// so every lane of the warp must take part (a divergent shuffle deadlocks and aborts the run),
// and compute what the PTX ISA specifies: shfl.up returns the lane's own value below `delta`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "prefill_emu.h"

#define MOE_LAUNCH_BOUNDS(threads, min_blocks)

namespace cacheflow {
namespace moe {

namespace emu {

constexpr int kMaxWarps = 64;
inline int64_t g_slots[kMaxWarps][32];

/*! \brief Every lane publishes `v`; returns the value of lane `src` (all 32 lanes call). */
inline int64_t Exchange(int64_t v, int src) {
  const int warp = cfemu::Warp();
  const int lane = cfemu::Lane();
  if (warp >= kMaxWarps) cfemu::Fail("moe emulation: more than 64 warps in a CTA");
  if (src < 0 || src > 31) cfemu::Fail("moe emulation: shuffle source lane out of range");
  g_slots[warp][lane] = v;
  cfemu::WarpBarrier();
  const int64_t r = g_slots[warp][src];
  cfemu::WarpBarrier();
  return r;
}

}  // namespace emu

inline unsigned char* MoeSmem() { return cfemu::g_cta->smem.data(); }

inline int64_t ShflUp(int64_t v, int delta) {
  const int lane = cfemu::Lane();
  const int64_t r = emu::Exchange(v, lane >= delta ? lane - delta : lane);
  return r;
}
inline int ShflUp(int v, int delta) {
  return static_cast<int>(ShflUp(static_cast<int64_t>(v), delta));
}
inline int64_t ShflIdx(int64_t v, int src) { return emu::Exchange(v, src); }
inline int ShflXorInt(int v, int mask) {
  return static_cast<int>(emu::Exchange(v, cfemu::Lane() ^ mask));
}

inline uint32_t Ballot(bool pred) {
  const int warp = cfemu::Warp();
  const int lane = cfemu::Lane();
  emu::g_slots[warp][lane] = pred ? 1 : 0;
  cfemu::WarpBarrier();
  uint32_t mask = 0;
  for (int l = 0; l < 32; ++l) mask |= emu::g_slots[warp][l] ? (1u << l) : 0u;
  cfemu::WarpBarrier();
  return mask;
}

inline float ExpApprox(float x) { return std::exp(x); }
inline float DivApprox(float a, float b) { return std::isinf(b) ? 0.0f * a : a / b; }

inline int Ffs(uint32_t v) { return __builtin_ffs(static_cast<int>(v)); }
inline int Popc(uint32_t v) { return __builtin_popcount(v); }

template <class T>
inline float LowToFloat(uint32_t w) {
  return prefill::Elem<T>(static_cast<uint16_t>(w & 0xffffu));
}
template <class T>
inline float HighToFloat(uint32_t w) {
  return prefill::Elem<T>(static_cast<uint16_t>(w >> 16));
}

}  // namespace moe
}  // namespace cacheflow
