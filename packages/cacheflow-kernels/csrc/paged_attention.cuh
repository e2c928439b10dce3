// paged_attention: decode attention (one query token per sequence) over the paged KV cache.
//
// Layouts (C-contiguous; T = float16, bfloat16 or float32, the same for query and out; the
// caches hold T too, or FP8 E4M3 bytes (C = Fp8E4m3) dequantized on read with k_scale / v_scale):
//   query, out:               [num_seqs, num_heads, head_size]                       T
//                             (query's sequence rows may be strided: Params::q_stride)
//   key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_size]      C
//   block_tables:             [num_seqs, max_blocks_per_seq]                         int32
//   context_lens:             [num_seqs]                                             int32
//   alibi_slopes (optional):  [num_heads]                                            float32
//   workspace (split-K only): num_seqs * num_heads * num_partitions * (head_size + 2) float32:
//                             partial outputs [S, H, P, D], then maxima [S, H, P], then sums.
//   lse (optional):           [num_seqs, num_heads] float32, log-sum-exp of the final scores
//                             (written by the CTA when unsplit, by the merge kernel when split).
//
// Work decomposition. One CTA (4 warps) handles one (sequence, KV head, group of query heads,
// partition of the context): all query heads that share the KV head are processed together
// (up to 16 with tensor cores, 32 in the pipelined kernel with two m16 row tiles per warp, 8 on
// the float32 path), so each K/V row is read from memory once.
// The warps split the partition's tokens in tiles of 8 (warp w takes tiles w, w+4, w+8, ...),
// each keeping its own online-softmax state (running max, running sum, fp32 output); the four
// states are merged through shared memory at the end. With one partition per sequence the CTA
// writes `out` directly; with several (split-K, for long contexts and few sequences) each CTA
// writes its normalized partial output, max and sum to the workspace and a second kernel merges
// the partitions. Grid: x = KV head * head groups (fastest, so CTAs sharing K/V run together),
// y = sequence, z = partition.
//
// float16/bfloat16 use mma.sync (sm_80+) with the query heads as the 16 rows of the MMA (rows
// past the group size are zero):
//   S[16 heads x 8 tokens]  = Q[16 x D] * K^T        m16n8k16, fp32 accumulate, D/16 k-steps
//   O[16 heads x D]        += P[16 x 8 tokens] * V   m16n8k8, one per 8 output columns
// The score fragment of the first MMA is exactly the A fragment of the second (after rounding P
// to T), so P never leaves registers. K and V are read with 16-byte loads straight into MMA
// fragments: the order of the reduction dimension (head_size for QK) is free, and the output
// columns of PV can be permuted too, so each thread loads 8 contiguous elements of a K or V row;
// the permutation is undone when the output is written (see the index maps below).
// float32 uses CUDA cores (a warp-wide dot product per token, butterfly-reduced).
//
// Two main loops for float16/bfloat16 (same fragments and softmax): the pipelined kernel
// (default; each warp streams its tiles through a ring of cp.async stages in shared memory, see
// "Pipelined tensor-core kernel") and the register kernel (K/V loaded straight into fragments
// one tile ahead, plus L2 prefetches): the fallback where two stages do not fit, and the A/B
// baseline (Params::stages = kStagesRegister). The pipelined kernel computes two 8-token tiles
// per warp step where its ring has >= 4 stages (PipePairLoop: one softmax update per 16 tokens,
// PV with m16n8k16, lazy rescaling), else one (Params::step_tiles).
//
// FP8 caches: each load brings half the bytes (8 fp8 elements where the 16-bit path loads 8
// 16-bit ones), kept raw in registers and widened to T (exactly: every e4m3 value is a float16
// and a bfloat16) just before the MMA that consumes it. The K scale is folded into the softmax
// scale and the V scale into the final normalization, so neither costs a multiply per element.
// Soft-capping (Gemma 2): scores become cap * tanh(score / cap) before ALiBi and the mask.
//
// The kernels are written against a few primitives (below) so that they also compile for the
// host under CACHEFLOW_PAGED_ATTENTION_EMULATE, where tests/emulation/paged_attention_emu.h
// runs every CUDA thread as a fiber and emulates the warp-level instructions on a CPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pdl.cuh"

#ifdef CACHEFLOW_PAGED_ATTENTION_EMULATE
#include "paged_attention_emu.h"  // PA_* macros, Dtype<>, the primitives, for the host
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>

#define PA_DEVICE __device__ __forceinline__
#define PA_GLOBAL __global__
#define PA_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)

namespace cacheflow {
namespace paged_attention {

constexpr unsigned kFullMask = 0xffffffffu;

PA_DEVICE unsigned char* DynamicSmem() {
  extern __shared__ __align__(16) unsigned char pa_dynamic_smem[];
  return pa_dynamic_smem;
}
PA_DEVICE void SyncThreads() { __syncthreads(); }
PA_DEVICE float ShflXor(float v, int mask) { return __shfl_xor_sync(kFullMask, v, mask); }
PA_DEVICE int ShflIdx(int v, int src_lane) { return __shfl_sync(kFullMask, v, src_lane); }
/*! \brief x, whose computation the compiler may no longer move or repeat at its uses (an empty
 * asm statement it cannot see through): for per-lane values formed once before a loop. */
PA_DEVICE uint32_t Pinned(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}
PA_DEVICE int LoadIndex(const int32_t* ptr) { return __ldg(ptr); }
PA_DEVICE uint32_t BytePerm(uint32_t x, uint32_t y, uint32_t sel) { return __byte_perm(x, y, sel); }
PA_DEVICE float AsFloat(uint32_t u) { return __uint_as_float(u); }
template <typename U>
PA_DEVICE void StoreGlobal(U* ptr, U value) {
  *ptr = value;
}
// Plain (cached) loads of the query (and, in fused launches, of the new token's key/value rows,
// its position and slot and its cos/sin row).
PA_DEVICE uint4 LoadGlobal16(const void* ptr) { return *static_cast<const uint4*>(ptr); }
PA_DEVICE uint2 LoadGlobal8(const void* ptr) { return *static_cast<const uint2*>(ptr); }
PA_DEVICE int64_t LoadGlobalI64(const int64_t* ptr) { return *ptr; }
PA_DEVICE float LoadGlobalF32(const float* ptr) { return *ptr; }
/*! \brief a * b rounded to float, never contracted into a fused multiply-add. */
PA_DEVICE float MulRn(float a, float b) { return __fmul_rn(a, b); }
/*! \brief This thread's global stores performed at device scope before its later accesses
 * (fused launches: the new token's K/V stores before the barrier after which the CTA's own
 * cp.async copies read them back). */
PA_DEVICE void FenceDevice() { __threadfence(); }
/*! \brief x as an FP8 E4M3 byte: round to nearest even, saturating at +-448 (what an FP8 KV cache
 * stores; rotary_embedding_with_cache's and reshape_and_cache's conversion). */
PA_DEVICE uint32_t FloatToFp8(float x) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

PA_DEVICE float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

PA_DEVICE float FastTanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/*! \brief The FP8 E4M3 byte in the low 8 bits of `b` as a float (exact). */
PA_DEVICE float Fp8ToFloat(uint32_t b) {
  return __half2float(
      __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b & 0xffu), __NV_E4M3)));
}

// Streaming loads of data read once (the cache is not written while the kernel runs).
PA_DEVICE uint4 LoadStream16(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}
PA_DEVICE uint2 LoadStream8(const void* ptr) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}
PA_DEVICE uint32_t LoadStream4(const void* ptr) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}
PA_DEVICE uint32_t LoadStream2(const void* ptr) {
  unsigned short v;
  asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
  return v;
}

// Fetch the line holding `ptr` into L2 (no register result; callers pass only addresses inside
// the caches). Deepens the K/V pipeline beyond the one tile held in registers.
PA_DEVICE void PrefetchL2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

// The pipelined kernel's primitives: warp barrier and cp.async (sm_80+) of 16-byte chunks from
// the caches into shared memory. `valid` false zero-fills the chunk without reading global
// memory (src-size 0), so tokens outside the attended range read as zeros.
PA_DEVICE void SyncWarp() { __syncwarp(); }
/*! \brief True on every lane when `pred` holds on any lane of the (converged) warp. */
PA_DEVICE bool AnyInWarp(bool pred) { return __any_sync(kFullMask, pred) != 0; }
PA_DEVICE void CpAsync16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
PA_DEVICE void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
PA_DEVICE void CpAsyncWaitN() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
/*! \brief Waits until at most `n` (0 .. 7, warp-uniform) of this thread's groups are pending. */
PA_DEVICE void CpAsyncWait(int n) {
  switch (n) {
    case 0: CpAsyncWaitN<0>(); break;
    case 1: CpAsyncWaitN<1>(); break;
    case 2: CpAsyncWaitN<2>(); break;
    case 3: CpAsyncWaitN<3>(); break;
    case 4: CpAsyncWaitN<4>(); break;
    case 5: CpAsyncWaitN<5>(); break;
    case 6: CpAsyncWaitN<6>(); break;
    default: CpAsyncWaitN<7>(); break;
  }
}

/*! \brief The two FP8 E4M3 bytes in the upper half of `b` (byte 2 the lower element) as packed
 * halves; the PTX names the upper half, so no shift precedes the conversion. */
PA_DEVICE uint32_t Fp8x2HiToHalf2(uint32_t b) {
  uint32_t d;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}"
      : "=r"(d)
      : "r"(b));
  return d;
}

/*!
 * \brief ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: four 8x8 matrices of 16-bit elements,
 * matrix j's row i at the 16-byte-aligned shared address `row` of lane 8j + i; r[j] of lane l
 * gets elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) of matrix j (low half first), i.e.
 * an MMA B-fragment word of a matrix stored with its k index along the rows.
 */
PA_DEVICE void LdMatrixX4Trans(const unsigned char* row, uint32_t (&r)[4]) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

/*!
 * \brief movmatrix.sync.aligned.m8n8.trans.b16: the transpose of an 8x8 matrix of 16-bit
 * elements held in the MMA fragment layout (lane l: row l / 4, columns 2 (l % 4) and + 1, the
 * lower column in the low half), returned in the same layout: lane l gets elements (2 (l % 4),
 * l / 4) and (2 (l % 4) + 1, l / 4) of the input.
 */
PA_DEVICE uint32_t MovMatrixTrans(uint32_t a) {
  uint32_t d;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
  return d;
}

template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
  static PA_DEVICE uint32_t Pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static PA_DEVICE __half FromFloat(float x) { return __float2half_rn(x); }
  // One element as its 16 bits (rounded to nearest even) and back.
  static PA_DEVICE uint32_t ElemBits(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static PA_DEVICE float ElemToFloat(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  // Two FP8 E4M3 bytes (low 16 bits; the lower byte is the lower element) as packed halves.
  static PA_DEVICE uint32_t FromFp8x2(uint32_t b) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(b & 0xffffu), __NV_E4M3);
    return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  }
  // The same of the high 16 bits: FromFp8x2(b >> 16) without the shift (the conversion reads
  // the register's upper half in place, F2FP ... R.H1).
  static PA_DEVICE uint32_t FromFp8x2Hi(uint32_t b) { return Fp8x2HiToHalf2(b); }
  // d += a * b, m16n8k16, row.col, fp32 accumulate.
  static PA_DEVICE void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                 uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  // d += a * b, m16n8k8, row.col, fp32 accumulate.
  static PA_DEVICE void Mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <>
struct Dtype<__nv_bfloat16> {
  static PA_DEVICE uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static PA_DEVICE __nv_bfloat16 FromFloat(float x) { return __float2bfloat16_rn(x); }
  static PA_DEVICE uint32_t ElemBits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static PA_DEVICE float ElemToFloat(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
  }
  static PA_DEVICE uint32_t FromFp8x2(uint32_t b) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(b & 0xffffu), __NV_E4M3);
    return Pack(__half2float(__half(__half_raw{h.x})), __half2float(__half(__half_raw{h.y})));
  }
  static PA_DEVICE uint32_t FromFp8x2Hi(uint32_t b) {
    const uint32_t h = Fp8x2HiToHalf2(b);
    return Pack(__half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu))),
                __half2float(__ushort_as_half(static_cast<unsigned short>(h >> 16))));
  }
  static PA_DEVICE void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                 uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static PA_DEVICE void Mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <>
struct Dtype<float> {
  static PA_DEVICE float FromFloat(float x) { return x; }
};

// The float16 element type and the bfloat16 test (MmaElem).
using MmaHalf = __half;
template <typename T>
constexpr bool kIsBf16 = std::is_same<T, __nv_bfloat16>::value;

}  // namespace paged_attention
}  // namespace cacheflow
#endif  // CACHEFLOW_PAGED_ATTENTION_EMULATE

