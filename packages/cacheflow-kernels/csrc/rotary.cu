// rotary_embedding: rotary position embeddings applied in place to queries and keys.
//
// Layouts:
//   positions (int64):        [num_tokens], contiguous
//   query (float16/bfloat16/float32): [num_tokens, num_heads * head_size]; the last dimension is
//                             contiguous, rows may be further apart (a slice of a fused qkv
//                             tensor): the row stride comes from the tensor's strides
//   key (dtype of query):     [num_tokens, num_kv_heads * head_size], same rule
//   cos_sin_cache (float32):  [max_position, rot_dim], contiguous; row p is
//                             [cos(p * inv_freq) (rot_dim/2) | sin(p * inv_freq) (rot_dim/2)]
//
// For each head the first rot_dim features rotate; features rot_dim..head_size stay untouched.
//   neox style (is_neox):  x1 = x[:rot_dim/2], x2 = x[rot_dim/2:rot_dim]
//   gpt-j style:           x1 = x[0:rot_dim:2], x2 = x[1:rot_dim:2]
//   x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin
// computed like the runtime's torch implementation: cos and sin rounded to the activation dtype,
// each product and the sum rounded to it (float32 math, no fused multiply-add), so results match
// torch's eager ops. A position outside [0, max_position) leaves its token untouched.
//
// Three kernels. The block kernel: one CUDA block per token; each thread first loads its N elements of x1
// and their N partners of x2 (neox) or N interleaved elements (gpt-j) while the block stages the
// token's cos/sin row in shared memory, then rotates and stores them (RotaryKernel). With
// CACHEFLOW_ROTARY=warp, where 16-byte accesses are possible (rotary width, head size, row
// strides and pointers allow) and a head's 16-byte columns divide a warp (rot_dim 128 in 16-bit
// types, for instance): one warp per (token, part of its heads), each lane with up to 10 q/k
// loads in flight and its cos/sin columns read straight from global memory once for all its
// heads, no shared memory and no barrier (RotaryWarpKernel). On the H200 (2026-12-03) the warp
// kernel was slower (neox 61.4 vs 59.6 us, gpt-j 74.9 vs 60.0 us at q[8192, 32x128]), so it is
// not the default.
// With CACHEFLOW_ROTARY=pipelined, where 16-byte accesses are possible (same rule) and the cos/sin
// cache is 16-byte aligned: persistent CTAs (SM count x occupancy), each over a stream of tokens
// with a cp.async shared-memory ring of kPipeStages tokens, so 3 tokens' q/k loads and cos/sin
// rows stay in flight per CTA without holding registers, and a token's cos/sin load never waits
// for its position (read one step earlier) (RotaryPipelinedKernel). The default wherever it applies
// and gives every CTA at least two tokens: on the H200 (2026-12-03, bf16 q[8192, 32x128]) 49.0 us
// = 82.8% of copy against the block kernel's 60.1 us, bit-identical, racecheck and synccheck
// clean; CACHEFLOW_ROTARY=block brings the block kernel back.
// Every variant falls back to the block kernel where it does not apply; results are identical.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.h"
#include "elementwise_common.cuh"
#include "smem_limit.cuh"

namespace cacheflow {
namespace {

using namespace elementwise;  // NOLINT(build/namespaces)

constexpr const char* kOp = "rotary_embedding";
constexpr int kMaxThreads = 512;
constexpr int64_t kMaxRotDim = 8192;  // cos/sin row staged in shared memory (32 KB)

/*!
 * \tparam N elements rotated per thread and step: N of x1 and N of x2 (neox), or N/2 pairs
 *   (gpt-j, N even).
 * \tparam W elements per memory access (N, or 1 when alignment does not allow N).
 */
template <typename T, int N, int W, bool kNeox>
__global__ void __launch_bounds__(kMaxThreads)
    RotaryKernel(const int64_t* __restrict__ positions, T* query, T* key,
                 const float* __restrict__ cos_sin_cache, int64_t query_stride,
                 int64_t key_stride, int num_heads, int num_kv_heads, int head_size, int rot_dim,
                 int64_t max_position) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  extern __shared__ float cos_sin[];  // [rot_dim]: cos | sin, rounded to T
  const int64_t token = blockIdx.x;
  const int64_t pos = positions[token];
  const int half = rot_dim / 2;
  const int units = kNeox ? half / N : rot_dim / N;  // per head
  const int total = (num_heads + num_kv_heads) * units;
  T* q_row = query + token * query_stride;
  T* k_row = key + token * key_stride;
  // Unit u: head u / units; its first element i0 within the head (x1 for neox, the run of
  // interleaved pairs for gpt-j).
  auto locate = [&](int u, int& i0) -> T* {
    const int head = u / units;
    i0 = (u - head * units) * N;
    return head < num_heads ? q_row + static_cast<int64_t>(head) * head_size
                            : k_row + static_cast<int64_t>(head - num_heads) * head_size;
  };

