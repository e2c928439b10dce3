// Host emulation of the warp-level primitives of csrc/paged_prefill_ptx.cuh, so that the paged
// prefill kernels (csrc/paged_prefill_kernel.cuh, unchanged) run on a CPU for tests.
//
// Every CUDA thread of a CTA is a fiber (ucontext) on one host thread; a scheduler runs them
// round-robin and switches only at barriers, so runs are deterministic. Warp-collective
// instructions (ldmatrix, mma.sync, shuffles) exchange operands through per-warp scratch between
// two warp barriers and then compute exactly what the PTX ISA specifies for each lane:
//   * ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 b16 matrix i; lane l receives
//     row l/4, elements 2(l%4) and 2(l%4)+1 of each matrix (.trans: column l/4, rows 2(l%4), +1);
//   * mma.m16n8k16 row.col: A (16x16) a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8,
//     2t+8..); B (16x8) b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g); C/D c0,c1:(g, 2t..) c2,c3:(g+8,
//     2t..), with g = lane/4 and t = lane%4;
//   * wgmma.mma_async (the Hopper kernel, paged_prefill_wg_kernel.cuh): all 128 threads of a
//     warpgroup meet at a warpgroup barrier; each computes its own accumulators (register j of
//     lane l in warp w: row 16w + l/4 + 8((j/2)%2), column 8(j/4) + 2(l%4) + j%2) from shared
//     memory read through the matrix descriptors as the PTX ISA defines them (128-byte swizzle:
//     16-byte chunk bits 4-6 of each address XOR its bits 7-9; K-major: rows 128 bytes apart
//     within 8-row groups SBO apart; MN-major: 8-row groups of K SBO apart, 64-element column
//     blocks LBO apart) and, for A in registers, from the fragments of the lanes that hold them.
//     The result is written at issue; wgmma.wait and the proxy fence are no-ops;
//   * cp.async: copies are queued per thread and carried out only when a cp.async.wait_group
//     lets their group complete (or the thread exits), so a missing wait reads stale shared memory
//     (shared memory starts as 0xFF bytes: NaN in fp16, bf16 and fp32).
// Bounds: shared-memory addresses and 16-byte global copies are checked against the CTA's shared
// memory and the registered global buffers; a violation, a barrier deadlock (threads of a warp or
// CTA diverging at a barrier) or a misaligned address aborts the run with a message.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#define CF_DEVICE inline
#define CF_GLOBAL
#define CF_LAUNCH_BOUNDS(threads)
#define CF_LAUNCH_BOUNDS_MIN(threads, blocks)

struct uint4 {
  unsigned x, y, z, w;
};

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The built-in variables of the fiber currently running.
inline Dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace cfemu {

[[noreturn]] inline void Fail(const std::string& msg) {
  std::fprintf(stderr, "prefill emulation: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

struct PendingCopy {
  uint32_t dst;
  const unsigned char* src;
  bool valid;
  int group;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int tid = 0;
  enum State { kRunnable, kBlocked, kDone } state = kRunnable;
  std::vector<PendingCopy> pending;
  int committed = 0;  // groups committed so far; the open group has id `committed`
};

struct Barrier {
  int count = 0;
  int arrived = 0;
  std::vector<Fiber*> waiters;
};

struct WarpScratch {
  uint32_t u[32][6];
  float f[32];
  uint32_t addr[32];
};

struct GlobalRange {
  const unsigned char* begin;
  const unsigned char* end;
  const char* name;
};

struct Cta {
  std::vector<unsigned char> smem;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Barrier cta_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpScratch> scratch;
  std::vector<Barrier> warpgroup_barriers;       // 128 threads each (whole warpgroups only)
  std::vector<std::array<uint32_t, 4>> wg_frags;  // per thread: its A fragment of a wgmma
  ucontext_t scheduler;
};

inline Cta* g_cta = nullptr;
inline Fiber* g_fiber = nullptr;
inline std::vector<GlobalRange> g_ranges;
inline std::function<void()> g_kernel_body;
inline uint64_t g_collectives = 0;

inline void CheckGlobal(const unsigned char* p, size_t bytes, const char* what) {
  for (const GlobalRange& r : g_ranges) {
    if (p >= r.begin && p + bytes <= r.end) return;
  }
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s: %zu bytes at %p outside every registered buffer", what,
                bytes, static_cast<const void*>(p));
  Fail(buf);
}

inline unsigned char* SmemAt(uint32_t addr, size_t bytes, size_t align, const char* what) {
  if (addr % align != 0 || static_cast<size_t>(addr) + bytes > g_cta->smem.size()) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s: shared address %u (+%zu bytes, align %zu) outside %zu",
                  what, addr, bytes, align, g_cta->smem.size());
    Fail(buf);
  }
  return g_cta->smem.data() + addr;
}