namespace cacheflow {
namespace paged_attention {

/*! \brief Element type of an FP8 E4M3 cache (one byte; the kernels widen it to T on read). */
struct Fp8E4m3 {
  uint8_t bits;
};

constexpr int kWarps = 4;               // warps per CTA (the pipelined kernel's wide CTAs: more)
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 8;               // tokens per warp tile (one MMA n-tile); divides block_size
constexpr int kPartitionAlign = 64;    // partition sizes are multiples of this
constexpr int kMmaRows = 16;           // query heads per CTA on the tensor-core path
constexpr int kMaxCtaRows = 32;        // ... of the pipelined kernel with two m16 row tiles
constexpr int kSimtRows = 8;           // query heads per CTA on the float32 path (when group > 1)
constexpr int kMaxPartitions = 8192;   // bound of num_partitions (combine kernel's shared memory)
constexpr int kCombineThreads = 128;
constexpr int kOutPad = 4;             // floats of padding per row of the merge buffer
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

/*! \brief Everything a launch needs (see MakeParams). */
// Tiles (per warp) whose K and V rows are prefetched into L2 ahead of the one tile held in
// registers (Params::l2_prefetch_tiles): the register pipeline alone keeps ~1 tile (4 KB at d128
// fp16) per warp in flight, which leaves a CTA latency-bound (~16 GB/s); the prefetches add that
// many tiles of DRAM traffic in flight per warp at no register cost, and the register loads then
// hit L2. The tensor-core kernel reads it; tuning runs override the default through the
// environment variable CACHEFLOW_PA_L2_PREFETCH_TILES (0 .. kMaxL2PrefetchTiles).
constexpr int kDefaultL2PrefetchTiles = 2;
constexpr int kMaxL2PrefetchTiles = 16;  // < 32: the prefetched tile's block number is in the
                                         // current or the next chunk of 32 cached ones

// Pipeline depth of the shared-memory kernel (stages of one 8-token K/V tile per warp).
constexpr int kStagesAuto = -1;
constexpr int kStagesRegister = 0;
constexpr int kMinStages = 2;
constexpr int kMaxStages = 8;            // cp.async.wait_group takes an immediate: 0 .. 6 used
// The deepest pipeline the automatic choice takes. Measured on an H200 (2026-12-04,
// docs/benchmarks.md), 7 and 8 stages were 1-5% slower than 6 on every FP8 decode case (whose
// half-size stages fit 8) and never faster on 16-bit ones. The H100 has less bandwidth for the
// same latency, so it needs fewer bytes in flight and 6 suffices there too.
constexpr int kMaxAutoStages = 6;
constexpr int kSmemReservedPerCta = 1024;  // shared memory the driver reserves per CTA (sm_80+)
// The pipelined kernel's step (Params::step_tiles): 1 computes one 8-token tile per warp step
// (softmax update and PV with m16n8k8), 2 computes two tiles per step: one softmax update per 16
// tokens and PV with m16n8k16 (half the PV MMAs, half the rescales and shuffles per token); the
// ring still holds 8-token stages, and needs >= kMinPairStages of them.
constexpr int kDefaultStepTiles = 2;
constexpr int kMinPairStages = 4;
// Lazy rescaling of the two-tile step (Params::rescale_threshold, log2 units): a row's running
// max (the reference of its exponentials) moves only when a score exceeds it by more than the
// threshold, so the output accumulators are rescaled only then (warp-uniform skip otherwise);
// probabilities stay <= 2^threshold, exact after the final normalization by the sum taken with
// the same reference. < 0: every step moves the max to the exact running max and rescales.
constexpr float kDefaultRescaleThreshold = 8.f;
// Query heads per CTA of the pipelined two-tile-step kernel where a KV head has more than 16
// (Params::cta_rows): 32 gives every warp two m16 row tiles, so groups of 17-32 query heads (MQA
// with 32 heads) read each K/V tile once per CTA instead of once per 16 heads; 16 keeps one row
// tile (and ceil(group / 16) CTAs per KV head). Head sizes <= 128 (the accumulators double).
// kCtaRowsAuto takes 32 only where the unsplit grid of 32-row CTAs has at least
// Params::wide_rows_min_ctas CTAs (the device's multiprocessor count): a 32-row CTA is the only
// one its SM holds at d128, so a smaller grid runs one 4-warp CTA per SM, latency-bound, where
// twice as many 16-row CTAs put 8 warps on each SM. Their second read of each K/V tile hits L2
// (H100, 2026-12-05: the same DRAM bytes; MQA b1 ctx32k 0.91x the time of 32-row CTAs, 48 heads
// 0.84x; but b256 ctx2k, 256 CTAs of 32, 1.34x slower with 16; the H200 the same way round).
constexpr int kCtaRowsAuto = 0;
constexpr int kDefaultCtaRows = kCtaRowsAuto;
// Query heads per KV head up to which an unsplit grid of at most one CTA per SM runs wide CTAs
// (Params::wide_max_group, RunWideCtas): groups above 16 take ceil(group / 16) CTAs of 16. 48:
// MQA / GQA with groups of 40-48 at batches 16-44 and contexts of 1k-2k took 0.76-0.97x the
// time of the 4-warp splits planned before (H100, 2026-12-07 14:56); groups of 64 and 71 lost
// 2-11% where the 4-warp plan split (64 heads at batch 16 / 2k, 71 at 16 / 4k) and gained
// 20% where it did not (64 at 32 / 1k), so they keep 4 warps.
constexpr int kDefaultWideMaxGroup = 48;

struct Params {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  const float* alibi_slopes;  // nullptr: no ALiBi
  float* ws_o;                // [num_seqs, num_heads, num_partitions, head_size]; nullptr: no split
  float* ws_m;                // [num_seqs, num_heads, num_partitions] running max (log2 units)
  float* ws_l;                // [num_seqs, num_heads, num_partitions] sum of exp2(s - max)
  float* lse;                 // [num_seqs, num_heads] natural log-sum-exp of the final scores
                              // (-inf for an empty context); nullptr: not written
  float scale_log2;           // softmax scale * k_scale * log2(e)
  float v_scale;              // multiplies the output (the V dequantization scale; 1 unless fp8)
  float soft_cap_log2;        // logits soft cap * log2(e); 0: no soft-capping
  float inv_soft_cap_log2;    // 1 / soft_cap_log2 (0 without soft-capping)
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int group;                  // num_heads / num_kv_heads
  int block_size;
  int log2_block_size;
  int max_blocks_per_seq;
  int max_tokens;             // max_blocks_per_seq * block_size: contexts are clamped to it
  int64_t block_stride;       // elements between cache blocks: block_size * num_kv_heads * D
  int64_t token_stride;       // elements between tokens of a block: num_kv_heads * D
  int partition_size;         // tokens per partition (multiple of 64, >= max_tokens if unsplit)
  int num_partitions;
  int sliding_window;         // 0: attend to the whole context
  int l2_prefetch_tiles;      // tiles per warp prefetched into L2 ahead of the registers
                              // (register kernel only)
  // The 16-bit kernels' main loop (see "Pipelined tensor-core kernel"): kStagesAuto picks the
  // shared-memory pipeline with a depth from the device's shared memory (smem_per_sm,
  // smem_per_block: 0 = unknown, which selects the register kernel); kStagesRegister forces the
  // register kernel (the fallback, and the A/B knob); 2 .. kMaxStages forces that depth (clamped
  // to what one CTA may allocate). The dispatch resolves it to the depth used (0: register).
  int stages;
  int smem_per_sm;            // bytes of shared memory per multiprocessor
  int smem_per_block;         // bytes of dynamic shared memory one CTA may opt in to
  int step_tiles;             // pipelined kernel: 8-token tiles per warp step (1 or 2; see
                              // kDefaultStepTiles); 2 needs >= kMinPairStages stages, else 1
  float rescale_threshold;    // two-tile step: lazy-rescale threshold (log2), < 0 eager
  int cta_rows;               // query heads per CTA asked for groups > 16: 16, 32 or
                              // kCtaRowsAuto (kDefaultCtaRows)
  int wide_rows_min_ctas;     // kCtaRowsAuto: the fewest unsplit 32-row CTAs that take 32
  int prefetch_before_wait;   // pipelined kernel: first tiles issued before the PDL wait (1,
                              // the default) or after it (0; the A/B knob)
  int main_release;           // pipelined kernel, split launches: release the merge kernel once
                              // the main loop is done (1, the default) or as its CTAs exit (0)
  int release_max_ctas;       // pipelined kernel, unsplit launches of at most this many CTAs:
                              // release the successor right after the wait (0: never; see
                              // "Small grids" at the kernel)
  int wide_warps_max_ctas;    // unsplit pipelined launches with two-tile steps and groups of at
                              // most wide_max_group query heads whose grid has at most this many
                              // CTAs run CTAs of kWideWarps<D> warps, one per SM (0: never;
                              // RunWideCtas)
  int wide_max_group;         // ... the largest such group (kDefaultWideMaxGroup)
  int half_wide_max_ctas;     // larger such grids of at most this many CTAs whose groups have 9
                              // to 32 query heads (heads on M, CTAs of 16) run CTAs of
                              // kHalfWideWarps<D> warps, two per SM (0: never; RunWideCtas)
  int combine_slots_max_ctas;  // split launches whose combine grid has at most this many CTAs
                              // read partition rows in slots (CombineSlots; latency-bound
                              // grids); larger grids a column per thread (CombineColumns)
  int64_t q_stride;           // elements between the query rows of consecutive sequences
                              // (num_heads * head_size when contiguous; heads and dims always are)
  // Fused launches (see "New token"; new_key null: a plain launch). The query is then the one
  // before the rotary embedding.
  const void* new_key;        // [num_seqs, num_kv_heads * head_size] T, rows new_key_stride apart
  const void* new_value;      // the same layout, rows new_value_stride apart
  int64_t new_key_stride;     // elements
  int64_t new_value_stride;
  const int64_t* positions;   // [num_seqs] the new token's position
  const int64_t* slot_mapping;  // [num_seqs] its cache slot; < 0 or >= num_slots: not stored
  const float* cos_sin;       // [max_position, head_size] float32 cos | sin; null: no rotary
  int64_t max_position;       // positions outside [0, max_position) are not rotated
  int64_t num_slots;          // num_blocks * block_size
  int rotary_neox;            // 1: neox style (halves), 0: gpt-j style (interleaved pairs)
  float k_store_scale;        // FP8 caches: keys are stored as key / k_store_scale (the k_scale)
  // Set by the dispatch for the chosen kernel:
  int rows;                   // query heads per CTA that are allocated: min(group, kernel rows)
  int head_groups;            // CTAs per KV head along the query heads: ceil(group / rows)
  int release_at_start;       // release the successor right after the wait (release_max_ctas)
  int tokens_m;               // 1: the two-tile step with tokens on the MMA's M dimension
                              // (kPipeTokensM, PipePairLoopTokensM)
};

// ------------------------------------------------------------------------------------------
// Host side: parameters and kernel configuration (shared by the CUDA build and the emulator).

/*!
 * \brief Params from validated shapes (pointers and workspace left null): clamps
 * max_context_len to max_blocks_per_seq * block_size and derives the partitions. A
 * partition_size of 0, or one giving a single partition, means no split.
 */
inline Params MakeParams(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_size, int64_t block_size, int64_t max_blocks_per_seq,
                         double scale, int64_t max_context_len, int64_t partition_size,
                         int64_t sliding_window, double k_scale = 1.0, double v_scale = 1.0,
                         double logits_soft_cap = 0.0) {
  Params p{};
  const int64_t max_tokens = max_blocks_per_seq * block_size;
  const int64_t max_ctx = std::min(max_context_len, max_tokens);
  int64_t parts = partition_size > 0 ? (max_ctx + partition_size - 1) / partition_size : 1;
  if (parts <= 1) {
    parts = 1;
    // One partition covering every token a block table can address.
    partition_size = std::max<int64_t>(
        (max_tokens + kPartitionAlign - 1) / kPartitionAlign * kPartitionAlign, kPartitionAlign);
  }
  p.scale_log2 = static_cast<float>(scale * k_scale * 1.4426950408889634);
  p.v_scale = static_cast<float>(v_scale);
  p.soft_cap_log2 =
      logits_soft_cap > 0.0 ? static_cast<float>(logits_soft_cap * 1.4426950408889634) : 0.f;
  p.inv_soft_cap_log2 = logits_soft_cap > 0.0 ? 1.f / p.soft_cap_log2 : 0.f;
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_size = static_cast<int>(head_size);
  p.group = static_cast<int>(num_heads / num_kv_heads);
  p.block_size = static_cast<int>(block_size);
  p.log2_block_size = block_size == 8 ? 3 : block_size == 16 ? 4 : 5;
  p.max_blocks_per_seq = static_cast<int>(max_blocks_per_seq);
  p.max_tokens = static_cast<int>(max_tokens);
  p.token_stride = num_kv_heads * head_size;
  p.block_stride = block_size * num_kv_heads * head_size;
  p.partition_size = static_cast<int>(partition_size);
  p.num_partitions = static_cast<int>(parts);
  // A window at least as long as any context is no window.
  p.sliding_window = static_cast<int>(sliding_window < max_tokens ? sliding_window : 0);
  p.l2_prefetch_tiles = kDefaultL2PrefetchTiles;
  // Every combine grid: the launch sets the device's multiprocessor count.
  p.combine_slots_max_ctas = std::numeric_limits<int>::max();
  p.stages = kStagesAuto;
  p.step_tiles = kDefaultStepTiles;
  p.rescale_threshold = kDefaultRescaleThreshold;
  p.cta_rows = kDefaultCtaRows;
  p.wide_rows_min_ctas = 0;  // the launch sets the device's multiprocessor count
  p.wide_warps_max_ctas = 0;  // (likewise; 0: CTAs of kWarps warps only)
  p.wide_max_group = kDefaultWideMaxGroup;
  p.half_wide_max_ctas = 0;   // (likewise)
  p.prefetch_before_wait = 1;
  p.main_release = 1;
  p.q_stride = num_heads * head_size;
  return p;
}

/*! \brief float32 elements of workspace a launch with `p` needs (0 when not split). */
inline int64_t WorkspaceElements(const Params& p) {
  if (p.num_partitions <= 1) return 0;
  return static_cast<int64_t>(p.num_seqs) * p.num_heads * p.num_partitions * (p.head_size + 2);
}

/*! \brief Points the split-K arrays into `ws` (WorkspaceElements(p) floats). */
inline void SetWorkspace(Params& p, float* ws) {
  if (p.num_partitions <= 1) return;
  const int64_t partials = static_cast<int64_t>(p.num_seqs) * p.num_heads * p.num_partitions;
  p.ws_o = ws;
  p.ws_m = ws + partials * p.head_size;
  p.ws_l = ws + partials * (p.head_size + 1);
}

/*! \brief Bytes of the per-warp softmax statistics at the start of dynamic shared memory. */
constexpr size_t kStatsSmemBytes = 3 * kWarps * kMmaRows * sizeof(float);
/*! \brief ... for a CTA of kW warps and kRT m16 row tiles. */
template <int kRT, int kW = kWarps>
constexpr size_t kStatsSmemBytesFor = kRT * 3 * kW * kMmaRows * sizeof(float);

/*! \brief Bytes of the merge buffer: the unnormalized output rows of the `warps` warps' softmax
 * states. */
inline size_t MergeSmemBytes(int head_size, int rows, int warps = kWarps) {
  return static_cast<size_t>(warps) * rows * (head_size + kOutPad) * sizeof(float);
}

struct GridDims {
  unsigned x, y, z;
};

// ------------------------------------------------------------------------------------------
// Device helpers.

PA_DEVICE int IMin(int a, int b) { return a < b ? a : b; }
PA_DEVICE int IMax(int a, int b) { return a > b ? a : b; }

/*! \brief A plain load of shared memory (the pipelined kernel's K/V fragments). */
template <typename U>
PA_DEVICE U LoadShared(const unsigned char* p) {
  return *reinterpret_cast<const U*>(p);
}

PA_DEVICE uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant
}

/*!
 * \brief The logit (log2 units) of a score `x` = q.k * scale * k_scale * log2(e), plus `bias`:
 * soft-capped (cap * tanh(score / cap), in the same units) when the launch asks for it.
 */
PA_DEVICE float Logit(const Params& p, float x, float bias) {
  if (p.soft_cap_log2 > 0.f) x = p.soft_cap_log2 * FastTanh(x * p.inv_soft_cap_log2);
  return x + bias;
}

/*!
 * \brief How the tensor-core kernel of element type T loads cache elements of type C: the raw
 * register types of a 32-dim K span (8 elements per thread), a 16-dim half span (4) and a V
 * tail word (2), their loads, and their widening to packed T pairs.
 */
template <typename T, typename C>
struct CacheIo {
  static_assert(std::is_same<T, C>::value, "the cache holds T or FP8 E4M3");
  using Span = uint4;
  using HalfSpan = uint2;
  using Tail = uint32_t;
  static PA_DEVICE Span LoadSpan(const C* p) { return LoadStream16(p); }
  static PA_DEVICE Span SharedSpan(const unsigned char* p) { return LoadShared<uint4>(p); }
  static PA_DEVICE HalfSpan SharedHalf(const unsigned char* p) { return LoadShared<uint2>(p); }
  static PA_DEVICE Tail SharedTail(const unsigned char* p) { return LoadShared<uint32_t>(p); }
  static PA_DEVICE HalfSpan LoadHalf(const C* p) { return LoadStream8(p); }
  static PA_DEVICE Tail LoadTail(const C* p) { return LoadStream4(p); }
  static PA_DEVICE Span ZeroSpan() { return make_uint4(0, 0, 0, 0); }
  static PA_DEVICE HalfSpan ZeroHalf() { return make_uint2(0, 0); }
  static PA_DEVICE uint4 Widen(const Span& v) { return v; }
  static PA_DEVICE uint2 WidenHalf(const HalfSpan& v) { return v; }
  static PA_DEVICE uint32_t WidenTail(Tail v) { return v; }
  // Element e (0..7) of two V rows' spans as one packed T pair (row v0 in the low half): a PV
  // B-fragment word (e is a compile-time constant once the caller's loop is unrolled).
  static PA_DEVICE uint32_t VPair(const Span& v0, const Span& v1, int e) {
    return BytePerm(Word(v0, e >> 1), Word(v1, e >> 1), (e & 1) ? 0x7632u : 0x5410u);
  }
  // VPair of elements e and e + 1 (e even).
  static PA_DEVICE void VPairs(const Span& v0, const Span& v1, int e, uint32_t& lo, uint32_t& hi) {
    lo = VPair(v0, v1, e);
    hi = VPair(v0, v1, e + 1);
  }
  // Element e (0..kTailTiles-1) of two rows' V tails (kTailWords words each) as a packed pair.
  static PA_DEVICE uint32_t TailPair(const Tail* t0, const Tail* t1, int e) {
    return BytePerm(t0[e >> 1], t1[e >> 1], (e & 1) ? 0x7632u : 0x5410u);
  }
};

template <typename T>
struct CacheIo<T, Fp8E4m3> {
  using Span = uint2;
  using HalfSpan = uint32_t;
  using Tail = uint32_t;  // 16 bits used
  static PA_DEVICE Span LoadSpan(const Fp8E4m3* p) { return LoadStream8(p); }
  static PA_DEVICE Span SharedSpan(const unsigned char* p) { return LoadShared<uint2>(p); }
  static PA_DEVICE HalfSpan SharedHalf(const unsigned char* p) { return LoadShared<uint32_t>(p); }
  static PA_DEVICE Tail SharedTail(const unsigned char* p) { return LoadShared<uint16_t>(p); }
  static PA_DEVICE HalfSpan LoadHalf(const Fp8E4m3* p) { return LoadStream4(p); }
  static PA_DEVICE Tail LoadTail(const Fp8E4m3* p) { return LoadStream2(p); }
  static PA_DEVICE Span ZeroSpan() { return make_uint2(0, 0); }
  static PA_DEVICE HalfSpan ZeroHalf() { return 0u; }
  static PA_DEVICE uint4 Widen(const Span& v) {
    return make_uint4(Dtype<T>::FromFp8x2(v.x), Dtype<T>::FromFp8x2Hi(v.x),
                      Dtype<T>::FromFp8x2(v.y), Dtype<T>::FromFp8x2Hi(v.y));
  }
  static PA_DEVICE uint2 WidenHalf(HalfSpan v) {
    return make_uint2(Dtype<T>::FromFp8x2(v), Dtype<T>::FromFp8x2Hi(v));
  }
  static PA_DEVICE uint32_t WidenTail(Tail v) { return Dtype<T>::FromFp8x2(v); }
  // The byte pair is formed before the widening: one permute and one e4m3x2 conversion per
  // B-fragment word (widening each row first needs two conversions, a shift and a permute).
  static PA_DEVICE uint32_t VPair(const Span& v0, const Span& v1, int e) {
    const uint32_t sel = static_cast<uint32_t>((e & 3) | ((4 + (e & 3)) << 4));
    return Dtype<T>::FromFp8x2(BytePerm((e >> 2) ? v0.y : v0.x, (e >> 2) ? v1.y : v1.x, sel));
  }
  // VPair of elements e and e + 1 (e even): one permute gathers both byte pairs, the low pair
  // converted from the lower half of the word, the high pair from the upper half in place.
  static PA_DEVICE void VPairs(const Span& v0, const Span& v1, int e, uint32_t& lo, uint32_t& hi) {
    const uint32_t b = static_cast<uint32_t>(e & 3);
    const uint32_t x = BytePerm((e >> 2) ? v0.y : v0.x, (e >> 2) ? v1.y : v1.x,
                                b | ((4 + b) << 4) | ((b + 1) << 8) | ((5 + b) << 12));
    lo = Dtype<T>::FromFp8x2(x);
    hi = Dtype<T>::FromFp8x2Hi(x);
  }
  static PA_DEVICE uint32_t TailPair(const Tail* t0, const Tail* t1, int e) {
    const uint32_t sel = static_cast<uint32_t>((e & 1) | ((4 + (e & 1)) << 4));
    return Dtype<T>::FromFp8x2(BytePerm(t0[e >> 1], t1[e >> 1], sel));
  }
};

/*! \brief Four consecutive cache elements as floats (the float32 kernel's load). */
PA_DEVICE float4 Load4f(const float* p) {
  const uint4 w = LoadStream16(p);
  return make_float4(AsFloat(w.x), AsFloat(w.y), AsFloat(w.z), AsFloat(w.w));
}
PA_DEVICE float4 Load4f(const Fp8E4m3* p) {
  const uint32_t w = LoadStream4(p);
  return make_float4(Fp8ToFloat(w), Fp8ToFloat(w >> 8), Fp8ToFloat(w >> 16), Fp8ToFloat(w >> 24));
}

/*! \brief The per-warp statistics in dynamic shared memory: m, l, f, each [kWarps][kMmaRows]. */
struct Stats {
  float* m;
  float* l;
  float* f;
  int stride;  // rows per warp: element [w][r] is at w * stride + r
};

/*! \brief The statistics of a CTA of up to `rows` (kMmaRows, or kMaxCtaRows: see StatsSmemBytes)
 * query rows at the start of `smem`. */
template <int kW = kWarps>
PA_DEVICE Stats GetStats(unsigned char* smem, int rows = kMmaRows) {
  float* base = reinterpret_cast<float*>(smem);
  return Stats{base, base + kW * rows, base + 2 * kW * rows, rows};
}

/*! \brief The token range of one (sequence, partition). */
struct PartitionRange {
  int ctx;        // context length (clamped to [0, max_tokens])
  int begin;      // first token attended in this partition
  int end;        // one past the last
  int tile_base;  // begin rounded down to a multiple of kTile: tile t covers tile_base + 8t ...
  int num_tiles;
};

PA_DEVICE int ClampedContext(const Params& p, int seq) {
  return IMin(IMax(p.context_lens[seq], 0), p.max_tokens);
}

/*! \brief First token a query at the end of a context of `ctx` tokens sees. */
PA_DEVICE int WindowStart(const Params& p, int ctx) {
  return p.sliding_window > 0 ? IMax(ctx - p.sliding_window, 0) : 0;
}

PA_DEVICE PartitionRange GetRange(const Params& p, int seq, int part) {
  PartitionRange r;
  r.ctx = ClampedContext(p, seq);
  const int part_start = part * p.partition_size;
  r.begin = IMax(part_start, WindowStart(p, r.ctx));
  // partition_size may exceed max_tokens (one partition per sequence): avoid int overflow.
  r.end = (r.ctx - part_start <= p.partition_size) ? r.ctx : part_start + p.partition_size;
  r.tile_base = r.begin & ~(kTile - 1);
  r.num_tiles = r.begin < r.end ? (r.end - r.tile_base + kTile - 1) / kTile : 0;
  return r;
}

/*!
 * \brief Block numbers of 32 of a warp's tiles, one per lane: lane l gets the block of the warp's
 * tile number (32 * chunk + l), i.e. CTA tile (warp + kWarps * (32 * chunk + l)); 0 past the end.
 * A tile never straddles blocks (tile starts are multiples of 8, block sizes multiples of 8).
 */
template <int kW = kWarps>
PA_DEVICE int LoadTileBlocks(const Params& p, const int32_t* bt_row, const PartitionRange& r,
                             int warp, int chunk, int lane) {
  const int tile = warp + kW * (32 * chunk + lane);
  if (tile >= r.num_tiles) return 0;
  const int tok0 = r.tile_base + kTile * tile;
  return LoadIndex(bt_row + (tok0 >> p.log2_block_size));
}

// ------------------------------------------------------------------------------------------
// Merging the warps' states and writing the partition's result.
//
// On entry (after a barrier) each warp w has stored, for rows r < p.rows: its running max
// st.m[w][r] (log2 units, -inf if it saw no token), its running sum st.l[w][r] and its
// unnormalized output so[(w * p.rows + r) * (D + kOutPad) + d].

/*! \brief Natural log of sum(exp2(s - m)) * exp2(m), the log-sum-exp of scores kept in log2
 * units as a running max `m` and sum `total`; -inf when no token was seen. */
PA_DEVICE float LogSumExp(float m, float total) {
  return total > 0.f ? (m + log2f(total)) * kLn2 : kNegInf;
}

/*! \brief Four consecutive outputs at `dst` (aligned to four elements) in one store. */
template <typename T>
PA_DEVICE void StoreOut4(T* dst, const float4& v) {
  if constexpr (std::is_same<T, float>::value) {
    StoreGlobal(reinterpret_cast<float4*>(dst), v);
  } else {
    StoreGlobal(reinterpret_cast<uint2*>(dst),
                make_uint2(Dtype<T>::Pack(v.x, v.y), Dtype<T>::Pack(v.z, v.w)));
  }
}

template <typename T, int D, int kW = kWarps>
PA_DEVICE void FinishPartition(const Params& p, const float* so, const Stats& st, int rows_valid,
                               int head0, int seq, int part) {
  const int tid = threadIdx.x;
  const bool split = p.ws_o != nullptr;
  if (tid < rows_valid) {
    float m = kNegInf;
#pragma unroll
    for (int w = 0; w < kW; ++w) m = fmaxf(m, st.m[w * st.stride + tid]);
    float f[kW];
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) {
      const float mw = st.m[w * st.stride + tid];
      f[w] = mw == kNegInf ? 0.f : FastExp2(mw - m);
      total += f[w] * st.l[w * st.stride + tid];
    }
    const float inv = total > 0.f ? p.v_scale / total : 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) st.f[w * st.stride + tid] = f[w] * inv;
    if (split) {
      const int64_t idx =
          (static_cast<int64_t>(seq) * p.num_heads + head0 + tid) * p.num_partitions + part;
      StoreGlobal(p.ws_m + idx, m);
      StoreGlobal(p.ws_l + idx, total);
    } else if (p.lse != nullptr) {
      StoreGlobal(p.lse + static_cast<int64_t>(seq) * p.num_heads + head0 + tid,
                  LogSumExp(m, total));
    }
  }
  SyncThreads();
  // Four consecutive dims per thread: 16-byte reads of the merge buffer (its rows are 16-byte
  // aligned: D and kOutPad are multiples of 4) and one vector store, where the destination's
  // rows are aligned for it (a workspace view or an output may start anywhere; element stores
  // otherwise). Each sum is formed in the same order as element by element.
  constexpr int kQuads = D / 4;
  const int rows = p.rows;
  const int64_t head_row0 = static_cast<int64_t>(seq) * p.num_heads + head0;
  const bool aligned = split ? (reinterpret_cast<uintptr_t>(p.ws_o) & 15u) == 0
                             : (reinterpret_cast<uintptr_t>(p.out) & (4 * sizeof(T) - 1)) == 0;
  for (int i = tid; i < rows_valid * kQuads; i += 32 * kW) {
    const int row = i / kQuads;
    const int d = 4 * (i - row * kQuads);
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kW; ++w) {
      const float f = st.f[w * st.stride + row];
      const float4 x =
          *reinterpret_cast<const float4*>(so + (w * rows + row) * (D + kOutPad) + d);
      o.x += f * x.x;
      o.y += f * x.y;
      o.z += f * x.z;
      o.w += f * x.w;
    }
    const int64_t head_row = head_row0 + row;
    if (split) {
      float* dst = p.ws_o + (head_row * p.num_partitions + part) * D + d;
      if (aligned) {
        StoreGlobal(reinterpret_cast<float4*>(dst), o);
      } else {
        StoreGlobal(dst, o.x);
        StoreGlobal(dst + 1, o.y);
        StoreGlobal(dst + 2, o.z);
        StoreGlobal(dst + 3, o.w);
      }
    } else {
      T* dst = static_cast<T*>(p.out) + head_row * D + d;
      if (aligned) {
        StoreOut4(dst, o);
      } else {
        StoreGlobal(dst, Dtype<T>::FromFloat(o.x));
        StoreGlobal(dst + 1, Dtype<T>::FromFloat(o.y));
        StoreGlobal(dst + 2, Dtype<T>::FromFloat(o.z));
        StoreGlobal(dst + 3, Dtype<T>::FromFloat(o.w));
      }
    }
  }
}

/*! \brief Zeros for the CTA's heads (a sequence with an empty context, unsplit launch). */
template <typename T, int D, int kW = kWarps>
PA_DEVICE void WriteZeros(const Params& p, int rows_valid, int head0, int seq) {
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head0) * D;
  for (int i = threadIdx.x; i < rows_valid * D; i += 32 * kW) {
    StoreGlobal(out + i, Dtype<T>::FromFloat(0.f));
  }
  if (p.lse != nullptr && static_cast<int>(threadIdx.x) < rows_valid) {
    StoreGlobal(p.lse + static_cast<int64_t>(seq) * p.num_heads + head0 + threadIdx.x, kNegInf);
  }
}

