// Dynamic per-tensor FP8 quantization: an amax kernel (atomic max into 4 bytes of workspace), then a quantize
// kernel that derives the scale on the device, so the host never waits and CUDA graph capture works.
#include "quant_common.cuh"

namespace fp8kern::quant {
namespace {

// Work is split into units: 16-byte vectors on the aligned path (kVector), single elements otherwise.
template <typename T, bool kVector>
struct Units {
  static constexpr int U = kVector ? kVec<T> : 1;
  int64_t per_row;
  explicit Units(const QuantProblem& p) : per_row(p.cols / U) {}
  __device__ const T* src(const QuantProblem& p, int64_t u) const {
    return static_cast<const T*>(p.x) + (u / per_row) * p.x_row_stride + (u % per_row) * U;
  }
  __device__ uint8_t* dst(const QuantProblem& p, int64_t u) const {
    return static_cast<uint8_t*>(p.q) + (u / per_row) * p.q_row_stride + (u % per_row) * U;
  }
  __device__ unsigned amax(const T* s) const {
    if constexpr (kVector) return vec_amax_bits<T>(load_vec(s));
    else return abs_bits(to_float(*s));
  }
  __device__ void quantize(uint8_t* d, const T* s, float inv) const {
    if constexpr (kVector) store_vec_e4m3<T>(d, load_vec(s), inv);
    else *d = to_e4m3(__fmul_rn(to_float(*s), inv));
  }
};

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreads) amax_kernel(QuantProblem p, Units<T, kVector> units) {
  const int64_t n = p.rows * units.per_row;
  unsigned amax = 0;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < n; u += int64_t(gridDim.x) * blockDim.x)
    amax = max(amax, units.amax(units.src(p, u)));
  amax = block_max(amax);
  if (threadIdx.x == 0) atomicMax(static_cast<unsigned*>(p.workspace), amax);
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kMaxThreads) quantize_kernel(QuantProblem p, Units<T, kVector> units, bool ue8m0) {
  const float s = scale_from_amax(*static_cast<const unsigned*>(p.workspace), p.scale_ub, ue8m0);
  const float inv = __frcp_rn(s);
  if (blockIdx.x == 0 && threadIdx.x == 0) store_scale(p.scale, 0, s, ue8m0);
  const int64_t n = p.rows * units.per_row;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < n; u += int64_t(gridDim.x) * blockDim.x)
    units.quantize(units.dst(p, u), units.src(p, u), inv);
}

template <typename T, bool kVector>
void launch(const QuantProblem& p, bool ue8m0) {
  const Units<T, kVector> units(p);
  const unsigned blocks = grid_stride_blocks(p.rows * units.per_row, kMaxThreads);
  FP8KERN_CUDA_CHECK(cudaMemsetAsync(p.workspace, 0, sizeof(unsigned), p.stream));
  amax_kernel<T, kVector><<<blocks, kMaxThreads, 0, p.stream>>>(p, units);
  FP8KERN_CUDA_CHECK(cudaGetLastError());
  quantize_kernel<T, kVector><<<blocks, kMaxThreads, 0, p.stream>>>(p, units, ue8m0);
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace fp8kern::quant

namespace fp8kern {
using namespace quant;

void quantize_per_tensor(const QuantProblem& p) {
  validate_quantize(p, "tensor");
  if (p.rows == 0) return;  // the caller reports the floor scale for an empty tensor
  const bool ue8m0 = p.scale_dtype == DType::kFloat8E8M0;
  dispatch_input(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vector_path_ok<T>(p)) launch<T, true>(p, ue8m0);
    else launch<T, false>(p, ue8m0);
  });
}

}  // namespace fp8kern
