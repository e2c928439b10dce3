// rotary_embedding_with_cache: the rotary embedding of a step's queries and keys and the write of
// its keys and values into the paged KV cache, in one kernel. The result is exactly that of
// rotary_embedding(positions, query, key, ...) followed by reshape_and_cache(key, value, ...):
// query and key rotated in place, the rotated key and the value stored at each token's slot.
//
// Layouts (16-bit activations only; the caller checks them, see _rotary_ops.py):
//   positions, slot_mapping (int64): [num_tokens], contiguous
//   query (float16/bfloat16):  [num_tokens, num_heads * head_size], last dimension contiguous,
//                              rows may be further apart (a slice of a fused qkv tensor)
//   key, value (query's dtype): [num_tokens, num_kv_heads * head_size], same rule
//   cos_sin_cache (float32):   [max_position, head_size]: every feature rotates (full rotary)
//   key_cache, value_cache:    [num_blocks, block_size, num_kv_heads, head_size], the query's
//                              dtype or FP8 E4M3 bytes (stored as x / scale, saturating)
// with head_size a multiple of 16, the rows' strides multiples of 8 elements and every pointer
// 16-byte aligned: each access moves 8 elements.
//
// Why: in a decode step both ops are a few microseconds of latency (one CTA per token, a
// position or slot read, then the rows); one kernel pays that once and reads each key once.
//
// One CTA per token. A "unit" is 8 elements: neox style, 8 features of x1 and their 8 partners of
// x2 (half a head apart); gpt-j style, 8 interleaved features (4 pairs). Launched with PDL
// (pdl.cuh), the CTA reads the token's position and slot and stages its cos/sin row in shared
// memory before it waits for the kernel before it: none of these is written by that kernel (in a
// step it is the qkv projection; positions and slots come from the step's input upload, and the
// cos/sin table from model load), so their dependent loads overlap its tail. After the wait each
// thread issues its first query/key unit and its first value unit, then rotates its units
// (storing keys both in place and into the cache) and copies its value units. A position outside
// [0, max_position) leaves query and key unrotated (the cache still gets them, as the two ops
// would); a negative slot, or one past the cache, skips the cache writes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using namespace elementwise;  // NOLINT(build/namespaces)

constexpr const char* kOp = "rotary_embedding_with_cache";
constexpr int kUnit = 8;          // elements per access (16 bytes of a 16-bit type)
constexpr int kMaxThreads = 512;
constexpr int64_t kMaxHeadSize = 8192;  // cos/sin row staged in shared memory (32 KB)

/*! \brief Stores 8 elements into a cache row: as they are (16 bytes), or as 8 E4M3 bytes. */
template <typename T, bool kFp8>
__device__ __forceinline__ void StoreCacheUnit(void* dst, const Vec<T, kUnit>& x, float scale) {
  if constexpr (kFp8) {
    uint32_t w[2] = {0u, 0u};
#pragma unroll
    for (int e = 0; e < kUnit; ++e) {
      w[e / 4] |= static_cast<uint32_t>(QuantizeFp8(ToFloat(x.v[e]), scale)) << (8 * (e % 4));
    }
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  } else {
    StoreVec<T, kUnit, kUnit>(static_cast<T*>(dst), x);
  }
}

