// skinny_gemm: out = x W^T (+ bias) for one or two rows of x, reading W with TMA bulk copies
// (skinny_gemm_kernel.cuh); with activation "silu", x = [gate | up] and the product is with
// silu(gate) * up (the MLP's down projection with its activation fused); with norm_weight, the
// product is with rms_norm(x, norm_weight, eps) (a layer's qkv or gate_up projection with the norm
// before it fused); with residual, out = residual + x W^T (+ bias) (a layer's o or down projection
// with the residual add fused; out may be residual). Meant for the GEMMs of
// a decode step at batch 1 or 2, where cuBLAS reads the weights at 60-98% of the copy bandwidth
// and cannot start before its input is ready.
//
// Layouts (on one CUDA device of compute capability 9.0 or newer):
//   out:    [m, n]  float16 or bfloat16, rows contiguous (row stride any)
//   x:      [m, k]  dtype of out, rows contiguous, row stride a multiple of 8 elements
//           ([m, 2 k] = [gate | up] with activation "silu")
//   weight: [n, k]  dtype of out, C-contiguous, 16-byte aligned
//   bias:   [n] or None, dtype of out, contiguous
//   norm_weight: [k] or None, dtype of out, contiguous, 16-byte aligned (not with "silu")
//   residual:    [m, n] or None, dtype of out, rows contiguous (may be out itself)
// with 1 <= m <= 2, k a multiple of 64 and at most 16384.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common.h"
#include "device_attribute.cuh"
#include "pdl_launch.cuh"
#include "skinny_gemm_kernel.cuh"
#include "smem_limit.cuh"

