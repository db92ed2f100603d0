// The C++ API of fp8kern's compiled core: plain descriptors and launch functions, no torch, no Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

namespace fp8kern {

// Element types crossing the boundary. Values are part of the binding's ABI: append only.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,   // OCP e4m3fn: max 448, no inf
  kFloat8E8M0 = 4,   // UE8M0 scale byte: value = 2^(byte - 127)
};

const char* dtype_name(DType t);
int dtype_size(DType t);

// Raised for bad arguments (the binding turns it into ValueError).
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Raised when CUDA reports an error (the binding turns it into RuntimeError).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Largest finite e4m3fn value; quantization saturates to +-kE4M3Max.
constexpr float kE4M3Max = 448.0f;
// Floor for dynamic scales: an all-zero segment gets this finite, positive scale (2^-126, the smallest
// normal fp32 number and exactly representable in UE8M0).
constexpr float kMinScale = 1.1754943508222875e-38f;

// One activation quantization problem: x [rows, cols] with row stride, to q [rows, cols] e4m3.
// Dynamic scales are amax / 448 over a segment (row, group or whole tensor), clamped to [kMinScale, inf),
// optionally with amax clamped to scale_ub first, optionally rounded up to a power of two (UE8M0).
// q = saturate_e4m3(x * (1 / scale)), round to nearest even.
struct QuantProblem {
  const void* x = nullptr;
  DType x_dtype = DType::kBFloat16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;   // elements
  void* q = nullptr;          // e4m3
  int64_t q_row_stride = 0;   // elements
  // Scales: fp32, or one UE8M0 byte each when scale_dtype is kFloat8E8M0.
  void* scale = nullptr;
  DType scale_dtype = DType::kFloat32;
  int64_t scale_row_stride = 0;  // elements; group scales are scale[row * row_stride + g * col_stride]
  int64_t scale_col_stride = 0;
  int group_size = 128;          // group granularity only
  float scale_ub = 0.0f;         // > 0: clamp amax to this before computing the scale (dynamic kinds)
  void* workspace = nullptr;     // per-tensor dynamic: 4 bytes of device memory
  cudaStream_t stream = nullptr;
};

// Dynamic per-row scales: scale[row * scale_row_stride].
void quantize_per_token(const QuantProblem& p);
// Dynamic per-(row, group of group_size columns) scales; the last group of a row may be partial.
void quantize_per_group(const QuantProblem& p);
// Dynamic single scale for the whole tensor (two kernels: amax, then quantize; no host synchronization). With
// rows == 0 nothing is written, the scale included: the caller picks the scale of an empty tensor.
void quantize_per_tensor(const QuantProblem& p);
// Static: scales are inputs (fp32), read as scale[row * scale_row_stride + (col / group_size) * scale_col_stride].
// Per-tensor: both strides 0; per-token: col stride 0 (group_size then selects nothing).
void quantize_static(const QuantProblem& p);

