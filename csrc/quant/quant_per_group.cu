// Dynamic per-group FP8 quantization (1 x group_size, e.g. the 1x128 activation groups of block-scaled GEMMs).
#include "quant_common.cuh"

namespace fp8kern::quant {
namespace {

// group_size / V threads per group (a power of two <= 32), one 16-byte vector each: each group is read once
// and reduced with warp shuffles. Groups never straddle a warp because tpg divides 32.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
per_group_vec_kernel(QuantProblem p, int64_t groups_per_row, int log2_tpg, bool ue8m0) {
  constexpr int V = kVec<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = tid >> log2_tpg;
  const int lane = int(tid & ((1 << log2_tpg) - 1));
  const int64_t row = g / groups_per_row, gc = g % groups_per_row;
  const int64_t col = gc * p.group_size + int64_t(lane) * V;
  const bool in_rows = row < p.rows;
  const bool active = in_rows && col < p.cols;  // the last group of a row may be partial

  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  uint4 raw = make_uint4(0, 0, 0, 0);
  if (active) raw = load_vec(x + col);
  const unsigned amax = warp_max(active ? vec_amax_bits<T>(raw) : 0u, 1 << log2_tpg);
  const float s = scale_from_amax(amax, p.scale_ub, ue8m0);
  if (in_rows && lane == 0) store_scale(p.scale, row * p.scale_row_stride + gc * p.scale_col_stride, s, ue8m0);
  if (active) store_vec_e4m3<T>(static_cast<uint8_t*>(p.q) + row * p.q_row_stride + col, raw, __frcp_rn(s));
}

// Any alignment and group size: one warp per group, element loads.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
per_group_scalar_kernel(QuantProblem p, int64_t groups_per_row, bool ue8m0) {
  const int64_t g = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t row = g / groups_per_row, gc = g % groups_per_row;
  const bool in_rows = row < p.rows;
  const int64_t c0 = gc * p.group_size;
  const int64_t c1 = in_rows ? (c0 + p.group_size < p.cols ? c0 + p.group_size : p.cols) : c0;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  unsigned amax = 0;
  for (int64_t c = c0 + lane; c < c1; c += 32) amax = max(amax, abs_bits(to_float(x[c])));
  amax = warp_max(amax);
  const float s = scale_from_amax(amax, p.scale_ub, ue8m0);
  const float inv = __frcp_rn(s);
  if (in_rows && lane == 0) store_scale(p.scale, row * p.scale_row_stride + gc * p.scale_col_stride, s, ue8m0);
  uint8_t* q = static_cast<uint8_t*>(p.q) + row * p.q_row_stride;
  for (int64_t c = c0 + lane; c < c1; c += 32) q[c] = to_e4m3(__fmul_rn(to_float(x[c]), inv));
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return (int64_t(1) << l) == v ? l : -1;
}

}  // namespace
}  // namespace fp8kern::quant

namespace fp8kern {
using namespace quant;

void quantize_per_group(const QuantProblem& p) {
  validate_quantize(p, "group");
  if (p.rows == 0) return;
  const bool ue8m0 = p.scale_dtype == DType::kFloat8E8M0;
  const int64_t groups_per_row = (p.cols + p.group_size - 1) / p.group_size;
  const int64_t groups = p.rows * groups_per_row;
  dispatch_input(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const int log2_tpg = p.group_size % V == 0 ? log2_exact(p.group_size / V) : -1;
    if (vector_path_ok<T>(p) && log2_tpg >= 0 && log2_tpg <= 5) {
      const int64_t threads = groups << log2_tpg;
      const int64_t blocks = (threads + kMaxThreads - 1) / kMaxThreads;
      FP8KERN_CHECK(blocks <= 0x7fffffff, "quantize_per_group: problem too large (", groups, " groups)");
      per_group_vec_kernel<T><<<unsigned(blocks), kMaxThreads, 0, p.stream>>>(p, groups_per_row, log2_tpg, ue8m0);
    } else {
      const int64_t blocks = (groups * 32 + kMaxThreads - 1) / kMaxThreads;
      FP8KERN_CHECK(blocks <= 0x7fffffff, "quantize_per_group: problem too large (", groups, " groups)");
      per_group_scalar_kernel<T><<<unsigned(blocks), kMaxThreads, 0, p.stream>>>(p, groups_per_row, ue8m0);
    }
  });
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fp8kern
