// skinny_gemm: out = x W^T (+ bias) for one or two rows of x (a decode step at batch 1 or 2),
// device code and the launch plan (no TVM-FFI here).
//
// At batch 1 a decode step's GEMMs are weight reads: 13.5 GB per step of a 7B model. The kernel
// reads W the way the card reads fastest (TMA bulk copies into a shared-memory ring, completed
// through mbarriers; benchmarks/read_bw_probe.cu) and, launched with programmatic dependent
// launch, issues its first copies before it waits for the kernel that writes x: W does not
// depend on it, so the read of W overlaps the tail of that kernel. (So W must not be written by
// the kernel just before on the stream: weights are written once, at load time.)
//   * CTA = 8 warps over a contiguous range of W's rows, which is a contiguous byte range; it
//     streams in stages of whole rows (about 16 KB), up to 4 stages in flight (as many as the
//     SM's shared memory holds for its CTAs; PlanSkinny).
//   * the 8 warps split K: warp w owns columns [w K / 8, (w + 1) K / 8), lane l the 16-byte pieces
//     l, l + 32, ... of that slice; its pieces of x live in registers (loaded once, after the
//     wait). Per row: float32 multiply-adds, a warp reduction, one partial per warp in shared
//     memory; the CTA sums the 8 partials of each row (+ bias) at the end.
//   * kSiluGated: x is [gate | up] (2 K columns) and the kernel multiplies by silu(gate) * up,
//     rounded like silu_and_mul (the activation to T, then the product to T): the MLP's down
//     projection without the activation kernel before it.
//   * kRmsNorm: the kernel multiplies by rms_norm(x, norm_weight, eps), rounded like rms_norm
//     (x * rsqrt(mean(x^2) + eps) to T, then the product with the weight to T): a layer's qkv
//     or gate_up projection without the norm kernel before it. Every CTA reduces the whole row
//     (K elements, an L2 read) itself; the weight's pieces are loaded before the PDL wait. The
//     sum of squares is added in another order than rms_norm's, so a normalized element can
//     differ from rms_norm's by one rounding step (rarely).
//   * residual (any mode): out = residual + (x W^T + bias), x W^T + bias rounded to T first, like
//     fused_add_rms_norm's add: a layer's o or down projection with the residual add. out may be
//     residual itself (each element is read and written by one thread).
//   * the kernel releases its successor (griddepcontrol.launch_dependents) right after its own
//     wait when asked (SkinnyParams::release_early): the successor's CTAs are then placed as this
//     grid's CTAs exit, so a next skinny_gemm starts reading its W in this one's tail, and a small
//     successor is already resident when this grid ends, instead of being launched then.
// Requirements (the host checks them): K a multiple of 64 and at most kMaxK, W and x rows
// 16-byte aligned, rows of x <= kMaxRows.
#pragma once

#include <cstdint>

#include "pdl.cuh"
#include "skinny_gemm_ptx.cuh"

#ifndef CF_LAUNCH_BOUNDS_MIN
#define CF_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads, blocks)
#endif