  // The first unit's loads do not depend on the position: issue them before the cos/sin row.
  int u = threadIdx.x;
  int i0 = 0;
  T* base = nullptr;
  Vec<T, N> x1{}, x2{};
  if (u < total) {
    base = locate(u, i0);
    x1 = LoadVec<T, N, W>(base + i0);
    if constexpr (kNeox) x2 = LoadVec<T, N, W>(base + half + i0);
  }
  if (pos < 0 || pos >= max_position) return;  // uniform over the block
  const float* row = cos_sin_cache + pos * rot_dim;
  for (int i = threadIdx.x; i < rot_dim; i += blockDim.x) cos_sin[i] = RoundTo<T>(row[i]);
  __syncthreads();

  while (u < total) {
    if constexpr (kNeox) {
      Vec<T, N> y1, y2;
      RotateNeoxUnit<T, N>(cos_sin, half, i0, x1, x2, y1, y2);
      StoreVec<T, N, W>(base + i0, y1);
      StoreVec<T, N, W>(base + half + i0, y2);
    } else {
      StoreVec<T, N, W>(base + i0, RotateGptjUnit<T, N>(cos_sin, half, i0, x1));
    }
    u += blockDim.x;
    if (u < total) {
      base = locate(u, i0);
      x1 = LoadVec<T, N, W>(base + i0);
      if constexpr (kNeox) x2 = LoadVec<T, N, W>(base + half + i0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-per-token kernel (the default where it applies): no shared memory and no barrier.
// ---------------------------------------------------------------------------------------------

constexpr int kWarpsPerBlock = 8;
constexpr int kLoadsPerLane = 10;  // 16-byte q/k loads each lane has in flight
constexpr int kMinBlocks = 2;      // per SM: <= 128 registers (bf16 needs ~130 unbounded)

/*!
 * \brief One warp per (token, part of the heads). A lane owns one unit column c of the rotated
 * features (neox: N elements of x1 and their N partners of x2; gpt-j: N interleaved elements) and
 * the heads slot, slot + slots, ... (slots = 32 / units), `heads_per_part` of them per part. It
 * issues all of its q/k loads first, then reads the position and the cos/sin values of its
 * column straight from global memory (the same addresses for every head slot of the warp: one
 * transaction), so the dependent latency is paid once per token and nothing waits for a barrier.
 * \tparam T element type; accesses are 16 bytes (N = 16 / sizeof(T) elements).
 */
template <typename T, bool kNeox>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocks)
    RotaryWarpKernel(const int64_t* __restrict__ positions, T* query, T* key,
                     const float* __restrict__ cos_sin_cache, int64_t query_stride,
                     int64_t key_stride, int num_tokens, int num_heads, int num_kv_heads,
                     int head_size, int rot_dim, int64_t max_position, int unit_shift,
                     int heads_per_part) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  constexpr int N = kVec16<T>;
  constexpr int kHeads = kNeox ? kLoadsPerLane / 2 : kLoadsPerLane;  // per lane and part
  constexpr int kCs = kNeox ? N : N / 2;  // cos (and sin) values per lane
  constexpr int kCsW = kCs < 4 ? kCs : 4;
  const int64_t token =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= num_tokens) return;  // (uniform over the warp)
  const int lane = threadIdx.x & 31;
  const int slots = 32 >> unit_shift;
  const int slot = lane >> unit_shift;
  const int i0 = (lane & ((1 << unit_shift) - 1)) * N;
  const int half = rot_dim / 2;
  const int total = num_heads + num_kv_heads;
  const int first = static_cast<int>(blockIdx.y) * heads_per_part;
  T* q_row = query + token * query_stride + i0;
  T* k_row = key + token * key_stride + i0;

  T* ptr[kHeads];
  Vec<T, N> x1[kHeads], x2[kHeads];
#pragma unroll
  for (int b = 0; b < kHeads; ++b) {
    const int h = slot + (first + b) * slots;
    ptr[b] = nullptr;
    if (b < heads_per_part && h < total) {
      ptr[b] = h < num_heads ? q_row + static_cast<int64_t>(h) * head_size
                             : k_row + static_cast<int64_t>(h - num_heads) * head_size;
      x1[b] = LoadVec<T, N, N>(ptr[b]);
      if constexpr (kNeox) x2[b] = LoadVec<T, N, N>(ptr[b] + half);
    }
  }
  // No early return between the loads and their use: the loads stay ahead of the position.
  const int64_t pos = positions[token];
  const bool valid = pos >= 0 && pos < max_position;
  const float* row = cos_sin_cache + (valid ? pos : 0) * rot_dim + (kNeox ? i0 : i0 / 2);
  const Vec<float, kCs> cs = LoadVec<float, kCs, kCsW>(row);
  const Vec<float, kCs> sn = LoadVec<float, kCs, kCsW>(row + half);
  if (!valid) return;
  float c[kCs], s[kCs];
#pragma unroll
  for (int m = 0; m < kCs; ++m) {
    c[m] = RoundTo<T>(cs.v[m]);
    s[m] = RoundTo<T>(sn.v[m]);
  }
#pragma unroll
  for (int b = 0; b < kHeads; ++b) {
    if (ptr[b] == nullptr) continue;
    if constexpr (kNeox) {
      Vec<T, N> y1, y2;
#pragma unroll
      for (int m = 0; m < N; ++m) {
        const float a = ToFloat(x1[b].v[m]);
        const float d = ToFloat(x2[b].v[m]);
        y1.v[m] = FromFloat<T>(Rotate<T, true>(a, c[m], d, s[m]));   // x1*cos - x2*sin
        y2.v[m] = FromFloat<T>(Rotate<T, false>(d, c[m], a, s[m]));  // x2*cos + x1*sin
      }
      StoreVec<T, N, N>(ptr[b], y1);
      StoreVec<T, N, N>(ptr[b] + half, y2);
    } else {
      Vec<T, N> y;
#pragma unroll
      for (int m = 0; m < N / 2; ++m) {
        const float a = ToFloat(x1[b].v[2 * m]);
        const float d = ToFloat(x1[b].v[2 * m + 1]);
        y.v[2 * m] = FromFloat<T>(Rotate<T, true>(a, c[m], d, s[m]));
        y.v[2 * m + 1] = FromFloat<T>(Rotate<T, false>(d, c[m], a, s[m]));
      }
      StoreVec<T, N, N>(ptr[b], y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pipelined persistent kernel (CACHEFLOW_ROTARY=pipelined): each CTA walks a stream of tokens
// and keeps the next kPipeStages - 1 tokens' loads in flight (cp.async into a shared-memory
// ring, so they hold no registers) while it rotates the current one.
// ---------------------------------------------------------------------------------------------

constexpr int kPipeLoads = 4;          // 16-byte q/k chunks per thread and token
constexpr int kPipeStages = 4;         // ring depth: tokens in flight per CTA = kPipeStages - 1
constexpr int kPipeMaxThreads = 512;   // per CTA (one token's part)

/*! \brief Rounds x and y to T in one paired conversion (same values as RoundTo on each). */
template <typename T>
__device__ __forceinline__ void RoundPair(float& x, float& y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    x = __low2float(h);
    y = __high2float(h);
  } else if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(x, y);
    x = __low2float(h);
    y = __high2float(h);
  }
}

/*! \brief Rotate with both products rounded by one paired conversion: bit-identical to Rotate. */
template <typename T, bool kMinus>
__device__ __forceinline__ float RotatePaired(float a, float c, float b, float s) {
  float ac = __fmul_rn(a, c);
  float bs = __fmul_rn(b, s);
  RoundPair<T>(ac, bs);
  return kMinus ? __fsub_rn(ac, bs) : __fadd_rn(ac, bs);
}

/*! \brief 16-byte asynchronous global -> shared copy (cp.async, L2 only). */
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
/*! \brief Waits until at most kPending of this thread's committed groups are still pending. */
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

/*!
 * \brief positions[i] through a volatile load: issued where it is written, never sunk by the
 * compiler into the (later) block that uses it.
 */
__device__ __forceinline__ int64_t LoadPositionNow(const int64_t* p) {
  int64_t v;
  asm volatile("ld.global.nc.s64 %0, [%1];\n" : "=l"(v) : "l"(p));
  return v;
}

/*! \brief 16-byte streaming store (evict-first: q/k are touched once; cos/sin stay in L2). */
template <typename T>
__device__ __forceinline__ void StoreStream16(T* p, const Vec<T, kVec16<T>>& x) {
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&x));
}

/*! \brief Units (neox: an x1 chunk and its x2 chunk; gpt-j: one chunk) per thread and token. */
template <bool kNeox>
constexpr int kPipeUnits = kNeox ? kPipeLoads / 2 : kPipeLoads;

/*! \brief Dynamic shared memory of RotaryPipelinedKernel for `threads` threads and rot_dim. */
template <typename T>
constexpr size_t PipeSmemBytes(int threads, int rot_dim) {
  return static_cast<size_t>(kPipeStages) * threads * kPipeLoads * 16 +  // q/k ring
         static_cast<size_t>(kPipeStages) * rot_dim * sizeof(float) +   // raw cos/sin ring
         2 * static_cast<size_t>(rot_dim) * sizeof(T);                  // rounded cos/sin x2
}

/*!
 * \brief Persistent CTAs, each over the tokens blockIdx.x, blockIdx.x + gridDim.x, ... and the
 * units (16-byte columns of the rotated features: neox N elements of x1 with their N partners
 * of x2, gpt-j N interleaved elements) of part blockIdx.y of each token. Thread i owns the units
 * i, i + blockDim.x, ... (kPipeLoads 16-byte chunks per token), the same for every token.
 *
 * Software pipeline over the CTA's tokens t_0, t_1, ...: at step k the thread issues, with
 * cp.async into ring slot (k + kPipeStages - 1) % kPipeStages, its q/k chunks of token
 * t_{k+kPipeStages-1} and (the first rot_dim/4 threads) one float4 each of that token's cos/sin
 * row, whose position was read at step k-1; then it reads positions[t_{k+kPipeStages}], waits for
 * its own copies of token t_k (cp.async.wait_group: kPipeStages - 1 tokens stay in flight), and
 * rotates t_k: the cos/sin loaders round their float4 to T into one of two shared buffers, one
 * barrier, then every thread rotates its chunks (read back from its own ring slots: no barrier
 * needed for them) and stores them to global memory. Loads in flight hold no registers, the
 * cos/sin load never waits for its position, and the first tokens' q/k loads wait for nothing.
 * Arithmetic identical to RotaryKernel (the two product roundings of each output share one
 * paired conversion instruction; the values are the same).
 */
template <typename T, bool kNeox>
__global__ void __launch_bounds__(kPipeMaxThreads)
    RotaryPipelinedKernel(const int64_t* __restrict__ positions, T* query, T* key,
                          const float* __restrict__ cos_sin_cache, int64_t query_stride,
                          int64_t key_stride, int num_tokens, int num_heads, int head_size,
                          int rot_dim, int64_t max_position, int units_per_head, int part_units,
                          int total_units) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  constexpr int N = kVec16<T>;
  constexpr int kU = kPipeUnits<kNeox>;
  constexpr int kCs = kNeox ? N : N / 2;  // cos (and sin) values per unit
  constexpr int S = kPipeStages;
  using Chunk = Vec<T, N>;
  extern __shared__ __align__(16) unsigned char pipe_smem[];
  const int threads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  // [S][kPipeLoads][threads] chunks | [S][rot_dim] float (raw rows) | [2][rot_dim] T (rounded)
  Chunk* const ring = reinterpret_cast<Chunk*>(pipe_smem);
  float* const ring_cs = reinterpret_cast<float*>(ring + S * kPipeLoads * threads);
  T* const cs_buf = reinterpret_cast<T*>(ring_cs + S * rot_dim);
  const int half = rot_dim / 2;

