// How fast can this card read DRAM, and does the paged KV layout cost read bandwidth?
//
// The decode attention kernel is judged against a copy rate (read + write bytes of a device copy
// per second). A read-only stream may go faster than a copy, so this probe measures, in one
// process and on buffers far larger than L2:
//   * copy       cudaMemcpyAsync device to device, (read + write) bytes / s (the benchmarks' figure)
//   * ld         a grid-stride stream of 16-byte ld.global.nc loads, UNROLL in flight per thread
//   * cp.async   16-byte cp.async.cg copies into a per-CTA shared-memory ring (the decode kernel's
//                way of reading K/V), STAGES tiles of 8 KiB in flight per CTA
//   * bulk       cp.async.bulk (TMA bulk copies, one thread per CTA issues 16 KiB chunks) into a
//                ring completed through an mbarrier
//   * paged      a decode step's K/V read (64 sequences x 2048 tokens, 32 heads x 128 fp16,
//                16-token blocks in random order): one CTA per (sequence, head) reading its head's
//                rows of each block with cp.async, in the cache layout the engine uses
//                ([block][token][head][dim], "NHD": 16 rows of 256 B at a stride of 8 KiB) and in
//                the head-major one ([block][head][token][dim], "HND": 4 KiB contiguous per
//                block and head); CTAs in head-fastest or sequence-fastest launch order.
//   * paged bulk the same reads with TMA bulk copies: one per 256-byte row (NHD) or one per
//                4 KiB block and head (HND), completed through an mbarrier per stage.
// Every figure is bytes read (or copied) over the median time of 20 timed runs.
//
// Build: nvcc -O3 -std=c++17 -arch=sm_90a read_bw_probe.cu -o read_bw_probe
// Run:   ./read_bw_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <numeric>
#include <random>
#include <vector>

#define CHECK_CUDA(x)                                                                 \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace {

__device__ unsigned int g_sink;

__device__ __forceinline__ uint4 LdNc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void Sink(unsigned acc) {
  if (acc == 0x9e3779b9u) g_sink = acc;  // never true for the fill below; keeps the loads
}

template <int kUnroll>
__global__ void StreamLd(const uint4* __restrict__ p, size_t n) {
  unsigned acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = LdNc(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = LdNc(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  Sink(acc);
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Each CTA (128 threads) streams contiguous 8 KiB tiles (4 x 16 B per thread) of its share.
template <int kStages>
__global__ void StreamCpAsync(const uint4* __restrict__ p, size_t n_tiles) {
  extern __shared__ uint4 ring[];  // [kStages][512]
  unsigned acc = 0;
  const int t = threadIdx.x;
  auto issue = [&](size_t tile, int slot) {
    if (tile < n_tiles) {
#pragma unroll
      for (int c = 0; c < 4; ++c) CpAsync16(&ring[slot * 512 + c * 128 + t], p + tile * 512 + c * 128 + t);
    }
    CpAsyncCommit();
  };
  size_t tile = blockIdx.x;
  const size_t step = gridDim.x;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(tile + s * step, s);
  for (int k = 0; tile < n_tiles; ++k, tile += step) {
    issue(tile + (kStages - 1) * step, (k + kStages - 1) % kStages);
    CpAsyncWait<kStages - 1>();
    const int slot = k % kStages;
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // each thread reads back its own chunks: no barrier needed
      const uint4 v = ring[slot * 512 + c * 128 + t];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  CpAsyncWait<0>();
  Sink(acc);
}

__device__ __forceinline__ void MbarInit(uint64_t* bar, unsigned count) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(s), "r"(count));
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, unsigned bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(s), "r"(bytes));
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, unsigned phase) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}" ::"r"(s),
      "r"(phase));
}
__device__ __forceinline__ void BulkCopy(void* smem, const void* gmem, unsigned bytes, uint64_t* bar) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(s),
      "l"(gmem), "r"(bytes), "r"(b)
      : "memory");
}