// ------------------------------------------------------------------------------------------
// New token (fused launches: paged_attention_with_rotary_cache).
//
// In a decode step the token's key and value come from the projection, not from the cache. A
// fused launch takes them as they are (with the query, before the rotary embedding) and does in
// the attention kernel what rotary_embedding_with_cache would do before it, bit for bit: the
// CTA of each (sequence, KV head) rotates the key at the token's position and stores key and
// value at the token's slot (FP8: as x / scale), rotates its query rows while staging them, and
// then attends over the cache, the new slot included. Launches fuse where one CTA per
// (sequence, KV head, partition) reads each K/V row: one head group, the pipelined kernel (the
// dispatch declines the others and the caller runs the two ops). Split launches too: every CTA
// rotates its query rows, and the one whose partition holds the new position stores the token.
// Ordering: the position, slot and cos/sin row are step inputs, read before the PDL wait (the
// cos/sin row is staged, rounded to T, in the statistics area, which the epilogue reuses only
// after the main loop); the key, value and query rows come from the kernel before and are read
// after it. The stores are fenced and followed by a CTA barrier before any copy of the tile
// that holds the new slot is issued (the prologue issues only the tiles before it), so the CTA's
// own copies read back what it stored.

/*! \brief x rounded to T, as a float. */
template <typename T>
PA_DEVICE float RoundToT(float x) {
  return Dtype<T>::ElemToFloat(Dtype<T>::ElemBits(x));
}

/*! \brief a*c - b*s (kMinus) or a*c + b*s with each product rounded to T first, as T bits: the
 * rotary embedding's arithmetic (elementwise_common.cuh's Rotate). */
template <typename T, bool kMinus>
PA_DEVICE uint32_t RotateBits(float a, float c, float b, float s) {
  const float ac = RoundToT<T>(MulRn(a, c));
  const float bs = RoundToT<T>(MulRn(b, s));
  return Dtype<T>::ElemBits(kMinus ? ac - bs : ac + bs);
}

/*! \brief Element m (0..7) of eight packed 16-bit values. */
PA_DEVICE uint32_t Elem16(const uint4& v, int m) {
  return (Word(v, m >> 1) >> (16 * (m & 1))) & 0xffffu;
}

PA_DEVICE uint4 Pack8(const uint32_t (&e)[8]) {
  return make_uint4(e[0] | (e[1] << 16), e[2] | (e[3] << 16), e[4] | (e[5] << 16),
                    e[6] | (e[7] << 16));
}

/*! \brief Rotates a neox-style unit in place: x1 = features i0 .. i0 + 7 of a head, x2 their
 * partners kHalf further; `cs` is the position's [cos | sin] row as T bits. */
template <typename T, int kHalf>
PA_DEVICE void RotateNeox8(const uint16_t* cs, int i0, uint4& x1, uint4& x2) {
  uint32_t y1[8];
  uint32_t y2[8];
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    const float c = Dtype<T>::ElemToFloat(cs[i0 + m]);
    const float s = Dtype<T>::ElemToFloat(cs[kHalf + i0 + m]);
    const float a = Dtype<T>::ElemToFloat(Elem16(x1, m));
    const float b = Dtype<T>::ElemToFloat(Elem16(x2, m));
    y1[m] = RotateBits<T, true>(a, c, b, s);   // x1 cos - x2 sin
    y2[m] = RotateBits<T, false>(b, c, a, s);  // x2 cos + x1 sin
  }
  x1 = Pack8(y1);
  x2 = Pack8(y2);
}

/*! \brief Rotates a gpt-j-style unit: features i0 .. i0 + 7, four interleaved pairs. */
template <typename T, int kHalf>
PA_DEVICE uint4 RotateGptj8(const uint16_t* cs, int i0, const uint4& x) {
  uint32_t y[8];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int pair = i0 / 2 + m;
    const float c = Dtype<T>::ElemToFloat(cs[pair]);
    const float s = Dtype<T>::ElemToFloat(cs[kHalf + pair]);
    const float a = Dtype<T>::ElemToFloat(Elem16(x, 2 * m));
    const float b = Dtype<T>::ElemToFloat(Elem16(x, 2 * m + 1));
    y[2 * m] = RotateBits<T, true>(a, c, b, s);
    y[2 * m + 1] = RotateBits<T, false>(b, c, a, s);
  }
  return Pack8(y);
}

/*! \brief Stores eight elements of T (packed) into a cache row: as they are, or as E4M3 bytes
 * of x / scale. */
template <typename T, typename C>
PA_DEVICE void StoreCache8(C* dst, const uint4& x, float scale) {
  if constexpr (std::is_same<C, Fp8E4m3>::value) {
    uint32_t w[2] = {0u, 0u};
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      w[m >> 2] |= FloatToFp8(Dtype<T>::ElemToFloat(Elem16(x, m)) / scale) << (8 * (m & 3));
    }
    StoreGlobal(reinterpret_cast<uint2*>(dst), make_uint2(w[0], w[1]));
  } else {
    StoreGlobal(reinterpret_cast<uint4*>(dst), x);
  }
}

/*! \brief The new token's position (its cos/sin row, rounded to T, staged in `cs` when it has
 * one) and slot: everything a fused CTA reads before the PDL wait. */
struct NewTokenAt {
  int64_t slot;  // < 0 or >= num_slots: nothing is stored
  bool rotate;   // a rotary table and a position inside it (else the rows stay as they are)
};

template <typename T, int D, int kW = kWarps>
PA_DEVICE NewTokenAt StageNewToken(const Params& p, int seq, uint16_t* cs, int tid) {
  NewTokenAt at;
  const int64_t pos = LoadGlobalI64(p.positions + seq);
  at.slot = LoadGlobalI64(p.slot_mapping + seq);
  at.rotate = p.cos_sin != nullptr && pos >= 0 && pos < p.max_position;
  if (at.rotate) {
    for (int i = tid; i < D; i += 32 * kW) {
      cs[i] = static_cast<uint16_t>(Dtype<T>::ElemBits(LoadGlobalF32(p.cos_sin + pos * D + i)));
    }
  }
  return at;
}

/*! \brief Rotates the new token's key of KV head `kvh` and stores it and its value at the slot
 * (after the PDL wait and a barrier publishing `cs`); fenced for the CTA's own copies. */
template <typename T, typename C, int D, int kW = kWarps>
PA_DEVICE void StoreNewToken(const Params& p, int seq, int kvh, const NewTokenAt& at,
                             const uint16_t* cs, int tid) {
  if (at.slot < 0 || at.slot >= p.num_slots) return;
  constexpr int kHalf = D / 2;
  const bool neox = p.rotary_neox != 0;
  const int k_units = neox ? D / 16 : D / 8;
  const auto* krow = static_cast<const unsigned char*>(p.new_key) +
                     (static_cast<int64_t>(seq) * p.new_key_stride + kvh * D) * 2;
  const auto* vrow = static_cast<const unsigned char*>(p.new_value) +
                     (static_cast<int64_t>(seq) * p.new_value_stride + kvh * D) * 2;
  C* kdst = static_cast<C*>(const_cast<void*>(p.key_cache)) + at.slot * p.token_stride + kvh * D;
  C* vdst = static_cast<C*>(const_cast<void*>(p.value_cache)) + at.slot * p.token_stride + kvh * D;
  for (int u = tid; u < k_units + D / 8; u += 32 * kW) {
    if (u < k_units) {
      const int i0 = 8 * u;
      uint4 x1 = LoadGlobal16(krow + i0 * 2);
      if (neox) {
        uint4 x2 = LoadGlobal16(krow + (kHalf + i0) * 2);
        if (at.rotate) RotateNeox8<T, kHalf>(cs, i0, x1, x2);
        StoreCache8<T, C>(kdst + i0, x1, p.k_store_scale);
        StoreCache8<T, C>(kdst + kHalf + i0, x2, p.k_store_scale);
      } else {
        if (at.rotate) x1 = RotateGptj8<T, kHalf>(cs, i0, x1);
        StoreCache8<T, C>(kdst + i0, x1, p.k_store_scale);
      }
    } else {
      const int i0 = 8 * (u - k_units);
      StoreCache8<T, C>(vdst + i0, LoadGlobal16(vrow + i0 * 2), p.v_scale);
    }
  }
  FenceDevice();
}

/*! \brief The CTA's query rows (heads head0 ..), rotated at the new token's position (or as they
 * are), into `plain`: [kRows][D] elements of T, row r = head head0 + r, rows past rows_valid not
 * written. All of a thread's loads are issued before its first store. */
template <typename T, int D, int kRows, int kW = kWarps>
PA_DEVICE void RotateQueryRows(const Params& p, unsigned char* plain, int seq, int head0,
                               int rows_valid, const NewTokenAt& at, const uint16_t* cs,
                               int tid) {
  constexpr int kHalf = D / 2;
  constexpr int kMaxUnits = (kRows * (D / 8) + 32 * kW - 1) / (32 * kW);
  const bool neox = p.rotary_neox != 0;
  const int per_row = neox ? D / 16 : D / 8;
  const int total = rows_valid * per_row;
  const auto* q_seq = static_cast<const unsigned char*>(p.query) +
                      (static_cast<int64_t>(seq) * p.q_stride + static_cast<int64_t>(head0) * D) * 2;
  uint4 x1[kMaxUnits];
  uint4 x2[kMaxUnits];
#pragma unroll
  for (int j = 0; j < kMaxUnits; ++j) {
    const int u = tid + j * 32 * kW;
    x1[j] = x2[j] = make_uint4(0, 0, 0, 0);
    if (u < total) {
      const int row = u / per_row;
      const int i0 = 8 * (u - row * per_row);
      x1[j] = LoadGlobal16(q_seq + (row * D + i0) * 2);
      if (neox) x2[j] = LoadGlobal16(q_seq + (row * D + kHalf + i0) * 2);
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxUnits; ++j) {
    const int u = tid + j * 32 * kW;
    if (u < total) {
      const int row = u / per_row;
      const int i0 = 8 * (u - row * per_row);
      unsigned char* dst = plain + (row * D + i0) * 2;
      if (neox) {
        if (at.rotate) RotateNeox8<T, kHalf>(cs, i0, x1[j], x2[j]);
        *reinterpret_cast<uint4*>(dst) = x1[j];
        *reinterpret_cast<uint4*>(dst + kHalf * 2) = x2[j];
      } else {
        *reinterpret_cast<uint4*>(dst) = at.rotate ? RotateGptj8<T, kHalf>(cs, i0, x1[j]) : x1[j];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernel (float16 / bfloat16).
//
// Fragment maps (m16n8k16 / m16n8k8, row.col; g = lane / 4, t = lane % 4):
//   A regs: a0 = (row g, k 2t..2t+1), a1 = (row g+8, k 2t..), a2 = (row g, k 2t+8..),
//           a3 = (row g+8, k 2t+8..) (m16n8k8: a0, a1 only); B regs: b0 = (k 2t..2t+1, col g),
//           b1 = (k 2t+8.., col g) (m16n8k8: b0 only);
//   C: c0, c1 = (row g, col 2t, 2t+1), c2, c3 = (row g+8, col 2t, 2t+1).
// QK (k = head dim, in spans of 32 = two k-steps of 16): logical k of step 2j (2j+1) maps to the
//   physical dims 32j + 8t + {0..3} ({4..7}); so one 16-byte load at dim 32j + 8t of a Q row
//   gives the A words of both steps and of a K row the B words of both steps. A trailing
//   16-dim step (head_size 80, 112) maps to 32j + 4t + {0..3}: an 8-byte load.
// PV (n = head dim in tiles of 8): column n of d-tile i = 8c + e (c < D / 64) is dim
//   64c + 8n + e, so lane g loads 8 contiguous dims (64c + 8g ..) of a V row and takes element
//   e for d-tile 8c + e. The D % 64 trailing dims: d-tile 8 * (D / 64) + e, column n is dim
//   64 * (D / 64) + (D % 64 / 8) * n + e (4-byte loads).
// Tokens: the 8 tokens of a tile are the n columns of S (token tile_start + n) and the k rows
//   of PV (k = 2t, 2t+1 in this thread: tokens tile_start + 2t, + 2t + 1).

template <int D>
struct MmaShape {
  static_assert(D % 16 == 0 && D >= 32 && D <= 256, "head_size: a multiple of 16 in [32, 256]");
  static constexpr int kSpans = D / 32;                   // full 32-dim QK spans
  static constexpr bool kHalfSpan = (D % 32) != 0;        // one more 16-dim k-step
  static constexpr int kQSpans = kSpans + (kHalfSpan ? 1 : 0);
  static constexpr int kChunks = D / 64;                  // full 64-dim PV chunks
  static constexpr int kTailTiles = (D % 64) / 8;         // trailing d-tiles (0, 2, 4 or 6)
  static constexpr int kTailWords = kTailTiles / 2;       // 32-bit words per V row and thread
  static constexpr int kTailWordsAlloc = kTailWords > 0 ? kTailWords : 1;
  static constexpr int kDTiles = D / 8;
  static constexpr int kQSmemBytes = kQSpans * 2 * 32 * 16;
};

template <typename T, typename C, int D>
PA_DEVICE void LoadKTile(const C* kc, const Params& p, const PartitionRange& r, int tok0, int blk,
                         int gid, int tig, typename CacheIo<T, C>::Span (&kr)[MmaShape<D>::kSpans],
                         typename CacheIo<T, C>::HalfSpan& krh) {
  using S = MmaShape<D>;
  using Io = CacheIo<T, C>;
  const int tok = tok0 + gid;
  const bool valid = tok >= r.begin && tok < r.end;
  const C* row = kc + static_cast<int64_t>(blk) * p.block_stride +
                 static_cast<int64_t>(tok & (p.block_size - 1)) * p.token_stride;
#pragma unroll
  for (int j = 0; j < S::kSpans; ++j) {
    kr[j] = valid ? Io::LoadSpan(row + 32 * j + 8 * tig) : Io::ZeroSpan();
  }
  if constexpr (S::kHalfSpan) {
    krh = valid ? Io::LoadHalf(row + 32 * S::kSpans + 4 * tig) : Io::ZeroHalf();
  }
}

template <typename T, typename C, int D>
PA_DEVICE void LoadVTile(const C* vc, const Params& p, const PartitionRange& r, int tok0, int blk,
                         int gid, int tig, typename CacheIo<T, C>::Span (&vr)[2][MmaShape<D>::kChunks],
                         uint32_t (&vt)[2][MmaShape<D>::kTailWords > 0 ? MmaShape<D>::kTailWords
                                                                       : 1]) {
  using S = MmaShape<D>;
  using Io = CacheIo<T, C>;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int tok = tok0 + 2 * tig + s;
    const bool valid = tok >= r.begin && tok < r.end;
    const C* row = vc + static_cast<int64_t>(blk) * p.block_stride +
                   static_cast<int64_t>(tok & (p.block_size - 1)) * p.token_stride;
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) {
      // Invalid tokens must read as zeros: their slots may hold NaN, and 0 * NaN = NaN.
      vr[s][c] = valid ? Io::LoadSpan(row + 64 * c + 8 * gid) : Io::ZeroSpan();
    }
#pragma unroll
    for (int w = 0; w < S::kTailWords; ++w) {
      vt[s][w] = valid ? Io::LoadTail(row + 64 * S::kChunks + S::kTailTiles * gid + 2 * w) : 0u;
    }
  }
}

/*!
 * \brief L2 prefetch of the K and V rows of one tile: lane (g, t) prefetches the 32-byte sectors
 * t, t + 4, ... of the K and V rows of token tok0 + g (valid tokens only).
 */
template <typename C, int D>
PA_DEVICE void PrefetchTileL2(const C* kc, const C* vc, const Params& p, const PartitionRange& r,
                              int tok0, int blk, int gid, int tig) {
  constexpr int kSectors = static_cast<int>((D * sizeof(C) + 31) / 32);
  const int tok = tok0 + gid;
  if (tok < r.begin || tok >= r.end) return;
  const int64_t off = static_cast<int64_t>(blk) * p.block_stride +
                      static_cast<int64_t>(tok & (p.block_size - 1)) * p.token_stride;
  const unsigned char* krow = reinterpret_cast<const unsigned char*>(kc + off);
  const unsigned char* vrow = reinterpret_cast<const unsigned char*>(vc + off);
#pragma unroll
  for (int i = 0; i < (kSectors + 3) / 4; ++i) {
    const int sector = tig + 4 * i;
    if (sector < kSectors) {
      PrefetchL2(krow + 32 * sector);
      PrefetchL2(vrow + 32 * sector);
    }
  }
}

/*!
 * \brief Online softmax of one 8-token tile's scores `sc` (16 rows x 8 tokens, this thread's
 * fragment) and O += P V with the tile's V fragments: the step both 16-bit kernels share.
 */
template <typename T, typename C, int D, int kQShift = 0>
PA_DEVICE void SoftmaxPv(const Params& p, const PartitionRange& r, int tok0, int tig,
                         const float (&sc)[4], const float (&alibi)[2], float query_pos,
                         float (&m_run)[2], float (&l_run)[2],
                         float (&acc)[MmaShape<D>::kDTiles][4],
                         const typename CacheIo<T, C>::Span (&vr)[2][MmaShape<D>::kChunks],
                         const uint32_t (&vt)[2][MmaShape<D>::kTailWordsAlloc]) {
  using S = MmaShape<D>;
  using Ops = Dtype<T>;
  using Io = CacheIo<T, C>;
  // ---- Scale, ALiBi, mask; online softmax per row (this thread: tokens 2t, 2t+1).
  const float scale_log2 = p.scale_log2 * static_cast<float>(1 << kQShift);  // MmaElem's Q
  const int ta = tok0 + 2 * tig;
  const bool va = ta >= r.begin && ta < r.end;
  const bool vb = ta + 1 >= r.begin && ta + 1 < r.end;
  const float da = static_cast<float>(ta) - query_pos;
  uint32_t pa[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float x0 = va ? Logit(p, sc[2 * hh] * scale_log2, alibi[hh] * da) : kNegInf;
    float x1 = vb ? Logit(p, sc[2 * hh + 1] * scale_log2, alibi[hh] * (da + 1.f)) : kNegInf;
    float mx = fmaxf(x0, x1);
    mx = fmaxf(mx, ShflXor(mx, 1));
    mx = fmaxf(mx, ShflXor(mx, 2));
    const float m_new = fmaxf(m_run[hh], mx);
    const float m_use = m_new == kNegInf ? 0.f : m_new;
    const float corr = FastExp2(m_run[hh] - m_use);
    x0 = FastExp2(x0 - m_use);
    x1 = FastExp2(x1 - m_use);
    l_run[hh] = fmaf(l_run[hh], corr, x0 + x1);
    m_run[hh] = m_new;
#pragma unroll
    for (int i = 0; i < S::kDTiles; ++i) {
      acc[i][2 * hh] *= corr;
      acc[i][2 * hh + 1] *= corr;
    }
    pa[hh] = Ops::Pack(x0, x1);
  }

  // ---- O += P V.
#pragma unroll
  for (int c = 0; c < S::kChunks; ++c) {
    const uint4 v0 = Io::Widen(vr[0][c]);
    const uint4 v1 = Io::Widen(vr[1][c]);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t sel = (e & 1) ? 0x7632u : 0x5410u;
      const uint32_t b = BytePerm(Word(v0, e >> 1), Word(v1, e >> 1), sel);
      Ops::Mma1688(acc[8 * c + e], pa[0], pa[1], b);
    }
  }
#pragma unroll
  for (int e = 0; e < S::kTailTiles; ++e) {
    const uint32_t sel = (e & 1) ? 0x7632u : 0x5410u;
    const uint32_t b = BytePerm(Io::WidenTail(vt[0][e >> 1]), Io::WidenTail(vt[1][e >> 1]), sel);
    Ops::Mma1688(acc[8 * S::kChunks + e], pa[0], pa[1], b);
  }
}

/*!
 * \brief One warp's state of the 16 fragment rows row_base .. row_base + 15 into the merge buffer
 * `so` and the statistics (the row sums are reduced over the quad first). Rows at or past p.rows
 * keep only their statistics. kNatural: the accumulators' d-tiles are in natural order (column n
 * of d-tile i is dim 8 i + n; the two-tile step with ldmatrix), else in the permuted order above.
 */
template <int D, bool kNatural = false>
PA_DEVICE void StoreWarpRows(const Params& p, const Stats& st, float* so, int warp, int gid,
                             int tig, int row_base, const float (&m_run)[2], float (&l_run)[2],
                             const float (&acc)[MmaShape<D>::kDTiles][4]) {
  using S = MmaShape<D>;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_run[hh] += ShflXor(l_run[hh], 1);
    l_run[hh] += ShflXor(l_run[hh], 2);
  }
  const int rows = p.rows;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row_base + gid + 8 * hh;
    if (tig == 0) {
      st.m[warp * st.stride + row] = m_run[hh];
      st.l[warp * st.stride + row] = l_run[hh];
    }
    if (row < rows) {
      float* o_row = so + (warp * rows + row) * (D + kOutPad);
      if constexpr (kNatural) {
#pragma unroll
        for (int i = 0; i < S::kDTiles; ++i) {
          *reinterpret_cast<float2*>(o_row + 8 * i + 2 * tig) =
              make_float2(acc[i][2 * hh], acc[i][2 * hh + 1]);
        }
      } else {
#pragma unroll
        for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
          for (int h4 = 0; h4 < 2; ++h4) {
            const int i = 8 * c + 4 * h4;
            // column 2t of d-tile 8c + e is dim 64c + 16t + e; column 2t + 1 is dim + 8.
            *reinterpret_cast<float4*>(o_row + 64 * c + 16 * tig + 4 * h4) =
                make_float4(acc[i][2 * hh], acc[i + 1][2 * hh], acc[i + 2][2 * hh],
                            acc[i + 3][2 * hh]);
            *reinterpret_cast<float4*>(o_row + 64 * c + 16 * tig + 8 + 4 * h4) =
                make_float4(acc[i][2 * hh + 1], acc[i + 1][2 * hh + 1], acc[i + 2][2 * hh + 1],
                            acc[i + 3][2 * hh + 1]);
          }
        }
#pragma unroll
        for (int e = 0; e < S::kTailTiles; ++e) {
          const int i = 8 * S::kChunks + e;
          o_row[64 * S::kChunks + S::kTailTiles * (2 * tig) + e] = acc[i][2 * hh];
          o_row[64 * S::kChunks + S::kTailTiles * (2 * tig + 1) + e] = acc[i][2 * hh + 1];
        }
      }
    }
  }
}

