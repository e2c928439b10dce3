// paged_prefill_attention: the Hopper (sm_90a, wgmma) kernels for bf16 (see
// paged_prefill_wg_kernel.cuh). Compiled for sm_90a only (CMakeLists.txt).
#include "paged_prefill_launch.cuh"
#include "paged_prefill_wg_kernel.cuh"

namespace cacheflow {
namespace prefill {

bool LaunchWgBf16(int64_t head_size, bool overlap, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream) {
  if (fp8_cache) {
    return DispatchWg<Bf16, true>(head_size, overlap, num_heads, num_seqs, max_query_len,
                                 CudaLauncher{p, stream});
  }
  return DispatchWg<Bf16>(head_size, overlap, num_heads, num_seqs, max_query_len,
                         CudaLauncher{p, stream});
}

}  // namespace prefill
}  // namespace cacheflow
