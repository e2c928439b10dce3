// Host-side argument checks shared by the two attention ops over the paged KV cache
// (paged_attention: decode, paged_prefill_attention: prefill), so that both accept the same
// tensors (the FP8 caches included) and report the same mistakes the same way.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace cacheflow {

inline bool IsInt32Dtype(DLDataType dt) {
  return dt.code == kDLInt && dt.bits == 32 && dt.lanes == 1;
}

/*! \brief The sizes of a checked attention call. */
struct PagedAttentionShapes {
  int64_t num_rows;  // query rows: sequences (decode) or tokens (prefill)
  int64_t num_heads;
  int64_t head_size;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t num_seqs;
  int64_t max_blocks_per_seq;
  bool fp8_cache;  // the caches hold FP8 E4M3 bytes
};

/*!
 * \brief Checks the shapes and dtypes of the tensors both ops take: out and query [rows, num_heads, head_size] (float16, bfloat16 or float32, the same),
 * key_cache and value_cache [num_blocks, block_size, num_kv_heads, head_size] (query's dtype or
 * an FP8 E4M3 cache, the same for both; num_kv_heads dividing num_heads), block_tables int32
 * [num_seqs, max_blocks_per_seq], context_lens int32 [num_seqs] (shapes and dtypes only: the
 * layout and device follow in CheckPagedAttentionLayoutAndDevice). `rows_are_seqs`: one query row per sequence (decode), so num_seqs is the query's row
 * count; else (prefill) num_seqs comes from block_tables. `rows_dim` names the rows in messages.
 */
