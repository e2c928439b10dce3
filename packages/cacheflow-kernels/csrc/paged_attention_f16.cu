// paged_attention kernels for float16 (tensor cores); see paged_attention.cuh.
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace paged_attention {

template <>
bool Launch<__half>(const Params& p, bool fp8_cache, cudaStream_t stream) {
  CudaLauncher launch{stream};
  if (fp8_cache) {
    return Run<__half, Fp8E4m3>(p, launch);
  } else {
    return Run<__half>(p, launch);
  }
}

}  // namespace paged_attention
}  // namespace cacheflow