/*! \brief After the main loop of a 16-bit kernel: the warps' states merged, the result written. */
template <typename T, int D>
PA_DEVICE void MmaEpilogue(const Params& p, const Stats& st, unsigned char* smem_main, int warp,
                           int gid, int tig, const float (&m_run)[2], float (&l_run)[2],
                           const float (&acc)[MmaShape<D>::kDTiles][4], int rows_valid,
                           int head0, int seq, int part) {
  SyncThreads();
  float* so = reinterpret_cast<float*>(smem_main);
  StoreWarpRows<D>(p, st, so, warp, gid, tig, 0, m_run, l_run, acc);
  SyncThreads();
  FinishPartition<T, D>(p, so, st, rows_valid, head0, seq, part);
}


// Resident CTAs per SM the register allocation must allow (checked with -Xptxas -v: no spills):
// 4 (<= 128 registers/thread) up to head_size 96, 3 (<= 168) up to 128, else 2. Two row tiles
// (kRT = 2, twice the accumulators): 3 up to head size 64, else 2 (<= 255).
template <int D, int kRT = 1>
constexpr int MmaMinBlocks() {
  return kRT == 2 ? (D <= 64 ? 3 : 2) : D <= 96 ? 4 : D <= 128 ? 3 : 2;
}

// Warps of a wide CTA (Params::wide_warps_max_ctas, RunWideCtas): the register budget of
// MmaMinBlocks<D>() 4-warp CTAs of 16 query heads in one CTA, which has its SM to itself: 16
// warps up to head size 96, 12 up to 128, 8 beyond.
template <int D>
constexpr int kWideWarps = kWarps * MmaMinBlocks<D>();
// Warps of a half-wide CTA (Params::half_wide_max_ctas): half that budget, two such CTAs per SM
// (6 warps up to head size 128 and 8 up to 96; none at 256, whose half is 4 warps).
template <int D>
constexpr int kHalfWideWarps = kWideWarps<D> / 2;

/*! \brief Two T elements as float16 times 2^-kShift (MmaElem's query; kShift 0: as they are). */
template <typename T, int kShift>
PA_DEVICE uint32_t QueryPair(uint32_t w) {
  if constexpr (kShift == 0) {
    return w;
  } else {
    constexpr float kScale = 1.f / static_cast<float>(1 << kShift);
    return Dtype<MmaHalf>::Pack(Dtype<T>::ElemToFloat(w & 0xffffu) * kScale,
                                Dtype<T>::ElemToFloat(w >> 16) * kScale);
  }
}

// The CTA's query rows as mma A fragments in shared memory, each uint4 one MMA's four A registers:
// qs[((rt * kQSpans + span) * 2 + k) * 32 + lane] for row tile rt (rows 16 rt ..) holds the A
// fragment of the span's k-step k (0: its dims 32 span + 8t + {0..3}, 1: + {4..7}; a trailing
// half span: dims 32 span + 4t + {0..3} in k-step 0, zeros in 1), i.e. {row g, row g + 8, row g,
// row g + 8} words, so a step loads it with one 16-byte read and no register moves; rows at or
// past rows_valid are zeros.
// kFromShared (fused launches): the rows are read from `plain` (RotateQueryRows' [rows][D] layout,
// in the same shared memory as qs), so every thread's reads are done, at a barrier, before any
// store. kHalfShift > 0 (MmaElem: float16 MMAs for a bfloat16 query): the fragments hold the
// query times 2^-kHalfShift in float16.
template <typename T, int D, int kRT = 1, bool kFromShared = false, int kW = kWarps,
          int kHalfShift = 0>
PA_DEVICE void StageQueryFragments(const Params& p, uint4* qs, int seq, int head0, int rows_valid,
                                   int tid, const unsigned char* plain = nullptr) {
  using S = MmaShape<D>;
  // All of a thread's loads are issued before any store: one global round trip for the whole
  // query instead of one per loop iteration (a loop of load-then-store waited for each load in
  // turn: 4 round trips per CTA of 32 rows, ~17% of the MQA kernel's warp stalls under ncu).
  constexpr int kItems = kRT * S::kQSpans * 64;
  constexpr int kPerThread = (kItems + 32 * kW - 1) / (32 * kW);
  const T* q_seq = static_cast<const T*>(p.query) + static_cast<int64_t>(seq) * p.q_stride;
  uint2 lo[kPerThread];
  uint2 hi[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = tid + u * 32 * kW;
    const int rt = kRT == 1 ? 0 : i / (S::kQSpans * 64);
    const int j = (i >> 6) - rt * S::kQSpans;
    const int k = (i >> 5) & 1;
    const int row = ((i & 31) >> 2) + kMmaRows * rt;  // and row + 8
    const int t4 = i & 3;
    lo[u] = make_uint2(0, 0);
    hi[u] = make_uint2(0, 0);
    if (i < kItems && (j < S::kSpans || k == 0)) {
      const int dim = j < S::kSpans ? 32 * j + 8 * t4 + 4 * k : 32 * j + 4 * t4;
      if constexpr (kFromShared) {
        if (row < rows_valid) lo[u] = LoadShared<uint2>(plain + (row * D + dim) * 2);
        if (row + 8 < rows_valid) hi[u] = LoadShared<uint2>(plain + ((row + 8) * D + dim) * 2);
      } else {
        if (row < rows_valid) {
          lo[u] = LoadGlobal8(q_seq + static_cast<int64_t>(head0 + row) * D + dim);
        }
        if (row + 8 < rows_valid) {
          hi[u] = LoadGlobal8(q_seq + static_cast<int64_t>(head0 + row + 8) * D + dim);
        }
      }
    }
  }
  if constexpr (kFromShared) SyncThreads();
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = tid + u * 32 * kW;
    if constexpr (kHalfShift > 0) {  // two T elements -> two scaled float16 (exact: 2^-k)
      lo[u] = make_uint2(QueryPair<T, kHalfShift>(lo[u].x), QueryPair<T, kHalfShift>(lo[u].y));
      hi[u] = make_uint2(QueryPair<T, kHalfShift>(hi[u].x), QueryPair<T, kHalfShift>(hi[u].y));
    }
    if (i < kItems) qs[i] = make_uint4(lo[u].x, hi[u].x, lo[u].y, hi[u].y);
  }
}

// ALiBi slopes, in log2 units, of a thread's two fragment rows (gid and gid + 8); 0 without
// ALiBi or past rows_valid.
PA_DEVICE void AlibiRowSlopes(const Params& p, int gid, int head0, int rows_valid,
                              float alibi[2]) {
  alibi[0] = alibi[1] = 0.f;
  if (p.alibi_slopes != nullptr) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = gid + 8 * hh;
      if (row < rows_valid) alibi[hh] = p.alibi_slopes[head0 + row] * kLog2e;
    }
  }
}

template <typename T, typename C, int D>
PA_GLOBAL void PA_LAUNCH_BOUNDS(kThreads, MmaMinBlocks<D>())
    PagedAttentionMmaKernel(const Params p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  using S = MmaShape<D>;
  using Ops = Dtype<T>;
  using Io = CacheIo<T, C>;
  unsigned char* smem = DynamicSmem();
  const Stats st = GetStats(smem);
  unsigned char* smem_main = smem + kStatsSmemBytes;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const int kvh = blockIdx.x / p.head_groups;
  const int hg = blockIdx.x - kvh * p.head_groups;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int rows_valid = IMin(kMmaRows, p.group - hg * kMmaRows);
  const int head0 = kvh * p.group + hg * kMmaRows;

  const PartitionRange r = GetRange(p, seq, part);
  if (r.num_tiles == 0) {
    if (p.ws_o == nullptr) WriteZeros<T, D>(p, rows_valid, head0, seq);
    return;
  }

  const C* kc = static_cast<const C*>(p.key_cache) + static_cast<int64_t>(kvh) * D;
  const C* vc = static_cast<const C*>(p.value_cache) + static_cast<int64_t>(kvh) * D;
  const int32_t* bt_row = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  float acc[S::kDTiles][4];
#pragma unroll
  for (int i = 0; i < S::kDTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_run[2] = {kNegInf, kNegInf};
  float l_run[2] = {0.f, 0.f};

  typename Io::Span kr[S::kSpans];
  typename Io::HalfSpan krh = Io::ZeroHalf();
  typename Io::Span vr[2][S::kChunks];
  uint32_t vt[2][S::kTailWordsAlloc];

  // The first tile's K and V do not depend on Q: issue them first, so their latency overlaps the
  // Q fill below.
  int tile = warp;
  int it = 0;  // this warp's tile counter: tile = warp + kWarps * it
  // Block numbers of this warp's tiles, 32 per chunk, one per lane: the current chunk and the
  // next one (loaded a chunk ahead, so neither the register loads nor the L2 prefetches that
  // reach into the next chunk wait for the block table).
  int blk_cache = 0;
  int blk_cache_next = 0;
  if (tile < r.num_tiles) {
    blk_cache = LoadTileBlocks(p, bt_row, r, warp, 0, lane);
    blk_cache_next = LoadTileBlocks(p, bt_row, r, warp, 1, lane);
    const int blk = ShflIdx(blk_cache, 0);
    const int tok0 = r.tile_base + kTile * tile;
    LoadKTile<T, C, D>(kc, p, r, tok0, blk, gid, tig, kr, krh);
    LoadVTile<T, C, D>(vc, p, r, tok0, blk, gid, tig, vr, vt);
    // Fill the L2 pipeline: this warp's tiles 1 .. l2_prefetch_tiles.
#pragma unroll 1
    for (int q = 1; q <= p.l2_prefetch_tiles; ++q) {
      const int pf_tile = warp + kWarps * q;
      if (pf_tile >= r.num_tiles) break;
      const int pf_blk = ShflIdx(q < 32 ? blk_cache : blk_cache_next, q & 31);
      PrefetchTileL2<C, D>(kc, vc, p, r, r.tile_base + kTile * pf_tile, pf_blk, gid, tig);
    }
  }

  uint4* qs = reinterpret_cast<uint4*>(smem_main);
  StageQueryFragments<T, D>(p, qs, seq, head0, rows_valid, tid);
  float alibi[2];
  AlibiRowSlopes(p, gid, head0, rows_valid, alibi);
  const float query_pos = static_cast<float>(r.ctx - 1);
  SyncThreads();

  while (tile < r.num_tiles) {  // warp-uniform
    const int tok0 = r.tile_base + kTile * tile;

    // ---- S = Q K^T for 16 rows x 8 tokens.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < S::kSpans; ++j) {
      const uint4 q0 = qs[(2 * j) * 32 + lane];
      const uint4 q1 = qs[(2 * j + 1) * 32 + lane];
      const uint4 k = Io::Widen(kr[j]);
      Ops::Mma16816(sc, q0.x, q0.y, q0.z, q0.w, k.x, k.y);
      Ops::Mma16816(sc, q1.x, q1.y, q1.z, q1.w, k.z, k.w);
    }
    if constexpr (S::kHalfSpan) {
      const uint4 q0 = qs[(2 * S::kSpans) * 32 + lane];
      const uint2 k = Io::WidenHalf(krh);
      Ops::Mma16816(sc, q0.x, q0.y, q0.z, q0.w, k.x, k.y);
    }

    // ---- Prefetch the next tile's K (the registers are free now).
    const int next = tile + kWarps;
    ++it;
    int blk_next = 0;
    if (next < r.num_tiles) {
      if ((it & 31) == 0) {
        blk_cache = blk_cache_next;
        blk_cache_next = LoadTileBlocks(p, bt_row, r, warp, (it >> 5) + 1, lane);
      }
      blk_next = ShflIdx(blk_cache, it & 31);
      LoadKTile<T, C, D>(kc, p, r, tok0 + kTile * kWarps, blk_next, gid, tig, kr, krh);
    }

    SoftmaxPv<T, C, D>(p, r, tok0, tig, sc, alibi, query_pos, m_run, l_run, acc, vr, vt);

    // ---- Prefetch the next tile's V.
    if (next < r.num_tiles) {
      // Keep the L2 pipeline l2_prefetch_tiles tiles ahead of the registers.
      const int q = it + p.l2_prefetch_tiles;
      const int pf_tile = warp + kWarps * q;
      if (p.l2_prefetch_tiles > 0 && pf_tile < r.num_tiles) {
        const int pf_blk = ShflIdx((q >> 5) == (it >> 5) ? blk_cache : blk_cache_next, q & 31);
        PrefetchTileL2<C, D>(kc, vc, p, r, r.tile_base + kTile * pf_tile, pf_blk, gid, tig);
      }
      LoadVTile<T, C, D>(vc, p, r, tok0 + kTile * kWarps, blk_next, gid, tig, vr, vt);
    }
    tile = next;
  }

  // ---- Per-warp state to shared memory (the Q fragments are dead: reuse their space).
  MmaEpilogue<T, D>(p, st, smem_main, warp, gid, tig, m_run, l_run, acc, rows_valid, head0, seq,
                    part);
}

// ------------------------------------------------------------------------------------------
// Pipelined tensor-core kernel (float16 / bfloat16, caches of T or FP8; sm_80+).
//
// Same CTA shape, work split and fragment math as the register kernel above (4 warps, warp w
// takes the partition's 8-token tiles w, w + 4, ...; the score and PV fragments, the index maps
// and the online softmax are the same code), but K and V reach the fragments through a ring of
// `stages` tiles per warp in shared memory, filled with cp.async: each warp keeps stages - 1
// tiles of K/V in flight while it computes one (the register kernel: one tile, plus L2
// prefetches), with no registers held for them. Each stage is one warp's: 8 K rows then 8 V
// rows, every row copied whole by the warp's lanes in 16-byte chunks (tokens outside the range
// zero-filled), one commit group per tile, so only cp.async.wait_group and a warp barrier order
// the ring: at step i a warp waits for tile i (stages - 2 newer groups may stay pending),
// __syncwarp (tile i visible to all lanes; every lane done reading tile i - 1), issues tile
// i + stages - 1 into tile i - 1's stage, then computes tile i from shared memory.
//
// Rows are stored padded and/or with their 16-byte chunks XOR-swizzled by row, a layout chosen at
// compile time (pipe_layout::Best) to minimize the shared-memory wavefronts of this kernel's own
// fragment loads for the element size and head size. The depth comes from the device
// (ChooseStages): as many stages (<= kMaxAutoStages) as fit while the register-limited number of
// CTAs per SM (MmaMinBlocks) still fits in the multiprocessor's shared memory.

// The two-tile step's 16-bit V fragments through ldmatrix.x4.trans instead of 16-byte shared
// loads and byte permutes (PipeLdsmV; the V layout is then also costed for it, see TileCost):
// 32 fewer permutes per 16-token step at head size 128. A build option (CMake
// CACHEFLOW_PA_LDSM_V, or the environment variable of that name at build time) until it has
// been measured on a GPU; the emulated tests run the kernels both ways.
#ifndef CACHEFLOW_PA_LDSM_V
#define CACHEFLOW_PA_LDSM_V 0
#endif
constexpr bool kPipeLdsmV = CACHEFLOW_PA_LDSM_V != 0;

// A bfloat16 launch over an FP8 cache runs the pipelined kernel's MMAs in float16: every E4M3
// value is exact in float16, whose conversion is one instruction per two elements (to bfloat16:
// through half and float, four), P is finer in float16, and the accumulators stay float32. The
// query is staged in float16 scaled by 2^-kFp8HalfQShift (exact for |q| < 2^24 down to float16's
// normal range), the scores scaled back by the same power of two. On by default since its H100
// runs (2026-12-05/06: bfloat16 over FP8 1.9-3.8% faster; GPU tests and sanitizers clean); the
// build option CACHEFLOW_PA_FP8_F16_MMA=0 (CMake, or the environment variable at build time)
// restores bfloat16 MMAs for A/B wheels.
#ifndef CACHEFLOW_PA_FP8_F16_MMA
#define CACHEFLOW_PA_FP8_F16_MMA 1
#endif
constexpr bool kFp8HalfMma = CACHEFLOW_PA_FP8_F16_MMA != 0;
constexpr int kFp8HalfQShift = 8;

// The two-tile step of KV heads with at most kTokensMHeads query heads computes the transposed
// products S^T = K Q^T and O^T = V^T P^T (PipePairLoopTokensM): the step's 16 tokens on the
// m16n8k16 MMA's M dimension and the query heads on N, where the default layout puts the heads on
// M (16 rows, at least half of them empty for such groups) and so issues twice the MMAs per K/V
// byte. On by default since its H100 run (2026-12-06: FP8 decode 0.5-4.2% faster, 16-bit GQA
// 0.7-1.3%, nothing slower; GPU tests and sanitizers clean); the build option
// CACHEFLOW_PA_TOKENS_M=0 (CMake, or the environment variable at build time) builds the heads-on-M
// layout for every group, for A/B wheels. It composes with the two options above.
#ifndef CACHEFLOW_PA_TOKENS_M
#define CACHEFLOW_PA_TOKENS_M 1
#endif
constexpr bool kPipeTokensM = CACHEFLOW_PA_TOKENS_M != 0;
constexpr int kTokensMHeads = 8;  // the MMA's N

/*! \brief The MMA element type of the pipelined kernel for output T over a cache of C: T, or
 * float16 for bfloat16 over FP8 with kFp8HalfMma (kQShift: the query's scaling, log2). */
template <typename T, typename C>
struct MmaElem {
  static constexpr bool kHalf = kFp8HalfMma && kIsBf16<T> && sizeof(C) == 1;
  using type = typename std::conditional<kHalf, MmaHalf, T>::type;
  static constexpr int kQShift = kHalf ? kFp8HalfQShift : 0;
};

namespace pipe_layout {

struct RowLayout {
  int chunks;  // 16-byte chunks per stored row (the row's own plus padding)
  int mask;    // chunk c of row r is stored at chunk c ^ ((r & mask) << shift)
  int shift;
  int cost;    // shared-memory wavefronts of one tile's fragment loads (the search's score)
};

constexpr int Offset(const RowLayout& l, int row, int byte) {
  return row * l.chunks * 16 + ((((byte >> 4) ^ ((row & l.mask) << l.shift)) << 4) | (byte & 15));
}

/*! \brief Wavefronts of one warp-wide shared load: lane i reads `width` bytes at (row[i],
 * byte[i]) of the layout. 16-byte loads go in 4 phases of 8 lanes, 8-byte ones in 2 of 16; a
 * phase costs the largest number of distinct 4-byte words that fall in one bank. */
constexpr int LoadCost(const RowLayout& l, int width, const int (&row)[32], const int (&byte)[32]) {
  const int phases = width >= 16 ? 4 : width == 8 ? 2 : 1;
  const int per = 32 / phases;
  const int words_per = width >= 4 ? width / 4 : 1;
  int cost = 0;
  for (int ph = 0; ph < phases; ++ph) {
    int words[32] = {};
    int n = 0;
    for (int lane = ph * per; lane < (ph + 1) * per; ++lane) {
      const int a = Offset(l, row[lane], byte[lane]) / 4;
      for (int k = 0; k < words_per; ++k) {
        bool seen = false;
        for (int i = 0; i < n; ++i) seen = seen || words[i] == a + k;
        if (!seen) words[n++] = a + k;
      }
    }
    int banks[32] = {};
    int worst = 0;
    for (int i = 0; i < n; ++i) {
      const int c = ++banks[words[i] % 32];
      worst = worst > c ? worst : c;
    }
    cost += worst;
  }
  return cost;
}

/*! \brief Wavefronts of the two-tile step's ldmatrix.x4.trans of 16-bit V rows of d elements
 * (PipeLdsmV): per instruction, 4 matrices of 8 rows x 16 bytes (chunk i + j / 2 of rows 0-7 for
 * matrix j), each as many wavefronts as the most of its rows in one 16-byte bank group. (The
 * second tile's matrices are costed like the first's.) */
constexpr int LdsmCost(const RowLayout& l, int d) {
  int cost = 0;
  for (int i = 0; i < d / 8; i += 2) {
    for (int j = 0; j < 4; ++j) {
      int groups[8] = {};
      int worst = 0;
      for (int r = 0; r < 8; ++r) {
        const int c = ++groups[(Offset(l, r, 16 * (i + (j >> 1))) >> 4) & 7];
        worst = worst > c ? worst : c;
      }
      cost += worst;
    }
  }
  return cost;
}

/*! \brief Wavefronts of the K (is_k) or V fragment loads of one tile: elements of `e` bytes, head
 * size d; the lane -> (row, element) maps of LoadKTile / LoadVTile, plus, for 16-bit V with
 * kPipeLdsmV, those of the two-tile step's ldmatrix (LdsmCost). */
constexpr int TileCost(const RowLayout& l, bool is_k, int e, int d) {
  int row[32] = {};
  int byte[32] = {};
  int cost = 0;
  if (is_k) {
    for (int j = 0; j <= d / 32; ++j) {
      const bool half = j == d / 32;
      if (half && d % 32 == 0) break;
      for (int lane = 0; lane < 32; ++lane) {
        row[lane] = lane >> 2;
        byte[lane] = (32 * j + (half ? 4 : 8) * (lane & 3)) * e;
      }
      cost += LoadCost(l, (half ? 4 : 8) * e, row, byte);
    }
  } else {
    const int tail_tiles = (d % 64) / 8;
    for (int s = 0; s < 2; ++s) {
      for (int c = 0; c < d / 64 + tail_tiles / 2; ++c) {
        const bool tail = c >= d / 64;
        for (int lane = 0; lane < 32; ++lane) {
          row[lane] = 2 * (lane & 3) + s;
          byte[lane] = (tail ? 64 * (d / 64) + tail_tiles * (lane >> 2) + 2 * (c - d / 64)
                             : 64 * c + 8 * (lane >> 2)) * e;
        }
        cost += LoadCost(l, (tail ? 2 : 8) * e, row, byte);
      }
    }
    if (e == 2 && kPipeLdsmV) cost += LdsmCost(l, d);
  }
  return cost;
}

/*! \brief The cheapest layout (fewest wavefronts, then fewest bytes) of rows of d elements of
 * `e` bytes: padding by 0-7 chunks, and an XOR swizzle where the stored row is a multiple of 8
 * chunks (so that the swizzle stays inside it). */
constexpr RowLayout Best(bool is_k, int e, int d) {
  const int chunks = d * e / 16;
  RowLayout best{chunks, 0, 0, 1 << 30};
  for (int pad = 0; pad < 8; ++pad) {
    for (int mask = 0; mask < 8; ++mask) {
      for (int shift = 0; shift < 3; ++shift) {
        if ((mask << shift) > 7 || (mask == 0 && shift > 0)) continue;
        if (mask != 0 && (chunks + pad) % 8 != 0) continue;
        RowLayout l{chunks + pad, mask, shift, 0};
        l.cost = TileCost(l, is_k, e, d);
        if (l.cost < best.cost || (l.cost == best.cost && l.chunks < best.chunks)) best = l;
      }
    }
  }
  return best;
}

}  // namespace pipe_layout

