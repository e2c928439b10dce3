// Host emulation of the primitives csrc/paged_attention.cuh is written against, so that its
// kernels (unchanged source) run on a CPU in tests (tests/test_kernels_paged_attention_emulated.py).
//
// Every CUDA thread of a CTA is a fiber (ucontext) on one host thread; CTAs run one after the
// other, and within a CTA the scheduler switches fibers only at barriers, so runs are
// deterministic. Warp-collective instructions (shuffles, mma.sync) exchange operands through
// per-warp scratch at a warp barrier, then compute what the PTX ISA specifies per lane:
//   mma.m16n8k16 row.col: A (16x16) a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8,
//   2t+8..); B (16x8) b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g); C/D c0,c1:(g, 2t..2t+1),
//   c2,c3:(g+8, 2t..2t+1); mma.m16n8k8: A a0:(g, 2t..2t+1) a1:(g+8, 2t..), B b0:(k 2t..2t+1,
//   n g), same C/D; the lower k of a packed pair is in the low 16 bits; g = lane/4, t = lane%4;
//   movmatrix.m8n8.trans.b16: lane l gets (row l/4, columns 2t, 2t+1) of the transpose of the
//   8x8 matrix whose (row g, columns 2t, 2t+1) lane l gave.
// Checks that abort the run with a message: global loads and stores outside every registered
// buffer or misaligned, a barrier that not all threads of the warp / CTA reach (divergent
// collective: deadlock), shared-memory writes past the requested size (canary), and a dynamic
// shared-memory request that is not a whole number of 16-byte chunks. Reads past the request are
// not seen (plain C++ loads), and the kernels' own loads stay inside it; but ptxas merges
// conditional scalar loads of one 16-byte-aligned chunk into one wide load (the combine kernel's
// tail loop: LDS.128 of weights[i..i+2] when only weights[i] remains), which memcheck reports as
// out of bounds when the request ends inside that chunk. Shared memory starts as 0xFF bytes
// (NaN), so a read of an unwritten element poisons the result.
//
// cp.async (the pipelined kernel): each thread's copies are queued in commit groups and land
// when cp.async.wait_group retires their group ("late", the default: the latest moment the PTX
// ISA allows, so a read of a stage before its wait, or before the warp barrier that publishes
// the other lanes' copies, sees stale bytes), or at issue ("early": a copy into a stage that is
// still to be read overwrites it). Tests run both (cf_emu_configure). Also checked: the source
// lies in a registered buffer and is 16-byte aligned (zero-fill copies read nothing), the
// destination lies inside the CTA's shared memory and is 16-byte aligned, and no copy is still
// queued when a thread exits. __syncwarp is a barrier of the 32 lanes (divergence aborts).
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#define PA_DEVICE inline
#define PA_GLOBAL
#define PA_LAUNCH_BOUNDS(threads, min_blocks)

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

struct PaDim3 {
  unsigned x = 0, y = 0, z = 0;
};
// The built-in variables of the fiber that runs.
inline PaDim3 threadIdx, blockIdx;

namespace pa_emu {

[[noreturn]] inline void Fail(const std::string& msg) {
  std::fprintf(stderr, "paged_attention emulation: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

constexpr size_t kCanary = 256;
/*! \brief Dynamic shared memory is requested in whole chunks of this many bytes (see above). */
constexpr size_t kSmemChunk = 16;

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;  // null: zero-fill
};

struct Fiber {
  ucontext_t ctx;
  std::vector<PendingCopy> open_group;                // cp.async since the last commit
  std::vector<std::vector<PendingCopy>> groups;       // committed, oldest first
  char* stack = nullptr;
  int tid = 0;
  unsigned collectives = 0;  // warp collectives this thread has entered (scratch parity)
  enum State { kRunnable, kBlocked, kDone } state = kRunnable;
};

struct Barrier {
  int count = 0;
  int arrived = 0;
  std::vector<Fiber*> waiters;
};

struct WarpScratch {
  uint32_t u[32][6];
  float f[32];
  int i[32];
};

struct GlobalRange {
  const unsigned char* begin;
  const unsigned char* end;
  std::string name;
};

struct Cta {
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Barrier cta_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<Barrier> pair_barriers;  // named barriers 1.. of 64 threads (warps 2i, 2i + 1)
  std::vector<WarpScratch> scratch;  // two per warp: collectives alternate between them
  ucontext_t scheduler;
};

constexpr size_t kStackBytes = 256 * 1024;

/*! \brief Fiber stacks, allocated once (uninitialized) and reused by every CTA. */
inline char* FiberStack(int tid) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= tid) {
    stacks.emplace_back(new char[kStackBytes]);
  }
  return stacks[tid].get();
}

