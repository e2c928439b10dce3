// reshape_and_cache: write the keys and values of new tokens into the paged KV cache.
//
// Layouts (C-contiguous, except that key and value may have strided token rows, e.g. views of a
// fused QKV projection output; key and value float16, bfloat16 or float32, the caches the same
// dtype or FP8 E4M3 (float8_e4m3fn, or uint8 holding its bytes)):
//   key, value:               [num_tokens, num_kv_heads, head_size] (each token's row dense)
//   key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_size]
//   slot_mapping (int64):     [num_tokens]; slot = block_number * block_size + block_offset;
//                             a negative slot skips the token (padding). Slots at or beyond
//                             num_blocks * block_size are also skipped (never written).
//
// With these layouts the [num_kv_heads, head_size] row of token t is one contiguous run of bytes
// both in `key` and at `slot` in `key_cache`, so the kernel is a row copy. It copies in the widest
// of 16/8/4/2-byte words that divides the row, the token strides and the alignment of all four
// pointers.
// FP8 caches: each element is divided by its scale (k_scale for keys, v_scale for values) and
// rounded to the nearest E4M3 value, saturating at +-448 (the checkpoint's scales are chosen so
// that the values fit); four elements per thread step, one 4-byte store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "common.h"
#include "elementwise_common.cuh"
#include "pdl.cuh"
#include "pdl_launch.cuh"

namespace cacheflow {
namespace {

using elementwise::QuantizeFp8;
using elementwise::ToFloat;

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
                                      int64_t k_stride, int64_t v_stride, int64_t num_slots) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (or out of range): skip
  const Word* k_src = key + token * k_stride;
  const Word* v_src = value + token * v_stride;
  Word* k_dst = key_cache + slot * row_words;
  Word* v_dst = value_cache + slot * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

/*! \brief Bytes of one token's row and between consecutive tokens of key and value. */
struct RowBytes {
  int64_t row;
  int64_t key_stride;
  int64_t value_stride;
};

template <typename Word>
void Launch(char* key, char* value, char* key_cache, char* value_cache,
            const int64_t* slot_mapping, int64_t num_tokens, RowBytes rb, int64_t num_slots,
            cudaStream_t stream) {
  constexpr int64_t kWord = static_cast<int64_t>(sizeof(Word));
  const int64_t row_words = rb.row / kWord;
  // Round the thread count up to a warp, at most kMaxThreads.
  const int64_t warps = (std::min<int64_t>(row_words, kMaxThreads) + 31) / 32;
  const unsigned threads = static_cast<unsigned>(warps * 32);
  LaunchChained(
      ReshapeAndCacheKernel<Word>, dim3(static_cast<unsigned>(num_tokens)), dim3(threads), 0,
      stream, reinterpret_cast<const Word*>(key), reinterpret_cast<const Word*>(value),
      reinterpret_cast<Word*>(key_cache), reinterpret_cast<Word*>(value_cache), slot_mapping,
      row_words, rb.key_stride / kWord, rb.value_stride / kWord, num_slots);
}

/*!
 * \brief FP8 caches: one CUDA block per token; threads stride over the row in groups of 4
 * elements (one 4-byte store) when `row % 4 == 0` and the pointers allow it, else one by one.
 */
template <typename T, bool kVec4>
__global__ void ReshapeAndCacheFp8Kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         uint8_t* __restrict__ key_cache,
                                         uint8_t* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t row,
                                         int64_t k_stride, int64_t v_stride, int64_t num_slots,
                                         float k_scale, float v_scale) {
  PdlWaitForPrevious();  // before any memory access (pdl.cuh)
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (or out of range): skip
  const T* k_src = key + token * k_stride;
  const T* v_src = value + token * v_stride;
  uint8_t* k_dst = key_cache + slot * row;
  uint8_t* v_dst = value_cache + slot * row;
  if constexpr (kVec4) {
    for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < row; i += 4 * blockDim.x) {
      uint32_t kw = 0;
      uint32_t vw = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        kw |= static_cast<uint32_t>(QuantizeFp8(ToFloat(k_src[i + e]), k_scale)) << (8 * e);
        vw |= static_cast<uint32_t>(QuantizeFp8(ToFloat(v_src[i + e]), v_scale)) << (8 * e);
      }
      *reinterpret_cast<uint32_t*>(k_dst + i) = kw;
      *reinterpret_cast<uint32_t*>(v_dst + i) = vw;
    }
  } else {
    for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
      k_dst[i] = QuantizeFp8(ToFloat(k_src[i]), k_scale);
      v_dst[i] = QuantizeFp8(ToFloat(v_src[i]), v_scale);
    }
  }
}

