// reshape_and_cache: write the keys and values of new tokens into the paged KV cache.
//
// Layouts (all C-contiguous, same dtype: float16, bfloat16 or float32):
//   key, value:               [num_tokens, num_kv_heads, head_size]
//   key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_size]
//   slot_mapping (int64):     [num_tokens]; slot = block_number * block_size + block_offset;
//                             a negative slot skips the token (padding). Slots at or beyond
//                             num_blocks * block_size are also skipped (never written).
//
// With these layouts the [num_kv_heads, head_size] row of token t is one contiguous run of bytes
// both in `key` and at `slot` in `key_cache`, so the kernel is a row copy. It copies in the widest
// of 16/8/4/2-byte words that divides the row and the alignment of all four pointers.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common.h"

namespace cacheflow {
namespace {

constexpr const char* kOp = "reshape_and_cache";
constexpr int kMaxThreads = 256;

/*!
 * \brief One CUDA block per token; threads stride over the token's row of `row_words` words.
 * \tparam Word the copy unit (uint4 = 16 bytes, uint2, uint32_t, uint16_t).
 */
template <typename Word>
__global__ void ReshapeAndCacheKernel(const Word* __restrict__ key, const Word* __restrict__ value,
                                      Word* __restrict__ key_cache, Word* __restrict__ value_cache,
                                      const int64_t* __restrict__ slot_mapping, int64_t row_words,
                                      int64_t num_slots) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (or out of range): skip
  const Word* k_src = key + token * row_words;
  const Word* v_src = value + token * row_words;
  Word* k_dst = key_cache + slot * row_words;
  Word* v_dst = value_cache + slot * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

template <typename Word>
void Launch(char* key, char* value, char* key_cache, char* value_cache,
            const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes, int64_t num_slots,
            cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  // Round the thread count up to a warp, at most kMaxThreads.
  const int64_t warps = (std::min<int64_t>(row_words, kMaxThreads) + 31) / 32;
  const unsigned threads = static_cast<unsigned>(warps * 32);
  ReshapeAndCacheKernel<Word><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      reinterpret_cast<const Word*>(key), reinterpret_cast<const Word*>(value),
      reinterpret_cast<Word*>(key_cache), reinterpret_cast<Word*>(value_cache), slot_mapping,
      row_words, num_slots);
}

/*! \brief Largest of 16, 8, 4, 2 dividing `row_bytes` and every pointer's address. */
int64_t CopyWidth(int64_t row_bytes, std::initializer_list<const char*> ptrs) {
  for (int64_t width : {16, 8, 4, 2}) {
    bool ok = row_bytes % width == 0;
    for (const char* p : ptrs) ok = ok && reinterpret_cast<std::uintptr_t>(p) % width == 0;
    if (ok) return width;
  }
  return 1;
}

void ReshapeAndCache(TensorView key, TensorView value, TensorView key_cache,
                     TensorView value_cache, TensorView slot_mapping) {
  // -- Shapes and dtypes first (they are reported the same on any device), then the device. --
  CheckNdim(kOp, "key", key, 3, "[num_tokens, num_kv_heads, head_size]");
  TVM_FFI_CHECK(IsFloatKvDtype(key.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key") << "float16, bfloat16 or float32, got " << key.dtype();
  const int64_t num_tokens = key.shape()[0];
  const int64_t num_heads = key.shape()[1];
  const int64_t head_size = key.shape()[2];

  CheckNdim(kOp, "value", value, 3, "[num_tokens, num_kv_heads, head_size]");
  TVM_FFI_CHECK(value.dtype() == key.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value") << key.dtype() << " like 'key', got "
      << value.dtype();
  TVM_FFI_CHECK(value.shape()[0] == num_tokens && value.shape()[1] == num_heads &&
                    value.shape()[2] == head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value") << "of shape " << ShapeStr(key)
      << " like 'key', got " << ShapeStr(value);

  CheckNdim(kOp, "key_cache", key_cache, 4,
            "[num_blocks, block_size, num_kv_heads, head_size]");
  TVM_FFI_CHECK(key_cache.dtype() == key.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << key.dtype() << " like 'key', got "
      << key_cache.dtype();
  const int64_t num_blocks = key_cache.shape()[0];
  const int64_t block_size = key_cache.shape()[1];
  TVM_FFI_CHECK(key_cache.shape()[2] == num_heads && key_cache.shape()[3] == head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << "of shape [num_blocks, block_size, "
      << num_heads << ", " << head_size << "] ([num_kv_heads, head_size] of 'key'), got "
      << ShapeStr(key_cache);

  CheckNdim(kOp, "value_cache", value_cache, 4,
            "[num_blocks, block_size, num_kv_heads, head_size]");
  TVM_FFI_CHECK(value_cache.dtype() == key.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value_cache") << key.dtype() << " like 'key', got "
      << value_cache.dtype();
  TVM_FFI_CHECK(value_cache.shape()[0] == num_blocks && value_cache.shape()[1] == block_size &&
                    value_cache.shape()[2] == num_heads && value_cache.shape()[3] == head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value_cache") << "of shape " << ShapeStr(key_cache)
      << " like 'key_cache', got " << ShapeStr(value_cache);

  CheckNdim(kOp, "slot_mapping", slot_mapping, 1, "[num_tokens]");
  TVM_FFI_CHECK(IsInt64(slot_mapping.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "slot_mapping") << "int64, got " << slot_mapping.dtype();
  TVM_FFI_CHECK(slot_mapping.shape()[0] == num_tokens, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "slot_mapping") << "of shape [" << num_tokens
      << "] (num_tokens of 'key'), got " << ShapeStr(slot_mapping);

  CheckContiguous(kOp, "key", key);
  CheckContiguous(kOp, "value", value);
  CheckContiguous(kOp, "key_cache", key_cache);
  CheckContiguous(kOp, "value_cache", value_cache);
  CheckContiguous(kOp, "slot_mapping", slot_mapping);

  CheckCuda(kOp, "key", key);
  CheckSameDevice(kOp, "value", value, "key", key);
  CheckSameDevice(kOp, "key_cache", key_cache, "key", key);
  CheckSameDevice(kOp, "value_cache", value_cache, "key", key);
  CheckSameDevice(kOp, "slot_mapping", slot_mapping, "key", key);

  TVM_FFI_CHECK(num_tokens <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key") << "at most 2^31-1 tokens, got " << num_tokens;

  const int64_t row_bytes = num_heads * head_size * ElementBytes(key.dtype());
  if (num_tokens == 0 || row_bytes == 0) return;
  const int64_t num_slots = num_blocks * block_size;

  char* k = DataPtr(key);
  char* v = DataPtr(value);
  char* kc = DataPtr(key_cache);
  char* vc = DataPtr(value_cache);
  const int64_t* slots = reinterpret_cast<const int64_t*>(DataPtr(slot_mapping));

  const DLDevice dev = key.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));

  switch (CopyWidth(row_bytes, {k, v, kc, vc})) {
    case 16: Launch<uint4>(k, v, kc, vc, slots, num_tokens, row_bytes, num_slots, stream); break;
    case 8: Launch<uint2>(k, v, kc, vc, slots, num_tokens, row_bytes, num_slots, stream); break;
    case 4: Launch<uint32_t>(k, v, kc, vc, slots, num_tokens, row_bytes, num_slots, stream); break;
    case 2: Launch<uint16_t>(k, v, kc, vc, slots, num_tokens, row_bytes, num_slots, stream); break;
    default: Launch<uint8_t>(k, v, kc, vc, slots, num_tokens, row_bytes, num_slots, stream);
  }
  TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError());
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(reshape_and_cache, cacheflow::ReshapeAndCache);