inline Cta* g_cta = nullptr;
inline Fiber* g_fiber = nullptr;
inline std::vector<GlobalRange> g_ranges;
inline std::function<void()> g_kernel_body;

inline void CheckGlobal(const void* ptr, size_t bytes, const char* what) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0 && (bytes == 2 || bytes == 4 || bytes == 8 ||
                                                      bytes == 16)) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s: %zu-byte access at %p is misaligned", what, bytes,
                  static_cast<const void*>(p));
    Fail(buf);
  }
  for (const GlobalRange& r : g_ranges) {
    if (p >= r.begin && p + bytes <= r.end) return;
  }
  char buf[200];
  std::snprintf(buf, sizeof(buf), "%s: %zu bytes at %p outside every registered buffer", what,
                bytes, static_cast<const void*>(p));
  Fail(buf);
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
inline void WarpBarrier() { Arrive(g_cta->warp_barriers[Warp()]); }
/*!
 * \brief The scratch of this thread's next warp collective. Collectives alternate between two
 * buffers, so one barrier per collective suffices: a lane that leaves collective n early can
 * only write collective n+1's buffer, and cannot pass n+1's barrier before every lane has
 * arrived there, i.e. has read its result of n.
 */
inline WarpScratch& Scratch() {
  return g_cta->scratch[2 * Warp() + (g_fiber->collectives++ & 1)];
}

/*! \brief 0: cp.async copies at issue ("early"); 1: when their group is retired ("late"). */
inline int g_cp_async_mode = 1;
/*! \brief CTAs run one after another: 0 in blockIdx order (x fastest), 1 in reverse order (a
 * CTA that reads what another CTA of the grid writes sees it only in one of the two orders). */
inline int g_reverse_ctas = 0;

inline void FiberEntry() {
  g_kernel_body();
  bool pending = !g_fiber->open_group.empty();
  for (const auto& g : g_fiber->groups) pending = pending || !g.empty();
  if (pending) Fail("a thread exited with cp.async copies never waited for");
  g_fiber->state = Fiber::kDone;  // returning resumes uc_link (the scheduler)
}