// One FP8 GEMM with the dequantization fused into the epilogue:
//   D[m, n] = scale_a[m or 0] * scale_b[n or 0] * sum_k A[m, k] * B[n, k]  (+ bias[n])
// What every GEMM problem has. A [m, k] and B [n, k] are e4m3, row-major (K contiguous); D [m, n] is row-major with
// row stride ldd. The scales differ per problem kind (below).
struct GemmOperands {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;  // elements
  DType d_dtype = DType::kBFloat16;
  const void* bias = nullptr;         // [n] of d_dtype, or null
  int config = -1;                    // index into the family's config table; -1 selects by shape
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// Per-tensor / per-token x per-channel: D = scale_a[m] * scale_b[n] * A B^T (+ bias).
struct GemmProblem : GemmOperands {
  const float* scale_a = nullptr;     // [m] when scale_a_vector, else one scalar
  bool scale_a_vector = false;
  const float* scale_b = nullptr;     // [n] when scale_b_vector, else one scalar
  bool scale_b_vector = false;
  bool fast_accum = false;            // false: partial sums promoted to fp32 every 128 of K (Ada: 64 or 128)
};

// Hopper (sm_90a) per-tensor / per-token x per-channel family. Throws InvalidArgument for shapes it cannot run
// (K % 16, D row alignment): the Python layer pads those first.
void scaled_mm_sm90(const GemmProblem& p);
// Ada (sm_89) per-tensor / per-token x per-channel family (mma.sync; also built for sm_90a to test on Hopper).
void scaled_mm_sm89(const GemmProblem& p);

// Block-scaled FP8 GEMM: D[m, n] = sum_kb scale_a[m, kb] * scale_b[n / 128, kb] * sum_{k in block kb} A[m, k] B[n, k]
// (+ bias[n]). Scales are fp32 and K-major: scale_a [m, ceil(k/128)], scale_b [ceil(n/128), ceil(k/128)], contiguous.
struct BlockGemmProblem : GemmOperands {
  const float* scale_a = nullptr;
  const float* scale_b = nullptr;
};

// Hopper (sm_90a) block-scaled family (1x128 x 128x128).
void blockwise_sm90(const BlockGemmProblem& p);
// Ada (sm_89) block-scaled family: mma.sync with the scales applied in the mainloop every 128 of K; K needs only
// to be a multiple of 16 (a partial last block is zero-filled). Also built for sm_90a to test on Hopper.
void blockwise_sm89(const BlockGemmProblem& p);

// Grouped FP8 GEMM (mixture-of-experts layers): `groups` GEMMs sharing N and K in one launch. Group g computes rows
// [offsets[g], offsets[g+1]) of D from the same rows of A and of scale_a (rows sorted by group) and its own weights
// B[g] [n, k] with scales scale_b[g]. offsets ([groups + 1] int64, non-decreasing) are read on the device only; each
// range is clamped into [0, rows], and rows outside every range are not written. B [groups, n, k] contiguous. Scales
// fp32, contiguous:
// - block: D[r, c] = sum_kb scale_a[r, kb] * scale_b[g, c / 128, kb] * sum_{k in block kb} A[r, k] B[g, c, k], with
//   scale_a [rows, ceil(k/128)] and scale_b [groups, ceil(n/128), ceil(k/128)] (K-major);
// - row/col (block = false): D[r, c] = scale_a[r] * scale_b[g, c] * sum_k A[r, k] B[g, c, k], with scale_a [rows] and
//   scale_b [groups, n].
struct GroupedGemmProblem {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const float* scale_a = nullptr;
  const float* scale_b = nullptr;
  const int64_t* offsets = nullptr;  // device memory
  bool block = true;
  int64_t groups = 0, rows = 0, n = 0, k = 0;
  int64_t lda = 0, ldd = 0;          // elements
  DType d_dtype = DType::kBFloat16;
  void* workspace = nullptr;         // grouped_workspace_size bytes, 128-byte aligned
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// Hopper (sm_90a): one persistent launch over all groups' 128x128 tiles (plus a one-thread-per-group setup kernel),
// partial sums promoted into fp32 every 128 of K. Needs K >= 128, K and lda multiples of 16, and D rows of a
// multiple of 16 bytes.
void grouped_gemm_sm90(const GroupedGemmProblem& p);
void validate_grouped(const GroupedGemmProblem& p);
// Bytes of workspace grouped_gemm_sm90 needs (depends on groups, the scale kind, the output dtype and the device's SM
// count).
size_t grouped_workspace_size(const GroupedGemmProblem& p);

// The checks every launch function runs first, callable on their own (no device needed): they throw InvalidArgument
// for a problem the named path cannot run. GEMM families: "sm90", "sm89", "sm90_block", "sm89_block"; quantize kinds:
// "token", "group", "tensor", "static".
void validate_gemm(const GemmProblem& p, const char* family);
void validate_gemm(const BlockGemmProblem& p, const char* family);
void validate_quantize(const QuantProblem& p, const char* kind);

// Bytes of device workspace the kernel a per-tensor / per-token problem runs with needs ("sm90" or "sm89"; 0 unless
// the selected config is stream-K). The caller provides at least that much in GemmProblem::workspace, owned by the
// launch's stream.
size_t gemm_workspace_size(const GemmProblem& p, const char* family);
// The same for a block-scaled problem ("sm90_block" or "sm89_block").
size_t gemm_workspace_size(const BlockGemmProblem& p, const char* family);

// Name of config i of a family ("" past the end) and the config select_config picks for a problem on a GPU with
// sm_count multiprocessors. Families: "sm90", "sm89" (per-tensor / per-token x per-channel), "sm90_block",
// "sm89_block" (block-scaled).
const char* gemm_config_name(const char* family, int index);
int gemm_select_config(const char* family, int64_t m, int64_t n, int64_t k, int sm_count);
// Whether the module was compiled with the family's kernels (sm90 needs the 90a target).
bool gemm_family_compiled(const char* family);

// Compute capability (major * 10 + minor) of a device.
int device_arch(int device);
// Arch list the module was compiled for, e.g. "89,90a".
const char* compiled_archs();

}  // namespace fp8kern
