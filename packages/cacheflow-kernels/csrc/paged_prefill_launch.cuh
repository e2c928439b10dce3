// paged_prefill_attention: host-side launch helpers shared by the translation units of the op
// (paged_prefill.cu with the checks and the CUDA-core kernels, paged_prefill_tc_{fp16,bf16}.cu
// with the tensor-core kernels, split so that they compile in parallel).
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstddef>
#include <cstdint>

#include "paged_prefill_kernel.cuh"
#include "pdl_launch.cuh"
#include "smem_limit.cuh"

namespace cacheflow {
namespace prefill {

/*! \brief Largest grid y / z of a launch. */
constexpr int64_t kMaxGridYZ = 65535;

/*!
 * \brief Launches a prefill kernel with `params` on `stream` over the grid
 * (ceil(max_query_len / rows_per_cta), heads, seqs); CUDA errors become exceptions. The caller
 * has checked heads and seqs against kMaxGridYZ.
 */
struct CudaLauncher {
  const PrefillParams& params;
  cudaStream_t stream;

  template <class Kernel>
  void operator()(Kernel kernel, int64_t num_heads, int64_t num_seqs, int64_t max_query_len,
                  int64_t rows_per_cta, int threads, int smem_bytes) const {
    const int64_t m_blocks = (max_query_len + rows_per_cta - 1) / rows_per_cta;
    RaiseSmemLimit(reinterpret_cast<const void*>(kernel), static_cast<size_t>(smem_bytes));
    // The largest carveout, so kernels built for several CTAs per SM (the Hopper kernel at head
    // size 64, WgCtasPerSm) get them: their K/V gathers bypass L1 anyway.
    PreferSharedCarveout(reinterpret_cast<const void*>(kernel));
    const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(num_heads),
                    static_cast<unsigned>(num_seqs));
    LaunchChained(kernel, grid, dim3(static_cast<unsigned>(threads)),
                  static_cast<size_t>(smem_bytes), stream, params);
  }
};

/*!
 * \brief Tensor-core kernels (one translation unit per element type), over caches of the
 * query's type or (fp8_cache) of FP8 E4M3.
 * \return false when `head_size` has no tensor-core kernel.
 */
bool LaunchTcFp16(int64_t head_size, int variant, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream);
bool LaunchTcBf16(int64_t head_size, int variant, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream);

/*!
 * \brief The Hopper (sm_90a, wgmma) kernels, in the library when it was built for a 90
 * architecture (CACHEFLOW_HAS_SM90A_PREFILL); launch them on compute capability 9.0 only.
 * `overlap`: FlashAttention-3's schedule (softmax of a tile during P V of the one before), else
 * the serial one.
 * \return false when `head_size` has no Hopper kernel (IsWgHeadSize).
 */
bool LaunchWgFp16(int64_t head_size, bool overlap, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream);
bool LaunchWgBf16(int64_t head_size, bool overlap, bool fp8_cache, const PrefillParams& p,
                  int num_heads, int num_seqs, int64_t max_query_len, cudaStream_t stream);

}  // namespace prefill
}  // namespace cacheflow
