// paged_attention kernels for float32 (CUDA cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
void Launch<float>(const Params& p, cudaStream_t stream) {
  CudaLauncher launch{stream};
  Run<float>(p, launch);
}

}  // namespace paged_attention
}  // namespace cacheflow
