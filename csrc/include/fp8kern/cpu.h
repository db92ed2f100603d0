// The C++ API of fp8kern's CPU kernel family: exact FP8 GEMMs on any CPU, one binary with the instruction set chosen
// at run time. No torch, no Python, no CUDA: this header and csrc/cpu/ build with any C++17 compiler.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace fp8kern {
namespace cpu {

// K (and N) extent of one block scale, and the activation group size of block-scaled problems.
constexpr int64_t kBlock = 128;

// Output element types. Values equal fp8kern::DType's (the binding's dtype codes).
enum class OutType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raised for bad arguments (the binding turns it into ValueError).
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// One FP8 GEMM on the CPU:
//   D[m, n] = sa(m, k) * sb(n, k) * sum_k A[m, k] * B[n, k]  (+ bias[n])
// A [m, k] and B [n, k] are e4m3fn bytes, row-major with row strides lda, ldb (K contiguous); D [m, n] row-major with
// row stride ldd. Scales are fp32:
// - block == false: scale_a is one scalar or [m] (scale_a_vector), scale_b one scalar or [n] (scale_b_vector), and
//   D = scale_a[m] * scale_b[n] * (sum_k A B) (+ bias);
// - block == true: scale_a [m, ceil(k/128)] (row stride lds_a), scale_b [ceil(n/128), ceil(k/128)] (row stride
//   lds_b); each 128 of K is summed in fp32, then multiplied by scale_a[m, kb] * scale_b[n / 128, kb] and added.
// Numerics, every instruction set: e4m3 values converted exactly (all 256 codes; NaN stays NaN), products exact,
// fp32 accumulation; only the order of the fp32 sums differs between instruction sets. The result does not depend on
// the thread count (threads split N, never K). The epilogue adds the bias in fp32 and rounds once to the output type
// (round to nearest even).
struct GemmProblem {
  const uint8_t* a = nullptr;
  const uint8_t* b = nullptr;
  void* d = nullptr;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;  // elements
  OutType d_type = OutType::kBFloat16;
  const void* bias = nullptr;         // [n] of d_type, or null
  const float* scale_a = nullptr;
  const float* scale_b = nullptr;
  bool block = false;
  bool scale_a_vector = false, scale_b_vector = false;
  int64_t lds_a = 0, lds_b = 0;       // block scales' row strides (elements)
  int threads = 1;                    // worker threads to use (the caller's share of the machine)
};

// Throws InvalidArgument for a problem the family cannot run (null pointers, negative sizes, strides shorter than a
// row, scale strides shorter than ceil(k/128)).
void validate_gemm(const GemmProblem& p);
void scaled_mm(const GemmProblem& p);
// Which of a valid problem's scales, among the values it reads, are not all finite and > 0 (a NaN, infinite, zero or
// negative scale poisons or flips the result): 0 none, 1 scale_a, 2 scale_b (scale_a is looked at first).
int bad_scales(const GemmProblem& p);

// Activation quantization on the CPU, bit for bit the reference's (fp8kern.reference.quantize):
//   dynamic: amax of the segment (row, group or tensor; NaN propagates), clamped to scale_ub when > 0,
//            scale = max(amax / 448, 2^-126) (correctly rounded), rounded up to a power of two when scale_e8m0;
//   static:  scale read from scale[row * s_rs + (col / group) * s_cs] (fp32);
//   q = e4m3(clamp(x * (1 / scale), -448, 448)), the reciprocal rounded once, round to nearest even, NaN stays NaN.
// x is fp32, fp16 or bf16 (OutType codes) [m, k] with row stride x_rs; q [m, k] e4m3 with row stride q_rs. Dynamic
// scales are written as fp32, or as UE8M0 bytes (2^(byte - 127)) when scale_e8m0, at scale[row * s_rs + g * s_cs].
enum class QuantKind : int { kToken = 0, kGroup = 1, kTensor = 2, kStatic = 3 };

struct QuantProblem {
  QuantKind kind = QuantKind::kToken;
  const void* x = nullptr;
  OutType x_type = OutType::kBFloat16;
  int64_t m = 0, k = 0, x_rs = 0;
  uint8_t* q = nullptr;
  int64_t q_rs = 0;
  void* scale = nullptr;
  bool scale_e8m0 = false;
  int64_t s_rs = 0, s_cs = 0;
  int64_t group = 128;     // columns per scale (group and static kinds)
  float scale_ub = 0.0f;   // > 0: clamp amax to this first (dynamic kinds)
  int threads = 1;
};

void validate_quantize(const QuantProblem& p);
void quantize(const QuantProblem& p);

// One linear layer in one call: the activations x [m, k] quantized as `quant` says (kinds token, group, tensor or
// static per-tensor; q, scale and the strides of `quant` are the call's own, in per-thread scratch), then
// D = scaled_mm(q, B) with `gemm`'s weight, weight scales, output and bias (its a, scale_a, lda and lds_a are the
// call's own too). Exactly quantize() followed by scaled_mm() on their results, with no intermediate buffers for the
// caller to allocate. quant.kind kStatic reads one fp32 scale at quant.scale; a group size other than 128 is
// refused (the block-scaled GEMM's 1x128 groups), as is a group kind without gemm.block or the reverse.
struct LinearProblem {
  QuantProblem quant;
  GemmProblem gemm;
};

void validate_linear(const LinearProblem& p);
void linear(const LinearProblem& p);

// Instruction sets, best first: "amx" (AMX-BF16 tiles, with the AVX-512 kernel for problems of at most four rows of
// A), "avx512" (AVX-512 F/BW/VL with BF16 dot products and VBMI byte lookups), "avx2" (AVX2 + FMA + F16C), "generic"
// (portable C++, every CPU). isa_supported says whether this CPU (and OS) runs one.
bool isa_supported(const char* isa);
// The instruction set in use: the best supported, or the one set_isa forced.
const char* isa();
// Force an instruction set ("" or "auto": the best); throws InvalidArgument for an unknown name or one this CPU lacks.
void set_isa(const char* isa);

}  // namespace cpu
}  // namespace fp8kern
