// Activations: gated (silu_and_mul, gelu_and_mul) and element-wise (gelu_new, gelu_fast).
//
// Layouts (all C-contiguous, one dtype: float16, bfloat16 or float32):
//   *_and_mul:  x [..., 2 * d] -> out [..., d]:  out = act(x[..., :d]) * x[..., d:]
//   gelu_new, gelu_fast:  x [...] -> out [...] (same shape; out may be x)
//
// The activation is computed in float32. For the gated ops the activation is rounded to the
// dtype before the multiply, like the runtime's torch code (`F.silu(gate) * up`: two eager ops);
// gelu_new / gelu_fast round once at the end (the runtime's torch versions round every step).
//   silu(x)       = x / (1 + exp(-x))
//   gelu(x)       = 0.5 * x * (1 + erf(x / sqrt(2)))                         (approximate "none")
//   gelu_tanh(x)  = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (approximate "tanh")
//   gelu_new(x)   = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
//   gelu_fast(x)  = 0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + 0.044715 * x * x)))
//
// Flat grid over all accesses of W elements (16 bytes when sizes and pointers allow, else the
// widest of 8/4/2 bytes or single elements), a grid-stride loop when the grid would be too large.
// gelu_new / gelu_fast give each thread kFlatUnroll accesses, all loads issued before first use.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using namespace elementwise;  // NOLINT(build/namespaces)

enum class Act { kSilu, kGelu, kGeluTanh, kGeluNew, kGeluFast };

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // beyond: grid-stride loop
constexpr int kFlatUnroll = 4;  // accesses per thread in flight (gelu_new / gelu_fast)
constexpr int kFlatMinBlocks = 4;  // <= 64 registers: 1024 threads, 64 KB of loads in flight per SM

template <Act A>
__device__ __forceinline__ float Activate(float x) {
  if constexpr (A == Act::kSilu) {
    return x / (1.0f + expf(-x));
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  } else if constexpr (A == Act::kGeluTanh || A == Act::kGeluNew) {
    constexpr float kBeta = 0.79788456080286535588f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(kBeta * (x + 0.044715f * x * x * x)));
  } else {
    return 0.5f * x * (1.0f + tanhf(x * 0.7978845608f * (1.0f + 0.044715f * x * x)));
  }
}

/*! \brief out[r, c] = act(x[r, c]) * x[r, d + c], over W-element accesses (d_vecs per row). */
template <typename T, int W, Act A>
__global__ void __launch_bounds__(kThreads)
    ActAndMulKernel(T* __restrict__ out, const T* __restrict__ x, int64_t rows, int64_t d_vecs) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  using V = Vec<T, W>;
  const V* xv = reinterpret_cast<const V*>(x);
  V* ov = reinterpret_cast<V*>(out);
  const int64_t total = rows * d_vecs;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t row = idx / d_vecs;
    const int64_t col = idx - row * d_vecs;
    const V g = xv[row * 2 * d_vecs + col];
    const V u = xv[row * 2 * d_vecs + d_vecs + col];
    V o;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float act = RoundTo<T>(Activate<A>(ToFloat(g.v[j])));
      o.v[j] = FromFloat<T>(__fmul_rn(act, ToFloat(u.v[j])));
    }
    ov[idx] = o;
  }
}

/*!
 * \brief out = act(x) over n elements: W-element accesses, then the n % W tail singly.
 * Each block takes chunks of kThreads * kFlatUnroll accesses (grid-stride over chunks); a thread
 * issues its kFlatUnroll loads (kThreads apart: coalesced) before the first use.
 */
template <typename T, int W, Act A>
__global__ void __launch_bounds__(kThreads, kFlatMinBlocks)
    ActKernel(T* out, const T* x, int64_t n) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  using V = Vec<T, W>;
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kFlatUnroll;
  const int64_t n_vecs = n / W;
  const V* xv = reinterpret_cast<const V*>(x);
  V* ov = reinterpret_cast<V*>(out);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x; base < n_vecs;
       base += static_cast<int64_t>(gridDim.x) * kChunk) {
    V v[kFlatUnroll];
    // out may equal x: every element is loaded before it is stored, by the same thread.
#pragma unroll
    for (int u = 0; u < kFlatUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * kThreads;
      if (idx < n_vecs) v[u] = xv[idx];
    }
#pragma unroll
    for (int u = 0; u < kFlatUnroll; ++u) {
      const int64_t idx = base + static_cast<int64_t>(u) * kThreads;
      if (idx < n_vecs) {
        V o;
#pragma unroll
        for (int j = 0; j < W; ++j) o.v[j] = FromFloat<T>(Activate<A>(ToFloat(v[u].v[j])));
        ov[idx] = o;
      }
    }
  }
  if constexpr (W > 1) {
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t idx = n_vecs * W + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
         idx < n; idx += step) {
      out[idx] = FromFloat<T>(Activate<A>(ToFloat(x[idx])));
    }
  }
}

unsigned GridFor(int64_t work) {
  const int64_t blocks = std::min(kMaxBlocks, (work + kThreads - 1) / kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, blocks));
}

/*!
 * \brief Widest access (elements, a power of two <= 16 bytes) dividing `multiple_of` whose size
 * divides the alignment of every pointer.
 */
template <typename T>
int AccessWidth(int64_t multiple_of, std::initializer_list<const void*> ptrs) {
  for (int w = kVec16<T>; w > 1; w /= 2) {
    if (multiple_of % w == 0 && AllAligned(ptrs, static_cast<int64_t>(w) * sizeof(T))) return w;
  }
  return 1;
}

