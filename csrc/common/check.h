// Argument and CUDA checks for the compiled core: every failure names what was given and what is expected.
#pragma once

#include <sstream>
#include <string>

#include "fp8kern/fp8kern.h"

namespace fp8kern::detail {

template <typename... Ts>
std::string cat(const Ts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

}  // namespace fp8kern::detail

// FP8KERN_CHECK(cond, "message parts", ...) throws InvalidArgument with the message when cond is false.
#define FP8KERN_CHECK(cond, ...)                                                              \
  do {                                                                                        \
    if (!(cond)) throw ::fp8kern::InvalidArgument(::fp8kern::detail::cat("fp8kern: ", __VA_ARGS__)); \
  } while (0)

#define FP8KERN_CUDA_CHECK(expr)                                                               \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      throw ::fp8kern::CudaError(::fp8kern::detail::cat("fp8kern: CUDA error '",               \
                                                        cudaGetErrorString(err_), "' at ",     \
                                                        __FILE__, ":", __LINE__));             \
  } while (0)
