// Host-side helpers of the compiled core: dtype names, argument validation, device queries.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "check.h"
#include "device_info.h"

#ifndef FP8KERN_CUDA_ARCHS
#define FP8KERN_CUDA_ARCHS "unknown"
#endif

namespace fp8kern {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kFloat8E8M0: return "float8_e8m0fnu";
  }
  return "unknown dtype";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat8E4M3:
    case DType::kFloat8E8M0: return 1;
  }
  return 0;
}

int device_arch(int device) {
  int major = 0, minor = 0;
  FP8KERN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FP8KERN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
}

const char* compiled_archs() { return FP8KERN_CUDA_ARCHS; }

int current_device() {
  int device = 0;
  FP8KERN_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (int(cache.size()) <= device) cache.resize(device + 1, 0);
  if (cache[device] == 0)
    FP8KERN_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  return cache[device];
}

namespace quant {

static void validate(const QuantProblem& p, const char* what, bool dynamic) {
  FP8KERN_CHECK(p.x != nullptr && p.q != nullptr && p.scale != nullptr, what,
                ": x, q and scale must be non-null device pointers");
  FP8KERN_CHECK(p.x_dtype == DType::kFloat32 || p.x_dtype == DType::kFloat16 || p.x_dtype == DType::kBFloat16,
                what, ": x has dtype ", dtype_name(p.x_dtype), ", expected float32, float16 or bfloat16");
  FP8KERN_CHECK(p.rows >= 0, what, ": rows=", p.rows, ", expected >= 0");
  FP8KERN_CHECK(p.cols >= 1, what, ": cols=", p.cols, ", expected >= 1");
  // x is only read, so its rows may share memory (an expanded row has stride 0); q's rows may not.
  FP8KERN_CHECK(p.x_row_stride >= 0, what, ": x row stride ", p.x_row_stride, ", expected >= 0");
  FP8KERN_CHECK(p.rows <= 1 || p.q_row_stride >= p.cols, what, ": q row stride ", p.q_row_stride,
                " is smaller than cols=", p.cols, " (rows would overlap)");
  FP8KERN_CHECK(p.scale_row_stride >= 0 && p.scale_col_stride >= 0, what, ": scale strides (", p.scale_row_stride,
                ", ", p.scale_col_stride, ") must be >= 0");
  if (dynamic) {
    FP8KERN_CHECK(p.scale_dtype == DType::kFloat32 || p.scale_dtype == DType::kFloat8E8M0, what,
                  ": scale dtype ", dtype_name(p.scale_dtype), ", expected float32 or float8_e8m0fnu");
    FP8KERN_CHECK(p.scale_ub >= 0.0f, what, ": scale_ub=", p.scale_ub, ", expected > 0 (or 0 for none)");
  } else {
    FP8KERN_CHECK(p.scale_dtype == DType::kFloat32, what, ": static scales must be float32, got ",
                  dtype_name(p.scale_dtype));
  }
}

}  // namespace quant

void validate_quantize(const QuantProblem& p, const char* kind) {
  const std::string k(kind);
  FP8KERN_CHECK(k == "token" || k == "group" || k == "tensor" || k == "static", "quantize: kind='", kind,
                "', expected 'token', 'group', 'tensor' or 'static'");
  const std::string what = k == "static" ? "quantize_static" : "quantize_per_" + k;
  quant::validate(p, what.c_str(), k != "static");
  if (k == "group" || k == "static")
    FP8KERN_CHECK(p.group_size >= 1, what, ": group_size=", p.group_size, ", expected >= 1");
  if (k == "tensor") {
    FP8KERN_CHECK(p.workspace != nullptr, what, ": workspace is null, expected 4 bytes of device memory");
    FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.workspace) % 4 == 0, what,
                  ": workspace must be 4-byte aligned (an atomic max on 32 bits)");
  }
  if (p.scale_dtype == DType::kFloat32 || k == "static")
    FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.scale) % 4 == 0, what, ": fp32 scale pointer is not 4-byte aligned");
  // Dynamic scales are written, one per row (token) or per (row, group): distinct ones must not share an address.
  if (k == "token")
    FP8KERN_CHECK(p.rows <= 1 || p.scale_row_stride >= 1, what, ": scale row stride ", p.scale_row_stride,
                  " with rows=", p.rows, ", expected >= 1 (rows would write one scale)");
  if (k == "group") {
    const int64_t groups = (p.cols + p.group_size - 1) / p.group_size;
    const int64_t row_extent = (groups - 1) * p.scale_col_stride + 1;  // a row's scales span this many elements
    FP8KERN_CHECK(groups <= 1 || p.scale_col_stride >= 1, what, ": scale column stride ", p.scale_col_stride,
                  " with ", groups, " groups per row, expected >= 1 (groups would write one scale)");
    FP8KERN_CHECK(p.rows <= 1 || p.scale_row_stride >= row_extent || (p.scale_row_stride >= 1 &&
                  p.scale_col_stride >= (p.rows - 1) * p.scale_row_stride + 1), what, ": scale strides (",
                  p.scale_row_stride, ", ", p.scale_col_stride, ") for ", p.rows, " rows x ", groups,
                  " groups: expected rows a whole row of scales apart (row-major, e.g. (", groups,
                  ", 1)) or groups a whole column apart (column-major, e.g. (1, ", p.rows, ")), so no two share one");
  }
}

}  // namespace fp8kern