template <typename T, bool kNeox, bool kFp8>
__global__ void __launch_bounds__(kMaxThreads)
    RotaryCacheKernel(const int64_t* __restrict__ positions,
                      const int64_t* __restrict__ slot_mapping, T* query, T* key,
                      const T* __restrict__ value, void* __restrict__ key_cache,
                      void* __restrict__ value_cache, const float* __restrict__ cos_sin_cache,
                      int64_t query_stride, int64_t key_stride, int64_t value_stride,
                      int num_heads, int num_kv_heads, int head_size, int64_t max_position,
                      int64_t num_slots, float k_scale, float v_scale) {
  extern __shared__ float cos_sin[];  // [head_size]: cos | sin, rounded to T
  constexpr int64_t kCacheElem = kFp8 ? 1 : sizeof(T);
  const int64_t token = blockIdx.x;
  // Before the wait: only what the kernel before this one does not write (see above).
  const int64_t pos = positions[token];
  const int64_t slot = slot_mapping[token];
  const bool rotate = pos >= 0 && pos < max_position;  // uniform over the block
  const bool cached = slot >= 0 && slot < num_slots;
  if (rotate) {
    const float* row = cos_sin_cache + pos * head_size;
    for (int i = threadIdx.x; i < head_size; i += blockDim.x) cos_sin[i] = RoundTo<T>(row[i]);
  }
  PdlWaitForPrevious();  // before reading the step's activations (pdl.cuh)
  const int half = head_size / 2;
  const int units = kNeox ? half / kUnit : head_size / kUnit;  // query/key units per head
  const int qk_total = (num_heads + num_kv_heads) * units;
  const int v_total = num_kv_heads * head_size / kUnit;
  T* q_row = query + token * query_stride;
  T* k_row = key + token * key_stride;
  const T* v_row = value + token * value_stride;
  // Unit u: its head, and its first element i0 within the head.
  auto locate = [&](int u, int& head, int& i0) -> T* {
    head = u / units;
    i0 = (u - head * units) * kUnit;
    return head < num_heads ? q_row + static_cast<int64_t>(head) * head_size
                            : k_row + static_cast<int64_t>(head - num_heads) * head_size;
  };

  // Everything a thread's first units need that does not depend on the position or the slot.
  int u = threadIdx.x;
  int head = 0, i0 = 0;
  T* base = nullptr;
  Vec<T, kUnit> x1{}, x2{};
  if (u < qk_total) {
    base = locate(u, head, i0);
    x1 = LoadVec<T, kUnit, kUnit>(base + i0);
    if constexpr (kNeox) x2 = LoadVec<T, kUnit, kUnit>(base + half + i0);
  }
  int vu = threadIdx.x;
  Vec<T, kUnit> xv{};
  if (vu < v_total) xv = LoadVec<T, kUnit, kUnit>(v_row + static_cast<int64_t>(vu) * kUnit);
  const int64_t row_elems = static_cast<int64_t>(num_kv_heads) * head_size;
  char* kc_row = static_cast<char*>(key_cache) + (cached ? slot : 0) * row_elems * kCacheElem;
  char* vc_row = static_cast<char*>(value_cache) + (cached ? slot : 0) * row_elems * kCacheElem;
  if (rotate) __syncthreads();  // the cos/sin row staged above

  while (u < qk_total) {
    // The key head's row in the cache (used only for key units).
    const bool is_key = head >= num_heads;
    char* kc_head = kc_row + static_cast<int64_t>(is_key ? head - num_heads : 0) * head_size *
                                 kCacheElem;
    if constexpr (kNeox) {
      Vec<T, kUnit> y1 = x1, y2 = x2;
      if (rotate) {
        RotateNeoxUnit<T, kUnit>(cos_sin, half, i0, x1, x2, y1, y2);
        StoreVec<T, kUnit, kUnit>(base + i0, y1);
        StoreVec<T, kUnit, kUnit>(base + half + i0, y2);
      }
      if (is_key && cached) {
        StoreCacheUnit<T, kFp8>(kc_head + i0 * kCacheElem, y1, k_scale);
        StoreCacheUnit<T, kFp8>(kc_head + (half + i0) * kCacheElem, y2, k_scale);
      }
    } else {
      Vec<T, kUnit> y = x1;
      if (rotate) {
        y = RotateGptjUnit<T, kUnit>(cos_sin, half, i0, x1);
        StoreVec<T, kUnit, kUnit>(base + i0, y);
      }
      if (is_key && cached) StoreCacheUnit<T, kFp8>(kc_head + i0 * kCacheElem, y, k_scale);
    }
    u += blockDim.x;
    if (u < qk_total) {
      base = locate(u, head, i0);
      x1 = LoadVec<T, kUnit, kUnit>(base + i0);
      if constexpr (kNeox) x2 = LoadVec<T, kUnit, kUnit>(base + half + i0);
    }
  }
  if (!cached) return;
  while (vu < v_total) {
    StoreCacheUnit<T, kFp8>(vc_row + static_cast<int64_t>(vu) * kUnit * kCacheElem, xv, v_scale);
    vu += blockDim.x;
    if (vu < v_total) xv = LoadVec<T, kUnit, kUnit>(v_row + static_cast<int64_t>(vu) * kUnit);
  }
}

/*! \brief Checks a [num_tokens, heads * head_size] activation of the op; returns its row stride
 * in elements. */
