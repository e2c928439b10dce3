// paged_prefill_attention: the tensor-core kernels for fp16 (see paged_prefill_kernel.cuh).
#include "paged_prefill_launch.cuh"

namespace cacheflow {
namespace prefill {

bool LaunchTcFp16(int64_t head_size, int variant, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream) {
  if (fp8_cache) {
    return DispatchTc<Fp16, true>(head_size, variant, num_heads, num_seqs, max_query_len,
                                 CudaLauncher{p, stream});
  }
  return DispatchTc<Fp16>(head_size, variant, num_heads, num_seqs, max_query_len,
                          CudaLauncher{p, stream});
}

}  // namespace prefill
}  // namespace cacheflow
