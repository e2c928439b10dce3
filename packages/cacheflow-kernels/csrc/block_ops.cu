// Whole-block operations on the paged KV cache: copy_blocks (copy-on-write inside the GPU cache,
// all layers in one launch) and swap_blocks (GPU <-> pinned CPU: a copy kernel over mapped
// pinned memory, or cudaMemcpyAsync per run).
//
// copy_blocks layouts:
//   key_caches, value_caches: lists of per-layer tensors, each
//                             [num_blocks, block_size, num_kv_heads, head_size], C-contiguous,
//                             one shape and one dtype (float16, bfloat16, float32, or FP8 E4M3
//                             as float8_e4m3fn or uint8: the copies are bytewise) for all,
//                             all on one CUDA device
//   block_mapping (int64):    [num_pairs, 2] on that device: rows (src, dst)
// The layers' data pointers travel by value inside the kernel's parameter block (a
// __grid_constant__ struct of up to kMaxLayersPerLaunch key and value pointers), so there is no
// device pointer array to build, no host-to-device copy, and the call is CUDA-graph capturable.
// More layers than kMaxLayersPerLaunch take one launch per kMaxLayersPerLaunch layers.
// Grid: (pair, layer, key/value); each CUDA block copies one cache block of one layer in the
// widest words (16/8/4/2/1 bytes) that the block size and all pointers allow. Pairs whose src or
// dst lies outside [0, num_blocks) are skipped.
//
// swap_blocks layouts:
//   src, dst:                 [num_blocks_src, ...] and [num_blocks_dst, ...] with the same
//                             trailing shape and dtype, C-contiguous; one is a CUDA tensor, the
//                             other is in pinned host memory (or both on one CUDA device)
//   block_mapping (int64):    [num_pairs, 2] on the CPU: rows (src block, dst block)
// Every index is validated on the host before the first copy (ValueError on any outside its
// cache). Consecutive pairs that continue a run (src+1, dst+1) are merged into one copy. Two or
// more runs go through SwapBlocksKernel (see SwapKernelApplies for when it is not used).
#include <cuda_runtime.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/extra/cuda/device_guard.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "elementwise_common.cuh"

