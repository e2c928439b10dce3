// A C entry point that runs paged_attention's kernels (csrc/paged_attention.cuh, unchanged) under
// the host emulation of paged_attention_emu.h, for tests/test_kernels_paged_attention_emulated.py.
//
// Build (from packages/cacheflow-kernels):
//   g++ -std=c++17 -O2 -shared -fPIC -Wno-unknown-pragmas -DCACHEFLOW_PAGED_ATTENTION_EMULATE
//       -Icsrc -Itests/emulation tests/emulation/paged_attention_emu.cc -o libpa_emu.so
#include "paged_attention.cuh"  // includes paged_attention_emu.h (CACHEFLOW_PAGED_ATTENTION_EMULATE)

#include <cstdint>
#include <type_traits>

namespace {

namespace pa = cacheflow::paged_attention;

// What the dispatch chose at the last launch (cf_emu_last_launch).
int g_last_stages = -1;
int g_last_step_tiles = -1;
int g_last_rows = -1;
int g_main_warps = -1;  // warps per CTA of the last call's first (main) kernel
int g_main_tokens_m = -1;  // its Params::tokens_m

struct EmuLauncher {
  template <typename... Args>
  void operator()(void (*kernel)(Args...), pa::GridDims grid, int threads, size_t smem,
                  const pa::Params& p) const {
    g_last_stages = p.stages;
    g_last_step_tiles = p.step_tiles;
    g_last_rows = p.rows;
    if (g_main_warps < 0) {
      g_main_warps = threads / 32;
      g_main_tokens_m = p.tokens_m;
    }
    pa_emu::RunGrid(pa_emu::Grid{grid.x, grid.y, grid.z}, threads, smem, [kernel, p] {
      kernel(p);
    });
  }
};

pa_emu::GlobalRange Range(const void* ptr, int64_t bytes, const char* name) {
  const auto* b = static_cast<const unsigned char*>(ptr);
  return pa_emu::GlobalRange{b, b + (ptr ? bytes : 0), name};
}

// Pipeline configuration of the next runs (cf_emu_configure).
int g_stages = pa::kStagesAuto;
int g_smem_per_sm = 233472;     // an H100's / H200's 228 KB
int g_smem_per_block = 232448;  // and its 227 KB per CTA
int g_step_tiles = pa::kDefaultStepTiles;
float g_rescale_threshold = pa::kDefaultRescaleThreshold;
int g_cta_rows = pa::kDefaultCtaRows;
int g_wide_rows_min_ctas = 0;  // kCtaRowsAuto takes 32 rows for every grid (the launch: SMs)
int g_wide_warps_max_ctas = 0;  // CTAs of 4 warps only (the launch: the SM count)
int g_wide_max_group = pa::kDefaultWideMaxGroup;
int g_half_wide_max_ctas = 0;  // no half-wide CTAs (the launch: twice the SM count)
int64_t g_query_stride = 0;  // 0: contiguous query
// The fused new token of the next runs (cf_emu_set_new_token; key null: plain launches).
struct NewToken {
  const void* key = nullptr;
  const void* value = nullptr;
  int64_t key_stride = 0;
  int64_t value_stride = 0;
  const int64_t* positions = nullptr;
  const int64_t* slot_mapping = nullptr;
  const float* cos_sin = nullptr;
  int64_t max_position = 0;
  int neox = 1;
} g_new_token;

}  // namespace

/*!
 * \brief Makes the following cf_emu_paged_attention calls fused launches (see "New token" in
 * paged_attention.cuh): the query is taken before the rotary embedding, and `key` / `value`
 * ([num_seqs, num_kv_heads * head_size] rows, strides in elements) are rotated at `positions`
 * (with `cos_sin` [max_position, head_size] float32; null: no rotary) and stored at
 * `slot_mapping` first. `key` null makes them plain launches again.
 */
extern "C" void cf_emu_set_new_token(const void* key, const void* value, int64_t key_stride,
                                     int64_t value_stride, const int64_t* positions,
                                     const int64_t* slot_mapping, const float* cos_sin,
                                     int64_t max_position, int neox) {
  g_new_token = NewToken{key, value, key_stride, value_stride, positions, slot_mapping,
                         cos_sin, max_position, neox};
}