inline void Yield() { swapcontext(&g_fiber->ctx, &g_cta->scheduler); }

inline void Arrive(Barrier& b) {
  if (++b.arrived == b.count) {
    b.arrived = 0;
    for (Fiber* f : b.waiters) f->state = Fiber::kRunnable;
    b.waiters.clear();
    return;
  }
  g_fiber->state = Fiber::kBlocked;
  b.waiters.push_back(g_fiber);
  Yield();
}

inline int Lane() { return g_fiber->tid & 31; }
inline int Warp() { return g_fiber->tid >> 5; }
inline void WarpBarrier() {
  ++g_collectives;
  Arrive(g_cta->warp_barriers[Warp()]);
}
inline WarpScratch& Scratch() { return g_cta->scratch[Warp()]; }
inline void WarpgroupBarrier() {
  const int wg = g_fiber->tid / 128;
  if (wg >= static_cast<int>(g_cta->warpgroup_barriers.size())) {
    Fail("warpgroup instruction in a CTA whose size is not a multiple of 128 threads");
  }
  ++g_collectives;
  Arrive(g_cta->warpgroup_barriers[wg]);
}

inline void CompleteCopies(int upto_group) {  // copies of groups < upto_group complete
  std::vector<PendingCopy> keep;
  for (const PendingCopy& c : g_fiber->pending) {
    if (c.group < upto_group) {
      unsigned char* dst = SmemAt(c.dst, 16, 16, "cp.async dst");
      if (c.valid) {
        std::memcpy(dst, c.src, 16);
      } else {
        std::memset(dst, 0, 16);
      }
    } else {
      keep.push_back(c);
    }
  }
  g_fiber->pending.swap(keep);
}

inline void FiberEntry() {
  g_kernel_body();
  CompleteCopies(1 << 30);  // outstanding copies land eventually
  g_fiber->state = Fiber::kDone;
  // returning resumes uc_link (the scheduler)
}

/*! \brief Runs `body` as every thread of every CTA of the grid, one CTA at a time. */
inline void RunGrid(Dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  if (threads % 32 != 0 || threads <= 0) Fail("threads must be a positive multiple of 32");
  gridDim = grid;
  blockDim = Dim3{static_cast<unsigned>(threads), 1, 1};
  g_kernel_body = body;
  constexpr size_t kStack = 512 * 1024;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta cta;
        cta.smem.assign(smem_bytes, 0xFF);
        cta.cta_barrier.count = threads;
        cta.warp_barriers.resize(threads / 32);
        for (Barrier& b : cta.warp_barriers) b.count = 32;
        cta.scratch.resize(threads / 32);
        cta.warpgroup_barriers.resize(threads / 128);
        for (Barrier& b : cta.warpgroup_barriers) b.count = 128;
        cta.wg_frags.resize(threads);
        g_cta = &cta;
        blockIdx = Dim3{x, y, z};
        for (int t = 0; t < threads; ++t) {
          auto f = std::make_unique<Fiber>();
          f->tid = t;
          f->stack.resize(kStack);
          getcontext(&f->ctx);
          f->ctx.uc_stack.ss_sp = f->stack.data();
          f->ctx.uc_stack.ss_size = f->stack.size();
          f->ctx.uc_link = &cta.scheduler;
          makecontext(&f->ctx, FiberEntry, 0);
          cta.fibers.push_back(std::move(f));
        }
        for (;;) {
          bool ran = false;
          bool all_done = true;
          for (auto& f : cta.fibers) {
            if (f->state == Fiber::kDone) continue;
            all_done = false;
            if (f->state != Fiber::kRunnable) continue;
            g_fiber = f.get();
            threadIdx = Dim3{static_cast<unsigned>(f->tid), 0, 0};
            swapcontext(&cta.scheduler, &f->ctx);
            ran = true;
          }
          if (all_done) break;
          if (!ran) {
            char buf[200];
            int blocked = 0, done = 0;
            for (auto& f : cta.fibers) {
              blocked += f->state == Fiber::kBlocked;
              done += f->state == Fiber::kDone;
            }
            std::snprintf(buf, sizeof(buf),
                          "deadlock in CTA (%u, %u, %u): %d threads wait at a barrier, %d exited",
                          x, y, z, blocked, done);
            Fail(buf);
          }
        }
        g_cta = nullptr;
        g_fiber = nullptr;
      }
    }
  }
}

