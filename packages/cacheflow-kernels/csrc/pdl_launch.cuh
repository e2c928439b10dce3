// Programmatic dependent launch (PDL), host side: launching a kernel that starts with
// PdlWaitForPrevious() or PdlWait() (pdl.cuh) so that it may be scheduled while the previous
// kernel on the stream finishes. Only kernels that call one of them before touching memory that
// a kernel still in flight may write may be launched this way (see pdl.cuh for what they may
// read before it).
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace cacheflow {

/*!
 * \brief Whether kernels on the current device are launched with PDL: compute capability 9.0 or
 * newer (queried once per device) unless CACHEFLOW_PDL=0 (read at every call, for A/B runs in
 * one process).
 */
inline bool PdlEnabled() {
  const char* env = std::getenv("CACHEFLOW_PDL");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int device = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaGetDevice(&device));
  static std::atomic<int> major[64];  // 0: not queried yet
  if (device < 0 || device >= 64) return false;
  int m = major[device].load(std::memory_order_relaxed);
  if (m == 0) {
    TVM_FFI_CHECK_CUDA_ERROR(
        cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device));
    major[device].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

/*!
 * \brief Launches `kernel` (which must call PdlWaitForPrevious() or PdlWait() before it
 * touches what the kernels before it write, see pdl.cuh) on
 * `stream`, with PDL where PdlEnabled(); a launch error throws (RuntimeError in Python).
 */
template <typename... Params, typename... Args>
void LaunchChained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (PdlEnabled()) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace cacheflow