inline void PerformCopy(const PendingCopy& c) {
  if (c.src != nullptr) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

struct Grid {
  unsigned x, y, z;
};

/*! \brief Runs `body` as every thread of every CTA of the grid, one CTA at a time. */
inline void RunGrid(Grid grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  if (threads % 32 != 0 || threads <= 0) Fail("threads must be a positive multiple of 32");
  if (smem_bytes % kSmemChunk != 0) {
    char buf[200];
    std::snprintf(buf, sizeof(buf),
                  "dynamic shared memory of %zu bytes is not a multiple of %zu: a wide load the "
                  "compiler forms from an aligned chunk reads past the request", smem_bytes,
                  kSmemChunk);
    Fail(buf);
  }
  g_kernel_body = body;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta cta;
        cta.smem_bytes = smem_bytes;
        cta.smem.assign(smem_bytes + kCanary, 0xFF);
        for (size_t i = 0; i < kCanary; ++i) cta.smem[smem_bytes + i] = 0xA5;
        cta.cta_barrier.count = threads;
        cta.warp_barriers.resize(threads / 32);
        for (Barrier& b : cta.warp_barriers) b.count = 32;
        cta.pair_barriers.resize(threads / 64);
        for (Barrier& b : cta.pair_barriers) b.count = 64;
        cta.scratch.resize(2 * (threads / 32));
        g_cta = &cta;
        blockIdx = g_reverse_ctas ? PaDim3{grid.x - 1 - x, grid.y - 1 - y, grid.z - 1 - z}
                                  : PaDim3{x, y, z};
        for (int t = 0; t < threads; ++t) {
          auto f = std::make_unique<Fiber>();
          f->tid = t;
          f->stack = FiberStack(t);
          getcontext(&f->ctx);
          f->ctx.uc_stack.ss_sp = f->stack;
          f->ctx.uc_stack.ss_size = kStackBytes;
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
            threadIdx = PaDim3{static_cast<unsigned>(f->tid), 0, 0};
            swapcontext(&cta.scheduler, &f->ctx);
            ran = true;
          }
          if (all_done) break;
          if (!ran) {
            int blocked = 0;
            int done = 0;
            for (auto& f : cta.fibers) {
              blocked += f->state == Fiber::kBlocked;
              done += f->state == Fiber::kDone;
            }
            char buf[200];
            std::snprintf(buf, sizeof(buf),
                          "deadlock in CTA (%u, %u, %u): %d threads wait at a barrier, %d "
                          "exited (a collective or barrier in divergent code)",
                          x, y, z, blocked, done);
            Fail(buf);
          }
        }
        for (size_t i = 0; i < kCanary; ++i) {
          if (cta.smem[smem_bytes + i] != 0xA5) {
            char buf[160];
            std::snprintf(buf, sizeof(buf),
                          "CTA (%u, %u, %u) wrote shared memory past its %zu bytes", x, y, z,
                          smem_bytes);
            Fail(buf);
          }
        }
        g_cta = nullptr;
        g_fiber = nullptr;
      }
    }
  }
}