// ---- Number formats. ----
inline float HalfToFloat(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t FloatToHalf(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float Bf16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace cfemu

namespace cacheflow {
namespace prefill {

struct Fp16 {};
struct Bf16 {};
struct Fp32 {};

struct HalfBits {
  uint16_t bits;
};
struct Bf16Bits {
  uint16_t bits;
};
template <class Tag>
struct StorageOf;
template <>
struct StorageOf<Fp16> { using type = HalfBits; };
template <>
struct StorageOf<Bf16> { using type = Bf16Bits; };
template <>
struct StorageOf<Fp32> { using type = float; };

inline float ToFloat(float x) { return x; }
inline float ToFloat(HalfBits x) { return cfemu::HalfToFloat(x.bits); }
inline float ToFloat(Bf16Bits x) { return cfemu::Bf16ToFloat(x.bits); }
template <class Tag>
inline typename StorageOf<Tag>::type FromFloat(float x);
template <>
inline float FromFloat<Fp32>(float x) { return x; }
template <>
inline HalfBits FromFloat<Fp16>(float x) { return HalfBits{cfemu::FloatToHalf(x)}; }
template <>
inline Bf16Bits FromFloat<Bf16>(float x) { return Bf16Bits{cfemu::FloatToBf16(x)}; }

template <class T>
inline float Elem(uint16_t bits);
template <>
inline float Elem<Fp16>(uint16_t bits) { return cfemu::HalfToFloat(bits); }
template <>
inline float Elem<Bf16>(uint16_t bits) { return cfemu::Bf16ToFloat(bits); }

inline float Exp(float x) { return std::exp(x); }
inline float Exp2(float x) { return std::exp2(x); }
inline float Tanh(float x) { return std::tanh(x); }
/*! \brief An FP8 E4M3 (fn: no infinities, 0x7f/0xff NaN) byte in the low 8 bits as a float. */
inline float Fp8ByteToFloat(uint32_t b) {
  b &= 0xffu;
  const int e = static_cast<int>((b >> 3) & 0xfu);
  const int m = static_cast<int>(b & 7u);
  float v;
  if (e == 15 && m == 7) {
    v = NAN;
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m) / 8.f, -6);
  } else {
    v = std::ldexp(1.f + static_cast<float>(m) / 8.f, e - 7);
  }
  return (b & 0x80u) ? -v : v;
}

inline unsigned char* DynamicSmem() { return cfemu::g_cta->smem.data(); }
inline uint32_t SmemU32(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = cfemu::g_cta->smem.data();
  if (c < base || c > base + cfemu::g_cta->smem.size()) {
    cfemu::Fail("SmemU32 of a non-shared pointer");
  }
  return static_cast<uint32_t>(c - base);
}

inline void SyncCta() { cfemu::Arrive(cfemu::g_cta->cta_barrier); }
inline void SyncWarp() { cfemu::WarpBarrier(); }

inline float ShflXor(float v, int mask) {
  cfemu::WarpScratch& s = cfemu::Scratch();
  const int lane = cfemu::Lane();
  s.f[lane] = v;
  cfemu::WarpBarrier();
  const float r = s.f[lane ^ mask];
  cfemu::WarpBarrier();
  return r;
}

inline bool AnySync(bool pred) {
  cfemu::WarpScratch& s = cfemu::Scratch();
  s.f[cfemu::Lane()] = pred ? 1.f : 0.f;
  cfemu::WarpBarrier();
  bool any = false;
  for (int i = 0; i < 32; ++i) any = any || s.f[i] != 0.f;
  cfemu::WarpBarrier();
  return any;
}

inline void LdMatrixImpl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  cfemu::WarpScratch& s = cfemu::Scratch();
  const int lane = cfemu::Lane();
  s.addr[lane] = addr;
  cfemu::WarpBarrier();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const unsigned char* row = cfemu::SmemAt(s.addr[i * 8 + lane / 4], 16, 16, "ldmatrix");
      std::memcpy(&lo, row + (lane % 4) * 4, 2);
      std::memcpy(&hi, row + (lane % 4) * 4 + 2, 2);
    } else {
      const unsigned char* row0 =
          cfemu::SmemAt(s.addr[i * 8 + (lane % 4) * 2], 16, 16, "ldmatrix.trans");
      const unsigned char* row1 =
          cfemu::SmemAt(s.addr[i * 8 + (lane % 4) * 2 + 1], 16, 16, "ldmatrix.trans");
      std::memcpy(&lo, row0 + (lane / 4) * 2, 2);
      std::memcpy(&hi, row1 + (lane / 4) * 2, 2);
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  cfemu::WarpBarrier();
}
inline void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) { LdMatrixImpl(r, addr, false); }
inline void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) { LdMatrixImpl(r, addr, true); }

