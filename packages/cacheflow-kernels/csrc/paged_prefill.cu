// paged_prefill_attention: causal attention of a ragged batch of new tokens over each sequence's
// paged KV cache (prefill, prefix-cached prefill and chunked prefill alike).
//
// Layouts (C-contiguous but for query's token rows, on one CUDA device):
//   out, query:               [num_tokens, num_heads, head_size]      float16, bfloat16 or float32
//                             (query's token rows may be strided: PrefillParams::q_token_stride)
//   key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_size]   dtype of query
//   block_tables (int32):     [num_seqs, max_blocks_per_seq]
//   query_start_loc (int32):  [num_seqs + 1]  cumulative query lengths (cu_seqlens)
//   context_lens (int32):     [num_seqs]      cached + new tokens of each sequence
//   scale:                    softmax scale (> 0)
//   max_query_len:            an upper bound of the longest query, or -1 (then num_tokens)
//   sliding_window:           W > 0: a query at position p sees only keys p - W + 1 .. p; 0: none
// Query j of sequence i sits at position context_lens[i] - q_len_i + j and attends to the keys
// at positions 0..its own, all read from the cache (the new tokens' K/V already written there).
//
// The kernels are in paged_prefill_kernel.cuh: tensor cores for fp16/bf16 with head sizes 64, 80,
// 96, 112, 128 and 256 (pointers 16-byte aligned); a CUDA-core kernel otherwise. On compute
// capability 9.0, CACHEFLOW_PREFILL_VARIANT=wgmma runs the Hopper kernels of
// paged_prefill_wg_kernel.cuh (head sizes 64, 96, 128, 256) instead of the mma.sync ones.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "attention_args.h"
#include "common.h"
#include "device_attribute.cuh"
#include "paged_prefill_launch.cuh"