namespace cacheflow {
namespace skinny {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 2;                   // rows of x (the batch)
constexpr int kMaxPieces = 8;                 // 16-byte pieces of x per lane
constexpr int kMaxK = kWarps * 32 * kMaxPieces * 8;  // 16384
constexpr int kStageTarget = 16384;           // bytes of W per stage (whole rows, at least one)
constexpr int kMaxStageBytes = 2 * kMaxK;     // one row at K = kMaxK
constexpr int kMaxRowsPerCta = kThreads;      // the epilogue gives each row a thread
constexpr int kCtasPerSm = 2;                 // registers are capped for two CTAs per SM
constexpr int kMinStages = 2;                 // stages of W in flight per CTA, at least
constexpr int kMaxStages = 8;                 // ... and at most
constexpr int kDefaultMaxStages = 4;          // ... and at most by default (see PlanSkinny)

/*! \brief Everything the kernel reads; element strides are in elements. */
struct SkinnyParams {
  const unsigned char* x;            // [m, k]
  const unsigned char* w;            // [n, k], contiguous
  const unsigned char* bias;         // [n] or null
  const unsigned char* norm_weight;  // [k] (XMode::kRmsNorm) or null
  const unsigned char* residual;     // [m, n] or null; may be out
  unsigned char* out;                // [m, n]
  int64_t x_stride;                  // between rows of x
  int64_t out_stride;                // between rows of out
  int64_t residual_stride;           // between rows of residual
  float eps;                         // XMode::kRmsNorm
  int32_t m, n, k;
  int32_t rows_per_cta;       // rows of W per CTA (<= kMaxRowsPerCta)
  int32_t rows_per_stage;     // rows of W per bulk copy
  int32_t stages;             // stages in the ring (kMinStages .. kMaxStages)
  int32_t release_early;      // 1: release the successor right after the wait (see above)
};

/*! \brief Which x the kernel multiplies by: x itself, silu(gate) * up of x = [gate | up], or
 * rms_norm(x, norm_weight, eps). */
enum class XMode { kPlain, kSiluGated, kRmsNorm };

/*! \brief The kernel's launch plan for a call (host side). */
struct SkinnyPlan {
  int grid = 0;
  int rows_per_cta = 0;
  int rows_per_stage = 0;
  int stages = 0;
  int smem_bytes = 0;
};

/*! \brief Shared memory of a CTA: the ring, its mbarriers, the per-warp row partials, the
 * per-warp sums of squares of x (XMode::kRmsNorm). */
constexpr int SmemBytes(int stages, int stage_bytes, int rows_per_cta) {
  return stages * stage_bytes + stages * 8 + (rows_per_cta + 1) * kWarps * kMaxRows * 4;
}

/*! \brief `f(a_e, b_e)` for the 8 element pairs of two 16-byte vectors of T, each result
 * rounded to T. */
template <class T, class F>
CF_DEVICE uint4 Map8(uint4 a, uint4 b, F f) {
  const uint32_t as[4] = {a.x, a.y, a.z, a.w};
  const uint32_t bs[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 af = Unpack2<T>(as[i]);
    const float2 bf = Unpack2<T>(bs[i]);
    o[i] = uint32_t{FromFloat<T>(f(af.x, bf.x))} | (uint32_t{FromFloat<T>(f(af.y, bf.y))} << 16);
  }
  return uint4{o[0], o[1], o[2], o[3]};
}

/*! \brief silu(g) * u of 8 elements, rounded like silu_and_mul: the activation (float32,
 * accurate expf) to T, then the float32 product to T. */
template <class T>
CF_DEVICE uint4 SiluMul8(uint4 g, uint4 u) {
  return Map8<T>(g, u, [](float gv, float uv) {
    return __fmul_rn(ToFloat16Bits<T>(FromFloat<T>(gv / (1.0f + expf(-gv)))), uv);
  });
}

/*! \brief 8 elements of x normalized like rms_norm: x * inv_rms rounded to T, times the
 * weight's 8 elements, rounded to T. */
template <class T>
CF_DEVICE uint4 RmsNorm8(uint4 x, uint4 w, float inv_rms) {
  return Map8<T>(x, w, [inv_rms](float xv, float wv) {
    return ToFloat16Bits<T>(FromFloat<T>(xv * inv_rms)) * wv;
  });
}

/*!
 * \brief Host side: the launch plan for W of shape [n, k] on a device with `sms` multiprocessors
 * of `smem_per_sm` bytes of shared memory (`smem_per_cta` at most per CTA): one wave of CTAs,
 * kCtasPerSm per SM if two stages fit that way (else one), each with an even share of W's rows,
 * and the deepest ring (at most `max_stages`) that the SM's shared memory holds for them.
 * The ring's depth is also what the kernel reads of W before its wait. Deeper than 4 (6 stages at
 * k = 4096) read no more of W behind the kernels before it in a 7B decode step at batch 1 and made
 * the 4096 x 4096 GEMM alone 11% slower (H200, 2026-12-05), so 4 is the default cap.
 */
inline SkinnyPlan PlanSkinny(int n, int k, int sms, int smem_per_sm, int smem_per_cta,
                             int max_stages = kDefaultMaxStages) {
  SkinnyPlan plan;
  const int row_bytes = 2 * k;
  const int rows_per_stage = row_bytes >= kStageTarget ? 1 : kStageTarget / row_bytes;
  const int stage_bytes = rows_per_stage * row_bytes;
  if (max_stages > kMaxStages) max_stages = kMaxStages;
  for (int per_sm = kCtasPerSm; per_sm >= 1; --per_sm) {
    int grid = sms * per_sm;
    int rows = (n + grid - 1) / grid;
    if (rows > kMaxRowsPerCta) rows = kMaxRowsPerCta;
    grid = (n + rows - 1) / rows;
    // 1 KB per CTA is reserved by the driver.
    int budget = smem_per_sm / per_sm - 1024;
    if (budget > smem_per_cta) budget = smem_per_cta;
    const int fixed = SmemBytes(0, stage_bytes, rows);
    int stages = (budget - fixed) / (stage_bytes + 8);
    if (stages > max_stages) stages = max_stages;
    if (stages < kMinStages) continue;
    plan.grid = grid;
    plan.rows_per_cta = rows;
    plan.rows_per_stage = rows_per_stage;
    plan.stages = stages;
    plan.smem_bytes = SmemBytes(stages, stage_bytes, rows);
    return plan;
  }
  return plan;  // grid 0: does not fit
}

template <class T, int kRows, XMode kX>
CF_GLOBAL void CF_LAUNCH_BOUNDS_MIN(kThreads, kCtasPerSm) SkinnyGemmKernel(const SkinnyParams p) {
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int r0 = static_cast<int>(blockIdx.x) * p.rows_per_cta;
  const int r1 = r0 + p.rows_per_cta < p.n ? r0 + p.rows_per_cta : p.n;
  const int rows = r1 - r0;  // >= 1: the host sizes the grid so
  const int64_t row_bytes = int64_t{2} * p.k;
  const int stage_rows = p.rows_per_stage;
  const int n_stages = (rows + stage_rows - 1) / stage_rows;
  const int stage_bytes = static_cast<int>(stage_rows * row_bytes);
  const int n_slots = p.stages;

  unsigned char* smem = DynamicSmem();
  const uint32_t s_ring = SmemU32(smem);
  const uint32_t s_bar = s_ring + n_slots * stage_bytes;
  float* s_part = reinterpret_cast<float*>(smem + n_slots * stage_bytes + n_slots * 8);
  float* s_sumsq = s_part + p.rows_per_cta * kWarps * kMaxRows;  // [kWarps][kMaxRows]
  const unsigned char* w_cta = p.w + r0 * row_bytes;
  // This lane's pieces of x: columns w K / 8 + 8 (lane + 32 j), j < pieces.
  const int slice = p.k / kWarps;  // a multiple of 8
  const int slice_pieces = slice / 8;
  const int col0 = warp * slice;

  auto issue = [&](int stage, int slot) {  // thread 0 only
    const int first = stage * stage_rows;
    const int n_rows = rows - first < stage_rows ? rows - first : stage_rows;
    const unsigned bytes = static_cast<unsigned>(n_rows * row_bytes);
    MbarArriveExpectTx(s_bar + slot * 8, bytes);
    BulkCopyG2S(s_ring + slot * stage_bytes, w_cta + first * row_bytes, bytes, s_bar + slot * 8);
  };

  // ---- Before the wait: W does not depend on the previous kernel. ----
  if (tid == 0) {
    for (int s = 0; s < n_slots; ++s) MbarInit(s_bar + s * 8, 1);
    FenceMbarInit();
    for (int s = 0; s < n_slots && s < n_stages; ++s) issue(s, s);
  }
  // The norm's weight, like W, is not written by the kernels around this one.
  constexpr bool kNorm = kX == XMode::kRmsNorm;
  uint4 wn[kNorm ? kMaxPieces : 1];
  if constexpr (kNorm) {
#pragma unroll
    for (int j = 0; j < kMaxPieces; ++j) {
      const int piece = lane + 32 * j;
      wn[j] = piece < slice_pieces ? LoadGlobal16(p.norm_weight + (col0 + piece * 8) * 2)
                                   : uint4{0, 0, 0, 0};
    }
  }
  PdlWait();  // x (and out) belong to the kernels around this one from here on
  if (p.release_early) PdlLaunchDependents();

  uint4 xr[kRows][kMaxPieces];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
#pragma unroll
    for (int j = 0; j < kMaxPieces; ++j) {
      const int piece = lane + 32 * j;
      const unsigned char* at = p.x + (m * p.x_stride + col0 + piece * 8) * 2;
      if (piece >= slice_pieces) {
        xr[m][j] = uint4{0, 0, 0, 0};
      } else if constexpr (kX == XMode::kSiluGated) {
        xr[m][j] = SiluMul8<T>(LoadGlobal16(at), LoadGlobal16(at + int64_t{2} * p.k));
      } else {
        xr[m][j] = LoadGlobal16(at);
      }
    }
  }
  if constexpr (kNorm) {  // this warp's part of each row's sum of squares
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxPieces; ++j) {
        const uint32_t xs[4] = {xr[m][j].x, xr[m][j].y, xr[m][j].z, xr[m][j].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const float2 f = Unpack2<T>(xs[h]);
          ss += f.x * f.x;
          ss += f.y * f.y;
        }
      }
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) ss += ShflXor(ss, off);
      if (lane == 0) s_sumsq[warp * kMaxRows + m] = ss;
    }
  }
  SyncCta();  // the mbarrier initializations (and the sums of squares) are visible to every thread
  if constexpr (kNorm) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      float ss = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) ss += s_sumsq[w * kMaxRows + m];
      const float inv_rms = rsqrtf(ss / static_cast<float>(p.k) + p.eps);