inline PagedAttentionShapes CheckPagedAttentionArgs(
    const char* op, const char* rows_dim, bool rows_are_seqs, const TensorView& out,
    const TensorView& query, const TensorView& key_cache, const TensorView& value_cache,
    const TensorView& block_tables, const TensorView& context_lens) {
  const std::string rows_layout = std::string("[") + rows_dim + ", num_heads, head_size]";
  PagedAttentionShapes s{};
  CheckNdim(op, "query", query, 3, rows_layout.c_str());
  TVM_FFI_CHECK(IsFloatKvDtype(query.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "query") << "float16, bfloat16 or float32, got "
      << query.dtype();
  s.num_rows = query.shape()[0];
  s.num_heads = query.shape()[1];
  s.head_size = query.shape()[2];

  CheckNdim(op, "out", out, 3, rows_layout.c_str());
  TVM_FFI_CHECK(out.dtype() == query.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "out") << query.dtype() << " like 'query', got " << out.dtype();
  TVM_FFI_CHECK(out.shape()[0] == s.num_rows && out.shape()[1] == s.num_heads &&
                    out.shape()[2] == s.head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, "out") << "of shape " << ShapeStr(query)
      << " like 'query', got " << ShapeStr(out);

  CheckNdim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_size]");
  s.fp8_cache = IsFp8CacheDtype(key_cache.dtype());
  TVM_FFI_CHECK(key_cache.dtype() == query.dtype() || s.fp8_cache, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "key_cache") << query.dtype()
      << " like 'query' (or an FP8 E4M3 cache: float8_e4m3fn or uint8), got "
      << key_cache.dtype();
  s.num_blocks = key_cache.shape()[0];
  s.block_size = key_cache.shape()[1];
  s.num_kv_heads = key_cache.shape()[2];
  TVM_FFI_CHECK(key_cache.shape()[3] == s.head_size, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "key_cache") << "of shape [num_blocks, block_size, "
      << "num_kv_heads, " << s.head_size << "] (head_size of 'query'), got "
      << ShapeStr(key_cache);
  TVM_FFI_CHECK(s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "key_cache") << "of num_kv_heads dividing num_heads="
      << s.num_heads << ", got num_kv_heads " << s.num_kv_heads << " (shape "
      << ShapeStr(key_cache) << ")";
  TVM_FFI_CHECK(s.block_size >= 1, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "key_cache") << "of block_size >= 1, got "
      << ShapeStr(key_cache);

  CheckNdim(op, "value_cache", value_cache, 4,
            "[num_blocks, block_size, num_kv_heads, head_size]");
  TVM_FFI_CHECK(value_cache.dtype() == key_cache.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "value_cache") << key_cache.dtype()
      << " like 'key_cache', got " << value_cache.dtype();
  TVM_FFI_CHECK(value_cache.shape()[0] == s.num_blocks &&
                    value_cache.shape()[1] == s.block_size &&
                    value_cache.shape()[2] == s.num_kv_heads &&
                    value_cache.shape()[3] == s.head_size,
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, "value_cache") << "of shape " << ShapeStr(key_cache)
      << " like 'key_cache', got " << ShapeStr(value_cache);

  CheckNdim(op, "block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]");
  TVM_FFI_CHECK(IsInt32Dtype(block_tables.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "block_tables") << "int32, got " << block_tables.dtype();
  s.num_seqs = rows_are_seqs ? s.num_rows : block_tables.shape()[0];
  TVM_FFI_CHECK(block_tables.shape()[0] == s.num_seqs, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "block_tables") << "of shape [" << s.num_seqs
      << ", max_blocks_per_seq] (num_seqs of 'query'), got " << ShapeStr(block_tables);
  s.max_blocks_per_seq = block_tables.shape()[1];

  CheckNdim(op, "context_lens", context_lens, 1, "[num_seqs]");
  TVM_FFI_CHECK(IsInt32Dtype(context_lens.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(op, "context_lens") << "int32, got " << context_lens.dtype();
  TVM_FFI_CHECK(context_lens.shape()[0] == s.num_seqs, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "context_lens") << "of shape [" << s.num_seqs << "] (num_seqs"
      << (rows_are_seqs ? " of 'query'" : " from 'block_tables'") << "), got "
      << ShapeStr(context_lens);

  return s;
}

/*!
 * \brief The memory layout and device checks of the same tensors (after the op's own shape and
 * scalar checks, so that a structural mistake reads the same on any device): C-contiguous, on
 * one CUDA device. `strided_query`: the query's rows may be strided (CheckRowStrided).
 */
inline void CheckPagedAttentionLayoutAndDevice(
    const char* op, const TensorView& out, const TensorView& query, const TensorView& key_cache,
    const TensorView& value_cache, const TensorView& block_tables,
    const TensorView& context_lens, bool strided_query = false) {
  CheckContiguous(op, "out", out);
  if (strided_query) {
    CheckRowStrided(op, "query", query);
  } else {
    CheckContiguous(op, "query", query);
  }
  CheckContiguous(op, "key_cache", key_cache);
  CheckContiguous(op, "value_cache", value_cache);
  CheckContiguous(op, "block_tables", block_tables);
  CheckContiguous(op, "context_lens", context_lens);

  CheckCuda(op, "query", query);
  CheckSameDevice(op, "out", out, "query", query);
  CheckSameDevice(op, "key_cache", key_cache, "query", query);
  CheckSameDevice(op, "value_cache", value_cache, "query", query);
  CheckSameDevice(op, "block_tables", block_tables, "query", query);
  CheckSameDevice(op, "context_lens", context_lens, "query", query);
}

/*!
 * \brief The scalars both ops take: the K/V dequantization scales (finite, > 0; they must be 1
 * unless the cache is FP8) and the logits soft cap (0: none, else finite and > 0).
 */
inline void CheckCacheScalesAndSoftCap(const char* op, bool fp8_cache, double k_scale,
                                       double v_scale, double logits_soft_cap) {
  const char* names[2] = {"k_scale", "v_scale"};
  const double values[2] = {k_scale, v_scale};
  for (int i = 0; i < 2; ++i) {
    TVM_FFI_CHECK(std::isfinite(values[i]) && values[i] > 0.0, ValueError)
        << CACHEFLOW_ARG_ERROR(op, names[i]) << "a finite number > 0, got " << values[i];
    TVM_FFI_CHECK(fp8_cache || values[i] == 1.0, ValueError)
        << CACHEFLOW_ARG_ERROR(op, names[i])
        << "1.0 unless the caches are FP8 (the scale dequantizes them), got " << values[i];
  }
  TVM_FFI_CHECK(std::isfinite(logits_soft_cap) && logits_soft_cap >= 0.0, ValueError)
      << CACHEFLOW_ARG_ERROR(op, "logits_soft_cap") << "a finite number > 0 (0: none), got "
      << logits_soft_cap;
}

}  // namespace cacheflow