// ---- Number formats.
inline float HalfToFloat(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t FloatToHalf(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

struct Half {
  uint16_t bits;
};
struct Bf16 {
  uint16_t bits;
};

}  // namespace pa_emu

namespace cacheflow {
namespace paged_attention {

inline unsigned char* DynamicSmem() { return pa_emu::g_cta->smem.data(); }
inline void SyncThreads() { pa_emu::Arrive(pa_emu::g_cta->cta_barrier); }
inline void SyncWarp() { pa_emu::WarpBarrier(); }
/*! \brief bar.sync 1 + pair, 64: only the warps 2 * pair and 2 * pair + 1 may arrive. */
inline void PairBarrier(int pair) {
  if (pa_emu::Warp() >> 1 != pair ||
      pair >= static_cast<int>(pa_emu::g_cta->pair_barriers.size())) {
    pa_emu::Fail("pair barrier: a warp outside the pair arrived");
  }
  pa_emu::Arrive(pa_emu::g_cta->pair_barriers[pair]);
}

inline void CpAsync16(void* smem_dst, const void* gmem_src, bool valid) {
  auto* dst = static_cast<unsigned char*>(smem_dst);
  unsigned char* base = pa_emu::g_cta->smem.data();
  if (dst < base || dst + 16 > base + pa_emu::g_cta->smem_bytes || (dst - base) % 16 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "cp.async: destination at shared offset %td outside its %zu "
                  "bytes or misaligned", dst - base, pa_emu::g_cta->smem_bytes);
    pa_emu::Fail(buf);
  }
  const unsigned char* src = nullptr;
  if (valid) {
    pa_emu::CheckGlobal(gmem_src, 16, "cp.async source");
    src = static_cast<const unsigned char*>(gmem_src);
  }
  const pa_emu::PendingCopy c{dst, src};
  if (pa_emu::g_cp_async_mode == 0) {
    pa_emu::PerformCopy(c);
  } else {
    pa_emu::g_fiber->open_group.push_back(c);
  }
}
inline void CpAsyncCommit() {
  pa_emu::g_fiber->groups.push_back(std::move(pa_emu::g_fiber->open_group));
  pa_emu::g_fiber->open_group.clear();
}
inline void CpAsyncWait(int n) {
  if (n < 0 || n > 7) pa_emu::Fail("cp.async.wait_group: count outside 0..7");
  auto& groups = pa_emu::g_fiber->groups;
  while (static_cast<int>(groups.size()) > n) {
    for (const pa_emu::PendingCopy& c : groups.front()) pa_emu::PerformCopy(c);
    groups.erase(groups.begin());
  }
}

/*! \brief ldmatrix .x4 .trans of 16-bit elements (see the device version): every lane gives
 * one 16-byte-aligned row address in the CTA's shared memory; lane l receives, in r[j], elements
 * (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) of matrix j (rows from lanes 8j .. 8j + 7). */
inline void LdMatrixX4Trans(const unsigned char* row, uint32_t (&r)[4]) {
  const unsigned char* base = pa_emu::g_cta->smem.data();
  if (row < base || row + 16 > base + pa_emu::g_cta->smem_bytes || (row - base) % 16 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "ldmatrix: row at shared offset %td outside its %zu bytes or "
                  "misaligned", row - base, pa_emu::g_cta->smem_bytes);
    pa_emu::Fail(buf);
  }
  pa_emu::WarpScratch& s = pa_emu::Scratch();
  const int lane = pa_emu::Lane();
  s.u[lane][0] = static_cast<uint32_t>(row - base);
  pa_emu::WarpBarrier();
  const int col = lane / 4;
  const int k = 2 * (lane % 4);
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    std::memcpy(&lo, base + s.u[8 * j + k][0] + 2 * col, 2);
    std::memcpy(&hi, base + s.u[8 * j + k + 1][0] + 2 * col, 2);
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

/*! \brief movmatrix.sync.aligned.m8n8.trans.b16 (see the device version): lane l holds row
 * l / 4, columns 2 (l % 4) and + 1 of an 8x8 matrix of 16-bit elements (the lower column in the
 * low half) and receives the same positions of its transpose: elements (2 (l % 4), l / 4) and
 * (2 (l % 4) + 1, l / 4) of the input. */
inline uint32_t MovMatrixTrans(uint32_t a) {
  pa_emu::WarpScratch& s = pa_emu::Scratch();
  const int lane = pa_emu::Lane();
  s.u[lane][0] = a;
  pa_emu::WarpBarrier();
  const auto elem = [&](int row, int col) {  // input element (row, col)
    return (s.u[4 * row + col / 2][0] >> (16 * (col % 2))) & 0xffffu;
  };
  const int row = lane / 4;
  const int col = 2 * (lane % 4);
  return elem(col, row) | (elem(col + 1, row) << 16);
}

inline float ShflXor(float v, int mask) {
  pa_emu::WarpScratch& s = pa_emu::Scratch();
  const int lane = pa_emu::Lane();
  s.f[lane] = v;
  pa_emu::WarpBarrier();
  return s.f[lane ^ mask];
}
inline uint32_t Pinned(uint32_t x) { return x; }
inline int ShflIdx(int v, int src_lane) {
  pa_emu::WarpScratch& s = pa_emu::Scratch();
  const int lane = pa_emu::Lane();
  s.i[lane] = v;
  pa_emu::WarpBarrier();
  return s.i[src_lane & 31];
}

inline bool AnyInWarp(bool pred) {
  pa_emu::WarpScratch& s = pa_emu::Scratch();
  const int lane = pa_emu::Lane();
  s.i[lane] = pred ? 1 : 0;
  pa_emu::WarpBarrier();
  for (int i = 0; i < 32; ++i) {
    if (s.i[i] != 0) return true;
  }
  return false;
}

inline int LoadIndex(const int32_t* ptr) {
  pa_emu::CheckGlobal(ptr, 4, "block table load");
  return *ptr;
}
inline uint32_t BytePerm(uint32_t x, uint32_t y, uint32_t sel) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t idx = (sel >> (4 * i)) & 0x7;
    r |= static_cast<uint32_t>((bytes >> (8 * idx)) & 0xFF) << (8 * i);
  }
  return r;
}
inline float AsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename U>
inline void StoreGlobal(U* ptr, U value) {
  pa_emu::CheckGlobal(ptr, sizeof(U), "global store");
  *ptr = value;
}
inline uint4 LoadGlobal16(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 16, "query load");
  uint4 v;
  std::memcpy(&v, ptr, 16);
  return v;
}
inline uint2 LoadGlobal8(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 8, "query load");
  uint2 v;
  std::memcpy(&v, ptr, 8);
  return v;
}
inline uint4 LoadStream16(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 16, "cache load");
  uint4 v;
  std::memcpy(&v, ptr, 16);
  return v;
}
inline uint2 LoadStream8(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 8, "cache load");
  uint2 v;
  std::memcpy(&v, ptr, 8);
  return v;
}
inline uint32_t LoadStream4(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 4, "cache load");
  uint32_t v;
  std::memcpy(&v, ptr, 4);
  return v;
}
inline int64_t LoadGlobalI64(const int64_t* ptr) {
  pa_emu::CheckGlobal(ptr, 8, "int64 load");
  return *ptr;
}
inline float LoadGlobalF32(const float* ptr) {
  pa_emu::CheckGlobal(ptr, 4, "float load");
  return *ptr;
}
inline float MulRn(float a, float b) {
  volatile float r = a * b;  // rounded to float (no contraction with a later add)
  return r;
}
inline void FenceDevice() {}
/*! \brief x as an FP8 E4M3 (fn) byte: round to nearest even, saturating at +-448, NaN 0x7f. */
inline uint32_t FloatToFp8(float x) {
  if (std::isnan(x)) return 0x7fu;
  const uint32_t sign = std::signbit(x) ? 0x80u : 0u;
  const float a = std::fabs(x);
  if (a >= 448.f) return sign | 0x7eu;
  int e = 0;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): the leading bit is 2^(e - 1)
  const int lead = a == 0.f ? -7 : e - 1;
  // Subnormals (below 2^-6) have the quantum of 2^-9, normals 2^(lead - 3).
  const int quantum_exp = lead < -6 ? -9 : lead - 3;
  const float q = std::nearbyint(std::ldexp(a, -quantum_exp));  // round half to even
  uint32_t code;
  if (lead < -6) {
    code = static_cast<uint32_t>(q);  // 8 becomes the smallest normal (0x08)
  } else if (q >= 16.f) {
    code = static_cast<uint32_t>((lead + 1 + 7) << 3);  // rounded up to the next binade
  } else {
    code = static_cast<uint32_t>(((lead + 7) << 3) | (static_cast<int>(q) - 8));
  }
  return sign | (code > 0x7eu ? 0x7eu : code);
}
inline float FastExp2(float x) { return std::exp2(x); }
inline float FastTanh(float x) { return std::tanh(x); }
inline uint32_t LoadStream2(const void* ptr) {
  pa_emu::CheckGlobal(ptr, 2, "cache load");
  uint16_t v;
  std::memcpy(&v, ptr, 2);
  return v;
}
/*! \brief The FP8 E4M3 (fn: no infinities, 0x7f/0xff NaN) byte in the low 8 bits as a float. */
inline float Fp8ToFloat(uint32_t b) {
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
// prefetch.global.L2: no effect on the results; the address must still lie in a buffer.
inline void PrefetchL2(const void* ptr) { pa_emu::CheckGlobal(ptr, 1, "L2 prefetch"); }

template <typename T>
struct Dtype;

/*! \brief Shared by the two 16-bit formats: packing and the two MMA shapes. */
template <uint16_t (*kFromFloat)(float), float (*kToFloat)(uint16_t)>
struct Emu16 {
  static uint32_t Pack(float lo, float hi) {
    return static_cast<uint32_t>(kFromFloat(lo)) | (static_cast<uint32_t>(kFromFloat(hi)) << 16);
  }
  static uint32_t ElemBits(float x) { return kFromFloat(x); }
  static float ElemToFloat(uint32_t b) { return kToFloat(static_cast<uint16_t>(b & 0xFFFFu)); }
  static float Elem(uint32_t reg, int k) {
    return kToFloat(static_cast<uint16_t>((k & 1) ? (reg >> 16) : (reg & 0xFFFFu)));
  }
  static void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                       uint32_t b0, uint32_t b1) {
    pa_emu::WarpScratch& s = pa_emu::Scratch();
    const int lane = pa_emu::Lane();
    s.u[lane][0] = a0;
    s.u[lane][1] = a1;
    s.u[lane][2] = a2;
    s.u[lane][3] = a3;
    s.u[lane][4] = b0;
    s.u[lane][5] = b1;
    pa_emu::WarpBarrier();
    auto A = [&](int row, int k) {  // row < 16, k < 16
      const int src = (row % 8) * 4 + (k % 8) / 2;
      const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
      return Elem(s.u[src][reg], k);
    };
    auto B = [&](int k, int n) {  // k < 16, n < 8
      const int src = n * 4 + (k % 8) / 2;
      const int reg = 4 + (k >= 8 ? 1 : 0);
      return Elem(s.u[src][reg], k);
    };
    for (int e = 0; e < 4; ++e) {
      const int row = lane / 4 + (e >= 2 ? 8 : 0);
      const int col = (lane % 4) * 2 + (e & 1);
      float acc = d[e];
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
      d[e] = acc;
    }
  }
  static void Mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    pa_emu::WarpScratch& s = pa_emu::Scratch();
    const int lane = pa_emu::Lane();
    s.u[lane][0] = a0;
    s.u[lane][1] = a1;
    s.u[lane][4] = b0;
    pa_emu::WarpBarrier();
    auto A = [&](int row, int k) {  // row < 16, k < 8
      const int src = (row % 8) * 4 + k / 2;
      const int reg = row >= 8 ? 1 : 0;
      return Elem(s.u[src][reg], k);
    };
    auto B = [&](int k, int n) {  // k < 8, n < 8
      const int src = n * 4 + k / 2;
      return Elem(s.u[src][4], k);
    };
    for (int e = 0; e < 4; ++e) {
      const int row = lane / 4 + (e >= 2 ? 8 : 0);
      const int col = (lane % 4) * 2 + (e & 1);
      float acc = d[e];
      for (int k = 0; k < 8; ++k) acc += A(row, k) * B(k, col);
      d[e] = acc;
    }
  }
};

