// The CPU family's linear layer (fp8kern/cpu.h: LinearProblem): quantize() into per-thread scratch, then scaled_mm()
// on the result, so a layer's forward is one call with nothing allocated by the caller but its output.
#include <cmath>
#include <cstring>
#include <string>

#include "kernels.h"
#include "thread_buffer.h"

namespace fp8kern {
namespace cpu {
namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgument("fp8kern.cpu.linear: " + what);
}

}  // namespace

void validate_linear(const LinearProblem& p) {
  const QuantProblem& q = p.quant;
  const GemmProblem& g = p.gemm;
  require(q.m == g.m && q.k == g.k, "quant is " + std::to_string(q.m) + " x " + std::to_string(q.k) +
                                        " but gemm is " + std::to_string(g.m) + " x " + std::to_string(g.k));
  require(g.block == (q.kind == QuantKind::kGroup), "group quantization goes with block scales, and only with them");
  require(q.kind != QuantKind::kGroup || q.group == kBlock, "group=" + std::to_string(q.group) +
                                                                 " (the block-scaled GEMM reads 1x128 groups)");
  require(q.m == 0 || q.k == 0 || q.kind != QuantKind::kStatic || q.scale != nullptr, "null static scale");
}

void linear(const LinearProblem& p) {
  validate_linear(p);
  QuantProblem q = p.quant;
  GemmProblem g = p.gemm;
  const int64_t m = q.m, k = q.k;
  const int64_t groups = q.kind == QuantKind::kGroup ? (k + kBlock - 1) / kBlock : 1;
  const int64_t count = q.kind == QuantKind::kTensor || q.kind == QuantKind::kStatic ? 1 : m * groups;
  uint8_t* a = reinterpret_cast<uint8_t*>(thread_buffer(Scratch::kLinearQ).get(size_t(m * k) + 64));
  // fp32 scales for the GEMM, then (UE8M0 only) the bytes quantize writes
  char* sbuf = thread_buffer(Scratch::kLinearScales).get(size_t(count) * 5 + 64);
  float* scales = reinterpret_cast<float*>(sbuf);
  q.q = a, q.q_rs = k;
  if (q.kind == QuantKind::kStatic) {
    q.s_rs = q.s_cs = 0, q.group = k > 0 ? k : 1;
    g.scale_a = static_cast<const float*>(q.scale);
  } else {
    q.scale = q.scale_e8m0 ? static_cast<void*>(sbuf + count * 4) : static_cast<void*>(scales);
    q.s_rs = q.kind == QuantKind::kToken ? 1 : groups, q.s_cs = 1;
    g.scale_a = scales;
  }
  g.a = a, g.lda = k;
  g.scale_a_vector = q.kind == QuantKind::kToken;
  g.lds_a = groups;
  q.threads = g.threads;
  validate_quantize(q);
  validate_gemm(g);
  if (m == 0 || g.n == 0) return;
  quantize(q);
  if (q.scale_e8m0 && q.kind != QuantKind::kStatic) {  // UE8M0 byte e is 2^(e - 127), exactly; 0xff is NaN
    const uint8_t* e = static_cast<const uint8_t*>(q.scale);
    for (int64_t i = 0; i < count; ++i) scales[i] = e[i] == 0xff ? std::nanf("") : std::ldexp(1.0f, int(e[i]) - 127);
  }
  scaled_mm(g);
}

}  // namespace cpu
}  // namespace fp8kern
