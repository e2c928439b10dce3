// paged_attention: argument checks, split-K parameters and the exported functions. The kernels
// are in paged_attention.cuh (instantiated per dtype in paged_attention_{f16,bf16,f32}.cu).
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "attention_args.h"
#include "common.h"
#include "device_attribute.cuh"
#include "paged_attention_launch.cuh"

namespace cacheflow {
namespace {

using paged_attention::kMaxPartitions;
using paged_attention::kPartitionAlign;
using tvm::ffi::Optional;

constexpr const char* kOp = "paged_attention";

bool IsFloat32Dtype(DLDataType dt) {
  return dt.code == kDLFloat && dt.bits == 32 && dt.lanes == 1;
}
bool SupportedHeadSize(int64_t d) {
  return d == 64 || d == 80 || d == 96 || d == 112 || d == 128 || d == 256;
}
bool SupportedBlockSize(int64_t b) { return b == 8 || b == 16 || b == 32; }

void CheckAligned(const char* name, const TensorView& t, int64_t bytes) {
  TVM_FFI_CHECK(reinterpret_cast<std::uintptr_t>(DataPtr(t)) % bytes == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, name) << bytes
      << "-byte aligned (a fresh or .contiguous() tensor is), got an address offset by "
      << reinterpret_cast<std::uintptr_t>(DataPtr(t)) % bytes << " bytes";
}

/*!
 * \brief The L2 prefetch distance: CACHEFLOW_PA_L2_PREFETCH_TILES (a tuning knob, read at every
 * launch so a benchmark can sweep it in one process) or the default; out-of-range values clamp.
 * FP8 caches use the same default: on an H200 (2026-12-02) 4 tiles for them were 2-5% slower
 * than 2 in three of four decode cases (docs/benchmarks.md).
 */
int L2PrefetchTiles() {
  const char* env = std::getenv("CACHEFLOW_PA_L2_PREFETCH_TILES");
  if (env == nullptr || *env == '\0') return paged_attention::kDefaultL2PrefetchTiles;
  const long v = std::strtol(env, nullptr, 10);  // NOLINT(runtime/int)
  return static_cast<int>(std::clamp<long>(v, 0, paged_attention::kMaxL2PrefetchTiles));  // NOLINT
}

/*!
 * \brief The 16-bit kernels' main loop: CACHEFLOW_PA_PIPELINE=0 forces the register kernel (the
 * fallback; for A/B benchmarks in one process), CACHEFLOW_PA_STAGES=N (2 .. kMaxStages) forces
 * the shared-memory pipeline's depth; both are read at every launch. Default: the pipeline, its
 * depth chosen from the device's shared memory (paged_attention::ChooseStages).
 */
int PipelineStages() {
  const char* pipe = std::getenv("CACHEFLOW_PA_PIPELINE");
  if (pipe != nullptr && pipe[0] == '0' && pipe[1] == '\0') {
    return paged_attention::kStagesRegister;
  }
  const char* env = std::getenv("CACHEFLOW_PA_STAGES");
  if (env == nullptr || *env == '\0') return paged_attention::kStagesAuto;
  const long v = std::strtol(env, nullptr, 10);  // NOLINT(runtime/int)
  if (v <= 0) return paged_attention::kStagesAuto;
  return static_cast<int>(std::clamp<long>(v, paged_attention::kMinStages,  // NOLINT
                                           paged_attention::kMaxStages));
}

/*!
 * \brief The pipelined kernel's step: CACHEFLOW_PA_STEP=8 computes one 8-token tile per warp step
 * (the kernel of 2026-12-03), 16 two tiles (the default; needs >= 4 stages, else 8 is used). Read
 * at every launch so one process can A/B them.
 */
int StepTiles() {
  const char* env = std::getenv("CACHEFLOW_PA_STEP");
  if (env == nullptr || *env == '\0') return paged_attention::kDefaultStepTiles;
  return std::strtol(env, nullptr, 10) == 8 ? 1 : 2;  // NOLINT(runtime/int)
}

/*!
 * \brief The two-tile step's lazy-rescale threshold in log2 units: CACHEFLOW_PA_RESCALE_THRESHOLD
 * (a float; negative: rescale at every step, as the one-tile step does), read at every launch.
 */
float RescaleThreshold() {
  const char* env = std::getenv("CACHEFLOW_PA_RESCALE_THRESHOLD");
  if (env == nullptr || *env == '\0') return paged_attention::kDefaultRescaleThreshold;
  const float v = std::strtof(env, nullptr);
  // Beyond 2^16 the probabilities could overflow float16 (65504); NaN means the default.
  if (!(v == v)) return paged_attention::kDefaultRescaleThreshold;
  return std::min(v, 15.f);
}

/*!
 * \brief Query heads per CTA for KV heads with more than 16: CACHEFLOW_PA_ROWS=16 keeps CTAs of
 * 16 (two CTAs read each K/V tile for 32 heads), 32 gives every warp two m16 row tiles so that
 * 17-32 heads read it once; unset (or anything else), the automatic choice (kCtaRowsAuto). Read
 * at every launch so one process can A/B them.
 */
int CtaRows() {
  const char* env = std::getenv("CACHEFLOW_PA_ROWS");
  if (env == nullptr || *env == '\0') return paged_attention::kDefaultCtaRows;
  const long rows = std::strtol(env, nullptr, 10);  // NOLINT(runtime/int)
  if (rows == 16) return paged_attention::kMmaRows;
  if (rows == 32) return paged_attention::kMaxCtaRows;
  return paged_attention::kCtaRowsAuto;
}

/*!
 * \brief The most CTAs a grid may have to run CTAs of kWideWarps<D> warps (RunWideCtas): the
 * device's `sms`; CACHEFLOW_PA_WARPS=4 keeps CTAs of 4 warps everywhere (0). Read at every launch
 * so one process can A/B them.
 */
int WideWarpsMaxCtas(int sms) {
  const char* env = std::getenv("CACHEFLOW_PA_WARPS");
  if (env != nullptr && env[0] == '4' && env[1] == '\0') return 0;
  return sms;
}

/*!
 * \brief Params::wide_max_group: CACHEFLOW_PA_WIDE_GROUP, a positive number of query heads per KV
 * head, else kDefaultWideMaxGroup. Read at every launch so one process can A/B them.
 */
int WideMaxGroup() {
  const char* env = std::getenv("CACHEFLOW_PA_WIDE_GROUP");
  if (env == nullptr || *env == '\0') return paged_attention::kDefaultWideMaxGroup;
  const long group = std::strtol(env, nullptr, 10);  // NOLINT(runtime/int)
  return group > 0 && group <= 1024 ? static_cast<int>(group)
                                    : paged_attention::kDefaultWideMaxGroup;
}

/*!
 * \brief Params::half_wide_max_ctas from Params::wide_warps_max_ctas (the SM count, or 0 with
 * CACHEFLOW_PA_WARPS=4): grids of up to two CTAs per SM run half-wide CTAs;
 * CACHEFLOW_PA_HALF_WIDE=0 keeps them at 4 warps (0). Read at every launch so one process can A/B them.
 */
int HalfWideMaxCtas(int wide_warps_max_ctas) {
  const char* env = std::getenv("CACHEFLOW_PA_HALF_WIDE");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return 0;
  return 2 * wide_warps_max_ctas;
}

/*!
 * \brief The decode kernel's PDL overlap: CACHEFLOW_PA_EARLY_PREFETCH=0 issues the pipelined
 * kernel's first K/V tiles after the wait for the previous kernel instead of before it (the
 * default); CACHEFLOW_PA_MAIN_RELEASE=0 makes a split launch's pipelined kernel release the merge
 * kernel as its CTAs exit instead of once their main loop is done (the default);
 * CACHEFLOW_PA_EARLY_RELEASE=0 makes an unsplit launch of at most half as many CTAs as the device
 * has SMs release its successor at exit instead of right after its wait (the default). All read
 * at every launch so one process can A/B them.
 */
bool EnvFlag(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  return !(env[0] == '0' && env[1] == '\0');
}

/*! \brief Shared memory per multiprocessor and per CTA (opt-in) of a device, queried once. */
struct DeviceSmem {
  int per_sm;
  int per_block;
};
DeviceSmem GetDeviceSmem(int device_id) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> per_sm[kMaxDevices];
  static std::atomic<int> per_block[kMaxDevices];
  if (device_id < 0 || device_id >= kMaxDevices) return DeviceSmem{0, 0};
  int sm = per_sm[device_id].load(std::memory_order_relaxed);
  int block = per_block[device_id].load(std::memory_order_relaxed);
  if (sm <= 0 || block <= 0) {
    TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(
        &sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device_id));
    TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(
        &block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id));
    per_sm[device_id].store(sm, std::memory_order_relaxed);
    per_block[device_id].store(block, std::memory_order_relaxed);
  }
  return DeviceSmem{sm, block};
}