  // The thread's units (identical for every token of the CTA).
  const int first = static_cast<int>(blockIdx.y) * part_units;
  const int last = min(total_units, first + part_units);
  int off[kU];  // element offset of x1 (neox) / the chunk (gpt-j) in the q or k row
  int col[kU];  // first cos/sin index
  unsigned has = 0, in_key = 0;
#pragma unroll
  for (int r = 0; r < kU; ++r) {
    const int u = first + tid + r * threads;
    off[r] = 0;
    col[r] = 0;
    if (u < last) {
      const int head = u / units_per_head;
      const int i0 = (u - head * units_per_head) * N;
      col[r] = kNeox ? i0 : i0 / 2;
      has |= 1u << r;
      if (head < num_heads) {
        off[r] = head * head_size + i0;
      } else {
        off[r] = (head - num_heads) * head_size + i0;
        in_key |= 1u << r;
      }
    }
  }
  const bool cs_loader = 4 * tid < rot_dim;
  // Ring slot of chunk j (x1 of unit r: j = 2r, its x2: 2r + 1 for neox; j = r for gpt-j).
  auto slot = [&](int stage, int j) -> Chunk* { return ring + (stage * kPipeLoads + j) * threads + tid; };
  unsigned valid = 0;  // bit s: the token in ring slot s has a position in range