namespace cacheflow {
namespace {

constexpr const char* kOp = "paged_prefill_attention";
using prefill::kMaxGridYZ;

inline bool IsHalfOrBf16(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 16 && (dt.code == kDLFloat || dt.code == kDLBfloat);
}

/*!
 * \brief Benchmarking knob: CACHEFLOW_PREFILL_VARIANT=m64 or w8 runs another tiling of the fp16
 * head-size-96 and -128 tensor-core kernels, bn64 the head-size-64 tiling before 2026-12-04, w4
 * and bn32 the head-size-256 tilings before 2026-12-04 and 2026-12-03, wgmma the Hopper kernel
 * where it applies (wgmma_serial: without its softmax / P V overlap; see prefill::TcVariant), mma
 * the mma.sync kernels where the default is the Hopper kernel (prefill::WgIsDefault); unset or
 * anything else: default. Read at every call.
 */
int TcVariantFromEnv() {
  const char* v = std::getenv("CACHEFLOW_PREFILL_VARIANT");
  if (v == nullptr) return prefill::kTcDefault;
  if (std::strcmp(v, "m64") == 0) return prefill::kTcM64;
  if (std::strcmp(v, "w8") == 0) return prefill::kTcW8;
  if (std::strcmp(v, "bn32") == 0) return prefill::kTcBn32;
  if (std::strcmp(v, "bn64") == 0) return prefill::kTcBn64;
  if (std::strcmp(v, "w4") == 0) return prefill::kTcW4;
  if (std::strcmp(v, "wgmma") == 0) return prefill::kTcWgmma;
  if (std::strcmp(v, "wgmma_serial") == 0) return prefill::kTcWgmmaSerial;
  if (std::strcmp(v, "mma") == 0) return prefill::kTcMma;
  return prefill::kTcDefault;
}

int MaxSmemOptin(int device) {
  return CachedDeviceAttribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
}

int NumSms(int device) { return CachedDeviceAttribute<cudaDevAttrMultiProcessorCount>(device); }

/*!
 * \brief Whether the Hopper kernels can run here: the library holds them (built for a 90
 * architecture) and the device is compute capability 9.0 (sm_90a code runs nowhere else).
 */
bool HasWgKernels(int device) {
#if defined(CACHEFLOW_HAS_SM90A_PREFILL)
  return CachedDeviceAttribute<cudaDevAttrComputeCapabilityMajor>(device) == 9 &&
         CachedDeviceAttribute<cudaDevAttrComputeCapabilityMinor>(device) == 0;
#else
  (void)device;
  return false;
#endif
}

/*! \brief Launches the Hopper kernel; false when it does not apply (or is not built). */
bool LaunchWg(bool bf16, int64_t head_size, bool overlap, bool fp8_cache,
              const prefill::PrefillParams& p, int heads, int seqs, int64_t max_q,
              cudaStream_t stream) {
#if defined(CACHEFLOW_HAS_SM90A_PREFILL)
  return bf16
             ? prefill::LaunchWgBf16(head_size, overlap, fp8_cache, p, heads, seqs, max_q, stream)
             : prefill::LaunchWgFp16(head_size, overlap, fp8_cache, p, heads, seqs, max_q, stream);
#else
  (void)bf16, (void)head_size, (void)overlap, (void)fp8_cache, (void)p, (void)heads, (void)seqs,
      (void)max_q, (void)stream;
  return false;
#endif
}

bool Aligned16(std::initializer_list<const char*> ptrs) {
  for (const char* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

void PagedPrefillAttention(TensorView out, TensorView query, TensorView key_cache,
                           TensorView value_cache, TensorView block_tables,
                           TensorView query_start_loc, TensorView context_lens, double scale,
                           int64_t max_query_len, int64_t sliding_window, double k_scale,
                           double v_scale, double logits_soft_cap) {
  // -- Shapes and dtypes first (reported the same on any device), then layout, then device. --
  const PagedAttentionShapes s = CheckPagedAttentionArgs(
      kOp, "num_tokens", false, out, query, key_cache, value_cache, block_tables, context_lens);
  const int64_t num_tokens = s.num_rows;
  const int64_t num_heads = s.num_heads;
  const int64_t head_size = s.head_size;
  const int64_t num_blocks = s.num_blocks;
  const int64_t block_size = s.block_size;
  const int64_t num_kv_heads = s.num_kv_heads;
  const int64_t num_seqs = s.num_seqs;
  const int64_t max_blocks_per_seq = s.max_blocks_per_seq;

  CheckNdim(kOp, "query_start_loc", query_start_loc, 1, "[num_seqs + 1]");
  TVM_FFI_CHECK(IsInt32Dtype(query_start_loc.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query_start_loc") << "int32, got " << query_start_loc.dtype();
  TVM_FFI_CHECK(query_start_loc.shape()[0] == num_seqs + 1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query_start_loc") << "of shape [" << num_seqs + 1
      << "] (num_seqs + 1, num_seqs from 'block_tables'), got " << ShapeStr(query_start_loc);

  // -- Sizes the kernels can index. --
  TVM_FFI_CHECK(head_size >= 1 && head_size <= prefill::kSimpleMaxHeadSize, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "of head_size between 1 and "
      << prefill::kSimpleMaxHeadSize << ", got " << ShapeStr(query);
  TVM_FFI_CHECK(num_tokens <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "at most 2^31-1 tokens, got " << num_tokens;
  TVM_FFI_CHECK(num_blocks * block_size <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << "at most 2^31-1 slots (num_blocks * "
      << "block_size), got " << num_blocks * block_size;
  TVM_FFI_CHECK(num_heads <= kMaxGridYZ, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "at most " << kMaxGridYZ << " heads, got "
      << num_heads;
  TVM_FFI_CHECK(num_seqs <= kMaxGridYZ, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_tables") << "at most " << kMaxGridYZ
      << " sequences, got " << num_seqs;
  TVM_FFI_CHECK(max_blocks_per_seq <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_tables") << "at most 2^31-1 blocks per sequence, got "
      << max_blocks_per_seq;
  TVM_FFI_CHECK(std::isfinite(scale) && scale > 0.0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "scale") << "a finite number > 0, got " << scale;
  TVM_FFI_CHECK(sliding_window >= 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "sliding_window") << ">= 1 (or 0: none), got "
      << sliding_window;
  TVM_FFI_CHECK(max_query_len >= -1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "max_query_len") << ">= 0 (or -1: unknown), got "
      << max_query_len;

  CheckCacheScalesAndSoftCap(kOp, s.fp8_cache, k_scale, v_scale, logits_soft_cap);

  CheckContiguous(kOp, "query_start_loc", query_start_loc);
  CheckPagedAttentionLayoutAndDevice(kOp, out, query, key_cache, value_cache, block_tables,
                                     context_lens, /*strided_query=*/true);
  const int64_t q_stride = CheckRowStrided(kOp, "query", query);
  CheckSameDevice(kOp, "query_start_loc", query_start_loc, "query", query);

  // A query is never longer than the batch: -1 (unknown) and larger bounds become num_tokens.
  const int64_t max_q =
      (max_query_len < 0 || max_query_len > num_tokens) ? num_tokens : max_query_len;
  if (num_seqs == 0 || max_q == 0 || num_heads == 0) return;

  prefill::PrefillParams p = prefill::MakePrefillParams(
      DataPtr(out), DataPtr(query), DataPtr(key_cache), DataPtr(value_cache),
      reinterpret_cast<const int32_t*>(DataPtr(block_tables)),
      reinterpret_cast<const int32_t*>(DataPtr(query_start_loc)),
      reinterpret_cast<const int32_t*>(DataPtr(context_lens)), num_heads, head_size, num_kv_heads,
      num_blocks, block_size, max_blocks_per_seq, scale, sliding_window, k_scale, v_scale,
      logits_soft_cap);
  p.q_token_stride = q_stride;

  // cp.async reads 16-byte chunks of query rows: the row stride must keep them aligned too.
  const bool q_rows_aligned = q_stride * ElementBytes(query.dtype()) % 16 == 0;
  const bool tensor_cores = prefill::UseTensorCores(
      IsHalfOrBf16(query.dtype()), head_size,
      q_rows_aligned &&
          Aligned16({DataPtr(query), DataPtr(out), DataPtr(key_cache), DataPtr(value_cache)}));

  const DLDevice dev = query.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  // The chunked CTA order indexes the grid with 32 bits (m-blocks <= max_q).
  if (max_q * num_heads * num_seqs < (int64_t{1} << 31)) {
    p.order_sms = prefill::OrderSms(NumSms(dev.device_id));
  }
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));
  const int heads = static_cast<int>(num_heads);
  const int seqs = static_cast<int>(num_seqs);
  const bool bf16 = query.dtype().code == kDLBfloat;
  const bool fp32 = query.dtype().bits == 32;

  bool launched = false;
  if (tensor_cores) {
    int variant = TcVariantFromEnv();
    if (head_size == 256 && variant != prefill::kTcBn32) {
      // Below 133 KB per CTA the 100 KB tiling; sm_86/89 (99 KB) the 83 KB one.
      const int smem = MaxSmemOptin(dev.device_id);
      if (smem < prefill::kD256SmemBytes) {
        variant = smem < prefill::kD256W4SmemBytes ? prefill::kTcBn32 : prefill::kTcW4;
      }
    }
    const bool fp8 = s.fp8_cache;
    if (variant == prefill::kTcDefault && prefill::WgIsDefault(head_size, fp8)) {
      variant = prefill::kTcWgmmaSerial;  // where the Hopper kernel is not built or cannot run,
    }                                     // the default mma.sync kernel below
    const bool wgmma = variant == prefill::kTcWgmma || variant == prefill::kTcWgmmaSerial;
    if (wgmma && prefill::IsWgHeadSize(head_size) && HasWgKernels(dev.device_id)) {
      launched = LaunchWg(bf16, head_size, variant == prefill::kTcWgmma, fp8, p, heads, seqs,
                          max_q, stream);
    }
    if (!launched) {
      launched =
          bf16 ? prefill::LaunchTcBf16(head_size, variant, fp8, p, heads, seqs, max_q, stream)
               : prefill::LaunchTcFp16(head_size, variant, fp8, p, heads, seqs, max_q, stream);
    }
  }
  if (!launched) {
    const prefill::CudaLauncher launch{p, stream};
    if (s.fp8_cache) {
      if (fp32) {
        prefill::LaunchSimple<prefill::Fp32, true>(heads, seqs, max_q, launch);
      } else if (bf16) {
        prefill::LaunchSimple<prefill::Bf16, true>(heads, seqs, max_q, launch);
      } else {
        prefill::LaunchSimple<prefill::Fp16, true>(heads, seqs, max_q, launch);
      }
    } else if (fp32) {
      prefill::LaunchSimple<prefill::Fp32>(heads, seqs, max_q, launch);
    } else if (bf16) {
      prefill::LaunchSimple<prefill::Bf16>(heads, seqs, max_q, launch);
    } else {
      prefill::LaunchSimple<prefill::Fp16>(heads, seqs, max_q, launch);
    }
  }
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_prefill_attention, cacheflow::PagedPrefillAttention);