template <>
struct Dtype<pa_emu::Half> : Emu16<pa_emu::FloatToHalf, pa_emu::HalfToFloat> {
  static pa_emu::Half FromFloat(float x) { return pa_emu::Half{pa_emu::FloatToHalf(x)}; }
  static uint32_t FromFp8x2(uint32_t b) { return Pack(Fp8ToFloat(b), Fp8ToFloat(b >> 8)); }
  static uint32_t FromFp8x2Hi(uint32_t b) { return Pack(Fp8ToFloat(b >> 16), Fp8ToFloat(b >> 24)); }
};
template <>
struct Dtype<pa_emu::Bf16> : Emu16<pa_emu::FloatToBf16, pa_emu::Bf16ToFloat> {
  static pa_emu::Bf16 FromFloat(float x) { return pa_emu::Bf16{pa_emu::FloatToBf16(x)}; }
  static uint32_t FromFp8x2(uint32_t b) { return Pack(Fp8ToFloat(b), Fp8ToFloat(b >> 8)); }
  static uint32_t FromFp8x2Hi(uint32_t b) { return Pack(Fp8ToFloat(b >> 16), Fp8ToFloat(b >> 24)); }
};
template <>
struct Dtype<float> {
  static float FromFloat(float x) { return x; }
};

using MmaHalf = pa_emu::Half;
template <typename T>
constexpr bool kIsBf16 = std::is_same<T, pa_emu::Bf16>::value;

}  // namespace paged_attention
}  // namespace cacheflow
