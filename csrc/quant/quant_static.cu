// Static FP8 quantization with given fp32 scales (per-tensor, per-token or per-group), one pass over x.
#include "quant_common.cuh"

namespace fp8kern::quant {
namespace {

// Elements of one vector can fall in different groups when group_size is not a multiple of the vector width.
__device__ __forceinline__ float scale_at(const QuantProblem& p, const float* scale, int64_t row, int64_t col) {
  return __ldg(scale + row * p.scale_row_stride + (col / p.group_size) * p.scale_col_stride);
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreads) static_kernel(QuantProblem p, int64_t units_per_row) {
  constexpr int U = kVector ? kVec<T> : 1;
  const float* scale = static_cast<const float*>(p.scale);
  const int64_t n = p.rows * units_per_row;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < n; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = u / units_per_row, col = (u % units_per_row) * U;
    const T* src = static_cast<const T*>(p.x) + row * p.x_row_stride + col;
    uint8_t* dst = static_cast<uint8_t*>(p.q) + row * p.q_row_stride + col;
    if constexpr (kVector) {
      const uint4 raw = load_vec(src);
      const T* e = reinterpret_cast<const T*>(&raw);
      float v[U];
#pragma unroll
      for (int i = 0; i < U; ++i) v[i] = __fmul_rn(to_float(e[i]), __frcp_rn(scale_at(p, scale, row, col + i)));
      uint32_t w[U / 4];
      pack_e4m3<U>(v, w);
      store_words<U>(dst, w);
    } else {
      *dst = to_e4m3(__fmul_rn(to_float(*src), __frcp_rn(scale_at(p, scale, row, col))));
    }
  }
}

}  // namespace
}  // namespace fp8kern::quant

namespace fp8kern {
using namespace quant;

void quantize_static(const QuantProblem& p) {
  validate_quantize(p, "static");
  if (p.rows == 0) return;
  dispatch_input(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    if (vector_path_ok<T>(p)) {
      const int64_t per_row = p.cols / V;
      static_kernel<T, true><<<grid_stride_blocks(p.rows * per_row, kMaxThreads), kMaxThreads, 0, p.stream>>>(p, per_row);
    } else {
      static_kernel<T, false><<<grid_stride_blocks(p.rows * p.cols, kMaxThreads), kMaxThreads, 0, p.stream>>>(p, p.cols);
    }
  });
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fp8kern
