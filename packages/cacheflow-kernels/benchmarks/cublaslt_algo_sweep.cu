// How much faster than cuBLASLt's first choice can another of its algorithms run a decode step's
// GEMMs? For each LLaMA-7B projection (y[M,N] = x[M,K] W[N,K]^T, fp16 in and out, fp32
// accumulation, as torch's F.linear) at each M, asks cuBLASLt's heuristic for up to 64
// algorithms, times each (median of 30 timed runs of 20 calls over weight copies that exceed
// L2; random data), and prints the first choice's time, the best one's, and both as a share of
// the rate of a 8192^3 fp16 GEMM (first choice) measured in the same run.
//
// Build (headers and libcublasLt.so.13 from the nvidia-cublas wheel; the device's torch ships
// the same library):
//   nvcc -O2 -std=c++17 -arch=sm_90 -I$CUBLAS/include cublaslt_algo_sweep.cu \
//        -L$CUBLAS/lib -l:libcublasLt.so.13 -o cublaslt_algo_sweep
// Run: LD_LIBRARY_PATH=<dir of libcublasLt.so.13> ./cublaslt_algo_sweep [M ...]
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK_CUDA(x)                                                              \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)
#define CHECK_LT(x)                                                                \
  do {                                                                             \
    cublasStatus_t s = (x);                                                        \
    if (s != CUBLAS_STATUS_SUCCESS) {                                              \
      std::fprintf(stderr, "%s:%d cublasLt status %d\n", __FILE__, __LINE__, (int)s); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

namespace {

constexpr size_t kWorkspace = 64u << 20;

// Random fp16 values in [-0.5, 0.5) from a hash of the index: tensor cores draw less power, and
// so clock higher, on constant data, which would flatter every algorithm.
__global__ void FillRandom(half* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2half(float(h & 0xffff) / 65536.f - 0.5f);
  }
}

void Fill(half* p, size_t n, uint32_t seed) {
  FillRandom<<<1024, 256>>>(p, n, seed);
  CHECK_CUDA(cudaGetLastError());
}

struct Gemm {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, c;  // column-major: C[N,M] = W^T-view (T) x x-view (N)
};

Gemm MakeGemm(int m, int n, int k) {
  Gemm g{};
  CHECK_LT(cublasLtMatmulDescCreate(&g.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&g.a, CUDA_R_16F, k, n, k));  // W row-major [N,K]
  CHECK_LT(cublasLtMatrixLayoutCreate(&g.b, CUDA_R_16F, k, m, k));  // x row-major [M,K]
  CHECK_LT(cublasLtMatrixLayoutCreate(&g.c, CUDA_R_16F, n, m, n));  // y row-major [M,N]
  return g;
}

void FreeGemm(Gemm& g) {
  cublasLtMatrixLayoutDestroy(g.a);
  cublasLtMatrixLayoutDestroy(g.b);
  cublasLtMatrixLayoutDestroy(g.c);
  cublasLtMatmulDescDestroy(g.desc);
}

// Median microseconds per call of `algo` (nullptr: the heuristic's first) over rotating weights.
float TimeAlgo(cublasLtHandle_t lt, Gemm& g, const cublasLtMatmulAlgo_t* algo,
               const std::vector<half*>& weights, half* x, half* y, void* ws,
               cudaStream_t stream, bool* ok) {
  const float one = 1.f, zero = 0.f;
  auto call = [&](int i) {
    return cublasLtMatmul(lt, g.desc, &one, weights[i % weights.size()], g.a, x, g.b, &zero, y,
                          g.c, y, g.c, algo, ws, kWorkspace, stream);
  };
  *ok = call(0) == CUBLAS_STATUS_SUCCESS && cudaStreamSynchronize(stream) == cudaSuccess;
  if (!*ok) {
    cudaGetLastError();
    return 0.f;
  }
  for (int i = 0; i < 10; ++i) call(i);
  cudaEvent_t start, end;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&end));
  std::vector<float> times;
  for (int r = 0; r < 30; ++r) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < 20; ++i) call(i);
    CHECK_CUDA(cudaEventRecord(end, stream));
    CHECK_CUDA(cudaEventSynchronize(end));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, end));
    times.push_back(ms * 1000.f / 20.f);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Result {
  float first_us, best_us;
  int count, best_index;
};

