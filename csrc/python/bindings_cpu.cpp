// pybind11 binding of the CPU kernel family (fp8kern._cpu): raw addresses and sizes in, nothing returned; no torch.
// The kernels validate every argument again (InvalidArgument -> ValueError) and run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fp8kern/cpu.h"

namespace py = pybind11;
namespace cpu = fp8kern::cpu;

namespace {

template <typename T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

cpu::GemmProblem gemm_problem(uintptr_t b, uintptr_t d, int64_t m, int64_t n, int64_t k, int64_t ldb, int64_t ldd,
                              int d_dtype, uintptr_t bias, uintptr_t scale_b, bool scale_b_vector, bool block,
                              int64_t lds_b, int threads) {
  cpu::GemmProblem p;
  p.b = cptr<uint8_t>(b);
  p.d = reinterpret_cast<void*>(d);
  p.m = m, p.n = n, p.k = k, p.ldb = ldb, p.ldd = ldd;
  p.d_type = static_cast<cpu::OutType>(d_dtype);
  p.bias = cptr<void>(bias);
  p.scale_b = cptr<float>(scale_b);
  p.scale_b_vector = scale_b_vector;
  p.block = block, p.lds_b = lds_b;
  p.threads = threads;
  return p;
}

cpu::QuantProblem quant_problem(int kind, uintptr_t x, int x_dtype, int64_t m, int64_t k, int64_t x_rs,
                                uintptr_t scale, bool scale_e8m0, int64_t group, float scale_ub, int threads) {
  cpu::QuantProblem p;
  p.kind = static_cast<cpu::QuantKind>(kind);
  p.x = cptr<void>(x);
  p.x_type = static_cast<cpu::OutType>(x_dtype);
  p.m = m, p.k = k, p.x_rs = x_rs;
  p.scale = reinterpret_cast<void*>(scale);
  p.scale_e8m0 = scale_e8m0, p.group = group, p.scale_ub = scale_ub;
  p.threads = threads;
  return p;
}

// Returns 0, or (computing nothing) 1 / 2 when check_scales finds scale_a / scale_b not all finite and > 0.
int scaled_mm(uintptr_t a, uintptr_t b, uintptr_t d, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
              int64_t ldd, int d_dtype, uintptr_t bias, uintptr_t scale_a, bool scale_a_vector, uintptr_t scale_b,
              bool scale_b_vector, bool block, int64_t lds_a, int64_t lds_b, int threads, bool check_scales) {
  cpu::GemmProblem p = gemm_problem(b, d, m, n, k, ldb, ldd, d_dtype, bias, scale_b, scale_b_vector, block, lds_b,
                                    threads);
  p.a = cptr<uint8_t>(a);
  p.lda = lda;
  p.scale_a = cptr<float>(scale_a);
  p.scale_a_vector = scale_a_vector, p.lds_a = lds_a;
  cpu::validate_gemm(p);
  py::gil_scoped_release release;
  if (check_scales) {
    const int bad = cpu::bad_scales(p);
    if (bad) return bad;
  }
  cpu::scaled_mm(p);
  return 0;
}

void quantize(int kind, uintptr_t x, int x_dtype, int64_t m, int64_t k, int64_t x_rs, uintptr_t q, int64_t q_rs,
              uintptr_t scale, bool scale_e8m0, int64_t s_rs, int64_t s_cs, int64_t group, float scale_ub,
              int threads) {
  cpu::QuantProblem p = quant_problem(kind, x, x_dtype, m, k, x_rs, scale, scale_e8m0, group, scale_ub, threads);
  p.q = reinterpret_cast<uint8_t*>(q);
  p.q_rs = q_rs;
  p.s_rs = s_rs, p.s_cs = s_cs;
  cpu::validate_quantize(p);
  py::gil_scoped_release release;
  cpu::quantize(p);
}

void linear(int kind, uintptr_t x, int x_dtype, int64_t m, int64_t k, int64_t x_rs, bool scale_e8m0,
            uintptr_t static_scale, float scale_ub, uintptr_t w, int64_t n, int64_t ldw, uintptr_t w_scale,
            bool w_scale_vector, bool block, int64_t lds_w, uintptr_t d, int64_t ldd, int d_dtype, uintptr_t bias,
            int threads) {
  cpu::LinearProblem p;
  p.quant = quant_problem(kind, x, x_dtype, m, k, x_rs, static_scale, scale_e8m0, cpu::kBlock, scale_ub, threads);
  p.gemm = gemm_problem(w, d, m, n, k, ldw, ldd, d_dtype, bias, w_scale, w_scale_vector, block, lds_w, threads);
  cpu::validate_linear(p);
  py::gil_scoped_release release;
  cpu::linear(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fp8kern's CPU kernel family (exact FP8 GEMMs; the instruction set is chosen at run time)";
  m.def("scaled_mm", &scaled_mm, py::arg("a"), py::arg("b"), py::arg("d"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("lda"), py::arg("ldb"), py::arg("ldd"), py::arg("d_dtype"), py::arg("bias"), py::arg("scale_a"),
        py::arg("scale_a_vector"), py::arg("scale_b"), py::arg("scale_b_vector"), py::arg("block"), py::arg("lds_a"),
        py::arg("lds_b"), py::arg("threads"), py::arg("check_scales"),
        "D = scale_a * scale_b * A B^T (+ bias) from raw CPU addresses (fp8kern/cpu.h: GemmProblem); with "
        "check_scales, returns 1 or 2 without computing when scale_a or scale_b is not all finite and > 0, else 0");
  m.def("quantize", &quantize, py::arg("kind"), py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"),
        py::arg("x_rs"), py::arg("q"), py::arg("q_rs"), py::arg("scale"), py::arg("scale_e8m0"), py::arg("s_rs"),
        py::arg("s_cs"), py::arg("group"), py::arg("scale_ub"), py::arg("threads"),
        "activation quantization from raw CPU addresses (fp8kern/cpu.h: QuantProblem; kind 0 token, 1 group, "
        "2 tensor, 3 static)");
  m.def("linear", &linear, py::arg("kind"), py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"),
        py::arg("x_rs"), py::arg("scale_e8m0"), py::arg("static_scale"), py::arg("scale_ub"), py::arg("w"), py::arg("n"),
        py::arg("ldw"), py::arg("w_scale"), py::arg("w_scale_vector"), py::arg("block"), py::arg("lds_w"), py::arg("d"),
        py::arg("ldd"), py::arg("d_dtype"), py::arg("bias"), py::arg("threads"),
        "one linear layer: quantize x (kind as for quantize; 3 reads the fp32 scale at static_scale), then scaled_mm "
        "against the weight w (fp8kern/cpu.h: LinearProblem)");
  m.def("isa", [] { return std::string(cpu::isa()); }, "the instruction set in use");
  m.def("set_isa", [](const std::string& name) { cpu::set_isa(name.c_str()); }, py::arg("name"),
        "force an instruction set ('avx512', 'avx2', 'generic'; 'auto' for the best this CPU runs)");
  m.def("isa_supported", [](const std::string& name) { return cpu::isa_supported(name.c_str()); }, py::arg("name"));
}
