// Dynamic per-token (per-row) FP8 quantization: one block per row, one read of x when the row fits in registers.
#include "quant_common.cuh"

namespace fp8kern::quant {
namespace {

// Vectors each thread keeps in registers between the amax and the quantize step (8 made ptxas spill);
// rows longer than kCache * blockDim.x vectors (16384 bf16 elements at 512 threads) re-read the tail from L2.
constexpr int kCache = 4;
constexpr int kTokenThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kTokenThreads) per_token_vec_kernel(QuantProblem p, bool ue8m0) {
  constexpr int V = kVec<T>;
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  uint8_t* q = static_cast<uint8_t*>(p.q) + row * p.q_row_stride;
  const int64_t nvec = p.cols / V;

  uint4 cache[kCache];
  unsigned amax = 0;
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int64_t v = threadIdx.x + int64_t(i) * blockDim.x;
    if (v < nvec) {
      cache[i] = load_vec(x + v * V);
      amax = max(amax, vec_amax_bits<T>(cache[i]));
    }
  }
  for (int64_t v = threadIdx.x + int64_t(kCache) * blockDim.x; v < nvec; v += blockDim.x)
    amax = max(amax, vec_amax_bits<T>(load_vec(x + v * V)));

  amax = block_max(amax);
  const float s = scale_from_amax(amax, p.scale_ub, ue8m0);
  const float inv = __frcp_rn(s);
  if (threadIdx.x == 0) store_scale(p.scale, row * p.scale_row_stride, s, ue8m0);

#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int64_t v = threadIdx.x + int64_t(i) * blockDim.x;
    if (v < nvec) store_vec_e4m3<T>(q + v * V, cache[i], inv);
  }
  for (int64_t v = threadIdx.x + int64_t(kCache) * blockDim.x; v < nvec; v += blockDim.x)
    store_vec_e4m3<T>(q + v * V, load_vec(x + v * V), inv);
}

// Any alignment and any number of columns: element loads, two reads of the row.
template <typename T>
__global__ void __launch_bounds__(kTokenThreads) per_token_scalar_kernel(QuantProblem p, bool ue8m0) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  uint8_t* q = static_cast<uint8_t*>(p.q) + row * p.q_row_stride;
  unsigned amax = 0;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) amax = max(amax, abs_bits(to_float(x[c])));
  amax = block_max(amax);
  const float s = scale_from_amax(amax, p.scale_ub, ue8m0);
  const float inv = __frcp_rn(s);
  if (threadIdx.x == 0) store_scale(p.scale, row * p.scale_row_stride, s, ue8m0);
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) q[c] = to_e4m3(__fmul_rn(to_float(x[c]), inv));
}

}  // namespace
}  // namespace fp8kern::quant

namespace fp8kern {
using namespace quant;

void quantize_per_token(const QuantProblem& p) {
  validate_quantize(p, "token");
  if (p.rows == 0) return;
  FP8KERN_CHECK(p.rows <= 0x7fffffff, "quantize_per_token: rows=", p.rows, " exceeds the grid limit 2^31-1");
  const bool ue8m0 = p.scale_dtype == DType::kFloat8E8M0;
  dispatch_input(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(p.rows));
    if (vector_path_ok<T>(p)) {
      per_token_vec_kernel<T><<<grid, threads_for(p.cols / kVec<T>, kTokenThreads), 0, p.stream>>>(p, ue8m0);
    } else {
      per_token_scalar_kernel<T><<<grid, threads_for(p.cols, kTokenThreads), 0, p.stream>>>(p, ue8m0);
    }
  });
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fp8kern