/*! \brief Shared-memory layout of one warp's pipeline stage for cache elements C, head size D. */
template <typename C, int D>
struct PipeLayout {
  static constexpr int kElem = static_cast<int>(sizeof(C));
  static_assert(kElem == 1 || kElem == 2, "the pipelined kernel reads 16-bit or FP8 caches");
  static constexpr int kRowChunks = D * kElem / 16;  // 16-byte chunks of one cache row
  static constexpr pipe_layout::RowLayout kK = pipe_layout::Best(true, kElem, D);
  static constexpr pipe_layout::RowLayout kV = pipe_layout::Best(false, kElem, D);
  // Scalars for device code.
  static constexpr int kKChunks = kK.chunks, kKMask = kK.mask, kKShift = kK.shift;
  static constexpr int kVChunks = kV.chunks, kVMask = kV.mask, kVShift = kV.shift;
  static constexpr int kKTileBytes = kTile * kKChunks * 16;
  static constexpr int kStageBytes = kKTileBytes + kTile * kVChunks * 16;  // one warp's stage
};

template <int kChunks, int kMask, int kShift>
PA_DEVICE int SwizzledOffset(int row, int byte) {
  return row * kChunks * 16 + ((((byte >> 4) ^ ((row & kMask) << kShift)) << 4) | (byte & 15));
}

/*! \brief Dynamic shared memory of the pipelined kernel (CTAs of kW warps) with `stages`
 * stages. */
template <typename C, int D, int kRT = 1, int kW = kWarps>
inline size_t PipeSmemBytes(int stages, int rows) {
  return kStatsSmemBytesFor<kRT, kW> +
         std::max<size_t>(kRT * MmaShape<D>::kQSmemBytes +
                              static_cast<size_t>(stages) * kW * PipeLayout<C, D>::kStageBytes,
                          MergeSmemBytes(D, rows, kW));
}

/*!
 * \brief Pipeline depth for the device (the dispatch's choice; 0: the register kernel): a forced
 * depth (p.stages >= 2) clamped to what one CTA may allocate; else (auto) the most stages (<=
 * kMaxAutoStages) that keep `min_blocks` CTAs per SM (the register-limited occupancy) within the
 * multiprocessor's shared memory, dropping to fewer CTAs per SM only when even 2 stages do not
 * fit. 0 when the device's shared memory is unknown or nothing fits.
 */
template <typename C, int D, int kRT = 1, int kW = kWarps>
inline int ChooseStages(const Params& p, int rows, int min_blocks) {
  if (p.stages == kStagesRegister || p.smem_per_block <= 0) return 0;
  const auto fits = [&](int stages, long long cap) {
    return static_cast<long long>(PipeSmemBytes<C, D, kRT, kW>(stages, rows)) <= cap;
  };
  if (p.stages >= kMinStages) {
    int s = std::min(p.stages, kMaxStages);
    while (s > kMinStages && !fits(s, p.smem_per_block)) --s;
    return fits(s, p.smem_per_block) ? s : 0;
  }
  if (p.smem_per_sm <= 0) return 0;
  for (int ctas = min_blocks; ctas >= 1; --ctas) {
    const long long cap = std::min<long long>(p.smem_per_sm / ctas - kSmemReservedPerCta,
                                              p.smem_per_block);
    for (int s = kMaxAutoStages; s >= kMinStages; --s) {
      if (fits(s, cap)) return s;
    }
  }
  return 0;
}

/*!
 * \brief Issues the cp.async copies of one tile (K and V rows of tokens tok0 .. tok0 + 7, all in
 * cache block `blk`) into a warp's stage; rows outside [r.begin, r.end) are zero-filled.
 */
template <typename C, int D>
PA_DEVICE void IssueTile(const C* kc, const C* vc, const Params& p, const PartitionRange& r,
                         int tok0, int blk, unsigned char* stage, int lane) {
  using L = PipeLayout<C, D>;
  constexpr int kTasks = kTile * L::kRowChunks;  // chunks per tensor and tile
  constexpr int kChunkElems = 16 / L::kElem;
  // Rows of the tile are consecutive slots of one block (tok0 is a multiple of 8).
  const int64_t tile_off = static_cast<int64_t>(blk) * p.block_stride +
                           static_cast<int64_t>(tok0 & (p.block_size - 1)) * p.token_stride;
#pragma unroll
  for (int k = 0; k < (kTasks + 31) / 32; ++k) {
    const int i = lane + 32 * k;
    if (kTasks % 32 == 0 || i < kTasks) {
      // Where a row's chunk count divides 32 (all but d80/96/112), a lane keeps its chunk and
      // steps by 32 / kRowChunks rows.
      constexpr bool kDivides = 32 % L::kRowChunks == 0;
      const int row = kDivides ? lane / L::kRowChunks + k * (32 / L::kRowChunks) : i / L::kRowChunks;
      const int c = kDivides ? lane % L::kRowChunks : i - row * L::kRowChunks;
      const int tok = tok0 + row;
      const bool valid = tok >= r.begin && tok < r.end;
      const int64_t off = tile_off + static_cast<int64_t>(row) * p.token_stride + c * kChunkElems;
      CpAsync16(stage + SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(row, 16 * c), kc + off,
                valid);
      CpAsync16(stage + L::kKTileBytes +
                    SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(row, 16 * c),
                vc + off, valid);
    }
  }
}

/*!
 * \brief The lane map of IssueTileRows for cache element C, head size D: kLanesPerRow lanes copy
 * one cache row, 16 bytes each per instruction, so that every copy instruction reads whole
 * 128-byte lines of kRowsPerPass rows (8 lanes per row where a row has a multiple of 8 chunks;
 * rows of 4 chunks, 64 bytes, take 4); kPasses passes cover the tile's 8 rows, and a lane copies
 * kChunksPerLane chunks of its row per pass (chunk lane % kLanesPerRow + kLanesPerRow * j).
 * value: whether the two-tile step uses it (else IssueTile).
 */
template <typename C, int D>
struct RowIssue {
  using L = PipeLayout<C, D>;
  static constexpr int kLanesPerRow = L::kRowChunks % 8 == 0 ? 8 : L::kRowChunks == 4 ? 4 : 0;
  static constexpr bool value = kLanesPerRow > 0;
  static constexpr int kRowsPerPass = value ? 32 / kLanesPerRow : 1;
  static constexpr int kPasses = kTile / kRowsPerPass;
  static constexpr int kChunksPerLane = value ? L::kRowChunks / kLanesPerRow : 0;
  // A swizzle XOR (< 8 chunks) stays inside a lane's low chunk bits with 8 lanes per row; with 4
  // (one chunk per lane) it applies to the lane's single chunk. Either way chunk j of a lane is
  // a constant 16 * kLanesPerRow * j bytes past its chunk 0.
  static_assert(!value || kLanesPerRow == 8 || kChunksPerLane == 1, "RowIssue: swizzle leaks");
};

/*!
 * \brief What IssueTileRows needs of its lane, formed once per warp before the main loop: the
 * shared-memory offsets (bytes into a stage) of the lane's first chunk of K and of V in each pass,
 * the lane's first row of a tile and its element offset into a cache row. Each tile then adds its
 * block's and its rows' base to these; without them the compiler re-derived all of it from the
 * thread index at every tile (about half of the FP8 loop's integer instructions, sm_90a SASS).
 */
template <typename C, int D>
struct RowIssueLane {
  using L = PipeLayout<C, D>;
  using M = RowIssue<C, D>;
  uint32_t kdst[M::kPasses];
  uint32_t vdst[M::kPasses];
  int row0;
  int src;  // row0 * token_stride + the lane's chunk, in elements

  /*! \brief The values of `lane` (only where RowIssue<C, D>::value). */
  PA_DEVICE static RowIssueLane Of(const Params& p, int lane) {
    constexpr int kChunkElems = 16 / L::kElem;
    RowIssueLane x;
    const int row0 = lane / M::kLanesPerRow;
    const int lane_chunk = lane % M::kLanesPerRow;
#pragma unroll
    for (int pass = 0; pass < M::kPasses; ++pass) {
      const int row = row0 + pass * M::kRowsPerPass;
      x.kdst[pass] = Pinned(static_cast<uint32_t>(
          SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(row, 16 * lane_chunk)));
      x.vdst[pass] = Pinned(static_cast<uint32_t>(
          L::kKTileBytes + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(row, 16 * lane_chunk)));
    }
    x.row0 = static_cast<int>(Pinned(static_cast<uint32_t>(row0)));
    x.src = static_cast<int>(Pinned(static_cast<uint32_t>(
        row0 * static_cast<int>(p.token_stride) + lane_chunk * kChunkElems)));
    return x;
  }
};

/*!
 * \brief IssueTile with little address arithmetic (the two-tile step's copies; 32-bit cache-block
 * strides): the K and V sources of the tile are formed once from the lane's RowIssueLane, and
 * each pass and chunk adds a constant to them, chunks as immediate offsets (the RowIssue lane
 * map). Same copies, destinations and zero-fill as IssueTile.
 */
template <typename C, int D>
PA_DEVICE void IssueTileRows(const C* kc, const C* vc, const Params& p, const PartitionRange& r,
                             int tok0, int blk, unsigned char* stage,
                             const RowIssueLane<C, D>& lane) {
  using L = PipeLayout<C, D>;
  using M = RowIssue<C, D>;
  static_assert(M::value, "IssueTileRows: no lane map for this row size");
  constexpr int kChunkElems = 16 / L::kElem;
  const int token_stride = static_cast<int>(p.token_stride);
  const int in_block = (tok0 & (p.block_size - 1)) * token_stride + lane.src;
  // Block numbers and strides are non-negative: one 32 x 32 -> 64-bit multiply-add.
  const int64_t off = static_cast<int64_t>(
      static_cast<uint64_t>(static_cast<uint32_t>(blk)) * static_cast<uint32_t>(p.block_stride) +
      static_cast<uint32_t>(in_block));
  const C* ksrc = kc + off;
  const C* vsrc = vc + off;
  // Rows in [r.begin, r.end) as one unsigned comparison per pass.
  const uint32_t span = static_cast<uint32_t>(r.end - r.begin);
  const int first = tok0 + lane.row0 - r.begin;
#pragma unroll
  for (int pass = 0; pass < M::kPasses; ++pass) {
    const bool valid = static_cast<uint32_t>(first + pass * M::kRowsPerPass) < span;
    unsigned char* kdst = stage + lane.kdst[pass];
    unsigned char* vdst = stage + lane.vdst[pass];
    const int64_t row_off = static_cast<int64_t>(pass) * M::kRowsPerPass * token_stride;
#pragma unroll
    for (int j = 0; j < M::kChunksPerLane; ++j) {
      const int chunk_off = M::kLanesPerRow * j * kChunkElems;  // elements
      CpAsync16(kdst + 16 * M::kLanesPerRow * j, ksrc + row_off + chunk_off, valid);
      CpAsync16(vdst + 16 * M::kLanesPerRow * j, vsrc + row_off + chunk_off, valid);
    }
  }
}

/*! \brief Whether the two-tile step reads V fragments with ldmatrix.trans (16-bit caches; FP8
 * bytes are paired by permutes before their widening). Its accumulators are then in natural
 * d-tile order, else in the permuted order of the index maps above (StoreWarpRows). Built in
 * where CACHEFLOW_PA_LDSM_V is 1 (see kPipeLdsmV). */
template <typename C>
struct PipeLdsmV {
  static constexpr bool value = kPipeLdsmV && sizeof(C) == 2;
};

// Q fragments live in registers up to head_size 128 (<= 32 registers, the ones the register
// kernel spends on its K/V tile), else they are re-read from shared memory per step; with
// two-tile steps and a 16-bit cache at head size 128 too (in registers they leave too few for the
// step's two tiles under the 3-CTA cap of 168; from shared memory: 8 loads per 16 tokens).
template <typename C, int D, bool kPair>
struct PipeQInRegs {
  static constexpr bool value = kPair && sizeof(C) == 2 ? D < 128 : D <= 128;
};

/*!
 * \brief The pipelined kernel's main loop with two-tile steps: each step computes the warp's
 * tiles q and q + 1 (stages q % stages and the next) as one 16-token step: S for both tiles (four
 * independent MMA chains), one online-softmax update for the 16 tokens (lazy rescaling, see
 * kDefaultRescaleThreshold), and O += P V with m16n8k16, whose k = 16 are tile q's 8 tokens then
 * tile q + 1's (A: a0/a1 from tile q's scores, a2/a3 from tile q + 1's; B: b0 from tile q's V
 * rows 2t, 2t + 1, b1 from tile q + 1's). Ring: stages - 2 tiles were issued before the loop; at
 * each step the warp waits for tiles q and q + 1 (stages - 4 newer groups may stay pending),
 * __syncwarp, then refills the two stages of the previous step with tiles q + stages - 2 and
 * q + stages - 1.
 */
// Two row tiles (kRT = 2; CTAs of 32 query heads): every K and V fragment read from the ring
// feeds the MMAs of both row tiles (their S, P, statistics and accumulators are separate), so a
// KV head's 17-32 query heads read each K/V byte once. Q is then re-read from shared memory.
template <typename T, typename C, int D, int kRT, typename QFrags, typename Issue, int kW = kWarps,
          int kQShift = 0>
PA_DEVICE void PipePairLoop(const Params& p, const PartitionRange& r, const uint4* qs,
                            const QFrags& qf,
                            const unsigned char* ring, int stages, int warp, int lane,
                            const float (&alibi)[kRT][2], float query_pos, int n_tiles,
                            Issue& issue, float (&m_run)[kRT][2], float (&l_run)[kRT][2],
                            float (&acc)[kRT][MmaShape<D>::kDTiles][4]) {
  using S = MmaShape<D>;
  using Ops = Dtype<T>;
  using Io = CacheIo<T, C>;
  using L = PipeLayout<C, D>;
  constexpr int kE = L::kElem;
  constexpr bool kQInRegs = kRT == 1 && PipeQInRegs<C, D, true>::value;
  constexpr bool kLdsmV = PipeLdsmV<C>::value;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const bool eager = p.rescale_threshold < 0.f;
  const float threshold = eager ? 0.f : p.rescale_threshold;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const float scale_log2 = p.scale_log2 * static_cast<float>(1 << kQShift);  // MmaElem's Q
  int stage = 0;  // stage of tile q; tile q + 1 is in the next one
  for (int q = 0; q < n_tiles; q += 2) {  // warp-uniform
    CpAsyncWait(stages - 4);  // this thread's copies of tiles q and q + 1 have landed
    SyncWarp();  // ... and every lane's; every lane is done with tiles q - 2 and q - 1
    const int free0 = stage >= 2 ? stage - 2 : stage + stages - 2;
    issue(q + stages - 2, free0);
    issue(q + stages - 1, free0 + 1 == stages ? 0 : free0 + 1);
    const int stage_b = stage + 1 == stages ? 0 : stage + 1;
    const unsigned char* ks[2] = {ring + stage * L::kStageBytes, ring + stage_b * L::kStageBytes};
    // tile q + 1: + kTile * kW
    const int tok0 = r.tile_base + kTile * (warp + kW * q);

    // ---- S = Q K^T for both tiles (and every row tile).
    float sc[kRT][2][4];
    float sc2[kRT][2][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[rt][h][e] = sc2[rt][h][e] = 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < S::kSpans; ++j) {
      const int off =
          SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(gid, (32 * j + 8 * tig) * kE);
      uint4 k[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) k[h] = Io::Widen(Io::SharedSpan(ks[h] + off));
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
        const int qi = rt * S::kQSpans + j;
        const uint4 q0 = kQInRegs ? qf[kQInRegs ? j : 0][0] : qs[(2 * qi) * 32 + lane];
        const uint4 q1 = kQInRegs ? qf[kQInRegs ? j : 0][1] : qs[(2 * qi + 1) * 32 + lane];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Ops::Mma16816(sc[rt][h], q0.x, q0.y, q0.z, q0.w, k[h].x, k[h].y);
          Ops::Mma16816(sc2[rt][h], q1.x, q1.y, q1.z, q1.w, k[h].z, k[h].w);
        }
      }
    }
    if constexpr (S::kHalfSpan) {
      const int off =
          SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(gid, (32 * S::kSpans + 4 * tig) * kE);
      uint2 k[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) k[h] = Io::WidenHalf(Io::SharedHalf(ks[h] + off));
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
        const int qi = rt * S::kQSpans + S::kSpans;
        const uint4 q0 = kQInRegs ? qf[kQInRegs ? S::kSpans : 0][0] : qs[(2 * qi) * 32 + lane];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Ops::Mma16816(sc2[rt][h], q0.x, q0.y, q0.z, q0.w, k[h].x, k[h].y);
        }
      }
    }

    // ---- Logits: scale, soft cap (one warp-uniform branch for the step), ALiBi and the mask.
    // x[rt][h][e]: tile q + h, row 16 rt + gid + 8 * (e >> 1), token 2 * tig + (e & 1).
    float x[kRT][2][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[rt][h][e] = (sc[rt][h][e] + sc2[rt][h][e]) * scale_log2;
      }
    }
    if (p.soft_cap_log2 > 0.f) {
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            x[rt][h][e] = p.soft_cap_log2 * FastTanh(x[rt][h][e] * p.inv_soft_cap_log2);
          }
        }
      }
    }
    // Most steps lie wholly inside [begin, end) (warp-uniform test); without ALiBi they have
    // nothing to add or mask.
    const bool interior = tok0 >= r.begin && tok0 + kTile * (kW + 1) <= r.end;
    if (has_alibi || !interior) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ta = tok0 + kTile * kW * h + 2 * tig;
        const bool va = ta >= r.begin && ta < r.end;
        const bool vb = ta + 1 >= r.begin && ta + 1 < r.end;
        const float da = static_cast<float>(ta) - query_pos;
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            x[rt][h][2 * hh] = va ? fmaf(alibi[rt][hh], da, x[rt][h][2 * hh]) : kNegInf;
            x[rt][h][2 * hh + 1] =
                vb ? fmaf(alibi[rt][hh], da + 1.f, x[rt][h][2 * hh + 1]) : kNegInf;
          }
        }
      }
    }

    // ---- Online softmax over the 16 tokens; P as the m16n8k16 A fragment.
    float corr[kRT][2];
    uint32_t pa[kRT][4];
    bool moved = false;
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = fmaxf(fmaxf(x[rt][0][2 * hh], x[rt][0][2 * hh + 1]),
                         fmaxf(x[rt][1][2 * hh], x[rt][1][2 * hh + 1]));
        mx = fmaxf(mx, ShflXor(mx, 1));
        mx = fmaxf(mx, ShflXor(mx, 2));
        const bool grow = mx > m_run[rt][hh] + threshold;  // -inf + threshold stays -inf
        const float m_new = grow ? mx : m_run[rt][hh];
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        corr[rt][hh] = grow ? FastExp2(m_run[rt][hh] - m_use) : 1.f;
        m_run[rt][hh] = m_new;
        const float p00 = FastExp2(x[rt][0][2 * hh] - m_use);
        const float p01 = FastExp2(x[rt][0][2 * hh + 1] - m_use);
        const float p10 = FastExp2(x[rt][1][2 * hh] - m_use);
        const float p11 = FastExp2(x[rt][1][2 * hh + 1] - m_use);
        l_run[rt][hh] = fmaf(l_run[rt][hh], corr[rt][hh], (p00 + p01) + (p10 + p11));
        pa[rt][hh] = Ops::Pack(p00, p01);
        pa[rt][2 + hh] = Ops::Pack(p10, p11);
        moved = moved || corr[rt][hh] != 1.f;
      }
    }
    if (eager || AnyInWarp(moved)) {
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
        for (int i = 0; i < S::kDTiles; ++i) {
          acc[rt][i][0] *= corr[rt][0];
          acc[rt][i][1] *= corr[rt][0];
          acc[rt][i][2] *= corr[rt][1];
          acc[rt][i][3] *= corr[rt][1];
        }
      }
    }

    // ---- O += P V (m16n8k16, k = the 16 tokens); each B fragment feeds every row tile.
    const unsigned char* vs[2] = {ks[0] + L::kKTileBytes, ks[1] + L::kKTileBytes};
    if constexpr (kLdsmV) {
      // d-tiles in natural order (column n of d-tile i is dim 8 i + n): one ldmatrix.x4.trans
      // gives the B fragments of d-tiles i and i + 1. Lane l addresses row l % 8 (a token) of
      // matrix l / 8: tile (l / 8) % 2's V rows at d-tile i + l / 16. With i even, chunk i + l / 16
      // is i ^ (l / 16), and the row's swizzle (< 8) only touches chunk bits 0-2.
      const int v_row = lane & 7;
      const int v_xor = (lane >> 4) ^ ((v_row & L::kVMask) << L::kVShift);
      // A select, not vs[(lane >> 3) & 1]: a runtime index puts vs in local memory.
      const unsigned char* v_lane = ((lane & 8) ? vs[1] : vs[0]) + v_row * L::kVChunks * 16;
#pragma unroll
      for (int i = 0; i < S::kDTiles; i += 2) {
        uint32_t b[4];
        LdMatrixX4Trans(v_lane + (i & ~7) * 16 + (((i & 7) ^ v_xor) << 4), b);
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) {
          Ops::Mma16816(acc[rt][i], pa[rt][0], pa[rt][1], pa[rt][2], pa[rt][3], b[0], b[1]);
          Ops::Mma16816(acc[rt][i + 1], pa[rt][0], pa[rt][1], pa[rt][2], pa[rt][3], b[2], b[3]);
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        typename Io::Span v[2][2];  // [tile][row 2 * tig + s]
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int sr = 0; sr < 2; ++sr) {
            v[h][sr] = Io::SharedSpan(vs[h] + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(
                                                  2 * tig + sr, (64 * c + 8 * gid) * kE));
          }
        }
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          uint32_t b0[2], b1[2];  // [element e, e + 1]
          Io::VPairs(v[0][0], v[0][1], e, b0[0], b0[1]);
          Io::VPairs(v[1][0], v[1][1], e, b1[0], b1[1]);
