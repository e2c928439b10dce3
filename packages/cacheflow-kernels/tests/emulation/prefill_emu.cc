// A C entry point that runs paged_prefill_attention's kernels (csrc/paged_prefill_kernel.cuh)
// under the host emulation of prefill_emu.h, for tests/test_kernels_paged_prefill_emulated.py.
//
// Build (from packages/cacheflow-kernels):
//   g++ -std=c++17 -O2 -shared -fPIC -DCACHEFLOW_PREFILL_EMULATE -Icsrc -Itests/emulation
//       tests/emulation/prefill_emu.cc -o libprefill_emu.so
#include "prefill_emu.h"  // first: it defines the launch-bounds macro the kernel header expects

#include <cstdint>

#include "paged_prefill_wg_kernel.cuh"

namespace {

using cacheflow::prefill::PrefillParams;
constexpr int kEmulatedSms = 3;

struct EmuLauncher {
  const PrefillParams& params;

  template <class Kernel>
  void operator()(Kernel kernel, int64_t num_heads, int64_t num_seqs, int64_t max_query_len,
                  int64_t rows_per_cta, int threads, int smem_bytes) const {
    const PrefillParams p = params;
    const int64_t m_blocks = (max_query_len + rows_per_cta - 1) / rows_per_cta;
    cfemu::RunGrid(Dim3{static_cast<unsigned>(m_blocks), static_cast<unsigned>(num_heads),
                        static_cast<unsigned>(num_seqs)},
                   threads, static_cast<size_t>(smem_bytes), [kernel, p] { kernel(p); });
  }
};

}  // namespace

/*!
 * \brief Runs the op on host memory (same argument meaning as the CUDA op).
 * \param dtype 0 float16, 1 bfloat16, 2 float32.
 * \param force_simple 1 runs the CUDA-core kernel even where tensor cores apply.
 * \param variant tiling of the tensor-core kernel (prefill::TcVariant; kTcWgmma: the Hopper
 *        kernel where it has the head size).
 * \param collectives if not null, receives the number of warp barriers the run took.
 * \param fp8_cache 1: the caches hold FP8 E4M3 bytes, dequantized with k_scale / v_scale.
 * \param logits_soft_cap > 0: soft-cap the scores; 0: none.
 * \param q_token_stride elements between the query's token rows (0: contiguous rows).
 * \return 2 when the Hopper kernel ran, 1 for the mma.sync tensor-core kernel, 0 for the
 *         CUDA-core kernel, -1 for nothing to do.
 */
extern "C" int cf_emu_paged_prefill(int dtype, int force_simple, int variant, void* out,
                                    const void* query, const void* key_cache,
                                    const void* value_cache,
                                    const int32_t* block_tables, const int32_t* query_start_loc,
                                    const int32_t* context_lens, int64_t num_tokens,
                                    int64_t num_heads, int64_t head_size, int64_t num_kv_heads,
                                    int64_t num_blocks, int64_t block_size, int64_t num_seqs,
                                    int64_t max_blocks_per_seq, double scale,
                                    int64_t max_query_len, int64_t sliding_window,
                                    int64_t* collectives, int fp8_cache, double k_scale,
                                    double v_scale, double logits_soft_cap,
                                    int64_t q_token_stride) {
  namespace pf = cacheflow::prefill;
  const int64_t elem = dtype == 2 ? 4 : 2;
  const int64_t row = num_heads * head_size;
  const int64_t q_stride = q_token_stride > 0 ? q_token_stride : row;
  const int64_t out_bytes = num_tokens * row * elem;
  const int64_t q_bytes = num_tokens > 0 ? ((num_tokens - 1) * q_stride + row) * elem : 0;
  const int64_t c_bytes =
      num_blocks * block_size * num_kv_heads * head_size * (fp8_cache ? 1 : elem);
  auto range = [](const void* p, int64_t bytes, const char* name) {
    const auto* b = static_cast<const unsigned char*>(p);
    return cfemu::GlobalRange{b, b + bytes, name};
  };
  cfemu::g_ranges = {range(out, out_bytes, "out"), range(query, q_bytes, "query"),
                     range(key_cache, c_bytes, "key_cache"),
                     range(value_cache, c_bytes, "value_cache")};
  cfemu::g_collectives = 0;

  const int64_t max_q =
      (max_query_len < 0 || max_query_len > num_tokens) ? num_tokens : max_query_len;
  if (num_seqs == 0 || max_q == 0 || num_heads == 0) return -1;
  PrefillParams p = pf::MakePrefillParams(
      out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens, num_heads,
      head_size, num_kv_heads, num_blocks, block_size, max_blocks_per_seq, scale, sliding_window,
      k_scale, v_scale, logits_soft_cap);
  p.q_token_stride = q_stride;
  // A small device: chunks of a few (head, seq) groups, so the tests' grids span several.
  p.order_sms = pf::OrderSms(kEmulatedSms);
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool tc = !force_simple &&
                  pf::UseTensorCores(dtype != 2, head_size,
                                     q_stride * elem % 16 == 0 && aligned(out) &&
                                         aligned(query) && aligned(key_cache) &&
                                         aligned(value_cache));
  const EmuLauncher launch{p};
  const int heads = static_cast<int>(num_heads);
  const int seqs = static_cast<int>(num_seqs);
  const bool wg = tc && (variant == pf::kTcWgmma || variant == pf::kTcWgmmaSerial) &&
                  pf::IsWgHeadSize(head_size);
  if (wg) {
    const bool bf16 = dtype == 1;
    const bool overlap = variant == pf::kTcWgmma;
    if (fp8_cache) {
      bf16 ? pf::DispatchWg<pf::Bf16, true>(head_size, overlap, heads, seqs, max_q, launch)
           : pf::DispatchWg<pf::Fp16, true>(head_size, overlap, heads, seqs, max_q, launch);
    } else {
      bf16 ? pf::DispatchWg<pf::Bf16>(head_size, overlap, heads, seqs, max_q, launch)
           : pf::DispatchWg<pf::Fp16>(head_size, overlap, heads, seqs, max_q, launch);
    }
  } else if (tc && fp8_cache) {
    if (dtype == 0) {
      pf::DispatchTc<pf::Fp16, true>(head_size, variant, heads, seqs, max_q, launch);
    } else {
      pf::DispatchTc<pf::Bf16, true>(head_size, variant, heads, seqs, max_q, launch);
    }
  } else if (tc) {
    if (dtype == 0) {
      pf::DispatchTc<pf::Fp16>(head_size, variant, heads, seqs, max_q, launch);
    } else {
      pf::DispatchTc<pf::Bf16>(head_size, variant, heads, seqs, max_q, launch);
    }
  } else if (fp8_cache) {
    if (dtype == 0) {
      pf::LaunchSimple<pf::Fp16, true>(heads, seqs, max_q, launch);
    } else if (dtype == 1) {
      pf::LaunchSimple<pf::Bf16, true>(heads, seqs, max_q, launch);
    } else {
      pf::LaunchSimple<pf::Fp32, true>(heads, seqs, max_q, launch);
    }
  } else if (dtype == 0) {
    pf::LaunchSimple<pf::Fp16>(heads, seqs, max_q, launch);
  } else if (dtype == 1) {
    pf::LaunchSimple<pf::Bf16>(heads, seqs, max_q, launch);
  } else {
    pf::LaunchSimple<pf::Fp32>(heads, seqs, max_q, launch);
  }
  if (collectives != nullptr) *collectives = static_cast<int64_t>(cfemu::g_collectives);
  return wg ? 2 : (tc ? 1 : 0);
}