/*!
 * \brief Sets Params::cta_rows (16, 32 or kCtaRowsAuto; CACHEFLOW_PA_ROWS on the GPU), the
 * query's elements between sequences (0: num_heads * head_size, a contiguous query) and
 * Params::wide_rows_min_ctas (the device's SM count on the GPU) of the following runs.
 */
extern "C" void cf_emu_set_layout(int cta_rows, int64_t query_stride, int wide_rows_min_ctas) {
  g_cta_rows = cta_rows;
  g_query_stride = query_stride;
  g_wide_rows_min_ctas = wide_rows_min_ctas;
}

/*! \brief Runs the following launches' CTAs in blockIdx order (0) or in reverse (1). */
extern "C" void cf_emu_set_cta_order(int reverse) { pa_emu::g_reverse_ctas = reverse; }


/*! \brief Query heads per CTA (Params::rows) the dispatch used at the last launch. */
extern "C" int cf_emu_last_rows() { return g_last_rows; }

/*! \brief Warps per CTA of the last call's main kernel. */
extern "C" int cf_emu_main_warps() { return g_main_warps; }

/*! \brief 1 where the two-tile step reads 16-bit V with ldmatrix (built with
 * CACHEFLOW_PA_LDSM_V=1), else 0. */
extern "C" int cf_emu_ldsm_v() { return pa::kPipeLdsmV ? 1 : 0; }

/*! \brief 1 where the last call's main kernel ran the two-tile step with tokens on the MMA's M
 * dimension (Params::tokens_m), else 0. */
extern "C" int cf_emu_main_tokens_m() { return g_main_tokens_m; }

/*! \brief 1 where KV heads of at most 8 query heads take that step (built with
 * CACHEFLOW_PA_TOKENS_M=1), else 0. */
extern "C" int cf_emu_tokens_m() { return pa::kPipeTokensM ? 1 : 0; }

/*! \brief Runs movmatrix.m8n8.trans.b16 on one warp: in[l] is lane l's source register, out[l]
 * its result (a check of the emulated instruction against the PTX ISA's definition). */
extern "C" void cf_emu_movmatrix(const uint32_t* in, uint32_t* out) {
  pa_emu::RunGrid(pa_emu::Grid{1, 1, 1}, 32, 0, [in, out] {
    const int lane = static_cast<int>(threadIdx.x);
    out[lane] = pa::MovMatrixTrans(in[lane]);
  });
}

/*! \brief 1 where bfloat16 launches over FP8 caches run float16 MMAs (built with
 * CACHEFLOW_PA_FP8_F16_MMA=1), else 0. */
extern "C" int cf_emu_fp8_f16_mma() { return pa::kFp8HalfMma ? 1 : 0; }

/*!
 * \brief Sets Params::wide_warps_max_ctas (the device's SM count on the GPU; 0: CTAs of 4 warps
 * only) of the following runs.
 */
extern "C" void cf_emu_set_wide_warps(int max_ctas) { g_wide_warps_max_ctas = max_ctas; }

/*! \brief Sets Params::wide_max_group (CACHEFLOW_PA_WIDE_GROUP on the GPU) of the following
 * runs. */
extern "C" void cf_emu_set_wide_max_group(int group) { g_wide_max_group = group; }

/*! \brief Sets Params::half_wide_max_ctas (twice the device's SM count on the GPU; 0: no
 * half-wide CTAs, the default here). */
extern "C" void cf_emu_set_half_wide(int max_ctas) { g_half_wide_max_ctas = max_ctas; }

/*!
 * \brief Sets Params::step_tiles (1 or 2; CACHEFLOW_PA_STEP on the GPU) and
 * Params::rescale_threshold (CACHEFLOW_PA_RESCALE_THRESHOLD) of the following runs.
 */
extern "C" void cf_emu_set_step(int step_tiles, double rescale_threshold) {
  g_step_tiles = step_tiles;
  g_rescale_threshold = static_cast<float>(rescale_threshold);
}

/*! \brief The depth (0: register kernel) and step tiles the dispatch used at the last launch. */
extern "C" void cf_emu_last_launch(int* stages, int* step_tiles) {
  *stages = g_last_stages;
  *step_tiles = g_last_step_tiles;
}

