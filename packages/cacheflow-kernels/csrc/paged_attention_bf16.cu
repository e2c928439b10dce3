// paged_attention kernels for bfloat16 (tensor cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
bool Launch<__nv_bfloat16>(const Params& p, bool fp8_cache, cudaStream_t stream) {
  CudaLauncher launch{stream};
  if (fp8_cache) {
    return Run<__nv_bfloat16, Fp8E4m3>(p, launch);
  } else {
    return Run<__nv_bfloat16>(p, launch);
  }
}

}  // namespace paged_attention
}  // namespace cacheflow