#pragma unroll
          for (int ee = 0; ee < 2; ++ee) {
#pragma unroll
            for (int rt = 0; rt < kRT; ++rt) {
              Ops::Mma16816(acc[rt][8 * c + e + ee], pa[rt][0], pa[rt][1], pa[rt][2], pa[rt][3],
                            b0[ee], b1[ee]);
            }
          }
        }
      }
      if constexpr (S::kTailTiles > 0) {
        typename Io::Tail t[2][2][S::kTailWordsAlloc];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int sr = 0; sr < 2; ++sr) {
#pragma unroll
            for (int w = 0; w < S::kTailWords; ++w) {
              t[h][sr][w] = Io::SharedTail(
                  vs[h] + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(
                              2 * tig + sr, (64 * S::kChunks + S::kTailTiles * gid + 2 * w) * kE));
            }
          }
        }
#pragma unroll
        for (int e = 0; e < S::kTailTiles; ++e) {
          const uint32_t b0 = Io::TailPair(t[0][0], t[0][1], e);
          const uint32_t b1 = Io::TailPair(t[1][0], t[1][1], e);
#pragma unroll
          for (int rt = 0; rt < kRT; ++rt) {
            Ops::Mma16816(acc[rt][8 * S::kChunks + e], pa[rt][0], pa[rt][1], pa[rt][2], pa[rt][3],
                          b0, b1);
          }
        }
      }
    }
    stage = stage_b + 1 == stages ? 0 : stage_b + 1;
  }
}

// ------------------------------------------------------------------------------------------
// Tokens on the MMA's M dimension (kPipeTokensM; KV heads of at most kTokensMHeads query heads).
//
// The two-tile step computes the transposed products, with the step's 16 tokens as the M rows
// (rows g: tile q's token g, rows g + 8: tile q + 1's token g) and the query heads as the N
// columns:
//   S^T [16 tokens x 8 heads]  = K [16 tokens x D] * Q^T                one m16n8k16 per 16 dims
//   O^T [D x 8 heads]         += V^T [D x 16 tokens] * P^T [16 x 8]     one m16n8k16 per 16 dims
// half the MMAs of the default layout (whose 16 rows are the heads). K's A fragment is the K span
// as the default layout loads it (k = 2t, 2t + 1 of the 16-dim k-step are dims 32j + 8t + {0, 1};
// 2t + 8, 2t + 9 are + {2, 3}; the second k-step + {4..7}), so Q^T's B fragment is query row g's
// 8 dims 32j + 8t .. + 7 (QueryCols). The softmax statistics are per head, i.e. per column: a
// lane's 2 tokens, then the 8 lanes sharing t (lane bits 2-4). C of S^T holds a lane's token g at
// heads 2t, 2t + 1, where P^T's B fragment wants tokens 2t, 2t + 1 at head g: one movmatrix.trans
// per tile. V^T's A fragment pairs the default layout's B words: rows g / g + 8 of m-tile
// 4c + e / 2 are dims 64c + 8g + e / + e + 1 (e even; the D % 64 tail likewise with its own index
// map), or, with ldmatrix (PipeLdsmV), rows g / g + 8 of m-tile i are dims 16i + g / + 8.
// StoreWarpCols writes the merge buffer and statistics as StoreWarpRows does, so the warps' merge,
// the partition's epilogue and the split-K combine are the default layout's.

/*!
 * \brief Q^T's B fragments of this lane (column gid = query row gid of `plain`, RotateQueryRows'
 * [rows][D] layout): qt[j] = dims 32j + 8 tig .. + 7 of the row (b0, b1 = .x, .y for the span's
 * first k-step, .z, .w for its second), a trailing half span's dims 32j + 4 tig .. + 3 in .x, .y;
 * zeros for rows at or past rows_valid (never written).
 */
template <typename T, int D, int kQShift>
PA_DEVICE void QueryCols(const unsigned char* plain, int gid, int tig, int rows_valid,
                         uint4 (&qt)[MmaShape<D>::kQSpans]) {
  using S = MmaShape<D>;
  const bool valid = gid < rows_valid;
  const unsigned char* row = plain + gid * D * 2;
#pragma unroll
  for (int j = 0; j < S::kSpans; ++j) {
    const uint4 w =
        valid ? LoadShared<uint4>(row + (32 * j + 8 * tig) * 2) : make_uint4(0, 0, 0, 0);
    qt[j] = make_uint4(QueryPair<T, kQShift>(w.x), QueryPair<T, kQShift>(w.y),
                       QueryPair<T, kQShift>(w.z), QueryPair<T, kQShift>(w.w));
  }
  if constexpr (S::kHalfSpan) {
    const uint2 w = valid ? LoadShared<uint2>(row + (32 * S::kSpans + 4 * tig) * 2)
                          : make_uint2(0, 0);
    qt[S::kSpans] = make_uint4(QueryPair<T, kQShift>(w.x), QueryPair<T, kQShift>(w.y), 0, 0);
  }
}

/*! \brief ALiBi slopes, in log2 units, of a thread's two columns (heads 2 tig and 2 tig + 1);
 * 0 without ALiBi or past rows_valid. */
PA_DEVICE void AlibiColSlopes(const Params& p, int tig, int head0, int rows_valid,
                              float alibi[2]) {
  alibi[0] = alibi[1] = 0.f;
  if (p.alibi_slopes != nullptr) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int head = 2 * tig + i;
      if (head < rows_valid) alibi[i] = p.alibi_slopes[head0 + head] * kLog2e;
    }
  }
}

/*!
 * \brief The two-tile step's main loop (PipePairLoop's ring, issue order and lazy rescaling)
 * with tokens on the MMA's M dimension (see above). State per thread: m_run / l_run of heads
 * 2 tig + i (l_run: this lane's tokens only, summed over the column by StoreWarpCols) and O^T's
 * D / 16 m-tiles (c0 / c1: row gid at heads 2 tig, 2 tig + 1; c2 / c3: row gid + 8).
 */
template <typename T, typename C, int D, typename Issue, int kW = kWarps, int kQShift = 0>
PA_DEVICE void PipePairLoopTokensM(const Params& p, const PartitionRange& r,
                                   const uint4 (&qt)[MmaShape<D>::kQSpans],
                                   const unsigned char* ring, int stages, int warp, int lane,
                                   const float (&alibi)[2], float query_pos, int n_tiles,
                                   Issue& issue, float (&m_run)[2], float (&l_run)[2],
                                   float (&acc)[MmaShape<D>::kDTiles / 2][4]) {
  using S = MmaShape<D>;
  using Ops = Dtype<T>;
  using Io = CacheIo<T, C>;
  using L = PipeLayout<C, D>;
  constexpr int kE = L::kElem;
  constexpr int kMTiles = S::kDTiles / 2;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const bool eager = p.rescale_threshold < 0.f;
  const float threshold = eager ? 0.f : p.rescale_threshold;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const float scale_log2 = p.scale_log2 * static_cast<float>(1 << kQShift);  // MmaElem's Q
  int stage = 0;  // stage of tile q; tile q + 1 is in the next one
  for (int q = 0; q < n_tiles; q += 2) {  // warp-uniform
    CpAsyncWait(stages - 4);  // this thread's copies of tiles q and q + 1 have landed
    SyncWarp();  // ... and every lane's; every lane is done with tiles q - 2 and q - 1
    const int free0 = stage >= 2 ? stage - 2 : stage + stages - 2;
    issue(q + stages - 2, free0);
    issue(q + stages - 1, free0 + 1 == stages ? 0 : free0 + 1);
    const int stage_b = stage + 1 == stages ? 0 : stage + 1;
    const unsigned char* ks[2] = {ring + stage * L::kStageBytes, ring + stage_b * L::kStageBytes};
    // tile q + 1: + kTile * kW
    const int tok0 = r.tile_base + kTile * (warp + kW * q);

    // ---- S^T = K Q^T: A = both tiles' K rows gid (rows gid, gid + 8), two accumulators.
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
    float sc2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < S::kSpans; ++j) {
      const int off =
          SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(gid, (32 * j + 8 * tig) * kE);
      uint4 k[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) k[h] = Io::Widen(Io::SharedSpan(ks[h] + off));
      Ops::Mma16816(sc, k[0].x, k[1].x, k[0].y, k[1].y, qt[j].x, qt[j].y);
      Ops::Mma16816(sc2, k[0].z, k[1].z, k[0].w, k[1].w, qt[j].z, qt[j].w);
    }
    if constexpr (S::kHalfSpan) {
      const int off =
          SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(gid, (32 * S::kSpans + 4 * tig) * kE);
      uint2 k[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) k[h] = Io::WidenHalf(Io::SharedHalf(ks[h] + off));
      Ops::Mma16816(sc2, k[0].x, k[1].x, k[0].y, k[1].y, qt[S::kSpans].x, qt[S::kSpans].y);
    }

    // ---- Logits: x[e] is tile q + (e >> 1)'s token gid at head 2 tig + (e & 1).
    float x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = (sc[e] + sc2[e]) * scale_log2;
    if (p.soft_cap_log2 > 0.f) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e] = p.soft_cap_log2 * FastTanh(x[e] * p.inv_soft_cap_log2);
    }
    const bool interior = tok0 >= r.begin && tok0 + kTile * (kW + 1) <= r.end;
    if (has_alibi || !interior) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tok = tok0 + kTile * kW * h + gid;
        const bool valid = tok >= r.begin && tok < r.end;
        const float dist = static_cast<float>(tok) - query_pos;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          x[2 * h + i] = valid ? fmaf(alibi[i], dist, x[2 * h + i]) : kNegInf;
        }
      }
    }

    // ---- Online softmax per head: this lane's two tokens, then the column's 8 lanes.
    float corr[2];
    float pr[4];
    bool moved = false;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(x[i], x[2 + i]);
      mx = fmaxf(mx, ShflXor(mx, 4));
      mx = fmaxf(mx, ShflXor(mx, 8));
      mx = fmaxf(mx, ShflXor(mx, 16));
      const bool grow = mx > m_run[i] + threshold;  // -inf + threshold stays -inf
      const float m_new = grow ? mx : m_run[i];
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      corr[i] = grow ? FastExp2(m_run[i] - m_use) : 1.f;
      m_run[i] = m_new;
      pr[i] = FastExp2(x[i] - m_use);
      pr[2 + i] = FastExp2(x[2 + i] - m_use);
      l_run[i] = fmaf(l_run[i], corr[i], pr[i] + pr[2 + i]);
      moved = moved || corr[i] != 1.f;
    }
    if (eager || AnyInWarp(moved)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        acc[mt][0] *= corr[0];
        acc[mt][1] *= corr[1];
        acc[mt][2] *= corr[0];
        acc[mt][3] *= corr[1];
      }
    }
    // P^T's B fragment: b0 (k = tile q's tokens 2 tig, 2 tig + 1; n = head gid), b1 tile q + 1's.
    const uint32_t b0 = MovMatrixTrans(Ops::Pack(pr[0], pr[1]));
    const uint32_t b1 = MovMatrixTrans(Ops::Pack(pr[2], pr[3]));

    // ---- O^T += V^T P^T: A = V^T (a0 / a1: tile q's tokens 2 tig, 2 tig + 1 at the m-tile's
    // rows gid / gid + 8; a2 / a3: tile q + 1's).
    const unsigned char* vs[2] = {ks[0] + L::kKTileBytes, ks[1] + L::kKTileBytes};
    if constexpr (PipeLdsmV<C>::value) {
      // Lane l addresses row l % 8 (a token) of matrix l / 8: tile l / 16's V rows at d-tile
      // i + (l / 8) % 2, so the four matrices are a0 .. a3 of m-tile i / 2 (i even: chunk
      // i + (l / 8) % 2 is i ^ ((l / 8) % 2); the row's swizzle only touches chunk bits 0-2).
      const int v_row = lane & 7;
      const int v_xor = ((lane >> 3) & 1) ^ ((v_row & L::kVMask) << L::kVShift);
      const unsigned char* v_lane = ((lane & 16) ? vs[1] : vs[0]) + v_row * L::kVChunks * 16;
#pragma unroll
      for (int i = 0; i < S::kDTiles; i += 2) {
        uint32_t a[4];
        LdMatrixX4Trans(v_lane + (i & ~7) * 16 + (((i & 7) ^ v_xor) << 4), a);
        Ops::Mma16816(acc[i / 2], a[0], a[1], a[2], a[3], b0, b1);
      }
    } else {
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        typename Io::Span v[2][2];  // [tile][row 2 * tig + s]
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int sr = 0; sr < 2; ++sr) {
            v[h][sr] = Io::SharedSpan(vs[h] + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(
                                                  2 * tig + sr, (64 * c + 8 * gid) * kE));
          }
        }
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          uint32_t a[4];
          Io::VPairs(v[0][0], v[0][1], e, a[0], a[1]);
          Io::VPairs(v[1][0], v[1][1], e, a[2], a[3]);
          Ops::Mma16816(acc[4 * c + e / 2], a[0], a[1], a[2], a[3], b0, b1);
        }
      }
      if constexpr (S::kTailTiles > 0) {
        typename Io::Tail t[2][2][S::kTailWordsAlloc];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int sr = 0; sr < 2; ++sr) {
#pragma unroll
            for (int w = 0; w < S::kTailWords; ++w) {
              t[h][sr][w] = Io::SharedTail(
                  vs[h] + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(
                              2 * tig + sr, (64 * S::kChunks + S::kTailTiles * gid + 2 * w) * kE));
            }
          }
        }
#pragma unroll
        for (int e = 0; e < S::kTailTiles; e += 2) {
          Ops::Mma16816(acc[4 * S::kChunks + e / 2], Io::TailPair(t[0][0], t[0][1], e),
                        Io::TailPair(t[0][0], t[0][1], e + 1), Io::TailPair(t[1][0], t[1][1], e),
                        Io::TailPair(t[1][0], t[1][1], e + 1), b0, b1);
        }
      }
    }
    stage = stage_b + 1 == stages ? 0 : stage_b + 1;
  }
}

/*!
 * \brief StoreWarpRows for PipePairLoopTokensM's state: each column's sum reduced over its 8
 * lanes, then head 2 tig + i's statistics and output row (heads at or past p.rows keep only their
 * statistics), in the merge buffer and statistics layout FinishPartition reads.
 */
template <int D, bool kNatural>
PA_DEVICE void StoreWarpCols(const Params& p, const Stats& st, float* so, int warp, int gid,
                             int tig, const float (&m_run)[2], float (&l_run)[2],
                             const float (&acc)[MmaShape<D>::kDTiles / 2][4]) {
  using S = MmaShape<D>;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += ShflXor(l_run[i], 4);
    l_run[i] += ShflXor(l_run[i], 8);
    l_run[i] += ShflXor(l_run[i], 16);
  }
  const int rows = p.rows;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int head = 2 * tig + i;
    if (gid == 0) {
      st.m[warp * st.stride + head] = m_run[i];
      st.l[warp * st.stride + head] = l_run[i];
    }
    if (head < rows) {
      float* o_row = so + (warp * rows + head) * (D + kOutPad);
      if constexpr (kNatural) {  // rows gid / gid + 8 of m-tile mt: dims 16 mt + gid / + 8
#pragma unroll
        for (int mt = 0; mt < S::kDTiles / 2; ++mt) {
          o_row[16 * mt + gid] = acc[mt][i];
          o_row[16 * mt + 8 + gid] = acc[mt][2 + i];
        }
      } else {  // rows gid / gid + 8: dims d / d + 1, d even (one float2)
#pragma unroll
        for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
          for (int e = 0; e < 8; e += 2) {
            const int mt = 4 * c + e / 2;
            *reinterpret_cast<float2*>(o_row + 64 * c + 8 * gid + e) =
                make_float2(acc[mt][i], acc[mt][2 + i]);
          }
        }
#pragma unroll
        for (int e = 0; e < S::kTailTiles; e += 2) {
          const int mt = 4 * S::kChunks + e / 2;
          *reinterpret_cast<float2*>(o_row + 64 * S::kChunks + S::kTailTiles * gid + e) =
              make_float2(acc[mt][i], acc[mt][2 + i]);
        }
      }
    }
  }
}

// kTokensM: the two-tile step with tokens on the MMA's M dimension (PipePairLoopTokensM; one row
// tile of at most kTokensMHeads query heads).
template <typename T, typename C, int D, bool kPair, int kRT = 1, int kW = kWarps,
          bool kTokensM = false>