template <class T>
inline void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cfemu::WarpScratch& s = cfemu::Scratch();
  const int lane = cfemu::Lane();
  for (int i = 0; i < 4; ++i) s.u[lane][i] = a[i];
  s.u[lane][4] = b0;
  s.u[lane][5] = b1;
  cfemu::WarpBarrier();
  auto half_of = [](uint32_t reg, int k) {
    return static_cast<uint16_t>((k & 1) ? (reg >> 16) : (reg & 0xFFFFu));
  };
  auto A = [&](int row, int k) {
    const int src = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return Elem<T>(half_of(s.u[src][reg], k));
  };
  auto B = [&](int k, int n) {
    const int src = n * 4 + (k % 8) / 2;
    const int reg = 4 + (k >= 8 ? 1 : 0);
    return Elem<T>(half_of(s.u[src][reg], k));
  };
  for (int e = 0; e < 4; ++e) {
    const int row = lane / 4 + (e >= 2 ? 8 : 0);
    const int col = (lane % 4) * 2 + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  cfemu::WarpBarrier();
}

template <class T>
inline uint32_t Pack2(float lo, float hi) {
  const uint16_t l = std::is_same<T, Fp16>::value ? cfemu::FloatToHalf(lo) : cfemu::FloatToBf16(lo);
  const uint16_t h = std::is_same<T, Fp16>::value ? cfemu::FloatToHalf(hi) : cfemu::FloatToBf16(hi);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

inline void CpAsync16(uint32_t dst, const void* src, bool valid) {
  cfemu::SmemAt(dst, 16, 16, "cp.async dst");
  const auto* s = static_cast<const unsigned char*>(src);
  if (reinterpret_cast<uintptr_t>(s) % 16 != 0) cfemu::Fail("cp.async: source not 16-byte aligned");
  if (valid) cfemu::CheckGlobal(s, 16, "cp.async src");
  cfemu::g_fiber->pending.push_back({dst, s, valid, cfemu::g_fiber->committed});
}
inline void CpAsyncCommit() { ++cfemu::g_fiber->committed; }
template <int N>
inline void CpAsyncWait() {
  cfemu::CompleteCopies(cfemu::g_fiber->committed - N);
}

/*! \brief FP8 E4M3 caches: 8 cache bytes widened to 8 elements of T into a 16-byte chunk. */
template <class T>
struct Fp8Io {
  static void Fill16(uint32_t dst, const unsigned char* src, bool valid) {
    unsigned char* d = cfemu::SmemAt(dst, 16, 16, "fp8 fill dst");
    uint32_t w[4] = {0, 0, 0, 0};
    if (valid) {
      if (reinterpret_cast<uintptr_t>(src) % 8 != 0) cfemu::Fail("fp8 fill: source not 8-byte aligned");
      cfemu::CheckGlobal(src, 8, "fp8 fill src");
      for (int i = 0; i < 4; ++i) {
        w[i] = Pack2<T>(Fp8ByteToFloat(src[2 * i]), Fp8ByteToFloat(src[2 * i + 1]));
      }
    }
    std::memcpy(d, w, 16);
  }
};

inline bool InSmem(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = cfemu::g_cta->smem.data();
  return c >= base && c < base + cfemu::g_cta->smem.size();
}
inline uint4 Load16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) cfemu::Fail("Load16: not 16-byte aligned");
  if (InSmem(p)) {
    cfemu::SmemAt(SmemU32(p), 16, 16, "Load16");
  } else {
    cfemu::CheckGlobal(static_cast<const unsigned char*>(p), 16, "Load16");
  }
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void Store16(void* p, uint4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) cfemu::Fail("Store16: not 16-byte aligned");
  if (InSmem(p)) {
    cfemu::SmemAt(SmemU32(p), 16, 16, "Store16");
  } else {
    cfemu::CheckGlobal(static_cast<unsigned char*>(p), 16, "Store16");
  }
  std::memcpy(p, &v, 16);
}

// ---- sm_90a warpgroup MMA (paged_prefill_wg_kernel.cuh). ----