/*! \brief The new token of a fused launch (validated by PagedAttentionWithRotaryCache). */
struct FusedToken {
  const void* key;
  const void* value;
  int64_t key_stride;  // elements between sequences' rows
  int64_t value_stride;
  const int64_t* positions;
  const int64_t* slot_mapping;
  const float* cos_sin;  // null: no rotary
  int64_t max_position;
  bool neox;
};

/*!
 * \brief paged_attention's checks and launch; with `fused`, a fused launch (the new token rotated
 * and stored by the kernel: paged_attention.cuh, "New token"). Returns false when the dispatch
 * declines a fused launch (nothing launched); true otherwise.
 */
bool RunPagedAttention(TensorView out, TensorView query, TensorView key_cache,
                       TensorView value_cache, TensorView block_tables, TensorView context_lens,
                       double scale, Optional<TensorView> alibi_slopes, int64_t max_context_len,
                       int64_t partition_size, Optional<TensorView> workspace,
                       int64_t sliding_window, double k_scale, double v_scale,
                       double logits_soft_cap, Optional<TensorView> lse,
                       const FusedToken* fused) {
  // Errors name the op the caller called.
  const char* const kOp =
      fused != nullptr ? "paged_attention_with_rotary_cache" : cacheflow::kOp;
  // -- Shapes and dtypes of the tensors both attention ops take.
  const PagedAttentionShapes s = CheckPagedAttentionArgs(
      kOp, "num_seqs", true, out, query, key_cache, value_cache, block_tables, context_lens);
  const int64_t num_seqs = s.num_seqs;
  const int64_t num_heads = s.num_heads;
  const int64_t head_size = s.head_size;
  const int64_t block_size = s.block_size;
  const int64_t num_kv_heads = s.num_kv_heads;
  const int64_t max_blocks_per_seq = s.max_blocks_per_seq;
  // -- This kernel's own limits.
  TVM_FFI_CHECK(SupportedHeadSize(head_size), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query")
      << "of head_size 64, 80, 96, 112, 128 or 256, got head_size " << head_size
      << " (shape " << ShapeStr(query) << ")";
  TVM_FFI_CHECK(SupportedBlockSize(block_size), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "key_cache") << "of block_size 8, 16 or 32, got block_size "
      << block_size << " (shape " << ShapeStr(key_cache) << ")";

  if (alibi_slopes.has_value()) {
    const TensorView& a = *alibi_slopes;
    CheckNdim(kOp, "alibi_slopes", a, 1, "[num_heads]");
    TVM_FFI_CHECK(IsFloat32Dtype(a.dtype()), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "alibi_slopes") << "float32, got " << a.dtype();
    TVM_FFI_CHECK(a.shape()[0] == num_heads, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "alibi_slopes") << "of shape [" << num_heads
        << "] (num_heads of 'query'), got " << ShapeStr(a);
  }
  if (lse.has_value()) {
    const TensorView& l = *lse;
    CheckNdim(kOp, "lse", l, 2, "[num_seqs, num_heads]");
    TVM_FFI_CHECK(IsFloat32Dtype(l.dtype()), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "lse") << "float32, got " << l.dtype();
    TVM_FFI_CHECK(l.shape()[0] == num_seqs && l.shape()[1] == num_heads, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "lse") << "of shape [" << num_seqs << ", " << num_heads
        << "] (num_seqs, num_heads of 'query'), got " << ShapeStr(l);
  }
  if (workspace.has_value()) {
    CheckNdim(kOp, "workspace", *workspace, 1, "[num_elements]");
    TVM_FFI_CHECK(IsFloat32Dtype((*workspace).dtype()), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "workspace") << "float32, got " << (*workspace).dtype();
  }

  // -- Scalars.
  TVM_FFI_CHECK(std::isfinite(scale), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "scale") << "a finite number, got " << scale;
  TVM_FFI_CHECK(max_context_len >= 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "max_context_len") << ">= 0, got " << max_context_len;
  TVM_FFI_CHECK(partition_size >= 0 && partition_size % kPartitionAlign == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "partition_size") << "0 or a positive multiple of "
      << kPartitionAlign << ", got " << partition_size;
  TVM_FFI_CHECK(sliding_window >= 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "sliding_window") << ">= 0 (0: no window), got "
      << sliding_window;

  CheckCacheScalesAndSoftCap(kOp, s.fp8_cache, k_scale, v_scale, logits_soft_cap);

  // -- Memory layout and device.
  CheckPagedAttentionLayoutAndDevice(kOp, out, query, key_cache, value_cache, block_tables,
                                     context_lens, /*strided_query=*/true);
  const int64_t q_stride = CheckRowStrided(kOp, "query", query);
  if (alibi_slopes.has_value()) CheckContiguous(kOp, "alibi_slopes", *alibi_slopes);
  if (workspace.has_value()) CheckContiguous(kOp, "workspace", *workspace);
  if (lse.has_value()) CheckContiguous(kOp, "lse", *lse);

  if (alibi_slopes.has_value()) {
    CheckSameDevice(kOp, "alibi_slopes", *alibi_slopes, "query", query);
  }
  if (workspace.has_value()) CheckSameDevice(kOp, "workspace", *workspace, "query", query);
  if (lse.has_value()) CheckSameDevice(kOp, "lse", *lse, "query", query);

  // -- Alignment (16-byte vector loads) and sizes the kernels index with 32-bit ints.
  CheckAligned("query", query, 16);
  TVM_FFI_CHECK(q_stride * ElementBytes(query.dtype()) % 16 == 0, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query")
      << "a tensor whose row stride is a multiple of 16 bytes, got a stride of " << q_stride
      << " elements";
  CheckAligned("out", out, 16);
  CheckAligned("key_cache", key_cache, 16);
  CheckAligned("value_cache", value_cache, 16);
  TVM_FFI_CHECK(num_seqs <= 65535, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "query") << "at most 65535 sequences, got " << num_seqs;
  const int64_t max_tokens = max_blocks_per_seq * block_size;
  TVM_FFI_CHECK(max_tokens <= (int64_t{1} << 30), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_tables")
      << "at most 2^30 tokens per sequence (max_blocks_per_seq * block_size), got "
      << max_tokens;

  if (num_seqs == 0 || num_heads == 0) return true;

  // -- Partitions and workspace.
  if (partition_size > 0) {
    const int64_t max_ctx = max_context_len < max_tokens ? max_context_len : max_tokens;
    const int64_t parts = (max_ctx + partition_size - 1) / partition_size;
    TVM_FFI_CHECK(parts <= kMaxPartitions, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "partition_size") << "large enough for at most "
        << kMaxPartitions << " partitions of max_context_len=" << max_ctx << ", got "
        << partition_size;
  }
  paged_attention::Params p = paged_attention::MakeParams(
      num_seqs, num_heads, num_kv_heads, head_size, block_size, max_blocks_per_seq, scale,
      max_context_len, partition_size, sliding_window, k_scale, v_scale, logits_soft_cap);
  const int64_t need = paged_attention::WorkspaceElements(p);
  if (need > 0) {
    TVM_FFI_CHECK(workspace.has_value(), ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "workspace") << "a float32 tensor of at least " << need
        << " elements for " << p.num_partitions << " partitions, got None";
    TVM_FFI_CHECK((*workspace).shape()[0] >= need, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "workspace") << "at least " << need
        << " float32 elements (num_seqs * num_heads * num_partitions * (head_size + 2) = "
        << num_seqs << " * " << num_heads << " * " << p.num_partitions << " * "
        << head_size + 2 << "), got " << (*workspace).shape()[0];
    paged_attention::SetWorkspace(p, reinterpret_cast<float*>(DataPtr(*workspace)));
  }
  p.q_stride = q_stride;
  p.out = DataPtr(out);
  p.query = DataPtr(query);
  p.key_cache = DataPtr(key_cache);
  p.value_cache = DataPtr(value_cache);
  p.block_tables = reinterpret_cast<const int32_t*>(DataPtr(block_tables));
  p.context_lens = reinterpret_cast<const int32_t*>(DataPtr(context_lens));
  p.alibi_slopes =
      alibi_slopes.has_value() ? reinterpret_cast<const float*>(DataPtr(*alibi_slopes)) : nullptr;
  p.lse = lse.has_value() ? reinterpret_cast<float*>(DataPtr(*lse)) : nullptr;
  p.l2_prefetch_tiles = L2PrefetchTiles();
  if (fused != nullptr) {
    p.new_key = fused->key;
    p.new_value = fused->value;
    p.new_key_stride = fused->key_stride;
    p.new_value_stride = fused->value_stride;
    p.positions = fused->positions;
    p.slot_mapping = fused->slot_mapping;
    p.cos_sin = fused->cos_sin;
    p.max_position = fused->max_position;
    p.num_slots = key_cache.shape()[0] * key_cache.shape()[1];
    p.rotary_neox = fused->neox ? 1 : 0;
    p.k_store_scale = static_cast<float>(k_scale);
  }

  const DLDevice dev = query.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  p.stages = PipelineStages();
  p.step_tiles = StepTiles();
  p.rescale_threshold = RescaleThreshold();
  p.cta_rows = CtaRows();
  p.prefetch_before_wait = EnvFlag("CACHEFLOW_PA_EARLY_PREFETCH", true) ? 1 : 0;
  p.main_release = EnvFlag("CACHEFLOW_PA_MAIN_RELEASE", true) ? 1 : 0;
  const int sms = CachedDeviceAttribute<cudaDevAttrMultiProcessorCount>(dev.device_id);
  p.release_max_ctas = EnvFlag("CACHEFLOW_PA_EARLY_RELEASE", true) ? sms / 2 : 0;
  // A combine grid of at most one CTA per multiprocessor is latency-bound: rows in slots. So is
  // a grid of 32-row CTAs with fewer CTAs than multiprocessors (kCtaRowsAuto).
  p.combine_slots_max_ctas = sms;
  p.wide_rows_min_ctas = sms;
  // An unsplit grid of at most one CTA per multiprocessor (groups up to 32 heads) runs CTAs of
  // kWideWarps<D> warps (RunWideCtas).
  p.wide_warps_max_ctas = WideWarpsMaxCtas(sms);
  p.wide_max_group = WideMaxGroup();
  p.half_wide_max_ctas = HalfWideMaxCtas(p.wide_warps_max_ctas);
  const DeviceSmem smem = GetDeviceSmem(dev.device_id);
  p.smem_per_sm = smem.per_sm;
  p.smem_per_block = smem.per_block;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(dev.device_type, dev.device_id));
  const DLDataType dt = query.dtype();
  if (dt.code == kDLFloat && dt.bits == 16) {
    return paged_attention::Launch<__half>(p, s.fp8_cache, stream);
  } else if (dt.code == kDLBfloat) {
    return paged_attention::Launch<__nv_bfloat16>(p, s.fp8_cache, stream);
  }
  return paged_attention::Launch<float>(p, s.fp8_cache, stream);
}

/*!
 * \brief Decode attention over the paged KV cache; see paged_attention.cuh for the layouts.
 *
 * \param max_context_len an upper bound of context_lens (clamped to max_blocks_per_seq *
 *        block_size); it sizes the split-K grid.
 * \param partition_size tokens per split-K partition, a multiple of 64; 0 (or a size giving a
 *        single partition) means no split. The Python wrapper chooses it.
 * \param workspace float32, at least num_seqs * num_heads * num_partitions * (head_size + 2)
 *        elements when split; ignored otherwise.
 * \param sliding_window W > 0: the query sees only the last W context tokens (its own
 *        included); 0: the whole context.
 * \param k_scale, v_scale dequantization scales of FP8 caches (1.0 otherwise).
 * \param logits_soft_cap > 0: scores become cap * tanh(score / cap); 0: none.
 * \param lse optional float32 [num_seqs, num_heads]: the natural log-sum-exp of each row's
 *        final scores (-inf for an empty context), for merging with attention over other keys.
 */
void PagedAttention(TensorView out, TensorView query, TensorView key_cache,
                    TensorView value_cache, TensorView block_tables, TensorView context_lens,
                    double scale, Optional<TensorView> alibi_slopes, int64_t max_context_len,
                    int64_t partition_size, Optional<TensorView> workspace,
                    int64_t sliding_window, double k_scale, double v_scale,
                    double logits_soft_cap, Optional<TensorView> lse) {
  RunPagedAttention(out, query, key_cache, value_cache, block_tables, context_lens, scale,
                    alibi_slopes, max_context_len, partition_size, workspace, sliding_window,
                    k_scale, v_scale, logits_soft_cap, lse, nullptr);
}

/*! \brief Checks one of the new token's [num_seqs, num_kv_heads, head_size] rows (key, value);
 * returns the elements between sequences. */
int64_t CheckNewTokenRows(const char* op, const char* name, const TensorView& t,
                          const TensorView& query, const TensorView& key_cache) {
  CheckNdim(op, name, t, 3, "[num_seqs, num_kv_heads, head_size]");
  TVM_FFI_CHECK(t.shape()[0] == query.shape()[0] && t.shape()[1] == key_cache.shape()[2] &&
                    t.shape()[2] == query.shape()[2],
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "of shape [" << query.shape()[0] << ", "
      << key_cache.shape()[2] << ", " << query.shape()[2] << "], got " << ShapeStr(t);
  TVM_FFI_CHECK(t.dtype() == query.dtype(), ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "of the dtype of 'query' (" << query.dtype() << "), got "
      << t.dtype();
  const int64_t stride = CheckRowStrided(op, name, t);
  TVM_FFI_CHECK(reinterpret_cast<std::uintptr_t>(DataPtr(t)) % 16 == 0 && stride % 8 == 0,
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "16-byte aligned with a row stride that is a multiple "
      << "of 8 elements, got row stride " << stride;
  CheckSameDevice(op, name, t, "query", query);
  return stride;
}

/*! \brief Checks a [num_seqs] int64 tensor of the new token (positions, slot_mapping). */
void CheckNewTokenIndex(const char* op, const char* name, const TensorView& t,
                        const TensorView& query) {
  CheckNdim(op, name, t, 1, "[num_seqs]");
  TVM_FFI_CHECK(IsInt64(t.dtype()) && t.shape()[0] == query.shape()[0], ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "int64 of shape [" << query.shape()[0] << "], got "
      << t.dtype() << " " << ShapeStr(t);
  CheckContiguous(op, name, t);
  CheckSameDevice(op, name, t, "query", query);
}

/*!
 * \brief Decode attention that also does rotary_embedding_with_cache's work for the step's new
 * token (paged_attention.cuh, "New token"): `query` is taken before the rotary embedding,
 * `key` / `value` ([num_seqs, num_kv_heads, head_size], rows may be strided like the query's)
 * are the token's key and value; the kernel rotates query and key at `positions` (with
 * `cos_sin_cache` [max_position, head_size] float32, cos | sin; None: no rotary), stores key and
 * value at `slot_mapping` (negative or past the cache: not stored; FP8 caches: key / k_scale,
 * value / v_scale) and attends over the cache with that slot included. Query, key and value are
 * not modified. partition_size and workspace as for paged_attention (a split launch: the
 * partition holding the new position stores it).
 * \return false, having launched nothing, where the launch would not have one pipelined CTA per
 * (sequence, KV head, partition): several query head groups per KV head, a float32 query, or a
 * device where the pipelined kernel does not fit.
 */
bool PagedAttentionWithRotaryCache(TensorView out, TensorView query, TensorView key,
                                   TensorView value, TensorView key_cache, TensorView value_cache,
                                   TensorView block_tables, TensorView context_lens,
                                   TensorView positions, TensorView slot_mapping,
                                   Optional<TensorView> cos_sin_cache, bool is_neox, double scale,
                                   Optional<TensorView> alibi_slopes, int64_t max_context_len,
                                   int64_t partition_size, Optional<TensorView> workspace,
                                   int64_t sliding_window, double k_scale, double v_scale,
                                   double logits_soft_cap) {
  constexpr const char* op = "paged_attention_with_rotary_cache";
  const DLDataType dt = query.dtype();
  TVM_FFI_CHECK((dt.code == kDLFloat || dt.code == kDLBfloat) && dt.bits == 16 && dt.lanes == 1,
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, "query") << "float16 or bfloat16, got " << dt;
  CheckNdim(op, "query", query, 3, "[num_seqs, num_heads, head_size]");
  CheckNdim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_size]");
  FusedToken fused{};
  fused.key_stride = CheckNewTokenRows(op, "key", key, query, key_cache);
  fused.value_stride = CheckNewTokenRows(op, "value", value, query, key_cache);
  CheckNewTokenIndex(op, "positions", positions, query);
  CheckNewTokenIndex(op, "slot_mapping", slot_mapping, query);
  const int64_t head_size = query.shape()[2];
  if (cos_sin_cache.has_value()) {
    const TensorView& cs = *cos_sin_cache;
    CheckNdim(op, "cos_sin_cache", cs, 2, "[max_position, head_size]");
    TVM_FFI_CHECK(IsFloat32Dtype(cs.dtype()) && cs.shape()[1] == head_size, ValueError)
        << CACHEFLOW_ARG_ERROR(op, "cos_sin_cache") << "float32 of shape [max_position, "
        << head_size << "] (every feature rotates), got " << cs.dtype() << " " << ShapeStr(cs);
    CheckContiguous(op, "cos_sin_cache", cs);
    CheckSameDevice(op, "cos_sin_cache", cs, "query", query);
    fused.cos_sin = reinterpret_cast<const float*>(DataPtr(cs));
    fused.max_position = cs.shape()[0];
  }
  fused.key = DataPtr(key);
  fused.value = DataPtr(value);
  fused.positions = reinterpret_cast<const int64_t*>(DataPtr(positions));
  fused.slot_mapping = reinterpret_cast<const int64_t*>(DataPtr(slot_mapping));
  fused.neox = is_neox;
  return RunPagedAttention(out, query, key_cache, value_cache, block_tables, context_lens, scale,
                           alibi_slopes, max_context_len, partition_size, workspace,
                           sliding_window, k_scale, v_scale, logits_soft_cap,
                           Optional<TensorView>(), &fused);
}

/*! \brief Number of multiprocessors of CUDA device `device_id` (the split-K heuristic's input). */
int64_t SmCount(int64_t device_id) {
  int count = 0;
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                                  static_cast<int>(device_id)));
  return count;
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_attention, cacheflow::PagedAttention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_attention_with_rotary_cache,
                              cacheflow::PagedAttentionWithRotaryCache);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(paged_attention_sm_count, cacheflow::SmCount);
