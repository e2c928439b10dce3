// paged_attention kernels for bfloat16 (tensor cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
void Launch<__nv_bfloat16>(const Params& p, cudaStream_t stream) {
  CudaLauncher launch{stream};
  Run<__nv_bfloat16>(p, launch);
}

}  // namespace paged_attention
}  // namespace cacheflow