int64_t CheckRows(const char* name, const TensorView& t, int64_t num_tokens, int64_t width,
                  const char* layout) {
  CheckNdim(kOp, name, t, 2, layout);
  TVM_FFI_CHECK(t.shape()[0] == num_tokens && t.shape()[1] == width, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "of shape [" << num_tokens << ", " << width << "], got "
      << ShapeStr(t);
  const int64_t stride = t.IsContiguous() || num_tokens <= 1 ? width : t.strides()[0];
  TVM_FFI_CHECK(t.IsContiguous() || ((width <= 1 || t.strides()[1] == 1) && stride >= width),
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "contiguous in its last dimension with "
      << "non-overlapping rows, got shape " << ShapeStr(t);
  TVM_FFI_CHECK(stride % kUnit == 0 && IsAligned(DataPtr(t), 16), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "16-byte aligned with a row stride that is a "
      << "multiple of 8 elements, got row stride " << stride;
  return stride;
}

void CheckCache(const char* name, const TensorView& c, const TensorView& key,
                int64_t num_kv_heads, int64_t head_size) {
  CheckNdim(kOp, name, c, 4, "[num_blocks, block_size, num_kv_heads, head_size]");
  TVM_FFI_CHECK(c.dtype() == key.dtype() || IsFp8CacheDtype(c.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << key.dtype()
      << " like 'key' (or an FP8 E4M3 cache: float8_e4m3fn or uint8), got " << c.dtype();
  TVM_FFI_CHECK(c.shape()[2] == num_kv_heads && c.shape()[3] == head_size, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "of shape [num_blocks, block_size, " << num_kv_heads
      << ", " << head_size << "], got " << ShapeStr(c);
  CheckContiguous(kOp, name, c);
  TVM_FFI_CHECK(IsAligned(DataPtr(c), 16), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << "16-byte aligned";
}

void RotaryEmbeddingWithCache(TensorView positions, TensorView query, TensorView key,
                              TensorView value, TensorView cos_sin_cache, int64_t head_size,
                              bool is_neox, TensorView key_cache, TensorView value_cache,
                              TensorView slot_mapping, double k_scale, double v_scale) {
  CheckNdim(kOp, "positions", positions, 1, "[num_tokens]");
  TVM_FFI_CHECK(IsInt64(positions.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "positions") << "int64, got " << positions.dtype();
  const int64_t num_tokens = positions.shape()[0];
  TVM_FFI_CHECK(head_size > 0 && head_size % 16 == 0 && head_size <= kMaxHeadSize, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "head_size") << "a positive multiple of 16 (at most "
      << kMaxHeadSize << "), got " << head_size;
  const DLDataType dt = query.dtype();
  TVM_FFI_CHECK((dt.code == kDLFloat || dt.code == kDLBfloat) && dt.bits == 16 && dt.lanes == 1,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "float16 or bfloat16, got " << dt;
  TVM_FFI_CHECK(query.ndim() == 2 && query.shape()[1] % head_size == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "of shape [num_tokens, num_heads * head_size], got "
      << ShapeStr(query);
  TVM_FFI_CHECK(key.ndim() == 2 && key.shape()[1] % head_size == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key") << "of shape [num_tokens, num_kv_heads * head_size], got "
      << ShapeStr(key);
  const int64_t num_heads = query.shape()[1] / head_size;
  const int64_t num_kv_heads = key.shape()[1] / head_size;
  TVM_FFI_CHECK(key.dtype() == dt && value.dtype() == dt, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key") << "and 'value' of the dtype of 'query' (" << dt
      << "), got " << key.dtype() << " and " << value.dtype();
  const int64_t q_stride = CheckRows("query", query, num_tokens, num_heads * head_size,
                                     "[num_tokens, num_heads * head_size]");
  const int64_t k_stride = CheckRows("key", key, num_tokens, num_kv_heads * head_size,
                                     "[num_tokens, num_kv_heads * head_size]");
  const int64_t v_stride = CheckRows("value", value, num_tokens, num_kv_heads * head_size,
                                     "[num_tokens, num_kv_heads * head_size]");
  CheckNdim(kOp, "cos_sin_cache", cos_sin_cache, 2, "[max_position, head_size]");
  const DLDataType cs = cos_sin_cache.dtype();
  TVM_FFI_CHECK(cs.code == kDLFloat && cs.bits == 32 && cs.lanes == 1 &&
                    cos_sin_cache.shape()[1] == head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "cos_sin_cache") << "float32 of shape [max_position, "
      << head_size << "] (every feature rotates), got " << cs << " " << ShapeStr(cos_sin_cache);
  CheckContiguous(kOp, "cos_sin_cache", cos_sin_cache);
  CheckContiguous(kOp, "positions", positions);
  CheckCache("key_cache", key_cache, key, num_kv_heads, head_size);
  CheckCache("value_cache", value_cache, key, num_kv_heads, head_size);
  TVM_FFI_CHECK(value_cache.dtype() == key_cache.dtype() &&
                    value_cache.shape()[0] == key_cache.shape()[0] &&
                    value_cache.shape()[1] == key_cache.shape()[1],
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value_cache") << "of the dtype and shape of 'key_cache' ("
      << key_cache.dtype() << " " << ShapeStr(key_cache) << "), got " << value_cache.dtype()
      << " " << ShapeStr(value_cache);
  CheckNdim(kOp, "slot_mapping", slot_mapping, 1, "[num_tokens]");
  TVM_FFI_CHECK(IsInt64(slot_mapping.dtype()) && slot_mapping.shape()[0] == num_tokens,
                ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "slot_mapping") << "int64 of shape [" << num_tokens
      << "], got " << slot_mapping.dtype() << " " << ShapeStr(slot_mapping);
  CheckContiguous(kOp, "slot_mapping", slot_mapping);
  const bool fp8 = IsFp8CacheDtype(key_cache.dtype());
  const char* scale_names[2] = {"k_scale", "v_scale"};
  const double scales[2] = {k_scale, v_scale};
  for (int i = 0; i < 2; ++i) {
    TVM_FFI_CHECK(std::isfinite(scales[i]) && scales[i] > 0.0 && (fp8 || scales[i] == 1.0),
                  ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, scale_names[i])
        << "a finite number > 0, and 1.0 unless the caches are FP8, got " << scales[i];
  }
  CheckCuda(kOp, "positions", positions);
  for (const auto& [name, t] : {std::pair<const char*, const TensorView*>{"query", &query},
                                {"key", &key},
                                {"value", &value},
                                {"cos_sin_cache", &cos_sin_cache},
                                {"key_cache", &key_cache},
                                {"value_cache", &value_cache},
                                {"slot_mapping", &slot_mapping}}) {
    CheckSameDevice(kOp, name, *t, "positions", positions);
  }
  CheckRotaryExtent(kOp, num_tokens, num_heads, num_kv_heads, head_size);
  if (num_tokens == 0 || num_heads + num_kv_heads == 0) return;

  const int units = static_cast<int>((is_neox ? head_size / 2 : head_size) / kUnit);
  const int64_t qk_total = (num_heads + num_kv_heads) * units;
  const int64_t v_total = num_kv_heads * head_size / kUnit;
  const unsigned threads = static_cast<unsigned>(
      (std::min<int64_t>(std::max(qk_total, v_total), kMaxThreads) + 31) / 32 * 32);
  const size_t smem = static_cast<size_t>(head_size) * sizeof(float);
  const int64_t num_slots = key_cache.shape()[0] * key_cache.shape()[1];
  const DLDevice dev = positions.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const cudaStream_t stream = EnvStream(dev);
  const auto launch = [&](auto tag, auto neox, auto fp8_tag) {
    using T = decltype(tag);
    const auto kernel = RotaryCacheKernel<T, decltype(neox)::value, decltype(fp8_tag)::value>;
    LaunchChained(kernel, dim3(static_cast<unsigned>(num_tokens)), dim3(threads), smem, stream,
                  reinterpret_cast<const int64_t*>(DataPtr(positions)),
                  reinterpret_cast<const int64_t*>(DataPtr(slot_mapping)),
                  reinterpret_cast<T*>(DataPtr(query)), reinterpret_cast<T*>(DataPtr(key)),
                  reinterpret_cast<const T*>(DataPtr(value)),
                  static_cast<void*>(DataPtr(key_cache)), static_cast<void*>(DataPtr(value_cache)),
                  reinterpret_cast<const float*>(DataPtr(cos_sin_cache)), q_stride, k_stride,
                  v_stride, static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
                  static_cast<int>(head_size), cos_sin_cache.shape()[0], num_slots,
                  static_cast<float>(k_scale), static_cast<float>(v_scale));
  };
  const auto by_style = [&](auto tag, auto fp8_tag) {
    if (is_neox) {
      launch(tag, std::true_type{}, fp8_tag);
    } else {
      launch(tag, std::false_type{}, fp8_tag);
    }
  };
  const auto by_cache = [&](auto tag) {
    if (fp8) {
      by_style(tag, std::true_type{});
    } else {
      by_style(tag, std::false_type{});
    }
  };
  if (dt.code == kDLBfloat) {
    by_cache(__nv_bfloat16{});
  } else {
    by_cache(__half{});
  }
  CheckLaunch();
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(rotary_embedding_with_cache, cacheflow::RotaryEmbeddingWithCache);
