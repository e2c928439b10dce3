// C entry points that run the mixture-of-experts kernels of csrc/moe_kernels.cuh under the host
// emulation (prefill_emu.h + moe_emu.h), for tests/test_kernels_moe_emulated.py.
//
// Build (from packages/cacheflow-kernels):
//   g++ -std=c++17 -O2 -shared -fPIC -DCACHEFLOW_PREFILL_EMULATE -DCACHEFLOW_MOE_EMULATE -Icsrc
//       -Itests/emulation tests/emulation/moe_emu.cc -o libmoe_emu.so
#include "prefill_emu.h"  // first: the macros the kernel headers expect

#include <cstdint>

#include "moe_kernels.cuh"

namespace {

namespace moe = cacheflow::moe;

cfemu::GlobalRange Range(const void* p, int64_t bytes, const char* name) {
  const auto* b = static_cast<const unsigned char*>(p);
  return cfemu::GlobalRange{b, b + bytes, name};
}

template <class T, class Cfg, moe::Epilogue kEpi>
void RunGemm(const moe::GemmParams& p) {
  constexpr bool kGated = moe::kIsGated<kEpi>;
  constexpr int64_t kTileCols = kGated ? Cfg::BN / 2 : Cfg::BN;
  const int64_t out_cols = kGated ? p.N / 2 : p.N;
  const int64_t m_tiles = (p.M + Cfg::BM - 1) / Cfg::BM + p.E;
  const int64_t n_tiles = (out_cols + kTileCols - 1) / kTileCols;
  cfemu::RunGrid(Dim3{static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), 1},
                 Cfg::kThreads, moe::GemmSmem<Cfg, kEpi>::kBytes,
                 [p] { moe::GroupedGemmKernel<T, Cfg, kEpi>(p); });
}

template <class T, moe::Epilogue kEpi>
int RunTile(int tile, const moe::GemmParams& p) {
  switch (tile) {
    case 0: RunGemm<T, moe::Tile128x256s4, kEpi>(p); return 0;
    case 1: RunGemm<T, moe::Tile128x256s3, kEpi>(p); return 0;
    case 2: RunGemm<T, moe::Tile128x128, kEpi>(p); return 0;
    case 3: RunGemm<T, moe::Tile64x128, kEpi>(p); return 0;
    case 4: RunGemm<T, moe::Tile32x128, kEpi>(p); return 0;
    default: return -1;
  }
}

template <class T>
int RunEpilogue(int epilogue, int tile, const moe::GemmParams& p) {
  switch (epilogue) {
    case 0: return RunTile<T, moe::Epilogue::kStore>(tile, p);
    case 1: return RunTile<T, moe::Epilogue::kIndexed>(tile, p);
    case 2:
      if (p.act == static_cast<int>(moe::Activation::kSilu)) {
        return RunTile<T, moe::Epilogue::kGatedSilu>(tile, p);
      }
      return RunTile<T, moe::Epilogue::kGatedGelu>(tile, p);
    default: return -1;
  }
}

}  // namespace

/*!
 * \brief Runs GroupedGemmKernel on host memory (see moe::GemmParams for the arguments).
 * \param dtype 0 float16, 1 bfloat16. \param epilogue 0 kStore, 1 kIndexed, 2 gated (kGatedSilu or
 *        kGatedGelu by `act`: 0 silu, 1 gelu, 2 gelu tanh).
 * \param tile 0 128x256 (4 stages), 1 128x256 (3 stages), 2 128x128, 3 64x128, 4 32x128.
 * \param x_bytes, out_bytes sizes of x and out (the buffers the copies may touch).
 * \return 0, or -1 for an unknown dtype / epilogue / tile.
 */