inline void WgmmaFence() {}
inline void WgmmaCommit() {}
template <int N>
inline void WgmmaWait() {}
inline void FenceProxyAsync() {}
template <int N>
inline void WgmmaFenceOperand(float (&)[N]) {}
template <int N>
inline void WgmmaFenceOperand(uint32_t (&)[N][4]) {}

/*! \brief The shared-memory byte address of element (mn, k) of a 128-byte-swizzled operand. */
inline uint32_t WgmmaOperandAddr(uint64_t desc, int mn, int k, bool mn_major) {
  if ((desc >> 62) != 1) cfemu::Fail("wgmma descriptor: only the 128-byte swizzle is emulated");
  if (((desc >> 49) & 7) != 0) cfemu::Fail("wgmma descriptor: base offset must be 0");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  uint32_t linear;
  if (!mn_major) {  // rows of 64 elements (128 bytes); the 16 k of one step within one row
    if ((start & 127) + 32 > 128) cfemu::Fail("wgmma K-major step crosses a 128-byte row");
    linear = start + (mn / 8) * sbo + (mn % 8) * 128 + k * 2;
  } else {  // rows of K, 64 mn-elements each; column blocks of 64 LBO apart
    if ((start & 1023) != 0) cfemu::Fail("wgmma MN-major operand not 1024-byte aligned");
    linear = start + (k / 8) * sbo + (mn / 64) * lbo + (k % 8) * 128 + (mn % 64) * 2;
  }
  return linear ^ (((linear >> 7) & 7) << 4);
}

template <class T>
inline float WgmmaSmemElem(uint64_t desc, int mn, int k, bool mn_major) {
  uint16_t bits;
  std::memcpy(&bits, cfemu::SmemAt(WgmmaOperandAddr(desc, mn, k, mn_major), 2, 2, "wgmma operand"),
              2);
  return Elem<T>(bits);
}

/*! \brief Row and column of accumulator register j of this thread (see the file comment). */
inline void WgmmaAccCoord(int j, int& row, int& col) {
  const int lane = cfemu::Lane();
  const int warp = cfemu::Warp() % 4;
  row = 16 * warp + lane / 4 + 8 * ((j / 2) % 2);
  col = 8 * (j / 4) + 2 * (lane % 4) + j % 2;
}

template <class T, int N>
struct WgmmaSS {
  static void Run(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, int accumulate) {
    cfemu::WarpgroupBarrier();  // every thread of the warpgroup issues it
    for (int j = 0; j < N / 2; ++j) {
      int row, col;
      WgmmaAccCoord(j, row, col);
      float acc = accumulate ? d[j] : 0.f;
      for (int k = 0; k < 16; ++k) {
        acc += WgmmaSmemElem<T>(a_desc, row, k, false) * WgmmaSmemElem<T>(b_desc, col, k, false);
      }
      d[j] = acc;
    }
    cfemu::WarpgroupBarrier();
  }
};

template <class T, int N>
struct WgmmaRS {
  static void Run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b_desc) {
    const int tid = cfemu::g_fiber->tid;
    const int wg_base = tid / 128 * 128;
    for (int i = 0; i < 4; ++i) cfemu::g_cta->wg_frags[tid][i] = a[i];
    cfemu::WarpgroupBarrier();
    // A (64 x 16): lane (r % 8) * 4 + (k % 8) / 2 of warp r / 16 holds (r, k) in register
    // (r % 16 >= 8) + 2 (k >= 8), half k % 2 (the accumulator layout of a 64 x 16 slice).
    auto A = [&](int r, int k) {
      const int src = wg_base + (r / 16) * 32 + (r % 8) * 4 + (k % 8) / 2;
      const int reg = ((r % 16) >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
      const uint32_t v = cfemu::g_cta->wg_frags[src][reg];
      return Elem<T>(static_cast<uint16_t>((k & 1) ? (v >> 16) : (v & 0xFFFFu)));
    };
    for (int j = 0; j < N / 2; ++j) {
      int row, col;
      WgmmaAccCoord(j, row, col);
      float acc = d[j];
      for (int k = 0; k < 16; ++k) acc += A(row, k) * WgmmaSmemElem<T>(b_desc, col, k, true);
      d[j] = acc;
    }
    cfemu::WarpgroupBarrier();
  }
};

/*! \brief A 4-byte shared-memory store (the Hopper kernel's output staging). */
inline void StoreShared32(uint32_t addr, uint32_t v) {
  std::memcpy(cfemu::SmemAt(addr, 4, 4, "st.shared.b32"), &v, 4);
}

}  // namespace prefill
}  // namespace cacheflow