Result Sweep(cublasLtHandle_t lt, int m, int n, int k, void* ws, cudaStream_t stream) {
  Gemm g = MakeGemm(m, n, k);
  const size_t w_bytes = size_t(n) * k * sizeof(half);
  const int copies = std::max<size_t>(2, (400u << 20) / w_bytes);
  std::vector<half*> weights(copies);
  for (auto& w : weights) {
    CHECK_CUDA(cudaMalloc(&w, w_bytes));
    Fill(w, w_bytes / sizeof(half), uint32_t(&w - weights.data()) + 1);
  }
  half *x, *y;
  CHECK_CUDA(cudaMalloc(&x, size_t(m) * k * sizeof(half)));
  CHECK_CUDA(cudaMalloc(&y, size_t(m) * n * sizeof(half)));
  Fill(x, size_t(m) * k, 12345u);

  cublasLtMatmulPreference_t pref;
  CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws_size = kWorkspace;
  CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws_size, sizeof(ws_size)));
  std::vector<cublasLtMatmulHeuristicResult_t> found(64);
  int count = 0;
  CHECK_LT(cublasLtMatmulAlgoGetHeuristic(lt, g.desc, g.a, g.b, g.c, g.c, pref, 64, found.data(),
                                          &count));
  Result r{0.f, 1e30f, count, -1};
  for (int i = 0; i < count; ++i) {
    bool ok = false;
    const float us = TimeAlgo(lt, g, &found[i].algo, weights, x, y, ws, stream, &ok);
    if (!ok) continue;
    if (i == 0) r.first_us = us;
    if (us < r.best_us) {
      r.best_us = us;
      r.best_index = i;
    }
  }
  cublasLtMatmulPreferenceDestroy(pref);
  for (auto w : weights) cudaFree(w);
  cudaFree(x);
  cudaFree(y);
  FreeGemm(g);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> ms;
  for (int i = 1; i < argc; ++i) ms.push_back(std::atoi(argv[i]));
  if (ms.empty()) ms = {64, 128, 256, 384, 512, 1024, 2048};
  cublasLtHandle_t lt;
  CHECK_LT(cublasLtCreate(&lt));
  void* ws;
  CHECK_CUDA(cudaMalloc(&ws, kWorkspace));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const Result dense = Sweep(lt, 8192, 8192, 8192, ws, stream);
  const double rate = 2.0 * 8192.0 * 8192.0 * 8192.0 / (dense.first_us * 1e-6);
  std::printf("%s, %d SMs: fp16 8192^3 first choice %.0f TFLOP/s (best of %d: %.0f)\n",
              prop.name, prop.multiProcessorCount, rate / 1e12, dense.count,
              2.0 * 8192.0 * 8192.0 * 8192.0 / (dense.best_us * 1e-6) / 1e12);
  struct Shape {
    const char* name;
    int n, k;
  };
  const Shape shapes[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096},
                          {"down", 4096, 11008}};
  std::printf("%-8s %5s %6s %10s %10s %8s %8s %6s\n", "gemm", "M", "algos", "first us",
              "best us", "first", "best", "gain");
  for (int m : ms) {
    double first_sum = 0, best_sum = 0, flops = 0;
    for (const Shape& s : shapes) {
      const Result r = Sweep(lt, m, s.n, s.k, ws, stream);
      const double f = 2.0 * m * s.n * s.k;
      std::printf("%-8s %5d %6d %10.1f %10.1f %7.1f%% %7.1f%% %5.1f%%\n", s.name, m, r.count,
                  r.first_us, r.best_us, 100.0 * f / (r.first_us * 1e-6) / rate,
                  100.0 * f / (r.best_us * 1e-6) / rate, 100.0 * (r.first_us / r.best_us - 1));
      first_sum += r.first_us;
      best_sum += r.best_us;
      flops += f;
    }
    std::printf("%-8s %5d %6s %10.1f %10.1f %7.1f%% %7.1f%% %5.1f%%\n", "layer", m, "",
                first_sum, best_sum, 100.0 * flops / (first_sum * 1e-6) / rate,
                100.0 * flops / (best_sum * 1e-6) / rate, 100.0 * (first_sum / best_sum - 1));
  }
  cudaFree(ws);
  cublasLtDestroy(lt);
  return 0;
}
