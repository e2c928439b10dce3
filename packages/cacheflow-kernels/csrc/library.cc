// Library-wide exports: the ABI version the Python package checks when it loads the library.
#include <tvm/ffi/function.h>

#include <cstdint>

#include "common.h"

namespace cacheflow {
namespace {

/*! \brief The ABI version of this library (see kAbiVersion). */
int64_t AbiVersion() { return kAbiVersion; }

}  // namespace
}  // namespace cacheflow

TVM_FFI_DLL_EXPORT_TYPED_FUNC(abi_version, cacheflow::AbiVersion);