  // (Tokens past the end read the last position, unused.)
  auto load_position = [&](int64_t t) -> int64_t {
    return LoadPositionNow(positions + (t < num_tokens ? t : num_tokens - 1));
  };

  // Token t's q/k copies into ring slot `stage` (nothing past the end).
  auto issue_qk = [&](int64_t t, int stage) {
    if (t >= num_tokens) return;
    const T* q_row = query + t * query_stride;
    const T* k_row = key + t * key_stride;
#pragma unroll
    for (int r = 0; r < kU; ++r) {
      if ((has >> r) & 1u) {
        const T* p = ((in_key >> r) & 1u ? k_row : q_row) + off[r];
        CpAsync16(slot(stage, kNeox ? 2 * r : r), p);
        if constexpr (kNeox) CpAsync16(slot(stage, 2 * r + 1), p + half);
      }
    }
  };
  // Token t's cos/sin copy (position pos) into ring slot `stage`.
  auto issue_cs = [&](int64_t t, int64_t pos, int stage) {
    if (t >= num_tokens) return;
    const bool ok = pos >= 0 && pos < max_position;
    valid = ok ? valid | (1u << stage) : valid & ~(1u << stage);
    if (cs_loader) {
      CpAsync16(ring_cs + stage * rot_dim + 4 * tid,
                cos_sin_cache + (ok ? pos : 0) * rot_dim + 4 * tid);
    }
  };

