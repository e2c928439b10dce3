// Shared helpers of the cacheflow kernels: argument checks that raise ValueError in Python,
// with messages of the form "<op>: argument '<name>' must be <expected>, got <actual>".
#pragma once

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace cacheflow {

/*!
 * \brief ABI version of the library; must equal cacheflow_kernels.ABI_VERSION. Bump it on any
 * breaking change of an exported function's signature or of a tensor layout.
 */
constexpr int64_t kAbiVersion = 5;

using tvm::ffi::TensorView;

/*! \brief "[2, 3, 4]" for a tensor's shape. */
inline std::string ShapeStr(const TensorView& t) {
  std::ostringstream os;
  os << '[';
  for (int32_t i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.shape()[i];
  os << ']';
  return os.str();
}

/*! \brief "cuda:0", "cpu", or "device_type=<n>:<id>" for other DLPack device types. */
inline std::string DeviceStr(DLDevice dev) {
  std::ostringstream os;
  switch (dev.device_type) {
    case kDLCPU: os << "cpu"; break;
    case kDLCUDA: os << "cuda:" << dev.device_id; break;
    case kDLCUDAHost: os << "cuda_host"; break;
    case kDLCUDAManaged: os << "cuda_managed:" << dev.device_id; break;
    default: os << "device_type=" << static_cast<int>(dev.device_type) << ':' << dev.device_id;
  }
  return os.str();
}

/*! \brief float16, bfloat16 or float32 (one lane): the dtypes of activations and the KV cache. */
inline bool IsFloatKvDtype(DLDataType dt) {
  if (dt.lanes != 1) return false;
  return (dt.code == kDLFloat && (dt.bits == 16 || dt.bits == 32)) ||
         (dt.code == kDLBfloat && dt.bits == 16);
}

/*! \brief An FP8 E4M3 KV cache: float8_e4m3fn, or uint8 holding its bytes (as vLLM passes it). */
inline bool IsFp8CacheDtype(DLDataType dt) {
  return dt.lanes == 1 && dt.bits == 8 && (dt.code == kDLFloat8_e4m3fn || dt.code == kDLUInt);
}

/*! \brief A KV cache dtype: float16, bfloat16, float32 or an FP8 E4M3 cache. */
inline bool IsKvCacheDtype(DLDataType dt) { return IsFloatKvDtype(dt) || IsFp8CacheDtype(dt); }

inline bool IsInt64(DLDataType dt) { return dt.code == kDLInt && dt.bits == 64 && dt.lanes == 1; }

/*! \brief Bytes of one element of a (one-lane, byte-sized) dtype. */
inline int64_t ElementBytes(DLDataType dt) { return (static_cast<int64_t>(dt.bits) * dt.lanes) / 8; }

/*! \brief Address of the first element (data pointer plus DLPack byte offset). */
inline char* DataPtr(const TensorView& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

#define CACHEFLOW_ARG_ERROR(op, name) \
  "" << (op) << ": argument '" << (name) << "' must be "

/*! \brief Require ndim == expected. */
inline void CheckNdim(const char* op, const char* name, const TensorView& t, int32_t expected,
                      const char* layout) {
  TVM_FFI_CHECK(t.ndim() == expected, ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << expected << "-D " << layout << ", got " << t.ndim()
      << "-D tensor of shape " << ShapeStr(t);
}

/*! \brief Require a C-contiguous tensor. */
inline void CheckContiguous(const char* op, const char* name, const TensorView& t) {
  TVM_FFI_CHECK(t.IsContiguous(), ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "contiguous, got a strided tensor of shape "
      << ShapeStr(t);
}

/*!
 * \brief Elements between consecutive rows (dim 0) of a 3-D tensor whose rows are dense
 * [dim1, dim2] blocks (e.g. views of a fused QKV projection output); requires that layout:
 * the last two dims C-contiguous, rows not overlapping. A C-contiguous tensor gives
 * dim1 * dim2. Dims of size 1 may have any stride.
 */
inline int64_t CheckRowStrided(const char* op, const char* name, const TensorView& t) {
  const int64_t inner = t.shape()[1] * t.shape()[2];
  if (t.IsContiguous()) return inner;
  const bool dense = (t.shape()[2] <= 1 || t.strides()[2] == 1) &&
                     (t.shape()[1] <= 1 || t.strides()[1] == t.shape()[2]);
  const int64_t row = t.shape()[0] <= 1 ? inner : t.strides()[0];
  TVM_FFI_CHECK(dense && row >= inner, ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "contiguous, or rows of contiguous [" << t.shape()[1]
      << ", " << t.shape()[2] << "] blocks (strides [>= " << inner << ", " << t.shape()[2]
      << ", 1]), got shape " << ShapeStr(t) << " with strides [" << t.strides()[0] << ", "
      << t.strides()[1] << ", " << t.strides()[2] << "]";
  return row;
}

/*! \brief Require a tensor in CUDA device memory (kDLCUDA). */
inline void CheckCuda(const char* op, const char* name, const TensorView& t) {
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA, ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "a CUDA tensor, got a tensor on "
      << DeviceStr(t.device());
}

/*! \brief Require the same device as the reference tensor `ref` (named `ref_name`). */
inline void CheckSameDevice(const char* op, const char* name, const TensorView& t,
                            const char* ref_name, const TensorView& ref) {
  TVM_FFI_CHECK(t.device().device_type == ref.device().device_type &&
                    t.device().device_id == ref.device().device_id,
                ValueError)
      << CACHEFLOW_ARG_ERROR(op, name) << "on the same device as '" << ref_name << "' ("
      << DeviceStr(ref.device()) << "), got " << DeviceStr(t.device());
}

}  // namespace cacheflow