PA_GLOBAL void PA_LAUNCH_BOUNDS(32 * kW, (MmaMinBlocks<D, kRT>() * kWarps / kW))
    PagedAttentionPipeKernel(const Params p) {
  // By default no PdlWait() here: the prologue below reads what the previous kernel cannot be
  // writing before it waits (see "Before the wait" there); the successor starts as this grid
  // ends. (A second wait returns at once.)
  if (!p.prefetch_before_wait) PdlWait();
  static_assert(kRT == 1 || kPair, "two row tiles need the two-tile step");
  static_assert(kW == kWarps || (kRT == 1 && kPair), "wide CTAs: one row tile, two-tile steps");
  static_assert(!kTokensM || (kPair && kRT == 1), "tokens on M: one row tile, two-tile steps");
  using S = MmaShape<D>;
  using MT = typename MmaElem<T, C>::type;  // the MMAs' element type (T or float16)
  constexpr int kQShift = MmaElem<T, C>::kQShift;
  using Ops = Dtype<MT>;
  using Io = CacheIo<MT, C>;
  using L = PipeLayout<C, D>;
  constexpr int kE = L::kElem;
  constexpr int kRows = kRT * kMmaRows;  // query heads per CTA
  constexpr bool kQInRegs = !kTokensM && kRT == 1 && PipeQInRegs<C, D, kPair>::value;
  unsigned char* smem = DynamicSmem();
  const Stats st = GetStats<kW>(smem, kRows);
  unsigned char* smem_main = smem + kStatsSmemBytesFor<kRT, kW>;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const int kvh = blockIdx.x / p.head_groups;
  const int hg = blockIdx.x - kvh * p.head_groups;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int rows_valid = IMin(kRows, p.group - hg * kRows);
  const int head0 = kvh * p.group + hg * kRows;

  // Fused launches: the new token's slot and position, its cos/sin row staged (New token).
  const bool fused = p.new_key != nullptr;
  uint16_t* cs = reinterpret_cast<uint16_t*>(smem);  // the statistics area, free until the end
  NewTokenAt at{-1, false};
  if (fused) at = StageNewToken<T, D, kW>(p, seq, cs, tid);

  const PartitionRange r = GetRange(p, seq, part);
  // Split launches: the partition holding the new position stores the new token (the others
  // never read its slot); an empty context stores it from partition 0.
  if (part != IMax(r.ctx - 1, 0) / p.partition_size) at.slot = -1;
  if (r.num_tiles == 0) {
    PdlWait();
    if (fused) {
      SyncThreads();
      StoreNewToken<T, C, D, kW>(p, seq, kvh, at, cs, tid);
    }
    if (p.ws_o == nullptr) WriteZeros<T, D, kW>(p, rows_valid, head0, seq);
    return;
  }

  const C* kc = static_cast<const C*>(p.key_cache) + static_cast<int64_t>(kvh) * D;
  const C* vc = static_cast<const C*>(p.value_cache) + static_cast<int64_t>(kvh) * D;
  const int32_t* bt_row = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  const int stages = p.stages;
  uint4* qs = reinterpret_cast<uint4*>(smem_main);
  unsigned char* ring = smem_main + kRT * S::kQSmemBytes + warp * stages * L::kStageBytes;
  // This warp's tiles: warp + kW * q for q < n_tiles.
  const int n_tiles = warp < r.num_tiles ? (r.num_tiles - warp + kW - 1) / kW : 0;
  // Two-tile steps: an odd count is padded with one tile past the end, copied as zeros (every
  // row outside the range: nothing is read), so the step's second V stage is finite.
  const int n_issue = kPair ? (n_tiles + 1) & ~1 : n_tiles;

  // Block numbers of this warp's tiles, 32 per chunk, one per lane (the chunk of the next tile
  // to issue and the one after it).
  int blk_cache = 0;
  int blk_cache_next = 0;
  if (n_tiles > 0) {
    blk_cache = LoadTileBlocks<kW>(p, bt_row, r, warp, 0, lane);
    blk_cache_next = LoadTileBlocks<kW>(p, bt_row, r, warp, 1, lane);
  }
  // Per-lane and per-warp values of the copies, formed once (the compiler re-derived them from
  // the thread index at every tile otherwise; pinning the ring's address as well gave a longer
  // FP8 loop in static SASS, so it is not).
  constexpr bool kRowIssue = kPair && RowIssue<C, D>::value;
  RowIssueLane<C, D> row_lane;
  int warp_tok0 = 0;
  if constexpr (kRowIssue) {
    row_lane = RowIssueLane<C, D>::Of(p, lane);
    warp_tok0 = static_cast<int>(Pinned(static_cast<uint32_t>(r.tile_base + kTile * warp)));
  }
  // Issues this warp's tile q into stage `stage` and commits a group (empty past the last tile,
  // so that the group count stays uniform). q increases by one per call.
  auto issue = [&](int q, int stage) {
    if (q < n_issue) {  // warp-uniform
      if ((q & 31) == 0 && q > 0) {
        blk_cache = blk_cache_next;
        blk_cache_next = LoadTileBlocks<kW>(p, bt_row, r, warp, (q >> 5) + 1, lane);
      }
      const int blk = ShflIdx(blk_cache, q & 31);
      const int tok0 =
          kRowIssue ? warp_tok0 + kTile * kW * q : r.tile_base + kTile * (warp + kW * q);
      if constexpr (kRowIssue) {
        IssueTileRows<C, D>(kc, vc, p, r, tok0, blk, ring + stage * L::kStageBytes, row_lane);
      } else {
        IssueTile<C, D>(kc, vc, p, r, tok0, blk, ring + stage * L::kStageBytes, lane);
      }
    }
    CpAsyncCommit();
  };
  // Fill the pipeline before the Q fill, so the loads overlap it (two-tile steps: up to the two
  // stages the first step refills).
  //
  // Before the wait. Under PDL the previous kernel on the stream may still be running until
  // PdlWait() returns, and everything older has finished (pdl.cuh). Of what this prologue reads,
  // that kernel may only be writing the K/V of each sequence's last position: the decode token's
  // own, which reshape_and_cache stores just before attention. Block tables and context lengths
  // are step inputs, older positions were written by earlier steps. So this warp's first tiles
  // are issued before the wait, up to the one holding position ctx - 1; the rest of the prologue
  // and the query (written by the kernels before) follow it. This hides the CTA's chain of
  // block-table load and first K/V copies behind the previous kernel's tail.
  const int prologue_tiles = stages - (kPair ? 2 : 1);
  const int fresh = r.ctx - 1;
  int q0 = 0;
  for (; p.prefetch_before_wait && q0 < prologue_tiles; ++q0) {  // warp-uniform
    const int tok0 = r.tile_base + kTile * (warp + kW * q0);
    if (tok0 <= fresh && fresh < tok0 + kTile) break;
    issue(q0, q0);
  }
  PdlWait();
  // Small grids: an unsplit launch of at most release_max_ctas CTAs (about half the SMs: a decode
  // step at batch 1) releases its successor here. Every CTA of this grid is resident by the time
  // the release takes effect (it needs all of them to have executed it), so the successor's CTAs
  // take only SMs this grid leaves free, and there are many of those: the out projection's GEMM
  // (skinny_gemm) starts reading its weights while this kernel runs, instead of after it.
  // Larger grids keep the release at exit (pdl.cuh).
  if (p.release_at_start) PdlLaunchDependents();
  if (fused) {
    SyncThreads();  // the cos/sin row
    StoreNewToken<T, C, D, kW>(p, seq, kvh, at, cs, tid);
    RotateQueryRows<T, D, kRows, kW>(p, smem_main, seq, head0, rows_valid, at, cs, tid);
    SyncThreads();  // the new slot stored and fenced; the rotated query rows staged
  }
  for (; q0 < prologue_tiles; ++q0) issue(q0, q0);

  if constexpr (kTokensM) {
    // The query rows as they are into smem_main (RotateQueryRows' layout, where fused launches
    // have them rotated), read by QueryCols after the barrier below.
    if (!fused) {
      RotateQueryRows<T, D, kTokensMHeads, kW>(p, smem_main, seq, head0, rows_valid,
                                               NewTokenAt{-1, false}, cs, tid);
    }
  } else if (fused) {
    StageQueryFragments<T, D, kRT, true, kW, kQShift>(p, qs, seq, head0, rows_valid, tid,
                                                      smem_main);
  } else {
    StageQueryFragments<T, D, kRT, false, kW, kQShift>(p, qs, seq, head0, rows_valid, tid);
  }
  float alibi[kRT][2];
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt) {
    const int row0 = kMmaRows * rt;
    if constexpr (kTokensM) {
      AlibiColSlopes(p, tig, head0, rows_valid, alibi[rt]);
    } else {
      AlibiRowSlopes(p, gid, head0 + row0, rows_valid - row0, alibi[rt]);
    }
  }
  const float query_pos = static_cast<float>(r.ctx - 1);
  SyncThreads();
  uint4 qf[kQInRegs ? S::kQSpans : 1][2];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int j = 0; j < S::kQSpans; ++j) {
      qf[j][0] = qs[(2 * j) * 32 + lane];
      qf[j][1] = qs[(2 * j + 1) * 32 + lane];
    }
  }

  // Tokens on M: D / 16 m-tiles of O^T; m_run / l_run per head column (PipePairLoopTokensM).
  constexpr int kAccTiles = kTokensM ? S::kDTiles / 2 : S::kDTiles;
  float acc[kRT][kAccTiles][4];
  float m_run[kRT][2];
  float l_run[kRT][2];
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
    for (int i = 0; i < kAccTiles; ++i) {
      acc[rt][i][0] = acc[rt][i][1] = acc[rt][i][2] = acc[rt][i][3] = 0.f;
    }
    m_run[rt][0] = m_run[rt][1] = kNegInf;
    l_run[rt][0] = l_run[rt][1] = 0.f;
  }

  if constexpr (kTokensM) {
    uint4 qt[S::kQSpans];
    QueryCols<T, D, kQShift>(smem_main, gid, tig, rows_valid, qt);
    PipePairLoopTokensM<MT, C, D, decltype(issue), kW, kQShift>(
        p, r, qt, ring, stages, warp, lane, alibi[0], query_pos, n_tiles, issue, m_run[0],
        l_run[0], acc[0]);
  } else if constexpr (kPair) {
    PipePairLoop<MT, C, D, kRT, decltype(qf), decltype(issue), kW, kQShift>(
        p, r, qs, qf, ring, stages, warp, lane, alibi, query_pos, n_tiles, issue, m_run, l_run,
        acc);
  } else {
    int stage = 0;  // stage of tile q
    for (int q = 0; q < n_tiles; ++q) {  // warp-uniform
      CpAsyncWait(stages - 2);  // this thread's copies of tile q have landed
      SyncWarp();               // ... and every lane's; every lane is done with tile q - 1
      issue(q + stages - 1, stage == 0 ? stages - 1 : stage - 1);

      const unsigned char* ks = ring + stage * L::kStageBytes;
      const unsigned char* vs = ks + L::kKTileBytes;
      const int tok0 = r.tile_base + kTile * (warp + kW * q);

      // ---- V fragments (independent of the scores: loaded first, consumed after the softmax).
      typename Io::Span vr[2][S::kChunks];
      uint32_t vt[2][S::kTailWordsAlloc];
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int row = 2 * tig + s;
#pragma unroll
        for (int c = 0; c < S::kChunks; ++c) {
          vr[s][c] = Io::SharedSpan(
              vs + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(row, (64 * c + 8 * gid) * kE));
        }
#pragma unroll
        for (int w = 0; w < S::kTailWords; ++w) {
          vt[s][w] = Io::SharedTail(vs + SwizzledOffset<L::kVChunks, L::kVMask, L::kVShift>(
                                             row, (64 * S::kChunks + S::kTailTiles * gid + 2 * w) * kE));
        }
      }

      // ---- S = Q K^T for 16 rows x 8 tokens (two accumulators: half the dependent MMA chain).
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
      float sc2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < S::kSpans; ++j) {
        const uint4 q0 = kQInRegs ? qf[kQInRegs ? j : 0][0] : qs[(2 * j) * 32 + lane];
        const uint4 q1 = kQInRegs ? qf[kQInRegs ? j : 0][1] : qs[(2 * j + 1) * 32 + lane];
        const uint4 k = Io::Widen(Io::SharedSpan(
            ks + SwizzledOffset<L::kKChunks, L::kKMask, L::kKShift>(gid, (32 * j + 8 * tig) * kE)));
        Ops::Mma16816(sc, q0.x, q0.y, q0.z, q0.w, k.x, k.y);
        Ops::Mma16816(sc2, q1.x, q1.y, q1.z, q1.w, k.z, k.w);
      }
      if constexpr (S::kHalfSpan) {
        const uint4 q0 = kQInRegs ? qf[kQInRegs ? S::kSpans : 0][0] : qs[(2 * S::kSpans) * 32 + lane];
        const uint2 k = Io::WidenHalf(Io::SharedHalf(ks + SwizzledOffset<L::kKChunks, L::kKMask,
                                                                         L::kKShift>(
                                                              gid, (32 * S::kSpans + 4 * tig) * kE)));
        Ops::Mma16816(sc2, q0.x, q0.y, q0.z, q0.w, k.x, k.y);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[e] += sc2[e];

      SoftmaxPv<MT, C, D, kQShift>(p, r, tok0, tig, sc, alibi[0], query_pos, m_run[0], l_run[0],
                                   acc[0], vr, vt);
      stage = stage + 1 == stages ? 0 : stage + 1;
    }
  }
  // A split launch's successor is its merge kernel: releasing it here lets its CTAs be placed
  // while this grid's CTAs merge their warps and write their partials (each CTA is past its last
  // K/V copy, so the merge CTAs cannot displace any of them). An unsplit launch keeps the
  // release at exit: its successor may be another attention grid (pdl.cuh).
  if (p.main_release && p.ws_o != nullptr) PdlLaunchDependents();
  CpAsyncWait(0);  // only empty groups can be pending; the ring becomes the merge buffer
  // ---- Per-warp state to shared memory (Q and the ring are dead: reuse their space).
  SyncThreads();
  float* so = reinterpret_cast<float*>(smem_main);
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt) {
    if constexpr (kTokensM) {
      StoreWarpCols<D, PipeLdsmV<C>::value>(p, st, so, warp, gid, tig, m_run[rt], l_run[rt],
                                            acc[rt]);
    } else {
      StoreWarpRows<D, kPair && PipeLdsmV<C>::value>(p, st, so, warp, gid, tig, kMmaRows * rt,
                                                      m_run[rt], l_run[rt], acc[rt]);
    }
  }
  SyncThreads();
  FinishPartition<T, D, kW>(p, so, st, rows_valid, head0, seq, part);
}

// ------------------------------------------------------------------------------------------
// CUDA-core kernel (float32). Each warp handles its tiles 4 tokens at a time: every lane
// multiplies its float4 slices of the query rows (from shared memory) with the K rows, the
// partial dot products are butterfly-reduced over the warp, and all lanes then hold the same
// scores and softmax state; lane l owns output dims 4 * (l + 32 i) .. + 3.

template <typename C, int D, int kRows>
PA_GLOBAL void PA_LAUNCH_BOUNDS(kThreads, 1) PagedAttentionSimtKernel(const Params p) {
  PdlWait();  // before any memory access; the successor starts as this grid ends (pdl.cuh)
  constexpr int kVecs = D / 4;
  constexpr int kPerLane = (kVecs + 31) / 32;
  constexpr int kSub = 4;  // tokens per step
  unsigned char* smem = DynamicSmem();
  const Stats st = GetStats(smem);
  unsigned char* smem_main = smem + kStatsSmemBytes;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int kvh = blockIdx.x / p.head_groups;
  const int hg = blockIdx.x - kvh * p.head_groups;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int rows_valid = IMin(kRows, p.group - hg * kRows);
  const int head0 = kvh * p.group + hg * kRows;

  const PartitionRange r = GetRange(p, seq, part);
  if (r.num_tiles == 0) {
    if (p.ws_o == nullptr) WriteZeros<float, D>(p, rows_valid, head0, seq);
    return;
  }

  // Query rows, pre-multiplied by scale * log2(e): qs[row * D + d].
  float* qs = reinterpret_cast<float*>(smem_main);
  {
    const float* q_seq =
        static_cast<const float*>(p.query) + static_cast<int64_t>(seq) * p.q_stride;
    for (int i = tid; i < kRows * D; i += kThreads) {
      const int row = i / D;
      qs[i] = row < rows_valid ? q_seq[static_cast<int64_t>(head0) * D + i] * p.scale_log2 : 0.f;
    }
  }
  float alibi[kRows];
#pragma unroll
  for (int row = 0; row < kRows; ++row) {
    alibi[row] = (p.alibi_slopes != nullptr && row < rows_valid)
                     ? p.alibi_slopes[head0 + row] * kLog2e
                     : 0.f;
  }
  const float query_pos = static_cast<float>(r.ctx - 1);
  SyncThreads();

  const C* kc = static_cast<const C*>(p.key_cache) + static_cast<int64_t>(kvh) * D;
  const C* vc = static_cast<const C*>(p.value_cache) + static_cast<int64_t>(kvh) * D;
  const int32_t* bt_row = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;

  float4 acc[kRows][kPerLane];
  float m_run[kRows];
  float l_run[kRows];
#pragma unroll
  for (int row = 0; row < kRows; ++row) {
    m_run[row] = kNegInf;
    l_run[row] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[row][i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }

  int blk_cache = 0;
  for (int tile = warp, it = 0; tile < r.num_tiles; tile += kWarps, ++it) {
    if ((it & 31) == 0) blk_cache = LoadTileBlocks(p, bt_row, r, warp, it >> 5, lane);
    const int blk = ShflIdx(blk_cache, it & 31);
    const int tile_tok0 = r.tile_base + kTile * tile;
#pragma unroll 1
    for (int sub = 0; sub < kTile / kSub; ++sub) {
      const int tok0 = tile_tok0 + kSub * sub;
      float4 kv[kSub][kPerLane];
      float4 vv[kSub][kPerLane];
      bool valid[kSub];
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        const int tok = tok0 + u;
        valid[u] = tok >= r.begin && tok < r.end;
        const int64_t off = static_cast<int64_t>(blk) * p.block_stride +
                            static_cast<int64_t>(tok & (p.block_size - 1)) * p.token_stride;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int c = lane + 32 * i;
          const bool ok = valid[u] && c < kVecs;
          kv[u][i] = ok ? Load4f(kc + off + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
          vv[u][i] = ok ? Load4f(vc + off + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
      float s[kSub][kRows];
#pragma unroll
      for (int row = 0; row < kRows; ++row) {
        float4 q[kPerLane];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int c = lane + 32 * i;
          q[i] = c < kVecs ? reinterpret_cast<const float4*>(qs + row * D)[c]
                           : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            d = fmaf(q[i].x, kv[u][i].x, d);
            d = fmaf(q[i].y, kv[u][i].y, d);
            d = fmaf(q[i].z, kv[u][i].z, d);
            d = fmaf(q[i].w, kv[u][i].w, d);
          }
          s[u][row] = d;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
#pragma unroll
          for (int row = 0; row < kRows; ++row) s[u][row] += ShflXor(s[u][row], off);
        }
      }
#pragma unroll
      for (int row = 0; row < kRows; ++row) {
        float mx = kNegInf;
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          const float dist = static_cast<float>(tok0 + u) - query_pos;
          s[u][row] = valid[u] ? Logit(p, s[u][row], alibi[row] * dist) : kNegInf;
          mx = fmaxf(mx, s[u][row]);
        }
        const float m_new = fmaxf(m_run[row], mx);
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float corr = FastExp2(m_run[row] - m_use);
        m_run[row] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          acc[row][i].x *= corr;
          acc[row][i].y *= corr;
          acc[row][i].z *= corr;
          acc[row][i].w *= corr;
        }
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          const float pu = FastExp2(s[u][row] - m_use);
          sum += pu;
#pragma unroll
          for (int i = 0; i < kPerLane; ++i) {
            acc[row][i].x = fmaf(pu, vv[u][i].x, acc[row][i].x);
            acc[row][i].y = fmaf(pu, vv[u][i].y, acc[row][i].y);
            acc[row][i].z = fmaf(pu, vv[u][i].z, acc[row][i].z);
            acc[row][i].w = fmaf(pu, vv[u][i].w, acc[row][i].w);
          }
        }
        l_run[row] = fmaf(l_run[row], corr, sum);
      }
    }
  }

  SyncThreads();  // the query rows are dead: reuse their space
  float* so = reinterpret_cast<float*>(smem_main);
  const int rows = p.rows;
#pragma unroll
  for (int row = 0; row < kRows; ++row) {
    if (lane == 0) {
      st.m[warp * st.stride + row] = m_run[row];
      st.l[warp * st.stride + row] = l_run[row];
    }
    if (row < rows) {
      float* o_row = so + (warp * rows + row) * (D + kOutPad);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < kVecs) reinterpret_cast<float4*>(o_row)[c] = acc[row][i];
      }
    }
  }
  SyncThreads();
  FinishPartition<float, D>(p, so, st, rows_valid, head0, seq, part);
}

// ------------------------------------------------------------------------------------------
// Split-K merge: one CTA per (head, sequence) combines the partitions that saw tokens.

/*! \brief Reduces `v` (max or sum) over the kThreadsC threads of a combine CTA; `red` holds a
 * float per warp. */
template <int kThreadsC>
PA_DEVICE float BlockReduce(float v, float* red, bool is_max) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = ShflXor(v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  if (lane == 0) red[warp] = v;
  SyncThreads();
  v = red[0];
#pragma unroll
  for (int w = 1; w < kThreadsC / 32; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
  SyncThreads();  // red may be reused
  return v;
}

/*! \brief Partitions whose loads a combine thread keeps in flight at once (both paths). */
constexpr int kCombineUnroll = 8;
/*! \brief Threads of a combine CTA that reads rows in slots (CombineSlots) where kCombineThreads
 * would take more than one round of rows: with kCombineUnroll rows in flight per thread,
 * 512 / (head_size / 4) x 8 rows per CTA (128 at d128), so the 64-128 partitions of a long
 * context at batch 1 come in one round trip instead of 2-4. Fewer partitions keep
 * kCombineThreads (shorter reductions: on an H100, 2026-12-05, 512 threads made the merge of 8
 * partitions 0.3-0.7% slower end to end, and that of 64 0.6-2.9% faster). */
constexpr int kCombineSlotThreads = 512;

/*!
 * \brief Dynamic shared memory of the combine kernel: reduction scratch (a float per warp) + one
 * weight per part, rounded up to whole 16-byte chunks, then (`slots`) the per-slot sums of
 * CombineSlots (slots x head_size <= 4 x threads floats). The rounding: ptxas
 * merges CombineColumns' tail loads of weights[i], weights[i + 1], weights[i + 2] (i a multiple
 * of 8: a 16-byte-aligned address) into one LDS.128, issued even when only weights[i] is left; a
 * request ending inside that chunk (e.g. 24 bytes for 2 partitions) made it an out-of-bounds
 * shared read under compute-sanitizer.
 */
inline size_t CombineSmemBytes(int num_partitions, bool slots, int threads) {
  const size_t floats = threads / 32 + static_cast<size_t>(num_partitions);
  return ((floats + 3) / 4 * 4 + (slots ? 4 * threads : 0)) * sizeof(float);
}

/*! \brief Threads of a combine CTA reading `num_partitions` rows of `head_size` in slots:
 * kCombineSlotThreads where kCombineThreads would take more than one round, else
 * kCombineThreads. */
inline int CombineSlotThreads(int num_partitions, int head_size) {
  const int rows_per_round = kCombineThreads / (head_size / 4) * kCombineUnroll;
  return num_partitions > rows_per_round ? kCombineSlotThreads : kCombineThreads;
}

/*! \brief A combine CTA's place in the rows of CombineSlots: head_size / 4 threads ("cols") read
 * one partition's row with a 16-byte load each, so kThreadsC / cols rows ("slots") are read side
 * by side; threads past the last whole slot idle. */
struct SlotLane {
  int slots;
  int slot;
  int col;
};

template <int kThreadsC>
PA_DEVICE SlotLane GetSlotLane(int head_size) {
  const int cols = head_size / 4;
  const int tid = static_cast<int>(threadIdx.x);
  const int slot = tid / cols;
  return SlotLane{kThreadsC / cols, slot, tid - slot * cols};
}

/*! \brief Issues this thread's loads of the kCombineUnroll rows i0, i0 + slots, ... (< n) of the
 * partials `o`; zeros past n. */
PA_DEVICE void LoadSlotRows(const float* o, int n, int head_size, int i0, const SlotLane& sl,
                            uint4 (&v)[kCombineUnroll]) {
#pragma unroll
  for (int u = 0; u < kCombineUnroll; ++u) {
    const int i = i0 + u * sl.slots;
    v[u] = i < n ? LoadGlobal16(o + static_cast<int64_t>(i) * head_size + 4 * sl.col)
                 : make_uint4(0, 0, 0, 0);
  }
}

/*!
 * \brief The combine's weighted sum, vector path (partials 16-byte aligned; CTAs of kThreadsC,
 * see CombineSlotThreads): each slot (see SlotLane) sums every slots-th row, kCombineUnroll rows
 * in flight per thread; `first` holds the thread's first kCombineUnroll rows, loaded by the
 * kernel before the weights (the rows do not depend on them, so their round trip overlaps the
 * weights' loads and reductions). The slots' sums meet in `slot_sums` (shared, 4 x kThreadsC
 * floats). A column per thread with scalar loads (CombineColumns) waited one L2 round trip per 8
 * partitions: 16 for 128 partitions, about 12 us on an H100 for a b1 MQA call whose main kernel
 * takes 18 us; 128-thread slots 4 (8.0 us); here that is 1 (6.8 us).
 */
template <typename T, int kThreadsC>
PA_DEVICE void CombineSlots(const float* o, const float* weights, int n, int head_size, float inv,
                            const SlotLane& sl, const uint4 (&first)[kCombineUnroll],
                            float* slot_sums, T* out) {
  if (sl.slot < sl.slots) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    uint4 v[kCombineUnroll];
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) v[u] = first[u];
    for (int i0 = sl.slot; i0 < n; i0 += sl.slots * kCombineUnroll) {
      if (i0 != sl.slot) LoadSlotRows(o, n, head_size, i0, sl, v);
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) {
        const int i = i0 + u * sl.slots;
        const float w = i < n ? weights[i] : 0.f;
        acc.x = fmaf(w, AsFloat(v[u].x), acc.x);
        acc.y = fmaf(w, AsFloat(v[u].y), acc.y);
        acc.z = fmaf(w, AsFloat(v[u].z), acc.z);
        acc.w = fmaf(w, AsFloat(v[u].w), acc.w);
      }
    }
    float* dst = slot_sums + sl.slot * head_size + 4 * sl.col;
    dst[0] = acc.x;
    dst[1] = acc.y;
    dst[2] = acc.z;
    dst[3] = acc.w;
  }
  SyncThreads();
  for (int d = threadIdx.x; d < head_size; d += kThreadsC) {
    float sum = 0.f;
    for (int r = 0; r < sl.slots; ++r) sum += slot_sums[r * head_size + d];
    StoreGlobal(out + d, Dtype<T>::FromFloat(sum * inv));
  }
}