// Each CTA (128 threads) streams 16 KiB chunks with TMA bulk copies into a ring of kStages.
template <int kStages>
__global__ void StreamBulk(const uint4* __restrict__ p, size_t n_chunks) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);  // [kStages][1024]
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kStages * 16384);
  const int t = threadIdx.x;
  if (t == 0) {
    for (int s = 0; s < kStages; ++s) MbarInit(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  unsigned acc = 0;
  size_t chunk = blockIdx.x;
  const size_t step = gridDim.x;
  auto issue = [&](size_t c, int slot) {
    if (t == 0 && c < n_chunks) {
      MbarExpectTx(&bars[slot], 16384);
      BulkCopy(&ring[slot * 1024], p + c * 1024, 16384, &bars[slot]);
    }
  };
  for (int s = 0; s < kStages - 1; ++s) issue(chunk + s * step, s);
  for (int k = 0; chunk < n_chunks; ++k, chunk += step) {
    issue(chunk + (kStages - 1) * step, (k + kStages - 1) % kStages);
    const int slot = k % kStages;
    MbarWait(&bars[slot], (k / kStages) & 1);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint4 v = ring[slot * 1024 + c * 128 + t];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncthreads();  // the slot is refilled next iteration
  }
  Sink(acc);
}

struct PagedShape {
  int seqs = 64, tokens = 2048, heads = 32, block = 16;  // head size 128, fp16: 256-byte rows
  __host__ __device__ int blocks_per_seq() const { return tokens / block; }
  size_t num_blocks() const { return size_t(seqs) * blocks_per_seq(); }
  size_t bytes_per_cache() const { return num_blocks() * block * heads * 256; }
};

// One CTA of 128 threads per (sequence, head): a block's 16 rows of K and of V (2 x 4 KiB) are
// one stage, copied 16 threads per 256-byte row (8 rows per pass, two passes); kStages stages in
// flight.
template <bool kHnd, bool kHeadFastest, int kStages>
__global__ void PagedRead(const uint4* __restrict__ k_cache, const uint4* __restrict__ v_cache,
                          const int* __restrict__ block_table, PagedShape s) {
  extern __shared__ uint4 ring[];  // [kStages][2][256] uint4
  const int head = kHeadFastest ? blockIdx.x % s.heads : blockIdx.x / s.seqs;
  const int seq = kHeadFastest ? blockIdx.x / s.heads : blockIdx.x % s.seqs;
  const int t = threadIdx.x;
  const int nb = s.blocks_per_seq();
  const int* table = block_table + size_t(seq) * nb;
  auto row_base = [&](int blk, int row) -> size_t {  // uint4 index of (block, row, head)
    return kHnd ? ((size_t(blk) * s.heads + head) * s.block + row) * 16
                : ((size_t(blk) * s.block + row) * s.heads + head) * 16;
  };
  auto issue = [&](int i, int slot) {
    if (i < nb) {
      const int blk = table[i];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int idx = c * 128 + t;  // 256 uint4 per cache per block: row idx / 16, chunk idx % 16
        const size_t off = row_base(blk, idx >> 4) + (idx & 15);
        CpAsync16(&ring[(slot * 2 + 0) * 256 + idx], k_cache + off);
        CpAsync16(&ring[(slot * 2 + 1) * 256 + idx], v_cache + off);
      }
    }
    CpAsyncCommit();
  };
  unsigned acc = 0;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(st, st);
  for (int i = 0; i < nb; ++i) {
    issue(i + kStages - 1, (i + kStages - 1) % kStages);
    CpAsyncWait<kStages - 1>();
    const int slot = i % kStages;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const uint4 a = ring[(slot * 2) * 256 + c * 128 + t];
      const uint4 b = ring[(slot * 2 + 1) * 256 + c * 128 + t];
      acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    }
  }
  CpAsyncWait<0>();
  Sink(acc);
}

// PagedRead's work with TMA bulk copies instead of cp.async, completed through one mbarrier per
// stage: kRows (16) copies of one 256-byte row per cache and block, issued by the lanes of
// warp 0 (one row each: lanes 0-15 K, 16-31 V), or, where a head's rows of a block are
// contiguous (HND), one 4 KiB copy per cache and block. Tells whether bulk copies of single
// cache rows stream as fast as cp.async (the decode kernel issues ~45 instructions of
// addressing per 8 LDGSTS of a tile; a bulk copy per row would take a few).
template <bool kHnd, bool kHeadFastest, int kStages>
__global__ void PagedReadBulk(const uint4* __restrict__ k_cache, const uint4* __restrict__ v_cache,
                              const int* __restrict__ block_table, PagedShape s) {
  extern __shared__ __align__(128) unsigned char smem_bulk[];
  uint4* ring = reinterpret_cast<uint4*>(smem_bulk);  // [kStages][2][256] uint4
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem_bulk + kStages * 2 * 4096);
  const int head = kHeadFastest ? blockIdx.x % s.heads : blockIdx.x / s.seqs;
  const int seq = kHeadFastest ? blockIdx.x / s.heads : blockIdx.x % s.seqs;
  const int t = threadIdx.x;
  const int nb = s.blocks_per_seq();
  const int* table = block_table + size_t(seq) * nb;
  if (t == 0) {
    for (int st = 0; st < kStages; ++st) MbarInit(&bars[st], 1);
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  auto row_base = [&](int blk, int row) -> size_t {  // uint4 index of (block, row, head)
    return kHnd ? ((size_t(blk) * s.heads + head) * s.block + row) * 16
                : ((size_t(blk) * s.block + row) * s.heads + head) * 16;
  };
  auto issue = [&](int i, int slot) {  // warp 0 only
    if (i >= nb) return;
    const int blk = table[i];
    if (t == 0) MbarExpectTx(&bars[slot], 2 * 4096);
    __syncwarp();
    if constexpr (kHnd) {
      if (t < 2) {
        BulkCopy(&ring[(slot * 2 + t) * 256], (t ? v_cache : k_cache) + row_base(blk, 0), 4096,
                 &bars[slot]);
      }
    } else {
      const int row = t & 15;
      BulkCopy(&ring[(slot * 2 + (t >> 4)) * 256 + row * 16],
               (t >> 4 ? v_cache : k_cache) + row_base(blk, row), 256, &bars[slot]);
    }
  };
  unsigned acc = 0;
  if (t < 32) {
    for (int st = 0; st < kStages - 1; ++st) issue(st, st);
  }
  for (int i = 0; i < nb; ++i) {
    const int slot = i % kStages;
    MbarWait(&bars[slot], (i / kStages) & 1);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const uint4 a = ring[(slot * 2) * 256 + c * 128 + t];
      const uint4 b = ring[(slot * 2 + 1) * 256 + c * 128 + t];
      acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    }
    __syncthreads();  // every thread is done with the stage refilled next
    if (t < 32) issue(i + kStages - 1, (i + kStages - 1) % kStages);
  }
  Sink(acc);
}