template <typename T>
void LaunchFp8(const char* key, const char* value, char* key_cache, char* value_cache,
               const int64_t* slot_mapping, int64_t num_tokens, int64_t row, int64_t k_stride,
               int64_t v_stride, int64_t num_slots, float k_scale, float v_scale, bool vec4,
               cudaStream_t stream) {
  const int64_t per_thread = vec4 ? 4 : 1;
  const int64_t steps = (row + per_thread - 1) / per_thread;
  const int64_t warps = (std::min<int64_t>(steps, kMaxThreads) + 31) / 32;
  const unsigned threads = static_cast<unsigned>(warps * 32);
  const T* k = reinterpret_cast<const T*>(key);
  const T* v = reinterpret_cast<const T*>(value);
  uint8_t* kc = reinterpret_cast<uint8_t*>(key_cache);
  uint8_t* vc = reinterpret_cast<uint8_t*>(value_cache);
  if (vec4) {
    LaunchChained(ReshapeAndCacheFp8Kernel<T, true>, dim3(static_cast<unsigned>(num_tokens)),
                  dim3(threads), 0, stream, k, v, kc, vc, slot_mapping, row, k_stride, v_stride,
                  num_slots, k_scale, v_scale);
  } else {
    LaunchChained(ReshapeAndCacheFp8Kernel<T, false>, dim3(static_cast<unsigned>(num_tokens)),
                  dim3(threads), 0, stream, k, v, kc, vc, slot_mapping, row, k_stride, v_stride,
                  num_slots, k_scale, v_scale);
  }
}

/*! \brief Largest of 16, 8, 4, 2 dividing every byte count in `sizes` and every pointer's
 * address. */
int64_t CopyWidth(std::initializer_list<int64_t> sizes, std::initializer_list<const char*> ptrs) {
  for (int64_t width : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t n : sizes) ok = ok && n % width == 0;
    for (const char* p : ptrs) ok = ok && reinterpret_cast<std::uintptr_t>(p) % width == 0;
    if (ok) return width;
  }
  return 1;
}

void ReshapeAndCache(TensorView key, TensorView value, TensorView key_cache,
                     TensorView value_cache, TensorView slot_mapping, double k_scale,
                     double v_scale) {
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
  const bool fp8 = IsFp8CacheDtype(key_cache.dtype());
  TVM_FFI_CHECK(key_cache.dtype() == key.dtype() || fp8, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << key.dtype()
      << " like 'key' (or an FP8 E4M3 cache: float8_e4m3fn or uint8), got " << key_cache.dtype();
  const int64_t num_blocks = key_cache.shape()[0];
  const int64_t block_size = key_cache.shape()[1];
  TVM_FFI_CHECK(key_cache.shape()[2] == num_heads && key_cache.shape()[3] == head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << "of shape [num_blocks, block_size, "
      << num_heads << ", " << head_size << "] ([num_kv_heads, head_size] of 'key'), got "
      << ShapeStr(key_cache);

  CheckNdim(kOp, "value_cache", value_cache, 4,
            "[num_blocks, block_size, num_kv_heads, head_size]");
  TVM_FFI_CHECK(value_cache.dtype() == key_cache.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value_cache") << key_cache.dtype() << " like 'key_cache', got "
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

  const char* scale_names[2] = {"k_scale", "v_scale"};
  const double scales[2] = {k_scale, v_scale};
  for (int i = 0; i < 2; ++i) {
    TVM_FFI_CHECK(std::isfinite(scales[i]) && scales[i] > 0.0, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, scale_names[i]) << "a finite number > 0, got " << scales[i];
    TVM_FFI_CHECK(fp8 || scales[i] == 1.0, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, scale_names[i])
        << "1.0 unless the caches are FP8 (the scale quantizes them), got " << scales[i];
  }

  const int64_t key_stride = CheckRowStrided(kOp, "key", key);  // elements between tokens
  const int64_t value_stride = CheckRowStrided(kOp, "value", value);
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

  const int64_t elem = ElementBytes(key.dtype());
  const int64_t row_bytes = num_heads * head_size * elem;
  const RowBytes rb{row_bytes, key_stride * elem, value_stride * elem};
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

  if (fp8) {
    const int64_t row = num_heads * head_size;
    const bool vec4 = row % 4 == 0 && CopyWidth({4}, {kc, vc}) >= 4;
    const DLDataType dt = key.dtype();
    const float ks = static_cast<float>(k_scale);
    const float vs = static_cast<float>(v_scale);
    if (dt.code == kDLFloat && dt.bits == 16) {
      LaunchFp8<__half>(k, v, kc, vc, slots, num_tokens, row, key_stride, value_stride,
                        num_slots, ks, vs, vec4, stream);
    } else if (dt.code == kDLBfloat) {
      LaunchFp8<__nv_bfloat16>(k, v, kc, vc, slots, num_tokens, row, key_stride, value_stride,
                               num_slots, ks, vs, vec4, stream);
    } else {
      LaunchFp8<float>(k, v, kc, vc, slots, num_tokens, row, key_stride, value_stride,
                       num_slots, ks, vs, vec4, stream);
    }
    TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError());
    return;
  }
  switch (CopyWidth({rb.row, rb.key_stride, rb.value_stride}, {k, v, kc, vc})) {
    case 16: Launch<uint4>(k, v, kc, vc, slots, num_tokens, rb, num_slots, stream); break;
    case 8: Launch<uint2>(k, v, kc, vc, slots, num_tokens, rb, num_slots, stream); break;
    case 4: Launch<uint32_t>(k, v, kc, vc, slots, num_tokens, rb, num_slots, stream); break;
    case 2: Launch<uint16_t>(k, v, kc, vc, slots, num_tokens, rb, num_slots, stream); break;
    default: Launch<uint8_t>(k, v, kc, vc, slots, num_tokens, rb, num_slots, stream);
  }
  TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError());
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(reshape_and_cache, cacheflow::ReshapeAndCache);