/*! \brief The combine's weighted sum, a column per thread with kCombineUnroll partitions in
 * flight: grids of many CTAs (fewer instructions than CombineSlots) and partials that are not
 * 16-byte aligned (a workspace view at an odd offset). */
template <typename T>
PA_DEVICE void CombineColumns(const float* o, const float* weights, int n, int head_size,
                              float inv, T* out) {
  for (int d = threadIdx.x; d < head_size; d += kCombineThreads) {
    float a[kCombineUnroll];
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) a[u] = 0.f;
    int i = 0;
    for (; i + kCombineUnroll <= n; i += kCombineUnroll) {
      float v[kCombineUnroll];
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) {
        v[u] = o[static_cast<int64_t>(i + u) * head_size + d];
      }
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) a[u] = fmaf(weights[i + u], v[u], a[u]);
    }
    for (; i < n; ++i) a[0] = fmaf(weights[i], o[static_cast<int64_t>(i) * head_size + d], a[0]);
#pragma unroll
    for (int w = kCombineUnroll / 2; w > 0; w /= 2) {
#pragma unroll
      for (int u = 0; u < w; ++u) a[u] += a[u + w];
    }
    StoreGlobal(out + d, Dtype<T>::FromFloat(a[0] * inv));
  }
}

/*!
 * \brief Split-K merge of one (head, sequence) per CTA. kSlots: the weighted sum by CombineSlots
 * in CTAs of kThreadsC (CombineSlotThreads; the dispatch asks for slots only with 16-byte
 * aligned partials), else by CombineColumns in CTAs of kCombineThreads. Measured on an H100
 * (2026-12-05): slots (then 128 threads) took the combine of 128 partitions x 32 CTAs from 12.3
 * to 8.0 us and of 64 x 32 from 8.5 to 6.5 us, but made grids of 2-8 CTAs per SM with 4-8
 * partitions 2-4% slower end to end (there the columns' fewer instructions win), hence
 * combine_slots_max_ctas; 512-thread slots with the first rows loaded before the weights took
 * the 128-partition merge to 6.8 us.
 */
template <typename T, bool kSlots, int kThreadsC>
PA_GLOBAL void PA_LAUNCH_BOUNDS(kThreadsC, 1)
    PagedAttentionCombineKernel(const Params p) {
  // Before any memory access; the successor starts as this grid ends (pdl.cuh). Releasing it
  // right after the wait (2026-12-06, H100) made back-to-back batch-1 GQA / MQA calls 3-12%
  // faster and MHA ones 2% slower, and the 7B decode step at batch 1 and 4k context (whose
  // successor is the out projection) did not move.
  PdlWait();
  float* red = reinterpret_cast<float*>(DynamicSmem());
  float* weights = red + kThreadsC / 32;  // [num_partitions]
  const int head_size = p.head_size;
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int64_t head_row = static_cast<int64_t>(seq) * p.num_heads + head;
  T* out = static_cast<T*>(p.out) + head_row * head_size;

  const int ctx = ClampedContext(p, seq);
  const int first = WindowStart(p, ctx) / p.partition_size;
  const int last = ctx > 0 ? IMin((ctx - 1) / p.partition_size, p.num_partitions - 1) : -1;
  if (last < first) {
    for (int d = threadIdx.x; d < head_size; d += kThreadsC) {
      StoreGlobal(out + d, Dtype<T>::FromFloat(0.f));
    }
    if (p.lse != nullptr && threadIdx.x == 0) StoreGlobal(p.lse + head_row, kNegInf);
    return;
  }
  const int n = last - first + 1;
  const int64_t base = head_row * p.num_partitions + first;
  const float* o = p.ws_o + base * head_size;
  // Slots: the first rows are in flight while the weights are formed.
  SlotLane sl{};
  uint4 rows[kCombineUnroll];
  if constexpr (kSlots) {
    sl = GetSlotLane<kThreadsC>(head_size);
    if (sl.slot < sl.slots) LoadSlotRows(o, n, head_size, sl.slot, sl, rows);
  }

  // The statistics of the thread's first partition are loaded together, with the first rows in
  // flight: the sum no longer waits for a second round trip after the max (the same values in
  // the same order as loading each where it is used, so the same bits).
  const bool owns_first = static_cast<int>(threadIdx.x) < n;
  const float m_first = owns_first ? p.ws_m[base + threadIdx.x] : kNegInf;
  const float l_first = owns_first ? p.ws_l[base + threadIdx.x] : 0.f;
  float m = m_first;
  for (int i = threadIdx.x + kThreadsC; i < n; i += kThreadsC) m = fmaxf(m, p.ws_m[base + i]);
  m = BlockReduce<kThreadsC>(m, red, true);
  float total = 0.f;
  if (owns_first) {
    const float w = l_first * FastExp2(m_first - m);
    weights[threadIdx.x] = w;
    total += w;
  }
  for (int i = threadIdx.x + kThreadsC; i < n; i += kThreadsC) {
    const float w = p.ws_l[base + i] * FastExp2(p.ws_m[base + i] - m);
    weights[i] = w;
    total += w;
  }
  total = BlockReduce<kThreadsC>(total, red, false);  // its barriers also publish `weights`
  if (p.lse != nullptr && threadIdx.x == 0) StoreGlobal(p.lse + head_row, LogSumExp(m, total));
  const float inv = total > 0.f ? 1.f / total : 0.f;
  if constexpr (kSlots) {
    CombineSlots<T, kThreadsC>(o, weights, n, head_size, inv, sl, rows,
                               weights + (n + 3) / 4 * 4, out);
  } else {
    CombineColumns(o, weights, n, head_size, inv, out);
  }
}

// ------------------------------------------------------------------------------------------
// Dispatch: kernel choice, grid and shared memory for a dtype and head size, handed to a
// launcher (`launch(kernel, grid, threads, smem_bytes, params)`): the CUDA one in
// paged_attention_launch.cuh, or the emulator's.

/*! \brief Sets p.release_at_start for a pipelined launch of `grid`: unsplit and at most
 * p.release_max_ctas CTAs (see "Small grids" in PagedAttentionPipeKernel). */
inline void SetReleaseAtStart(Params& p, const GridDims& grid) {
  const int64_t ctas = int64_t{grid.x} * grid.y * grid.z;
  p.release_at_start = p.num_partitions == 1 && ctas <= p.release_max_ctas ? 1 : 0;
}

/*! \brief Whether p.cta_rows asks for CTAs of 32 query heads: 32, or kCtaRowsAuto with an
 * unsplit grid of at least p.wide_rows_min_ctas such CTAs (see kCtaRowsAuto), or a fused launch
 * (whose CTAs store the new token: one CTA per KV head, see "New token"). */
inline bool WantsWideRows(const Params& p) {
  if (p.cta_rows == kMaxCtaRows) return true;
  if (p.cta_rows != kCtaRowsAuto) return false;
  if (p.new_key != nullptr) return true;
  const int64_t wide_ctas = int64_t{p.num_seqs} * p.num_kv_heads *
                            ((p.group + kMaxCtaRows - 1) / kMaxCtaRows);
  return wide_ctas >= p.wide_rows_min_ctas;
}

/*! \brief Whether a launch with `p` takes the pipelined kernel with two m16 row tiles (CTAs of
 * 32 query heads): asked for (WantsWideRows), a group of more than 16 query heads, head size
 * <= 128, and a ring of at least kMinPairStages stages for its two-tile steps at its own
 * occupancy. */
template <typename C, int D>
inline int TwoRowTileStages(const Params& p) {
  if (!WantsWideRows(p) || p.group <= kMmaRows || D > 128 || p.step_tiles != 2 ||
      p.block_stride > int64_t{0x7fffffff}) {
    return 0;
  }
  const int rows = std::min(p.group, kMaxCtaRows);
  const int stages =
      ChooseStages<C, D, 2>(p, rows, MmaMinBlocks<D, 2>());
  return stages >= kMinPairStages ? stages : 0;
}

/*! \brief Whether a two-tile-step launch with one row tile takes tokens on the MMA's M dimension
 * (PipePairLoopTokensM): built with kPipeTokensM, and KV heads of at most kTokensMHeads query
 * heads (so a single head group: fused launches take it too). */
inline bool UsesTokensM(const Params& p) { return kPipeTokensM && p.group <= kTokensMHeads; }

/*! \brief Launches the pipelined kernel with two-tile steps and one row tile in CTAs of kW warps
 * (p.stages and p.rows set): tokens on the MMA's M dimension where UsesTokensM (those instances
 * exist only in builds with kPipeTokensM), else the default layout. */
template <typename T, typename C, int D, int kW, typename Launcher>
void LaunchPairSteps(Params& p, const GridDims& grid, Launcher& launch) {
  const size_t smem = PipeSmemBytes<C, D, 1, kW>(p.stages, p.rows);
  if constexpr (kPipeTokensM) {
    if (UsesTokensM(p)) {
      p.tokens_m = 1;
      launch(PagedAttentionPipeKernel<T, C, D, true, 1, kW, true>, grid, 32 * kW, smem, p);
      return;
    }
  }
  launch(PagedAttentionPipeKernel<T, C, D, true, 1, kW>, grid, 32 * kW, smem, p);
}

/*!
 * \brief Launches CTAs of kWideWarps<D> warps (16 query heads, two-tile steps; `asked_stages`:
 * Params::stages as the caller set it) for an unsplit launch of KV heads with at most 32 query
 * heads (CTAs of 16: groups above 16 take two) whose grid has at most p.wide_warps_max_ctas CTAs
 * (the device's SM count), where their ring has at least
 * kMinPairStages stages at one CTA per SM; false otherwise (nothing launched). Such a grid leaves
 * each SM at most one CTA: CTAs of 4 warps would leave most of its warp slots empty, and a split
 * into more CTAs pays the merge kernel. A wide CTA's warps take the CTA's tiles in turn (warp w:
 * tiles w, w + kW, ...) and merge their softmax states in shared memory, as 4 warps do. Split
 * launches keep 4 warps: on an H100 (2026-12-05) wide CTAs with half the partitions were 1-7%
 * slower than 4-warp CTAs with the wave plan's on every split decode case but one, while the
 * unsplit GQA-4 d64 case (128 CTAs, against 3 partitions of 4-warp CTAs) was 5% faster.
 * Fused launches take them too, so that they stay bit for bit the two kernels they replace.
 * Groups of 17 to 32 heads take them since 2026-12-07 (MQA of 32 heads at batches 12-48 and
 * contexts of 512-4k, grids of 24-96 CTAs of 16 heads, had run split at 0.72-1.03x SDPA; wide
 * and unsplit they take 0.81-0.99x that time, H100). A fused launch runs such a group in one 4-warp CTA of 32
 * (CTAs of 16 would be two head groups, which it declines): bit for bit the two kernels with
 * CTAs of 4 warps (CACHEFLOW_PA_WARPS=4), rounding apart from their wide CTAs; the runtime does
 * not fuse these groups (attention_rotary_fusion_wanted). Groups of 33 to p.wide_max_group
 * (48 by default; CACHEFLOW_PA_WIDE_GROUP) take three CTAs of 16 (H100, 2026-12-07: MQA of 40-48
 * heads at batches 16-44, 0.76-0.97x the time of the 4-warp plans); larger groups keep 4 warps.
 *
 * Half-wide CTAs (kHalfWideWarps<D>, two per SM) take a larger unsplit grid, of more than
 * p.wide_warps_max_ctas and at most p.half_wide_max_ctas CTAs (one to two per SM), whose KV heads
 * have 9 to 32 query heads (heads on the MMA's M dimension; CTAs of 16): four warps leave such an
 * SM with 8 warps where its registers hold 12 (MQA at batch 128 / 1k on an H100, 2026-12-06: 2-5%
 * faster at contexts of 1k-2k, 1.8% slower at 512). Groups of at most 8 (tokens on M) gained
 * nothing and keep 4 warps. A fused launch never takes them for groups above 16 (see above).
 */
template <typename T, typename C, int D, typename Launcher>
bool RunWideCtas(Params& p, int asked_stages, const GridDims& grid, Launcher& launch) {
  constexpr int kW = kWideWarps<D>;
  const int64_t ctas = int64_t{grid.x} * grid.y * grid.z;
  if (p.num_partitions > 1) return false;
  if constexpr (kHalfWideWarps<D> > kWarps) {
    if (ctas > p.wide_warps_max_ctas && ctas <= p.half_wide_max_ctas &&
        p.group <= 2 * kMmaRows && !UsesTokensM(p)) {
      constexpr int kHalfW = kHalfWideWarps<D>;
      Params asked = p;
      asked.stages = asked_stages;
      const int stages = ChooseStages<C, D, 1, kHalfW>(asked, p.rows, 2);
      if (stages < kMinPairStages) return false;
      p.stages = stages;
      launch(PagedAttentionPipeKernel<T, C, D, true, 1, kHalfW>, grid, 32 * kHalfW,
             PipeSmemBytes<C, D, 1, kHalfW>(p.stages, p.rows), p);
      return true;
    }
  }
  if (p.group > p.wide_max_group || ctas > p.wide_warps_max_ctas) return false;
  Params asked = p;
  asked.stages = asked_stages;  // automatic (or forced) depth, for the wide CTA's own budget
  const int stages = ChooseStages<C, D, 1, kW>(asked, p.rows, 1);
  if (stages < kMinPairStages) return false;
  p.stages = stages;
  LaunchPairSteps<T, C, D, kW>(p, grid, launch);
  return true;
}

/*! \brief What a dispatch did: launched, or declined a fused launch (nothing launched). */
enum class Dispatched { kLaunched, kDeclined, kNotTaken };

/*! \brief Launches the two-row-tile kernel when TwoRowTileStages allows it (kNotTaken
 * otherwise); a fused launch (see "New token") with more than one head group is declined. */
template <typename T, typename C, int D, typename Launcher>
Dispatched RunTwoRowTiles(Params& p, Launcher& launch) {
  if constexpr (D > 128) {
    return Dispatched::kNotTaken;
  } else {
    const int stages = TwoRowTileStages<C, D>(p);
    if (stages == 0) return Dispatched::kNotTaken;
    const int head_groups = (p.group + kMaxCtaRows - 1) / kMaxCtaRows;
    if (p.new_key != nullptr && head_groups > 1) return Dispatched::kDeclined;
    p.stages = stages;
    p.step_tiles = 2;
    p.rows = std::min(p.group, kMaxCtaRows);
    p.head_groups = head_groups;
    const GridDims grid{static_cast<unsigned>(p.num_kv_heads * p.head_groups),
                        static_cast<unsigned>(p.num_seqs),
                        static_cast<unsigned>(p.num_partitions)};
    SetReleaseAtStart(p, grid);
    launch(PagedAttentionPipeKernel<T, C, D, true, 2>, grid, kThreads,
           PipeSmemBytes<C, D, 2>(stages, p.rows), p);
    return Dispatched::kLaunched;
  }
}

/*!
 * \brief Launches the kernels for `p`; false when a fused launch (p.new_key set) is declined
 * because one CTA per (sequence, KV head, partition) would not read each K/V row (several head
 * groups), or the kernel is not the pipelined one (register or float32 kernel): nothing is
 * launched then.
 */
template <typename T, typename C, int D, typename Launcher>
bool RunHeadSize(Params p, Launcher& launch) {
  const bool fused = p.new_key != nullptr;
  if (fused && std::is_same<T, float>::value) return false;
  if constexpr (std::is_same<T, float>::value) {
    const int rows = p.group == 1 ? 1 : kSimtRows;
    p.rows = std::min(p.group, rows);
    p.head_groups = (p.group + rows - 1) / rows;
    const size_t smem = kStatsSmemBytes + std::max<size_t>(static_cast<size_t>(rows) * D * 4,
                                                           MergeSmemBytes(D, p.rows));
    const GridDims grid{static_cast<unsigned>(p.num_kv_heads * p.head_groups),
                        static_cast<unsigned>(p.num_seqs),
                        static_cast<unsigned>(p.num_partitions)};
    if (rows == 1) {
      launch(PagedAttentionSimtKernel<C, D, 1>, grid, kThreads, smem, p);
    } else {
      launch(PagedAttentionSimtKernel<C, D, kSimtRows>, grid, kThreads, smem, p);
    }
  } else if (const Dispatched two_rows = RunTwoRowTiles<T, C, D>(p, launch);
             two_rows != Dispatched::kNotTaken) {
    // CTAs of 32 query heads (the combine, if split, follows below).
    if (two_rows == Dispatched::kDeclined) return false;
  } else {
    p.rows = std::min(p.group, kMmaRows);
    p.head_groups = (p.group + kMmaRows - 1) / kMmaRows;
    if (fused && p.head_groups > 1) return false;
    const GridDims grid{static_cast<unsigned>(p.num_kv_heads * p.head_groups),
                        static_cast<unsigned>(p.num_seqs),
                        static_cast<unsigned>(p.num_partitions)};
    // The pipelined kernel unless the launch forces the register kernel or the device's shared
    // memory is unknown or too small for two stages (ChooseStages).
    const int asked_stages = p.stages;
    p.stages = ChooseStages<C, D>(p, p.rows, MmaMinBlocks<D>());
    if (p.stages >= kMinStages) {
      SetReleaseAtStart(p, grid);
      // Two-tile steps where the ring has room for them (>= kMinPairStages stages).
      // (and 32-bit cache-block strides: IssueTileRows).
      p.step_tiles = p.step_tiles == 2 && p.stages >= kMinPairStages &&
                             p.block_stride <= int64_t{0x7fffffff}
                         ? 2
                         : 1;
      if (p.step_tiles == 2) {
        if (!RunWideCtas<T, C, D>(p, asked_stages, grid, launch)) {
          LaunchPairSteps<T, C, D, kWarps>(p, grid, launch);
        }
      } else {
        launch(PagedAttentionPipeKernel<T, C, D, false>, grid, kThreads,
               PipeSmemBytes<C, D>(p.stages, p.rows), p);
      }
    } else {
      if (fused) return false;
      p.stages = kStagesRegister;
      const size_t smem = kStatsSmemBytes + std::max<size_t>(MmaShape<D>::kQSmemBytes,
                                                             MergeSmemBytes(D, p.rows));
      launch(PagedAttentionMmaKernel<T, C, D>, grid, kThreads, smem, p);
    }
  }
  if (p.num_partitions > 1) {
    const GridDims grid{static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs), 1};
    // Rows in slots need 16-byte aligned partials: a workspace view at an odd offset reads
    // columns (each partition's row starts a multiple of 64 bytes after p.ws_o).
    if (int64_t{p.num_heads} * p.num_seqs <= p.combine_slots_max_ctas &&
        (reinterpret_cast<uintptr_t>(p.ws_o) & 15u) == 0) {
      if (CombineSlotThreads(p.num_partitions, p.head_size) == kCombineSlotThreads) {
        launch(PagedAttentionCombineKernel<T, true, kCombineSlotThreads>, grid,
               kCombineSlotThreads, CombineSmemBytes(p.num_partitions, true, kCombineSlotThreads),
               p);
      } else {
        launch(PagedAttentionCombineKernel<T, true, kCombineThreads>, grid, kCombineThreads,
               CombineSmemBytes(p.num_partitions, true, kCombineThreads), p);
      }
    } else {
      launch(PagedAttentionCombineKernel<T, false, kCombineThreads>, grid, kCombineThreads,
             CombineSmemBytes(p.num_partitions, false, kCombineThreads), p);
    }
  }
  return true;
}

/*!
 * \brief Runs paged attention for `p` (head_size 64, 80, 96, 112, 128 or 256): query/out of
 * type T, caches of type C (T, or Fp8E4m3). False: a fused launch declined (RunHeadSize),
 * nothing launched.
 */
template <typename T, typename C = T, typename Launcher>
bool Run(const Params& p, Launcher& launch) {
  switch (p.head_size) {
    case 64: return RunHeadSize<T, C, 64>(p, launch);
    case 80: return RunHeadSize<T, C, 80>(p, launch);
    case 96: return RunHeadSize<T, C, 96>(p, launch);
    case 112: return RunHeadSize<T, C, 112>(p, launch);
    case 128: return RunHeadSize<T, C, 128>(p, launch);
    case 256: return RunHeadSize<T, C, 256>(p, launch);
    default: return false;  // rejected by the argument checks
  }
}

}  // namespace paged_attention
}  // namespace cacheflow
