// The CUDA launcher of paged_attention's dispatch (paged_attention.cuh); one translation unit
// per dtype (paged_attention_{f16,bf16,f32}.cu) so the kernels of different dtypes compile in
// parallel.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstddef>

#include "paged_attention.cuh"
#include "pdl_launch.cuh"
#include "smem_limit.cuh"

namespace cacheflow {
namespace paged_attention {

/*! \brief Launches kernels on a stream; a launch error throws (RuntimeError in Python). */
struct CudaLauncher {
  cudaStream_t stream;

  template <typename... Args>
  void operator()(void (*kernel)(Args...), GridDims grid, int threads, size_t smem,
                  const Params& p) const {
    constexpr size_t kCarveoutFrom = 32 * 1024;
    RaiseSmemLimit(reinterpret_cast<const void*>(kernel), smem);
    // The largest shared-memory carveout, so the pipelined kernel's depth (chosen to keep its
    // register-limited CTAs per SM within the SM's shared memory) gets them all.
    if (smem >= kCarveoutFrom) PreferSharedCarveout(reinterpret_cast<const void*>(kernel));
    LaunchChained(kernel, dim3(grid.x, grid.y, grid.z), dim3(threads), smem, stream, p);
  }
};

/*!
 * \brief Runs paged attention for query dtype T on `stream` (defined per dtype), over caches of
 * T or (fp8_cache) of FP8 E4M3. False: a fused launch declined, nothing launched (Run).
 */
template <typename T>
bool Launch(const Params& p, bool fp8_cache, cudaStream_t stream);

template <>
bool Launch<__half>(const Params& p, bool fp8_cache, cudaStream_t stream);
template <>
bool Launch<__nv_bfloat16>(const Params& p, bool fp8_cache, cudaStream_t stream);
template <>
bool Launch<float>(const Params& p, bool fp8_cache, cudaStream_t stream);

}  // namespace paged_attention
}  // namespace cacheflow