__global__ void Fill(uint4* p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(unsigned(i), unsigned(i >> 32) + 1u, 0x1234567u, unsigned(i) * 3u);
}

template <typename F>
float MedianMs(F&& launch) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int w = 0; w < 3; ++w) launch();
  std::vector<float> ms;
  for (int r = 0; r < 20; ++r) {
    CHECK_CUDA(cudaEventRecord(a));
    launch();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float m = 0;
    CHECK_CUDA(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  CHECK_CUDA(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void Report(const char* what, double bytes, float ms) {
  std::printf("%-52s %9.3f ms %8.1f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
}

}  // namespace

int main() {
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);

  const size_t bytes = size_t(4) << 30;
  const size_t n16 = bytes / 16;
  uint4 *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  Fill<<<1024, 256>>>(src, n16);
  CHECK_CUDA(cudaDeviceSynchronize());

  Report("copy (read + write bytes)", 2.0 * bytes,
         MedianMs([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }));

  for (int per_sm : {2, 4, 8}) {
    char name[96];
    std::snprintf(name, sizeof name, "ld.nc x8, 256 threads, %d CTAs/SM", per_sm);
    Report(name, bytes, MedianMs([&] { StreamLd<8><<<sms * per_sm, 256>>>(src, n16); }));
    std::snprintf(name, sizeof name, "ld.nc x4, 256 threads, %d CTAs/SM", per_sm);
    Report(name, bytes, MedianMs([&] { StreamLd<4><<<sms * per_sm, 256>>>(src, n16); }));
  }
  // A ring kernel of `smem` bytes per CTA at each CTAs-per-SM count, over `items` ring items.
  auto sweep_ring = [&](auto kernel, int smem, std::initializer_list<int> per_sms, const char* what,
                        size_t items) {
    CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    for (int per_sm : per_sms) {
      char name[96];
      std::snprintf(name, sizeof name, "%s, %d CTAs/SM", what, per_sm);
      Report(name, bytes, MedianMs([&] { kernel<<<sms * per_sm, 128, smem>>>(src, items); }));
    }
  };
  sweep_ring(StreamCpAsync<8>, 8 * 8192, {2, 3}, "cp.async, 8 x 8 KiB stages", n16 / 512);
  sweep_ring(StreamBulk<6>, 6 * 16384 + 64, {1, 2}, "bulk (TMA), 6 x 16 KiB stages", n16 / 1024);

  // Paged K/V of one decode step: K in src, V in dst (each 1 GiB).
  PagedShape s;
  std::vector<int> table(s.num_blocks());
  std::iota(table.begin(), table.end(), 0);
  std::mt19937 rng(0);
  std::shuffle(table.begin(), table.end(), rng);
  int* d_table = nullptr;
  CHECK_CUDA(cudaMalloc(&d_table, table.size() * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(d_table, table.data(), table.size() * sizeof(int), cudaMemcpyHostToDevice));
  const double kv_bytes = 2.0 * s.bytes_per_cache();
  const int grid = s.seqs * s.heads;
  const int smem = 6 * 2 * 4096;
  auto run = [&](auto kernel, const char* name) {
    CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    Report(name, kv_bytes, MedianMs([&] { kernel<<<grid, 128, smem>>>(src, dst, d_table, s); }));
  };
  run(PagedRead<false, true, 6>, "paged NHD (engine layout), head-fastest CTAs");
  run(PagedRead<false, false, 6>, "paged NHD (engine layout), sequence-fastest CTAs");
  run(PagedRead<true, true, 6>, "paged HND (head-major), head-fastest CTAs");
  run(PagedRead<true, false, 6>, "paged HND (head-major), sequence-fastest CTAs");
  const int smem_bulk = 6 * 2 * 4096 + 6 * 8;
  auto run_bulk = [&](auto kernel, const char* name) {
    CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bulk));
    Report(name, kv_bytes,
           MedianMs([&] { kernel<<<grid, 128, smem_bulk>>>(src, dst, d_table, s); }));
  };
  run_bulk(PagedReadBulk<false, true, 6>, "paged NHD, TMA bulk copy per 256-B row");
  run_bulk(PagedReadBulk<true, true, 6>, "paged HND, TMA bulk copy per 4-KiB block");
  Report("copy again (read + write bytes)", 2.0 * bytes,
         MedianMs([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }));
  return 0;
}
