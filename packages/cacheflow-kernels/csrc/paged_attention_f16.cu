// paged_attention kernels for float16 (tensor cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
void Launch<__half>(const Params& p, cudaStream_t stream) {
  CudaLauncher launch{stream};
  Run<__half>(p, launch);
}

}  // namespace paged_attention
}  // namespace cacheflow
