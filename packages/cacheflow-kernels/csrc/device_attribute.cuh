// Host side: CUDA device attributes queried once per (attribute, device) and cached, for the
// launch plans that read them at every call (SM count, shared memory, compute capability).
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <atomic>

namespace cacheflow {

/*! \brief The attribute kAttr of `device` (devices 0-63 cached after the first query). */
template <cudaDeviceAttr kAttr>
int CachedDeviceAttribute(int device) {
  static std::atomic<int> cached[64];  // value + 1; 0: not queried yet
  const bool cacheable = device >= 0 && device < 64;
  const int known = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (known != 0) return known - 1;
  int v = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&v, kAttr, device));
  if (cacheable) cached[device].store(v + 1, std::memory_order_relaxed);
  return v;
}

}  // namespace cacheflow