/*!
 * \brief Configures the following cf_emu_paged_attention calls: `cp_async_mode` 0 copies at
 * issue, 1 when the group is retired (see paged_attention_emu.h); `stages` is Params::stages
 * (-1 auto, 0 the register kernel, >= 2 forced); the device's shared memory per SM and per CTA
 * (the auto depth's inputs). Returns the depth the dispatch would pick for (dtype code as in
 * cf_emu_paged_attention, head_size) with 16 query heads per CTA (0: the register kernel).
 */
extern "C" int cf_emu_configure(int cp_async_mode, int stages, int smem_per_sm,
                                int smem_per_block, int dtype, int head_size) {
  pa_emu::g_cp_async_mode = cp_async_mode;
  g_stages = stages;
  g_smem_per_sm = smem_per_sm;
  g_smem_per_block = smem_per_block;
  pa::Params p = pa::MakeParams(1, 16, 1, head_size, 16, 1, 1.0, 16, 0, 0);
  p.stages = stages;
  p.smem_per_sm = smem_per_sm;
  p.smem_per_block = smem_per_block;
  const bool fp8 = (dtype & 4) != 0;
  if ((dtype & 3) == 2) return 0;
  int s = 0;
  auto pick = [&](auto d) {
    constexpr int D = decltype(d)::value;
    s = fp8 ? pa::ChooseStages<pa::Fp8E4m3, D>(p, 16, pa::MmaMinBlocks<D>())
            : pa::ChooseStages<pa_emu::Half, D>(p, 16, pa::MmaMinBlocks<D>());
  };
  switch (head_size) {
    case 64: pick(std::integral_constant<int, 64>{}); break;
    case 80: pick(std::integral_constant<int, 80>{}); break;
    case 96: pick(std::integral_constant<int, 96>{}); break;
    case 112: pick(std::integral_constant<int, 112>{}); break;
    case 128: pick(std::integral_constant<int, 128>{}); break;
    case 256: pick(std::integral_constant<int, 256>{}); break;
    default: return -1;
  }
  return s;
}

/*!
 * \brief Runs paged_attention on host memory; arguments mean what they mean for the CUDA op
 * (already validated by the caller). `partition_size` is the resolved one (0: no split).
 * \param dtype 0 float16, 1 bfloat16, 2 float32; plus 4 for FP8 E4M3 caches (k_scale and
 *        v_scale dequantize them).
 * \param logits_soft_cap > 0: soft-cap the scores; 0: none.
 * \param lse null, or float32 [num_seqs, num_heads] written with each row's log-sum-exp.
 * \return the number of partitions used, or -1 when `workspace` has fewer than the
 * workspace_elements needed (reported through `workspace_needed` when not null), or -2 when a
 * fused launch (cf_emu_set_new_token) was declined (nothing ran). With `out` null nothing runs:
 * the call only reports the partitions and the workspace size.
 */
