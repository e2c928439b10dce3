// paged_attention kernels for float32 (CUDA cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
bool Launch<float>(const Params& p, bool fp8_cache, cudaStream_t stream) {
  CudaLauncher launch{stream};
  if (fp8_cache) {
    return Run<float, Fp8E4m3>(p, launch);
  } else {
    return Run<float>(p, launch);
  }
}

}  // namespace paged_attention
}  // namespace cacheflow