template <Act A>
void LaunchAndMul(char* out, const char* x, DLDataType dtype, int64_t rows, int64_t d,
                  cudaStream_t stream) {
  DispatchFloat(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = reinterpret_cast<T*>(out);
    const T* xi = reinterpret_cast<const T*>(x);
    const int w = AccessWidth<T>(d, {out, x});
    const int64_t d_vecs = d / w;
    const unsigned grid = GridFor(rows * d_vecs);
    const auto launch = [&](auto kernel) {
      LaunchChained(kernel, dim3(grid), dim3(kThreads), 0, stream, o, xi, rows, d_vecs);
    };
    switch (w) {
      case 8:
        if constexpr (kVec16<T> >= 8) {
          launch(ActAndMulKernel<T, 8, A>);
        }
        break;
      case 4: launch(ActAndMulKernel<T, 4, A>); break;
      case 2: launch(ActAndMulKernel<T, 2, A>); break;
      default: launch(ActAndMulKernel<T, 1, A>);
    }
  });
  CheckLaunch();
}

template <Act A>
void LaunchFlat(char* out, const char* x, DLDataType dtype, int64_t n, cudaStream_t stream) {
  DispatchFloat(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = reinterpret_cast<T*>(out);
    const T* xi = reinterpret_cast<const T*>(x);
    // The tail is handled singly, so only the pointers limit the width.
    const int w = AccessWidth<T>(kVec16<T>, {out, x});
    // One block per chunk of kThreads * kFlatUnroll accesses (the n % w tail: grid-stride).
    const unsigned grid = GridFor((n / w + kFlatUnroll - 1) / kFlatUnroll);
    const auto launch = [&](auto kernel) {
      LaunchChained(kernel, dim3(grid), dim3(kThreads), 0, stream, o, xi, n);
    };
    switch (w) {
      case 8:
        if constexpr (kVec16<T> >= 8) launch(ActKernel<T, 8, A>);
        break;
      case 4: launch(ActKernel<T, 4, A>); break;
      case 2: launch(ActKernel<T, 2, A>); break;
      default: launch(ActKernel<T, 1, A>);
    }
  });
  CheckLaunch();
}

/*! \brief Checks of out [..., d] and x [..., 2 * d]; returns (rows, d). */
std::pair<int64_t, int64_t> CheckAndMul(const char* op, const TensorView& out,
                                        const TensorView& x) {
  TVM_FFI_CHECK(x.ndim() >= 1, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "a tensor [..., 2 * d] of at least 1 dimension, got a "
      << "0-D tensor";
  CheckFloatDtype(op, "x", x);
  const int64_t two_d = x.shape()[x.ndim() - 1];
  TVM_FFI_CHECK(two_d % 2 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "x") << "of shape [..., 2 * d] (an even last dimension), got "
      << ShapeStr(x);
  const int64_t d = two_d / 2;
  bool ok = out.ndim() == x.ndim() && out.shape()[out.ndim() - 1] == d;
  for (int32_t i = 0; ok && i + 1 < x.ndim(); ++i) ok = out.shape()[i] == x.shape()[i];
  if (!ok) {
    std::ostringstream want;
    want << '[';
    for (int32_t i = 0; i + 1 < x.ndim(); ++i) want << x.shape()[i] << ", ";
    want << d << ']';
    TVM_FFI_THROW(ValueError) << CACHEFLOW_ARG_ERROR(op, "out") << "of shape " << want.str()
                              << " (the shape of 'x' with the last dimension halved), got "
                              << ShapeStr(out);
  }
  CheckDtypeLike(op, "out", out, "x", x);
  CheckContiguous(op, "out", out);
  CheckContiguous(op, "x", x);
  CheckCuda(op, "x", x);
  CheckSameDevice(op, "out", out, "x", x);
  const int64_t rows = d == 0 ? 0 : out.numel() / d;
  return {rows, d};
}

template <Act A>
void AndMul(const char* op, const TensorView& out, const TensorView& x) {
  const auto [rows, d] = CheckAndMul(op, out, x);
  if (rows == 0 || d == 0) return;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  LaunchAndMul<A>(DataPtr(out), DataPtr(x), x.dtype(), rows, d, EnvStream(dev));
}

template <Act A>
void Flat(const char* op, const TensorView& out, const TensorView& x) {
  CheckFloatDtype(op, "x", x);
  CheckShapeLike(op, "out", out, "x", x);
  CheckDtypeLike(op, "out", out, "x", x);
  CheckContiguous(op, "out", out);
  CheckContiguous(op, "x", x);
  CheckCuda(op, "x", x);
  CheckSameDevice(op, "out", out, "x", x);
  const int64_t n = x.numel();
  if (n == 0) return;
  const DLDevice dev = x.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  LaunchFlat<A>(DataPtr(out), DataPtr(x), x.dtype(), n, EnvStream(dev));
}

void SiluAndMul(TensorView out, TensorView x) { AndMul<Act::kSilu>("silu_and_mul", out, x); }

void GeluAndMul(TensorView out, TensorView x, tvm::ffi::String approximate) {
  constexpr const char* kOp = "gelu_and_mul";
  const bool tanh = approximate == "tanh";
  TVM_FFI_CHECK(tanh || approximate == "none", ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "approximate") << "'none' or 'tanh', got '"
      << std::string(approximate) << "'";
  if (tanh) {
    AndMul<Act::kGeluTanh>(kOp, out, x);
  } else {
    AndMul<Act::kGelu>(kOp, out, x);
  }
}

void GeluNew(TensorView out, TensorView x) { Flat<Act::kGeluNew>("gelu_new", out, x); }

void GeluFast(TensorView out, TensorView x) { Flat<Act::kGeluFast>("gelu_fast", out, x); }

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(silu_and_mul, cacheflow::SiluAndMul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gelu_and_mul, cacheflow::GeluAndMul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gelu_new, cacheflow::GeluNew);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gelu_fast, cacheflow::GeluFast);