  // Rotate token t from ring slot `stage` (its copies complete), cos/sin staged in `buf`.
  auto finish = [&](int64_t t, int stage, T* buf) {
    if (t >= num_tokens) return;  // uniform over the CTA
    if (cs_loader) {
      const float4 raw = *reinterpret_cast<const float4*>(ring_cs + stage * rot_dim + 4 * tid);
      Vec<T, 4> v;
      v.v[0] = FromFloat<T>(raw.x);
      v.v[1] = FromFloat<T>(raw.y);
      v.v[2] = FromFloat<T>(raw.z);
      v.v[3] = FromFloat<T>(raw.w);
      *reinterpret_cast<Vec<T, 4>*>(buf + 4 * tid) = v;
    }
    __syncthreads();
    if (!((valid >> stage) & 1u)) return;  // out-of-range position: untouched (uniform)
    T* q_row = query + t * query_stride;
    T* k_row = key + t * key_stride;
#pragma unroll
    for (int r = 0; r < kU; ++r) {
      if (!((has >> r) & 1u)) continue;
      T* p = ((in_key >> r) & 1u ? k_row : q_row) + off[r];
      const Vec<T, kCs> c = LoadVec<T, kCs, kCs>(buf + col[r]);
      const Vec<T, kCs> s = LoadVec<T, kCs, kCs>(buf + half + col[r]);
      if constexpr (kNeox) {
        const Chunk x1 = *slot(stage, 2 * r);
        const Chunk x2 = *slot(stage, 2 * r + 1);
        Chunk y1, y2;
#pragma unroll
        for (int m = 0; m < N; ++m) {
          const float a = ToFloat(x1.v[m]);
          const float b = ToFloat(x2.v[m]);
          const float cm = ToFloat(c.v[m]);
          const float sm = ToFloat(s.v[m]);
          y1.v[m] = FromFloat<T>(RotatePaired<T, true>(a, cm, b, sm));   // x1*cos - x2*sin
          y2.v[m] = FromFloat<T>(RotatePaired<T, false>(b, cm, a, sm));  // x2*cos + x1*sin
        }
        StoreStream16<T>(p, y1);
        StoreStream16<T>(p + half, y2);
      } else {
        const Chunk x = *slot(stage, r);
        Chunk y;
#pragma unroll
        for (int m = 0; m < N / 2; ++m) {
          const float a = ToFloat(x.v[2 * m]);
          const float b = ToFloat(x.v[2 * m + 1]);
          const float cm = ToFloat(c.v[m]);
          const float sm = ToFloat(s.v[m]);
          y.v[2 * m] = FromFloat<T>(RotatePaired<T, true>(a, cm, b, sm));
          y.v[2 * m + 1] = FromFloat<T>(RotatePaired<T, false>(b, cm, a, sm));
        }
        StoreStream16<T>(p, y);
      }
    }
  };

  const int64_t stride = gridDim.x;
  int64_t t = blockIdx.x;
  // Prologue: positions of the first S tokens, the q/k copies of the first S - 1 tokens (none of
  // them waits for a position), then their cos/sin copies. Commit group i holds everything token
  // i still needs (group 0 all the q/k copies), so waiting for the groups up to k below means
  // token k's copies have landed.
  int64_t pos[S - 1];
#pragma unroll
  for (int i = 0; i < S - 1; ++i) pos[i] = load_position(t + i * stride);
  int64_t pos_next = load_position(t + (S - 1) * stride);
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue_qk(t + i * stride, i);
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    issue_cs(t + i * stride, pos[i], i);
    CpAsyncCommit();
  }
  for (int k = 0; t < num_tokens; ++k, t += stride) {
    const int stage = (k + S - 1) % S;
    issue_qk(t + (S - 1) * stride, stage);
    issue_cs(t + (S - 1) * stride, pos_next, stage);
    CpAsyncCommit();  // one group per step, empty past the end
    pos_next = load_position(t + S * stride);
    CpAsyncWait<S - 1>();  // this thread's copies of token t (slot k % S) have landed
    finish(t, k % S, cs_buf + (k & 1) * rot_dim);
  }
  CpAsyncWait<0>();  // nothing left in flight at exit (the remaining groups are empty)
}

