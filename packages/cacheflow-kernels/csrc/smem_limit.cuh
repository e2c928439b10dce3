// The dynamic shared-memory limit of a kernel, raised once per (kernel, device) and only upward;
// its shared-memory carveout preference, set once per (kernel, device).
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace cacheflow {

/*!
 * \brief Lets `kernel` launch with `bytes` of dynamic shared memory on the current device
 * (`device`, or the current one when negative): sets its cudaFuncAttributeMaxDynamicSharedMemorySize
 * when `bytes` is above the default 48 KB and above what this process set for it before. The
 * attribute is one value per kernel, so it only ever goes up; setting it to each requested size
 * would shrink it under a larger size a launcher has already checked (that launch then fails with
 * an invalid argument). Thread-safe; a repeated call costs one map lookup.
 */
inline void RaiseSmemLimit(const void* kernel, size_t bytes, int device = -1) {
  if (bytes <= 48 * 1024) return;
  if (device < 0) TVM_FFI_CHECK_CUDA_ERROR(cudaGetDevice(&device));
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> limits;
  std::lock_guard<std::mutex> lock(mu);
  size_t& limit = limits[{kernel, device}];
  if (bytes <= limit) return;
  TVM_FFI_CHECK_CUDA_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  limit = bytes;
}

/*!
 * \brief Asks the driver to give `kernel` all of the unified L1 / shared storage it can as shared
 * memory (cudaSharedmemCarveoutMaxShared) on `device` (the current one when negative), so every
 * CTA that its registers allow fits in shared memory too. For kernels whose global loads bypass
 * L1 (cp.async.cg). Set once per (kernel, device): later calls cost one set lookup and no driver
 * call. Thread-safe.
 */
inline void PreferSharedCarveout(const void* kernel, int device = -1) {
  if (device < 0) TVM_FFI_CHECK_CUDA_ERROR(cudaGetDevice(&device));
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (!done.insert({kernel, device}).second) return;
  TVM_FFI_CHECK_CUDA_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
}

}  // namespace cacheflow
