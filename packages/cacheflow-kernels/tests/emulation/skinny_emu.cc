// A C entry point that runs skinny_gemm's kernel (csrc/skinny_gemm_kernel.cuh) under the host
// emulation of skinny_emu.h, for tests/test_kernels_skinny_gemm_emulated.py.
//
// Build (from packages/cacheflow-kernels):
//   g++ -std=c++17 -O2 -shared -fPIC -DCACHEFLOW_PREFILL_EMULATE -DCACHEFLOW_SKINNY_EMULATE
//       -Icsrc -Itests/emulation tests/emulation/skinny_emu.cc -o libskinny_emu.so
#include <cstdint>

#include "skinny_gemm_kernel.cuh"

/*!
 * \brief Runs the op on host memory (same argument meaning as the CUDA op) as if on a device of
 * `sms` multiprocessors with `smem_per_sm` bytes of shared memory each.
 * \param dtype 0 float16, 1 bfloat16.
 * \param silu_gated 1: x is [gate | up] (2 k columns), multiplied as silu(gate) * up.
 * \param norm_weight null, or [k]: x is multiplied as rms_norm(x, norm_weight, eps).
 * \param residual null, or [m, n] (rows residual_stride apart; may be out): out = residual + ...
 * \param max_stages the most stages of W in the ring (PlanSkinny).
 * \return the grid the plan chose (0: the shape does not fit the kernel).
 */
extern "C" int cf_emu_skinny_gemm(int dtype, void* out, const void* x, const void* w,
                                  const void* bias, int m, int n, int k, int64_t x_stride,
                                  int64_t out_stride, int sms, int smem_per_sm, int silu_gated,
                                  int max_stages, const void* norm_weight, float eps,
                                  const void* residual, int64_t residual_stride) {
  namespace sk = cacheflow::skinny;
  auto range = [](const void* p, int64_t bytes, const char* name) {
    const auto* b = static_cast<const unsigned char*>(p);
    return cfemu::GlobalRange{b, b + bytes, name};
  };
  cfemu::g_ranges = {range(out, ((m - 1) * out_stride + n) * 2, "out"),
                     range(x, ((m - 1) * x_stride + (silu_gated ? 2 : 1) * k) * 2, "x"),
                     range(w, int64_t{n} * k * 2, "weight")};
  if (bias != nullptr) cfemu::g_ranges.push_back(range(bias, int64_t{n} * 2, "bias"));
  if (norm_weight != nullptr) {
    cfemu::g_ranges.push_back(range(norm_weight, int64_t{k} * 2, "norm_weight"));
  }
  if (residual != nullptr) {
    cfemu::g_ranges.push_back(range(residual, ((m - 1) * residual_stride + n) * 2, "residual"));
  }
  const sk::SkinnyPlan plan = sk::PlanSkinny(n, k, sms, smem_per_sm, smem_per_sm, max_stages);
  if (plan.grid == 0) return 0;
  sk::SkinnyParams p{};
  p.x = static_cast<const unsigned char*>(x);
  p.w = static_cast<const unsigned char*>(w);
  p.bias = static_cast<const unsigned char*>(bias);
  p.norm_weight = static_cast<const unsigned char*>(norm_weight);
  p.eps = eps;
  p.residual = static_cast<const unsigned char*>(residual);
  p.residual_stride = residual_stride;
  p.out = static_cast<unsigned char*>(out);
  p.x_stride = x_stride;
  p.out_stride = out_stride;
  p.m = m;
  p.n = n;
  p.k = k;
  p.rows_per_cta = plan.rows_per_cta;
  p.rows_per_stage = plan.rows_per_stage;
  p.stages = plan.stages;
  p.release_early = 1;
  auto launch = [&](auto kernel, int grid, int threads, int smem) {
    cfemu::RunGrid(Dim3{static_cast<unsigned>(grid), 1, 1}, threads, static_cast<size_t>(smem),
                   [kernel, p] { kernel(p); });
  };
  const sk::XMode mode = silu_gated != 0      ? sk::XMode::kSiluGated
                        : norm_weight != nullptr ? sk::XMode::kRmsNorm
                                                 : sk::XMode::kPlain;
  if (dtype == 0) {
    sk::LaunchSkinny<sk::Fp16>(m, mode, plan, launch);
  } else {
    sk::LaunchSkinny<sk::Bf16>(m, mode, plan, launch);
  }
  return plan.grid;
}

/*!
 * \brief PlanSkinny's choice for W of shape [n, k] on a device of `sms` multiprocessors with
 * `smem_per_sm` bytes of shared memory each (also the per-CTA limit): writes grid, rows per CTA,
 * rows per stage, stages and shared-memory bytes to `out[0..4]`.
 */
extern "C" void cf_emu_skinny_plan(int n, int k, int sms, int smem_per_sm, int max_stages,
                                   int* out) {
  const cacheflow::skinny::SkinnyPlan plan =
      cacheflow::skinny::PlanSkinny(n, k, sms, smem_per_sm, smem_per_sm, max_stages);
  out[0] = plan.grid;
  out[1] = plan.rows_per_cta;
  out[2] = plan.rows_per_stage;
  out[3] = plan.stages;
  out[4] = plan.smem_bytes;
}
