// Host emulation of the primitives of csrc/skinny_gemm_ptx.cuh of its own (bulk copies,
// mbarriers, conversions), so that the skinny GEMM kernel (csrc/skinny_gemm_kernel.cuh,
// unchanged) runs on a CPU for tests. The rest (fibers, barriers, shuffles, tags) is
// prefill_emu.h's, which skinny_gemm_ptx.cuh brings in through paged_prefill_ptx.cuh.
//
// A bulk copy poisons its destination with 0xFF bytes (NaN in 16-bit floats) at issue and lands,
// completing its bytes on its mbarrier, only when a thread first waits on that mbarrier: a read of
// a slot without the wait, or before it, sees NaN. An mbarrier phase completes when its arrivals
// and its announced bytes are all in (PTX ISA semantics); a wait on a phase that can never
// complete aborts the run, and so does a CTA that exits with copies in flight.
#pragma once

#include <map>

#include "prefill_emu.h"

struct float2 {
  float x, y;
};

namespace cacheflow {
namespace skinny {

struct MbarState {
  int count = 0;    // arrivals per phase
  int pending = 0;  // arrivals still missing in the current phase
  int64_t tx = 0;   // announced bytes still missing
  unsigned phase = 0;
};

struct PendingBulk { uint32_t dst; const unsigned char* src; unsigned bytes; uint32_t bar; };
inline std::vector<PendingBulk>& PendingBulks() { static std::vector<PendingBulk> v; return v; }
inline void CheckNoBulkInFlight() {
  if (!PendingBulks().empty()) cfemu::Fail("CTA exited with cp.async.bulk copies in flight");
}
inline std::map<uint32_t, MbarState>& Mbars() {
  static std::map<uint32_t, MbarState> bars;
  static const void* cta = nullptr;
  if (cta != cfemu::g_cta) {  // a new CTA: its own barriers
    CheckNoBulkInFlight();
    bars.clear();
    cta = cfemu::g_cta;
  }
  return bars;
}

inline MbarState& Mbar(uint32_t addr) {
  cfemu::SmemAt(addr, 8, 8, "mbarrier");
  auto it = Mbars().find(addr);
  if (it == Mbars().end()) cfemu::Fail("mbarrier used before mbarrier.init");
  return it->second;
}

inline void MaybeCompletePhase(MbarState& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.phase ^= 1u;
    b.pending = b.count;
  }
}


inline void MbarInit(uint32_t bar, unsigned count) {
  cfemu::SmemAt(bar, 8, 8, "mbarrier.init");
  MbarState s;
  s.count = static_cast<int>(count);
  s.pending = s.count;
  Mbars()[bar] = s;
}
inline void FenceMbarInit() {}
inline void FenceProxyAsync() {}

inline void MbarArriveExpectTx(uint32_t bar, unsigned bytes) {
  MbarState& b = Mbar(bar);
  b.tx += bytes;
  if (--b.pending < 0) cfemu::Fail("mbarrier: more arrivals than its count");
  MaybeCompletePhase(b);
}

inline void BulkCopyG2S(uint32_t dst, const void* src, unsigned bytes, uint32_t bar) {
  const auto* s = static_cast<const unsigned char*>(src);
  if (bytes % 16 != 0 || dst % 16 != 0 || reinterpret_cast<uintptr_t>(s) % 16 != 0) {
    cfemu::Fail("cp.async.bulk: size and addresses must be multiples of 16");
  }
  cfemu::CheckGlobal(s, bytes, "cp.async.bulk src");
  // Deferred: the destination is undefined (poisoned) until the copy lands at a wait on its bar.
  std::memset(cfemu::SmemAt(dst, bytes, 16, "cp.async.bulk dst"), 0xFF, bytes);
  Mbar(bar);
  PendingBulks().push_back(PendingBulk{dst, s, bytes, bar});
}
inline void LandBulks(uint32_t bar) {
  std::vector<PendingBulk> keep;
  for (const PendingBulk& c : PendingBulks()) {
    if (c.bar != bar) { keep.push_back(c); continue; }
    std::memcpy(cfemu::SmemAt(c.dst, c.bytes, 16, "cp.async.bulk dst"), c.src, c.bytes);
    MbarState& b = Mbar(bar);
    b.tx -= c.bytes;
    if (b.tx < 0) cfemu::Fail("cp.async.bulk: more bytes than the mbarrier expects");
    MaybeCompletePhase(b);
  }
  PendingBulks().swap(keep);
}

inline void MbarWait(uint32_t bar, unsigned parity) {
  LandBulks(bar);
  // The phase of parity `parity` has completed once the current phase's parity differs.
  for (int tries = 0; (Mbar(bar).phase & 1u) == (parity & 1u); ++tries) {
    if (tries > 1000) cfemu::Fail("mbarrier wait on a phase that never completes");
    cfemu::Yield();
  }
}

inline uint4 LoadGlobal16(const void* p) { return prefill::Load16(p); }

// Element conversions: prefill_emu.h's (prefill::Elem), under the names the kernel uses.
template <class T>
inline float2 Unpack2(uint32_t v) {
  return float2{prefill::Elem<T>(static_cast<uint16_t>(v & 0xFFFFu)),
                prefill::Elem<T>(static_cast<uint16_t>(v >> 16))};
}
template <class T>
inline float ToFloat16Bits(uint16_t b) { return prefill::Elem<T>(b); }
template <class T>
inline uint16_t FromFloat(float x);
template <>
inline uint16_t FromFloat<Fp16>(float x) { return cfemu::FloatToHalf(x); }
template <>
inline uint16_t FromFloat<Bf16>(float x) { return cfemu::FloatToBf16(x); }

inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float expf(float x) { return std::exp(x); }
inline float __fmul_rn(float a, float b) { return a * b; }

}  // namespace skinny
}  // namespace cacheflow