struct RotaryArgs {
  const int64_t* positions;
  char* query;
  char* key;
  const float* cos_sin_cache;
  int64_t query_stride, key_stride;  // elements
  int64_t num_tokens, max_position;
  int num_heads, num_kv_heads, head_size, rot_dim;
};

template <typename T, int N, int W, bool kNeox>
void LaunchKernel(const RotaryArgs& a, cudaStream_t stream) {
  const int units = kNeox ? a.rot_dim / 2 / N : a.rot_dim / N;
  const int64_t total = static_cast<int64_t>(a.num_heads + a.num_kv_heads) * units;
  const int64_t threads =
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (total + 31) / 32 * 32));
  const size_t smem = static_cast<size_t>(a.rot_dim) * sizeof(float);
  LaunchChained(RotaryKernel<T, N, W, kNeox>, dim3(static_cast<unsigned>(a.num_tokens)),
                dim3(static_cast<unsigned>(threads)), smem, stream, a.positions,
                reinterpret_cast<T*>(a.query), reinterpret_cast<T*>(a.key), a.cos_sin_cache,
                a.query_stride, a.key_stride, a.num_heads, a.num_kv_heads, a.head_size,
                a.rot_dim, a.max_position);
}

/*!
 * \brief Launches RotaryWarpKernel when a head's units (16-byte columns) divide a warp; returns
 * false (nothing launched) otherwise.
 */