extern "C" int cf_emu_paged_attention(
    int dtype, void* out, const void* query, const void* key_cache, const void* value_cache,
    const int32_t* block_tables, const int32_t* context_lens, const float* alibi_slopes,
    float* workspace, int64_t workspace_elements, int64_t num_seqs, int64_t num_heads,
    int64_t head_size, int64_t num_kv_heads, int64_t num_blocks, int64_t block_size,
    int64_t max_blocks_per_seq, double scale, int64_t max_context_len, int64_t partition_size,
    int64_t sliding_window, int64_t* workspace_needed, double k_scale, double v_scale,
    double logits_soft_cap, float* lse) {
  pa::Params p = pa::MakeParams(num_seqs, num_heads, num_kv_heads, head_size, block_size,
                                max_blocks_per_seq, scale, max_context_len, partition_size,
                                sliding_window, k_scale, v_scale, logits_soft_cap);
  const bool fp8 = (dtype & 4) != 0;
  dtype &= 3;
  const int64_t need = pa::WorkspaceElements(p);
  if (workspace_needed != nullptr) *workspace_needed = need;
  if (out == nullptr) return p.num_partitions;  // a query of the plan only
  if (need > workspace_elements) return -1;
  pa::SetWorkspace(p, workspace);
  p.out = out;
  p.query = query;
  p.key_cache = key_cache;
  p.value_cache = value_cache;
  p.block_tables = block_tables;
  p.context_lens = context_lens;
  p.alibi_slopes = alibi_slopes;
  p.lse = lse;
  p.stages = g_stages;
  p.smem_per_sm = g_smem_per_sm;
  p.smem_per_block = g_smem_per_block;
  p.step_tiles = g_step_tiles;
  p.rescale_threshold = g_rescale_threshold;
  p.cta_rows = g_cta_rows;
  p.wide_rows_min_ctas = g_wide_rows_min_ctas;
  p.wide_warps_max_ctas = g_wide_warps_max_ctas;
  p.wide_max_group = g_wide_max_group;
  p.half_wide_max_ctas = g_half_wide_max_ctas;
  if (g_query_stride > 0) p.q_stride = g_query_stride;
  const NewToken& nt = g_new_token;
  if (nt.key != nullptr) {
    p.new_key = nt.key;
    p.new_value = nt.value;
    p.new_key_stride = nt.key_stride;
    p.new_value_stride = nt.value_stride;
    p.positions = nt.positions;
    p.slot_mapping = nt.slot_mapping;
    p.cos_sin = nt.cos_sin;
    p.max_position = nt.max_position;
    p.num_slots = num_blocks * block_size;
    p.rotary_neox = nt.neox;
    p.k_store_scale = static_cast<float>(k_scale);
  }

  const int64_t elem = dtype == 2 ? 4 : 2;
  const int64_t q_bytes = num_seqs * num_heads * head_size * elem;
  const int64_t q_span =
      num_seqs > 0 ? ((num_seqs - 1) * p.q_stride + num_heads * head_size) * elem : 0;
  const int64_t c_bytes = num_blocks * block_size * num_kv_heads * head_size * (fp8 ? 1 : elem);
  pa_emu::g_ranges = {
      Range(out, q_bytes, "out"),
      Range(query, q_span, "query"),
      Range(key_cache, c_bytes, "key_cache"),
      Range(value_cache, c_bytes, "value_cache"),
      Range(block_tables, num_seqs * max_blocks_per_seq * 4, "block_tables"),
      Range(context_lens, num_seqs * 4, "context_lens"),
      Range(alibi_slopes, num_heads * 4, "alibi_slopes"),
      Range(workspace, need * 4, "workspace"),
      Range(lse, num_seqs * num_heads * 4, "lse"),
  };
  if (nt.key != nullptr) {
    const int64_t row = num_kv_heads * head_size;
    const int64_t last = num_seqs > 0 ? num_seqs - 1 : 0;
    pa_emu::g_ranges.push_back(Range(nt.key, (last * nt.key_stride + row) * elem, "new key"));
    pa_emu::g_ranges.push_back(
        Range(nt.value, (last * nt.value_stride + row) * elem, "new value"));
    pa_emu::g_ranges.push_back(Range(nt.positions, num_seqs * 8, "positions"));
    pa_emu::g_ranges.push_back(Range(nt.slot_mapping, num_seqs * 8, "slot_mapping"));
    pa_emu::g_ranges.push_back(
        Range(nt.cos_sin, nt.max_position * head_size * 4, "cos_sin_cache"));
  }
  if (num_seqs == 0 || num_heads == 0) return p.num_partitions;
  EmuLauncher launch;
  g_main_warps = -1;
  g_main_tokens_m = -1;
  bool ran = false;
  switch (dtype + (fp8 ? 4 : 0)) {
    case 0: ran = pa::Run<pa_emu::Half>(p, launch); break;
    case 1: ran = pa::Run<pa_emu::Bf16>(p, launch); break;
    case 4: ran = pa::Run<pa_emu::Half, pa::Fp8E4m3>(p, launch); break;
    case 5: ran = pa::Run<pa_emu::Bf16, pa::Fp8E4m3>(p, launch); break;
    case 6: ran = pa::Run<float, pa::Fp8E4m3>(p, launch); break;
    default: ran = pa::Run<float>(p, launch); break;
  }
  return ran ? p.num_partitions : -2;
}