namespace cacheflow {
namespace {

constexpr const char* kOp = "skinny_gemm";
using tvm::ffi::Optional;

bool IsHalfOrBf16(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
}

/*!
 * \brief Requires that `kernel` runs on `device` from sm_90 code: a library built without a 90
 * architecture would JIT its older PTX, where the bulk copies are traps (checked once per
 * device; every skinny kernel comes from the same architecture list).
 */
void CheckSm90Code(const void* kernel, int device) {
  static std::atomic<int> checked[64];  // 0: not yet, 1: fine
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable && checked[device].load(std::memory_order_relaxed) == 1) return;
  cudaFuncAttributes attr{};
  TVM_FFI_CHECK_CUDA_ERROR(cudaFuncGetAttributes(&attr, kernel));
  TVM_FFI_CHECK(attr.ptxVersion >= 90, RuntimeError)
      << kOp << ": the kernel library has no sm_90 code for this device (built for compute "
      << attr.ptxVersion / 10 << "." << attr.ptxVersion % 10 << "); rebuild it with 90 in "
      << "CACHEFLOW_CUDA_ARCHS";
  if (cacheable) checked[device].store(1, std::memory_order_relaxed);
}

/*!
 * \brief Tuning knobs read at every call (a getenv each, so that one process can A/B them):
 * CACHEFLOW_SKINNY_STAGES=N caps the ring at N stages (kMinStages .. kMaxStages; default
 * kDefaultMaxStages), CACHEFLOW_SKINNY_EARLY_RELEASE=0 keeps the successor's launch until
 * this grid exits (default: released right after the wait).
 */
int MaxStages() {
  const char* env = std::getenv("CACHEFLOW_SKINNY_STAGES");
  if (env == nullptr || *env == '\0') return skinny::kDefaultMaxStages;
  const long v = std::strtol(env, nullptr, 10);  // NOLINT(runtime/int)
  if (v < skinny::kMinStages) return skinny::kMinStages;
  return v > skinny::kMaxStages ? skinny::kMaxStages : static_cast<int>(v);
}

bool EarlyRelease() {
  const char* env = std::getenv("CACHEFLOW_SKINNY_EARLY_RELEASE");
  return env == nullptr || !(env[0] == '0' && env[1] == '\0');
}

/*! \brief Elements between the rows of a 2-D tensor whose rows are contiguous. */
int64_t RowStride(const char* name, const TensorView& t) {
  if (t.IsContiguous()) return t.shape()[1];
  TVM_FFI_CHECK(t.shape()[1] <= 1 || t.strides()[1] == 1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "a tensor with contiguous rows, got shape "
      << ShapeStr(t) << " with strides [" << t.strides()[0] << ", " << t.strides()[1] << "]";
  return t.shape()[0] <= 1 ? t.shape()[1] : t.strides()[0];
}

void SkinnyGemm(TensorView out, TensorView x, TensorView weight, Optional<TensorView> bias,
                tvm::ffi::String activation, Optional<TensorView> norm_weight, double eps,
                Optional<TensorView> residual) {
  const std::string act(activation);
  TVM_FFI_CHECK(act.empty() || act == "silu", ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "activation") << "None or 'silu', got '" << act << "'";
  const bool gated = act == "silu";
  TVM_FFI_CHECK(!(gated && norm_weight.has_value()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "norm_weight") << "None with activation 'silu', got a tensor";
  TVM_FFI_CHECK(!norm_weight.has_value() || (eps > 0.0 && std::isfinite(eps)), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "eps") << "a finite value above 0, got " << eps;
  CheckNdim(kOp, "x", x, 2, gated ? "[m, 2 k]" : "[m, k]");
  CheckNdim(kOp, "weight", weight, 2, "[n, k]");
  CheckNdim(kOp, "out", out, 2, "[m, n]");
  TVM_FFI_CHECK(IsHalfOrBf16(x.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "float16 or bfloat16, got " << x.dtype();
  for (const auto& [name, t] : {std::pair<const char*, const TensorView*>{"weight", &weight},
                                {"out", &out}}) {
    TVM_FFI_CHECK(t->dtype() == x.dtype(), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, name) << x.dtype() << " (the dtype of 'x'), got "
        << t->dtype();
  }
  const int64_t m = x.shape()[0];
  const int64_t k = gated ? x.shape()[1] / 2 : x.shape()[1];
  const int64_t n = weight.shape()[0];
  TVM_FFI_CHECK(!gated || x.shape()[1] % 2 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "[gate | up] of an even width, got " << ShapeStr(x);
  TVM_FFI_CHECK(m >= 1 && m <= skinny::kMaxRows, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "1 to " << skinny::kMaxRows << " rows, got "
      << ShapeStr(x);
  TVM_FFI_CHECK(k % 64 == 0 && k >= 64 && k <= skinny::kMaxK, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "a row length k that is a multiple of 64 and at most "
      << skinny::kMaxK << ", got " << ShapeStr(x);
  TVM_FFI_CHECK(weight.shape()[1] == k && n >= 1 && n <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "weight") << "of shape [n, " << k << "] (k from 'x'), got "
      << ShapeStr(weight);
  TVM_FFI_CHECK(out.shape()[0] == m && out.shape()[1] == n, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "out") << "of shape [" << m << ", " << n << "], got "
      << ShapeStr(out);
  if (bias.has_value()) {
    const TensorView& b = *bias;
    CheckNdim(kOp, "bias", b, 1, "[n]");
    TVM_FFI_CHECK(b.shape()[0] == n && b.dtype() == x.dtype(), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "bias") << "of shape [" << n << "] and dtype " << x.dtype()
        << ", got shape " << ShapeStr(b) << " and dtype " << b.dtype();
    CheckContiguous(kOp, "bias", b);
  }
  if (norm_weight.has_value()) {
    const TensorView& nw = *norm_weight;
    CheckNdim(kOp, "norm_weight", nw, 1, "[k]");
    TVM_FFI_CHECK(nw.shape()[0] == k && nw.dtype() == x.dtype(), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "norm_weight") << "of shape [" << k << "] and dtype "
        << x.dtype() << ", got shape " << ShapeStr(nw) << " and dtype " << nw.dtype();
    CheckContiguous(kOp, "norm_weight", nw);
    TVM_FFI_CHECK(reinterpret_cast<uintptr_t>(DataPtr(nw)) % 16 == 0, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "norm_weight") << "16-byte aligned (read 16 bytes at a time)";
  }
  if (residual.has_value()) {
    const TensorView& r = *residual;
    CheckNdim(kOp, "residual", r, 2, "[m, n]");
    TVM_FFI_CHECK(r.shape()[0] == m && r.shape()[1] == n && r.dtype() == x.dtype(), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "residual") << "of shape [" << m << ", " << n
        << "] and dtype " << x.dtype() << ", got shape " << ShapeStr(r) << " and dtype "
        << r.dtype();
  }
  CheckContiguous(kOp, "weight", weight);
  const int64_t x_stride = RowStride("x", x);
  const int64_t out_stride = RowStride("out", out);
  TVM_FFI_CHECK(reinterpret_cast<uintptr_t>(DataPtr(x)) % 16 == 0 && x_stride % 8 == 0,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "16-byte aligned rows (read 16 bytes at a time)";
  TVM_FFI_CHECK(reinterpret_cast<uintptr_t>(DataPtr(weight)) % 16 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "weight") << "16-byte aligned (read by bulk copies)";
  CheckCuda(kOp, "x", x);
  CheckSameDevice(kOp, "weight", weight, "x", x);
  CheckSameDevice(kOp, "out", out, "x", x);
  if (bias.has_value()) CheckSameDevice(kOp, "bias", *bias, "x", x);
  if (norm_weight.has_value()) CheckSameDevice(kOp, "norm_weight", *norm_weight, "x", x);
  if (residual.has_value()) CheckSameDevice(kOp, "residual", *residual, "x", x);

  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const int major = CachedDeviceAttribute<cudaDevAttrComputeCapabilityMajor>(dev.device_id);
  TVM_FFI_CHECK(major >= 9, RuntimeError)
      << kOp << ": needs a GPU of compute capability 9.0 or newer (TMA bulk copies); device "
      << dev.device_id << " is " << major << ".x";
  const int id = dev.device_id;
  const int sms = CachedDeviceAttribute<cudaDevAttrMultiProcessorCount>(id);
  const int smem_sm = CachedDeviceAttribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(id);
  const int smem_cta = CachedDeviceAttribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(id);
  const skinny::SkinnyPlan plan = skinny::PlanSkinny(static_cast<int>(n), static_cast<int>(k),
                                                     sms, smem_sm, smem_cta, MaxStages());
  TVM_FFI_CHECK(plan.grid > 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "x") << "a row length whose stages fit the device's shared "
      << "memory, got k = " << k;

  skinny::SkinnyParams p{};
  p.x = reinterpret_cast<const unsigned char*>(DataPtr(x));
  p.w = reinterpret_cast<const unsigned char*>(DataPtr(weight));
  p.bias = bias.has_value() ? reinterpret_cast<const unsigned char*>(DataPtr(*bias)) : nullptr;
  p.norm_weight = norm_weight.has_value()
                      ? reinterpret_cast<const unsigned char*>(DataPtr(*norm_weight))
                      : nullptr;
  p.eps = static_cast<float>(eps);
  p.residual =
      residual.has_value() ? reinterpret_cast<const unsigned char*>(DataPtr(*residual)) : nullptr;
  p.residual_stride = residual.has_value() ? RowStride("residual", *residual) : 0;
  p.out = reinterpret_cast<unsigned char*>(DataPtr(out));
  p.x_stride = x_stride;
  p.out_stride = out_stride;
  p.m = static_cast<int32_t>(m);
  p.n = static_cast<int32_t>(n);
  p.k = static_cast<int32_t>(k);
  p.rows_per_cta = plan.rows_per_cta;
  p.rows_per_stage = plan.rows_per_stage;
  p.stages = plan.stages;
  p.release_early = EarlyRelease() ? 1 : 0;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));
  auto launch = [&](auto kernel, int grid, int threads, int smem) {
    CheckSm90Code(reinterpret_cast<const void*>(kernel), id);
    RaiseSmemLimit(reinterpret_cast<const void*>(kernel), static_cast<size_t>(smem));
    LaunchChained(kernel, dim3(grid), dim3(threads), static_cast<size_t>(smem), stream, p);
  };
  const skinny::XMode mode = gated                      ? skinny::XMode::kSiluGated
                             : norm_weight.has_value() ? skinny::XMode::kRmsNorm
                                                       : skinny::XMode::kPlain;
  if (x.dtype().code == kDLBfloat) {
    skinny::LaunchSkinny<skinny::Bf16>(p.m, mode, plan, launch);
  } else {
    skinny::LaunchSkinny<skinny::Fp16>(p.m, mode, plan, launch);
  }
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(skinny_gemm, cacheflow::SkinnyGemm);