namespace cacheflow {
namespace {

using namespace elementwise;  // NOLINT(build/namespaces)
using tvm::ffi::Array;
using tvm::ffi::Tensor;

// ---------------------------------------------------------------------------------------------
// copy_blocks
// ---------------------------------------------------------------------------------------------

// 2 * 240 pointers = 3840 bytes: with the other parameters within the classic 4 KB limit.
constexpr int kMaxLayersPerLaunch = 240;
constexpr int kCopyThreads = 256;
constexpr int kCopyUnroll = 8;  // 16-byte loads in flight per thread: a 32 KiB block in one round

struct LayerPointers {
  char* ptr[2][kMaxLayersPerLaunch];  // [0]: key caches, [1]: value caches
};

/*!
 * \brief One CUDA block copies `block_words` words from `from` to `to`: kCopyUnroll loads in
 * flight per thread before the stores (source and destination may share an allocation, so the
 * compiler could not reorder them on its own).
 */
template <typename Word>
__device__ __forceinline__ void CopyBlockWords(const Word* from, Word* to, int64_t block_words) {
  for (int64_t i0 = threadIdx.x; i0 < block_words;
       i0 += static_cast<int64_t>(blockDim.x) * kCopyUnroll) {
    Word w[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * blockDim.x;
      if (i < block_words) w[u] = from[i];
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * blockDim.x;
      if (i < block_words) to[i] = w[u];
    }
  }
}

/*!
 * \brief Calls `f(Word{})` with the unsigned word type of `width` bytes (16, 8, 4, 2, else 1).
 */
template <typename F>
void WithWord(int64_t width, F&& f) {
  switch (width) {
    case 16:
      f(uint4{});
      break;
    case 8:
      f(uint2{});
      break;
    case 4:
      f(uint32_t{});
      break;
    case 2:
      f(uint16_t{});
      break;
    default:
      f(uint8_t{});
  }
}

template <typename Word>
__global__ void __launch_bounds__(kCopyThreads)
    CopyBlocksKernel(const __grid_constant__ LayerPointers caches,
                     const int64_t* __restrict__ block_mapping, int64_t num_blocks,
                     int64_t block_words) {
  const int64_t pair = blockIdx.x;
  const int64_t src = block_mapping[2 * pair];
  const int64_t dst = block_mapping[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks || src == dst) return;
  Word* base = reinterpret_cast<Word*>(caches.ptr[blockIdx.z][blockIdx.y]);
  CopyBlockWords<Word>(base + src * block_words, base + dst * block_words, block_words);
}

template <typename Word>
void LaunchCopyBlocks(const LayerPointers& ptrs, int num_layers, const int64_t* mapping,
                      int64_t num_pairs, int64_t num_blocks, int64_t block_bytes,
                      cudaStream_t stream) {
  const int64_t block_words = block_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t threads =
      std::min<int64_t>(kCopyThreads, (block_words + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_layers), 2);
  CopyBlocksKernel<Word><<<grid, static_cast<unsigned>(threads), 0, stream>>>(
      ptrs, mapping, num_blocks, block_words);
}

std::string LayerName(const char* list, size_t i) {
  std::ostringstream os;
  os << list << '[' << i << ']';
  return os.str();
}

void CopyBlocks(Array<Tensor> key_caches, Array<Tensor> value_caches, TensorView block_mapping) {
  constexpr const char* kOp = "copy_blocks";
  constexpr const char* kLayout = "[num_blocks, block_size, num_kv_heads, head_size]";
  TVM_FFI_CHECK(value_caches.size() == key_caches.size(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "value_caches") << "a list of " << key_caches.size()
      << " tensors (one per layer, like 'key_caches'), got " << value_caches.size();
  CheckNdim(kOp, "block_mapping", block_mapping, 2, "[num_pairs, 2]");
  TVM_FFI_CHECK(IsInt64(block_mapping.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "int64, got " << block_mapping.dtype();
  TVM_FFI_CHECK(block_mapping.shape()[1] == 2, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "of shape [num_pairs, 2], got "
      << ShapeStr(block_mapping);
  CheckContiguous(kOp, "block_mapping", block_mapping);

  const size_t num_layers = key_caches.size();
  if (num_layers > 0) {
    const Tensor ref_tensor = key_caches[0];
    const TensorView ref(ref_tensor);
    const std::string ref_name = LayerName("key_caches", 0);
    for (int list = 0; list < 2; ++list) {
      const Array<Tensor>& caches = list == 0 ? key_caches : value_caches;
      for (size_t i = 0; i < num_layers; ++i) {
        const Tensor tensor = caches[i];
        const TensorView t(tensor);
        // The common case passes without building the layer's name (host time per call).
        bool ok = t.ndim() == 4 && IsKvCacheDtype(t.dtype()) && t.dtype() == ref.dtype() &&
                  t.IsContiguous();
        for (int32_t d = 0; ok && d < 4; ++d) ok = t.shape()[d] == ref.shape()[d];
        if (ok) continue;
        const std::string name = LayerName(list == 0 ? "key_caches" : "value_caches", i);
        CheckNdim(kOp, name.c_str(), t, 4, kLayout);
        TVM_FFI_CHECK(IsKvCacheDtype(t.dtype()), ValueError)
            << CACHEFLOW_ARG_ERROR(kOp, name.c_str())
            << "float16, bfloat16, float32 or an FP8 E4M3 cache (float8_e4m3fn or uint8), got "
            << t.dtype();
        CheckDtypeLike(kOp, name.c_str(), t, ref_name.c_str(), ref);
        CheckShapeLike(kOp, name.c_str(), t, ref_name.c_str(), ref);
        CheckContiguous(kOp, name.c_str(), t);
      }
    }
  }
  CheckCuda(kOp, "block_mapping", block_mapping);
  for (int list = 0; list < 2; ++list) {
    const Array<Tensor>& caches = list == 0 ? key_caches : value_caches;
    for (size_t i = 0; i < num_layers; ++i) {
      const Tensor tensor = caches[i];
      const TensorView t(tensor);
      if (t.device().device_type == block_mapping.device().device_type &&
          t.device().device_id == block_mapping.device().device_id) {
        continue;
      }
      const std::string name = LayerName(list == 0 ? "key_caches" : "value_caches", i);
      CheckSameDevice(kOp, name.c_str(), t, "block_mapping", block_mapping);
    }
  }
  const int64_t num_pairs = block_mapping.shape()[0];
  TVM_FFI_CHECK(num_pairs <= 0x7fffffff, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "at most 2^31-1 pairs, got " << num_pairs;
  if (num_layers == 0 || num_pairs == 0) return;

  const Tensor ref_tensor = key_caches[0];
  const TensorView ref(ref_tensor);
  const int64_t num_blocks = ref.shape()[0];
  const int64_t block_bytes = ref.shape()[1] * ref.shape()[2] * ref.shape()[3] *
                              ElementBytes(ref.dtype());
  if (num_blocks == 0 || block_bytes == 0) return;

  // Base addresses of all layers (key caches, then value caches).
  std::vector<char*> bases(2 * num_layers);
  for (size_t i = 0; i < num_layers; ++i) {
    const Tensor k = key_caches[i];
    const Tensor v = value_caches[i];
    bases[i] = DataPtr(TensorView(k));
    bases[num_layers + i] = DataPtr(TensorView(v));
  }
  // The widest word that divides the block and every layer's base address.
  int64_t width = 16;
  for (; width > 1; width /= 2) {
    bool ok = block_bytes % width == 0;
    for (size_t i = 0; ok && i < bases.size(); ++i) ok = IsAligned(bases[i], width);
    if (ok) break;
  }

  const DLDevice dev = block_mapping.device();
  tvm::ffi::CUDADeviceGuard guard(dev.device_id);
  const cudaStream_t stream = EnvStream(dev);
  const auto* mapping = reinterpret_cast<const int64_t*>(DataPtr(block_mapping));
  for (size_t first = 0; first < num_layers; first += kMaxLayersPerLaunch) {
    const int n = static_cast<int>(std::min<size_t>(kMaxLayersPerLaunch, num_layers - first));
    LayerPointers ptrs{};
    for (int i = 0; i < n; ++i) {
      ptrs.ptr[0][i] = bases[first + i];
      ptrs.ptr[1][i] = bases[num_layers + first + i];
    }
    WithWord(width, [&](auto word) {
      using Word = decltype(word);
      LaunchCopyBlocks<Word>(ptrs, n, mapping, num_pairs, num_blocks, block_bytes, stream);
    });
    CheckLaunch();
  }
}

// ---------------------------------------------------------------------------------------------
// swap_blocks
// ---------------------------------------------------------------------------------------------

bool IsHost(DLDevice dev) { return dev.device_type == kDLCPU || dev.device_type == kDLCUDAHost; }

/*! \brief Require `t` in page-locked host memory (cudaHostAlloc / cudaHostRegister). */
/*!
 * \brief Requires pinned host memory; returns its address in the current device's address space
 * (nullptr when the pages are not mapped for the device).
 */
char* CheckPinned(const char* op, const char* name, const TensorView& t) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, DataPtr(t));
  if (err != cudaSuccess) (void)cudaGetLastError();  // clear the sticky-free error state
  TVM_FFI_CHECK(err == cudaSuccess && attr.type == cudaMemoryTypeHost, ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "in pinned (page-locked) host memory, e.g. "
      << "torch.empty(..., pin_memory=True), got pageable host memory";
  if (attr.devicePointer == nullptr) return nullptr;
  // devicePointer is the allocation's device address: add the tensor's offset into it.
  const auto offset = DataPtr(t) - static_cast<char*>(attr.hostPointer);
  return static_cast<char*>(attr.devicePointer) + offset;
}

// swap_blocks of many scattered blocks: one kernel reads and writes both sides directly (pinned
// host memory is mapped into the device's address space under unified addressing), instead of
// one cudaMemcpyAsync per run, whose driver cost (~3-4 us each) dominates 32 KiB blocks. The
// block numbers travel by value, kMaxSwapPairsPerLaunch per launch (3840 bytes of parameters).
constexpr int kMaxSwapPairsPerLaunch = 240;
constexpr int64_t kMinRunsForKernel = 2;  // a single run is one DMA copy: left to the copy engine

struct SwapPairs {
  int64_t src[kMaxSwapPairsPerLaunch];
  int64_t dst[kMaxSwapPairsPerLaunch];
};

template <typename Word>
__global__ void __launch_bounds__(kCopyThreads)
    SwapBlocksKernel(const __grid_constant__ SwapPairs pairs, const Word* src, Word* dst,
                     int64_t block_words) {
  const int pair = blockIdx.x;
  CopyBlockWords<Word>(src + pairs.src[pair] * block_words, dst + pairs.dst[pair] * block_words,
                       block_words);
}

/*!
 * \brief True when the copy kernel is the better way and gives the same result as copies in
 * order: at least kMinRunsForKernel runs, no destination block twice, and src and dst do not
 * overlap (CTAs run in any order).
 */
bool SwapKernelApplies(const char* from, int64_t src_blocks, const char* to, int64_t dst_blocks,
                       const int64_t* mapping, int64_t num_pairs, int64_t block_bytes) {
  int64_t runs = 1;
  for (int64_t q = 1; q < num_pairs; ++q) {
    const bool continues = mapping[2 * q] == mapping[2 * q - 2] + 1 &&
                           mapping[2 * q + 1] == mapping[2 * q - 1] + 1;
    runs += continues ? 0 : 1;
  }
  if (runs < kMinRunsForKernel) return false;
  if (from < to + dst_blocks * block_bytes && to < from + src_blocks * block_bytes) return false;
  std::vector<int64_t> dsts(static_cast<size_t>(num_pairs));
  for (int64_t q = 0; q < num_pairs; ++q) dsts[static_cast<size_t>(q)] = mapping[2 * q + 1];
  std::sort(dsts.begin(), dsts.end());
  return std::adjacent_find(dsts.begin(), dsts.end()) == dsts.end();
}

void LaunchSwapKernel(const char* from, char* to, const int64_t* mapping, int64_t num_pairs,
                      int64_t block_bytes, cudaStream_t stream) {
  int64_t width = 16;
  while (width > 1 && !(block_bytes % width == 0 && AllAligned({from, to}, width))) width /= 2;
  WithWord(width, [&](auto word) {
    using Word = decltype(word);
    const int64_t block_words = block_bytes / static_cast<int64_t>(sizeof(Word));
    const auto threads =
        static_cast<unsigned>(std::min<int64_t>(kCopyThreads, (block_words + 31) / 32 * 32));
    for (int64_t first = 0; first < num_pairs; first += kMaxSwapPairsPerLaunch) {
      const int64_t n = std::min<int64_t>(kMaxSwapPairsPerLaunch, num_pairs - first);
      SwapPairs pairs{};
      for (int64_t i = 0; i < n; ++i) {
        pairs.src[i] = mapping[2 * (first + i)];
        pairs.dst[i] = mapping[2 * (first + i) + 1];
      }
      SwapBlocksKernel<Word><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          pairs, reinterpret_cast<const Word*>(from), reinterpret_cast<Word*>(to), block_words);
      CheckLaunch();
    }
  });
}

void SwapBlocks(TensorView src, TensorView dst, TensorView block_mapping) {
  constexpr const char* kOp = "swap_blocks";
  TVM_FFI_CHECK(src.ndim() >= 1, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "src") << "a tensor [num_blocks, ...] of at least 1 "
      << "dimension, got a 0-D tensor";
  TVM_FFI_CHECK(dst.ndim() == src.ndim(), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "dst") << "a " << src.ndim()
      << "-D tensor [num_blocks, ...] like 'src', got a " << dst.ndim()
      << "-D tensor of shape " << ShapeStr(dst);
  bool same_block = true;
  for (int32_t i = 1; i < src.ndim(); ++i) {
    same_block = same_block && dst.shape()[i] == src.shape()[i];
  }
  TVM_FFI_CHECK(same_block, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "dst") << "of shape [num_blocks, ...] with the block shape of "
      << "'src' " << ShapeStr(src) << ", got " << ShapeStr(dst);
  CheckDtypeLike(kOp, "dst", dst, "src", src);
  CheckNdim(kOp, "block_mapping", block_mapping, 2, "[num_pairs, 2]");
  TVM_FFI_CHECK(IsInt64(block_mapping.dtype()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "int64, got " << block_mapping.dtype();
  TVM_FFI_CHECK(block_mapping.shape()[1] == 2, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "of shape [num_pairs, 2], got "
      << ShapeStr(block_mapping);
  CheckContiguous(kOp, "src", src);
  CheckContiguous(kOp, "dst", dst);
  CheckContiguous(kOp, "block_mapping", block_mapping);

  // Devices: block_mapping on the host; src/dst: CUDA + host, or both on one CUDA device.
  TVM_FFI_CHECK(IsHost(block_mapping.device()), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "a CPU tensor, got a tensor on "
      << DeviceStr(block_mapping.device());
  const DLDevice sd = src.device();
  const DLDevice dd = dst.device();
  TVM_FFI_CHECK(sd.device_type == kDLCUDA || IsHost(sd), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "src") << "a CUDA or pinned CPU tensor, got a tensor on "
      << DeviceStr(sd);
  TVM_FFI_CHECK(dd.device_type == kDLCUDA || IsHost(dd), ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "dst") << "a CUDA or pinned CPU tensor, got a tensor on "
      << DeviceStr(dd);
  TVM_FFI_CHECK(sd.device_type == kDLCUDA || dd.device_type == kDLCUDA, ValueError)
      << CACHEFLOW_ARG_ERROR(kOp, "dst") << "a CUDA tensor when 'src' is on the CPU, got a "
      << "tensor on " << DeviceStr(dd);
  if (sd.device_type == kDLCUDA && dd.device_type == kDLCUDA) {
    CheckSameDevice(kOp, "dst", dst, "src", src);
  }
  const DLDevice cuda_dev = sd.device_type == kDLCUDA ? sd : dd;

  const int64_t src_blocks = src.shape()[0];
  const int64_t dst_blocks = dst.shape()[0];
  const int64_t num_pairs = block_mapping.shape()[0];
  const auto* mapping = reinterpret_cast<const int64_t*>(DataPtr(block_mapping));
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t s = mapping[2 * p];
    const int64_t d = mapping[2 * p + 1];
    TVM_FFI_CHECK(s >= 0 && s < src_blocks && d >= 0 && d < dst_blocks, ValueError)
        << CACHEFLOW_ARG_ERROR(kOp, "block_mapping") << "pairs (src, dst) with 0 <= src < "
        << src_blocks << " and 0 <= dst < " << dst_blocks << ", got (" << s << ", " << d
        << ") in row " << p;
  }
  const int64_t block_bytes =
      src_blocks == 0 ? 0 : src.numel() / src_blocks * ElementBytes(src.dtype());
  if (num_pairs == 0 || block_bytes == 0) return;

  tvm::ffi::CUDADeviceGuard guard(cuda_dev.device_id);
  // Device-side addresses of both tensors (nullptr: host pages not mapped for the device).
  const char* from_dev = IsHost(sd) ? CheckPinned(kOp, "src", src) : DataPtr(src);
  char* to_dev = IsHost(dd) ? CheckPinned(kOp, "dst", dst) : DataPtr(dst);
  const cudaStream_t stream = EnvStream(cuda_dev);
  if (from_dev != nullptr && to_dev != nullptr &&
      SwapKernelApplies(from_dev, src_blocks, to_dev, dst_blocks, mapping, num_pairs,
                        block_bytes)) {
    LaunchSwapKernel(from_dev, to_dev, mapping, num_pairs, block_bytes, stream);
    return;
  }
  const cudaMemcpyKind kind = IsHost(sd)   ? cudaMemcpyHostToDevice
                              : IsHost(dd) ? cudaMemcpyDeviceToHost
                                           : cudaMemcpyDeviceToDevice;
  const char* from = DataPtr(src);
  char* to = DataPtr(dst);
  int64_t p = 0;
  while (p < num_pairs) {
    const int64_t s = mapping[2 * p];
    const int64_t d = mapping[2 * p + 1];
    int64_t run = 1;
    while (p + run < num_pairs && mapping[2 * (p + run)] == s + run &&
           mapping[2 * (p + run) + 1] == d + run) {
      ++run;
    }
    TVM_FFI_CHECK_CUDA_ERROR(cudaMemcpyAsync(to + d * block_bytes, from + s * block_bytes,
                                             static_cast<size_t>(run * block_bytes), kind, stream));
    p += run;
  }
}

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(copy_blocks, cacheflow::CopyBlocks);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(swap_blocks, cacheflow::SwapBlocks);