#pragma unroll
      for (int j = 0; j < kMaxPieces; ++j) xr[m][j] = RmsNorm8<T>(xr[m][j], wn[j], inv_rms);
    }
  }

  int slot = 0;
  unsigned phase = 0;  // of the slot's mbarrier: flips each time the ring wraps
  for (int stage = 0; stage < n_stages; ++stage) {
    MbarWait(s_bar + slot * 8, phase);
    const unsigned char* ring = smem + slot * stage_bytes;
    const int first = stage * stage_rows;
    const int n_rows = rows - first < stage_rows ? rows - first : stage_rows;
    for (int r = 0; r < n_rows; ++r) {
      const unsigned char* w_row = ring + r * row_bytes + col0 * 2;
      float acc[kRows];
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[m] = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxPieces; ++j) {
        const int piece = lane + 32 * j;
        if (piece < slice_pieces) {
          const uint4 wv = Load16(w_row + piece * 16);
          const uint32_t wr[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const float2 wf = Unpack2<T>(wr[h]);
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
              const uint32_t xh = h == 0 ? xr[m][j].x : h == 1 ? xr[m][j].y
                                  : h == 2 ? xr[m][j].z : xr[m][j].w;
              const float2 xf = Unpack2<T>(xh);
              acc[m] = fmaf(wf.x, xf.x, acc[m]);
              acc[m] = fmaf(wf.y, xf.y, acc[m]);
            }
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) acc[m] += ShflXor(acc[m], off);
      }
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          s_part[((first + r) * kWarps + warp) * kMaxRows + m] = acc[m];
        }
      }
    }
    FenceProxyAsync();  // this thread's reads of the slot before the copy that refills it
    SyncCta();          // every warp is done with the slot
    if (tid == 0 && stage + n_slots < n_stages) issue(stage + n_slots, slot);
    if (++slot == n_slots) {
      slot = 0;
      phase ^= 1u;
    }
  }

  // ---- Epilogue: each row's 8 partials (+ bias), one thread per row. ----
  if (tid < rows) {
    const int row = r0 + tid;
    float bias = 0.f;
    if (p.bias != nullptr) {
      uint16_t b;
      b = reinterpret_cast<const uint16_t*>(p.bias)[row];
      bias = ToFloat16Bits<T>(b);
    }
    for (int m = 0; m < kRows; ++m) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += s_part[(tid * kWarps + w) * kMaxRows + m];
      float value = sum + bias;
      if (p.residual != nullptr) {  // rounded to T, then added like fused_add_rms_norm
        const uint16_t r =
            reinterpret_cast<const uint16_t*>(p.residual + m * p.residual_stride * 2)[row];
        value = ToFloat16Bits<T>(FromFloat<T>(value)) + ToFloat16Bits<T>(r);
      }
      reinterpret_cast<uint16_t*>(p.out + m * p.out_stride * 2)[row] = FromFloat<T>(value);
    }
  }
}

/*!
 * \brief Launches the kernel of element type T for `m` rows of x (1 or 2) in mode kX, through `launch(kernel, grid, threads, smem)`; the caller made `plan` with
 * PlanSkinny and checked that plan.grid > 0.
 */
template <class T, XMode kX, class Launch>
void LaunchSkinnyX(int m, const SkinnyPlan& plan, Launch&& launch) {
  if (m == 1) {
    launch(&SkinnyGemmKernel<T, 1, kX>, plan.grid, kThreads, plan.smem_bytes);
  } else {
    launch(&SkinnyGemmKernel<T, 2, kX>, plan.grid, kThreads, plan.smem_bytes);
  }
}

template <class T, class Launch>
void LaunchSkinny(int m, XMode mode, const SkinnyPlan& plan, Launch&& launch) {
  switch (mode) {
    case XMode::kSiluGated: LaunchSkinnyX<T, XMode::kSiluGated>(m, plan, launch); break;
    case XMode::kRmsNorm: LaunchSkinnyX<T, XMode::kRmsNorm>(m, plan, launch); break;
    default: LaunchSkinnyX<T, XMode::kPlain>(m, plan, launch); break;
  }
}

}  // namespace skinny
}  // namespace cacheflow