template <typename T, bool kNeox>
bool LaunchWarpKernel(const RotaryArgs& a, cudaStream_t stream) {
  constexpr int kN = kVec16<T>;
  constexpr int kHeads = kNeox ? kLoadsPerLane / 2 : kLoadsPerLane;
  const int units = (kNeox ? a.rot_dim / 2 : a.rot_dim) / kN;
  if (units > 32 || 32 % units != 0 || !IsAligned(a.cos_sin_cache, 16)) return false;
  int unit_shift = 0;
  while ((1 << unit_shift) < units) ++unit_shift;
  const int slots = 32 / units;
  const int64_t lane_heads = (a.num_heads + a.num_kv_heads + slots - 1) / slots;
  const int64_t parts = (lane_heads + kHeads - 1) / kHeads;
  if (parts > 65535) return false;
  const int heads_per_part = static_cast<int>((lane_heads + parts - 1) / parts);
  const dim3 grid(static_cast<unsigned>((a.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(parts));
  LaunchChained(RotaryWarpKernel<T, kNeox>, grid, dim3(kWarpsPerBlock * 32), 0, stream,
      a.positions, reinterpret_cast<T*>(a.query), reinterpret_cast<T*>(a.key), a.cos_sin_cache,
      a.query_stride, a.key_stride, static_cast<int>(a.num_tokens), a.num_heads, a.num_kv_heads,
      a.head_size, a.rot_dim, a.max_position, unit_shift, heads_per_part);
  return true;
}

/*!
 * \brief CTAs of `kernel` (threads, smem bytes of dynamic shared memory) resident at once on
 * device `device`: SMs x CTAs per SM (occupancy API; 0 when it does not fit), remembered per
 * (kernel, device, threads, smem) so a call costs one lookup. Raises the kernel's dynamic shared
 * memory limit first when smem is above the default 48 KB (and within the device's opt-in limit),
 * and prefers the largest shared memory carveout.
 */
int64_t ResidentCtas(const void* kernel, int device, int threads, size_t smem) {
  struct Entry {
    const void* kernel;
    int device, threads;
    size_t smem;
    int64_t ctas;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache) {
    if (e.kernel == kernel && e.device == device && e.threads == threads && e.smem == smem) {
      return e.ctas;
    }
  }
  int sms = 0, optin = 0, per_sm = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TVM_FFI_CHECK_CUDA_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem <= static_cast<size_t>(optin)) {
    // All of the unified L1/shared storage as shared memory: the kernel's loads bypass L1.
    PreferSharedCarveout(kernel, device);
    RaiseSmemLimit(kernel, smem, device);
    TVM_FFI_CHECK_CUDA_ERROR(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  }
  const int64_t ctas = static_cast<int64_t>(sms) * per_sm;
  if (cache.size() < 256) cache.push_back({kernel, device, threads, smem, ctas});
  return ctas;
}

/*!
 * \brief Launches RotaryPipelinedKernel (16-byte q/k accesses already checked by the caller);
 * returns false (nothing launched) when the cos/sin cache is not 16-byte aligned, rot_dim is not
 * a multiple of 4, a token's part would need more than kPipeMaxThreads threads, or the shared
 * memory ring does not fit. Grid: (token streams, parts of a token's units): as many CTAs as are
 * resident on the device at once (SM count x occupancy), balanced so that every stream has the
 * same number of tokens (the last one fewer).
 */
template <typename T, bool kNeox>
bool LaunchPipelinedKernel(const RotaryArgs& a, int device, cudaStream_t stream,
                           int64_t min_tokens_per_cta) {
  constexpr int kN = kVec16<T>;
  constexpr int64_t kU = kPipeUnits<kNeox>;
  if (a.rot_dim % 4 != 0 || !IsAligned(a.cos_sin_cache, 16)) return false;
  const int units_per_head = (kNeox ? a.rot_dim / 2 : a.rot_dim) / kN;
  const int64_t total = static_cast<int64_t>(a.num_heads + a.num_kv_heads) * units_per_head;
  const int64_t parts = (total + kU * kPipeMaxThreads - 1) / (kU * kPipeMaxThreads);
  const int64_t part_units = (total + parts - 1) / parts;
  const int64_t cs_threads = (a.rot_dim / 4 + 31) / 32 * 32;
  const int64_t threads = std::max<int64_t>(((part_units + kU - 1) / kU + 31) / 32 * 32,
                                            cs_threads);
  if (parts > 65535 || threads > kPipeMaxThreads) return false;
  const size_t smem = PipeSmemBytes<T>(static_cast<int>(threads), a.rot_dim);
  const auto kernel = RotaryPipelinedKernel<T, kNeox>;
  const int64_t resident = ResidentCtas(reinterpret_cast<const void*>(kernel), device,
                                        static_cast<int>(threads), smem);
  if (resident <= 0) return false;
  const int64_t streams = std::max<int64_t>(1, resident / parts);
  const int64_t per_stream = (a.num_tokens + streams - 1) / streams;
  if (per_stream < min_tokens_per_cta) return false;
  const int64_t grid_x = (a.num_tokens + per_stream - 1) / per_stream;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(parts));
  LaunchChained(
      kernel, grid, dim3(static_cast<unsigned>(threads)), smem, stream, a.positions,
      reinterpret_cast<T*>(a.query), reinterpret_cast<T*>(a.key), a.cos_sin_cache, a.query_stride,
      a.key_stride, static_cast<int>(a.num_tokens), a.num_heads, a.head_size, a.rot_dim,
      a.max_position, units_per_head, static_cast<int>(part_units), static_cast<int>(total));
  return true;
}

enum class RotaryVariant { kAuto, kBlock, kWarp, kPipelined };

/*!
 * \brief The kernel chosen by CACHEFLOW_ROTARY (A/B benchmarks in one process): "block" the
 * block-per-token kernel, "warp" the warp-per-token kernel, "pipelined" the pipelined persistent
 * kernel wherever it applies; unset or anything else: the pipelined kernel where it applies and
 * every CTA gets at least two tokens (fewer leave its ring nothing to overlap), else the block
 * kernel. Read at every call (a getenv, no allocation).
 */
RotaryVariant ChosenVariant() {
  const char* v = std::getenv("CACHEFLOW_ROTARY");
  if (v == nullptr) return RotaryVariant::kAuto;
  if (std::strcmp(v, "block") == 0) return RotaryVariant::kBlock;
  if (std::strcmp(v, "warp") == 0) return RotaryVariant::kWarp;
  if (std::strcmp(v, "pipelined") == 0) return RotaryVariant::kPipelined;
  return RotaryVariant::kAuto;
}

template <typename T, bool kNeox>
void LaunchStyle(const RotaryArgs& a, int device, cudaStream_t stream) {
  constexpr int kN = kVec16<T>;
  const int unit_span = kNeox ? a.rot_dim / 2 : a.rot_dim;
  const bool wide = unit_span % kN == 0 && a.head_size % kN == 0 && a.query_stride % kN == 0 &&
                    a.key_stride % kN == 0 && AllAligned({a.query, a.key}, 16);
  const RotaryVariant variant = ChosenVariant();
  if (wide && variant == RotaryVariant::kWarp && LaunchWarpKernel<T, kNeox>(a, stream)) return;
  if (wide && variant == RotaryVariant::kPipelined &&
      LaunchPipelinedKernel<T, kNeox>(a, device, stream, 1)) {
    return;
  }
  if (wide && variant == RotaryVariant::kAuto &&
      LaunchPipelinedKernel<T, kNeox>(a, device, stream, 2)) {
    return;
  }
  if (wide) {
    LaunchKernel<T, kN, kN, kNeox>(a, stream);
  } else {
    LaunchKernel<T, kNeox ? 1 : 2, 1, kNeox>(a, stream);
  }
}

/*!
 * \brief Checks a [num_tokens, heads * head_size] activation whose last dimension is contiguous;
 * returns its row stride in elements.
 */
int64_t CheckActivation(const char* name, const TensorView& t, int64_t num_tokens,
                        int64_t head_size, const char* heads) {
  CheckNdim(kOp, name, t, 2, heads);
  TVM_FFI_CHECK(t.shape()[0] == num_tokens, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "of shape [" << num_tokens
      << ", ...] (num_tokens of 'positions'), got " << ShapeStr(t);
  TVM_FFI_CHECK(t.shape()[1] % head_size == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "of shape " << heads << " with a last dimension "
      << "divisible by head_size=" << head_size << ", got " << ShapeStr(t);
  if (t.IsContiguous()) return t.shape()[1];
  const int64_t col_stride = t.strides()[1];
  const int64_t row_stride = t.strides()[0];
  TVM_FFI_CHECK(col_stride == 1 || t.shape()[1] <= 1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "contiguous in its last dimension (stride 1), got "
      << "strides [" << row_stride << ", " << col_stride << "] for shape " << ShapeStr(t);
  TVM_FFI_CHECK(t.shape()[0] <= 1 || row_stride >= t.shape()[1], ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "of non-overlapping rows (row stride >= "
      << t.shape()[1] << "), got row stride " << row_stride;
  return t.shape()[0] <= 1 ? t.shape()[1] : row_stride;
}

void RotaryEmbedding(TensorView positions, TensorView query, TensorView key,
                     TensorView cos_sin_cache, int64_t head_size, bool is_neox) {
  CheckNdim(kOp, "positions", positions, 1, "[num_tokens]");
  TVM_FFI_CHECK(IsInt64(positions.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "positions") << "int64, got " << positions.dtype();
  const int64_t num_tokens = positions.shape()[0];
  TVM_FFI_CHECK(head_size > 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "head_size") << "a positive integer, got " << head_size;
  CheckFloatDtype(kOp, "query", query);
  const int64_t q_stride =
      CheckActivation("query", query, num_tokens, head_size, "[num_tokens, num_heads * head_size]");
  CheckDtypeLike(kOp, "key", key, "query", query);
  const int64_t k_stride = CheckActivation("key", key, num_tokens, head_size,
                                           "[num_tokens, num_kv_heads * head_size]");
  CheckNdim(kOp, "cos_sin_cache", cos_sin_cache, 2, "[max_position, rot_dim]");
  const DLDataType cs_dtype = cos_sin_cache.dtype();
  TVM_FFI_CHECK(cs_dtype.code == kDLFloat && cs_dtype.bits == 32 && cs_dtype.lanes == 1,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "cos_sin_cache") << "float32, got " << cs_dtype;
  const int64_t max_position = cos_sin_cache.shape()[0];
  const int64_t rot_dim = cos_sin_cache.shape()[1];
  TVM_FFI_CHECK(rot_dim >= 2 && rot_dim % 2 == 0 && rot_dim <= head_size && rot_dim <= kMaxRotDim,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "cos_sin_cache") << "of shape [max_position, rot_dim] with "
      << "rot_dim even, >= 2 and <= head_size=" << head_size << " (and <= " << kMaxRotDim
      << "), got " << ShapeStr(cos_sin_cache);
  CheckContiguous(kOp, "positions", positions);
  CheckContiguous(kOp, "cos_sin_cache", cos_sin_cache);
  CheckCuda(kOp, "positions", positions);
  CheckSameDevice(kOp, "query", query, "positions", positions);
  CheckSameDevice(kOp, "key", key, "positions", positions);
  CheckSameDevice(kOp, "cos_sin_cache", cos_sin_cache, "positions", positions);

  const int64_t num_heads = query.shape()[1] / head_size;
  const int64_t num_kv_heads = key.shape()[1] / head_size;
  CheckRotaryExtent(kOp, num_tokens, num_heads, num_kv_heads, head_size);
  if (num_tokens == 0 || num_heads + num_kv_heads == 0) return;

  RotaryArgs a;
  a.positions = reinterpret_cast<const int64_t*>(DataPtr(positions));
  a.query = DataPtr(query);
  a.key = DataPtr(key);
  a.cos_sin_cache = reinterpret_cast<const float*>(DataPtr(cos_sin_cache));
  a.query_stride = q_stride;
  a.key_stride = k_stride;
  a.num_tokens = num_tokens;
  a.max_position = max_position;
  a.num_heads = static_cast<int>(num_heads);
  a.num_kv_heads = static_cast<int>(num_kv_heads);
  a.head_size = static_cast<int>(head_size);
  a.rot_dim = static_cast<int>(rot_dim);

  const DLDevice dev = positions.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const cudaStream_t stream = EnvStream(dev);
  DispatchFloat(query.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if (is_neox) {
      LaunchStyle<T, true>(a, dev.device_id, stream);
    } else {
      LaunchStyle<T, false>(a, dev.device_id, stream);
    }
  });
  CheckLaunch();
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(rotary_embedding, cacheflow::RotaryEmbedding);