extern "C" int cf_emu_moe_gemm(int dtype, int epilogue, int tile, int act, void* out,
                               const void* x, const void* w, const int64_t* offsets,
                               const int32_t* row_index, const int32_t* out_index,
                               const float* out_scale, int64_t M, int64_t N, int64_t K,
                               int64_t E, int64_t x_rows, int64_t out_rows, int out_vec) {
  moe::GemmParams p{};
  p.out = out;
  p.x = x;
  p.w = w;
  p.offsets = offsets;
  p.row_index = row_index;
  p.out_index = out_index;
  p.out_scale = out_scale;
  p.M = M;
  p.N = N;
  p.K = K;
  p.E = E;
  p.x_rows = x_rows;
  p.out_rows = out_rows;
  p.act = act;
  p.out_vec = out_vec != 0;
  const int64_t out_cols = epilogue == 2 ? N / 2 : N;
  cfemu::g_ranges = {Range(out, out_rows * out_cols * 2, "out"), Range(x, x_rows * K * 2, "x"),
                     Range(w, E * N * K * 2, "w")};
  if (dtype == 0) return RunEpilogue<moe::Fp16>(epilogue, tile, p);
  if (dtype == 1) return RunEpilogue<moe::Bf16>(epilogue, tile, p);
  return -1;
}

/*! \brief Runs SortByExpertKernel (ids int64 when ids64, else int32). */
extern "C" int cf_emu_moe_sort(const void* ids, int ids64, int64_t num_pairs, int64_t top_k,
                               int64_t E, int64_t* offsets, int32_t* sorted_pairs,
                               int32_t* token_index) {
  cfemu::g_ranges = {};
  const Dim3 grid{static_cast<unsigned>(E + 1), 1, 1};
  if (ids64) {
    const auto* id = static_cast<const int64_t*>(ids);
    cfemu::RunGrid(grid, moe::kSortThreads, moe::kSortSmemBytes, [=] {
      moe::SortByExpertKernel<int64_t>(id, num_pairs, top_k, E, offsets, sorted_pairs,
                                       token_index);
    });
  } else {
    const auto* id = static_cast<const int32_t*>(ids);
    cfemu::RunGrid(grid, moe::kSortThreads, moe::kSortSmemBytes, [=] {
      moe::SortByExpertKernel<int32_t>(id, num_pairs, top_k, E, offsets, sorted_pairs,
                                       token_index);
    });
  }
  return 0;
}

namespace {

template <class T, class IdT, bool kVec>
void RunSum(uint16_t* out, const uint16_t* x, const IdT* ids, int64_t tokens, int64_t top_k,
            int64_t H, int64_t E) {
  const int64_t threads = tokens * (kVec ? H / 8 : H);
  const Dim3 grid{static_cast<unsigned>((threads + moe::kSumThreads - 1) / moe::kSumThreads), 1,
                  1};
  cfemu::RunGrid(grid, moe::kSumThreads, 0, [=] {
    moe::SumTopkKernel<T, IdT, kVec>(out, x, ids, tokens, top_k, H, E);
  });
}

template <class T, class IdT>
void RunSumVec(int vec, uint16_t* out, const uint16_t* x, const void* ids, int64_t tokens,
               int64_t top_k, int64_t H, int64_t E) {
  if (vec) {
    RunSum<T, IdT, true>(out, x, static_cast<const IdT*>(ids), tokens, top_k, H, E);
  } else {
    RunSum<T, IdT, false>(out, x, static_cast<const IdT*>(ids), tokens, top_k, H, E);
  }
}

}  // namespace

/*! \brief Runs SumTopkKernel: out [tokens, H] from x [tokens, top_k, H]. */
extern "C" int cf_emu_moe_sum(int dtype, int ids64, int vec, void* out, const void* x,
                              const void* ids, int64_t tokens, int64_t top_k, int64_t H,
                              int64_t E) {
  cfemu::g_ranges = {Range(out, tokens * H * 2, "out"), Range(x, tokens * top_k * H * 2, "x")};
  auto* o = static_cast<uint16_t*>(out);
  const auto* xs = static_cast<const uint16_t*>(x);
  if (dtype != 0 && dtype != 1) return -1;
  if (dtype == 0 && ids64) RunSumVec<moe::Fp16, int64_t>(vec, o, xs, ids, tokens, top_k, H, E);
  if (dtype == 0 && !ids64) RunSumVec<moe::Fp16, int32_t>(vec, o, xs, ids, tokens, top_k, H, E);
  if (dtype == 1 && ids64) RunSumVec<moe::Bf16, int64_t>(vec, o, xs, ids, tokens, top_k, H, E);
  if (dtype == 1 && !ids64) RunSumVec<moe::Bf16, int32_t>(vec, o, xs, ids, tokens, top_k, H, E);
  return 0;
}
