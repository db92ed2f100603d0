// The pybind11 module fp8kern._C: the only file that knows Python. Tensors cross as raw device pointers,
// sizes, strides and dtype codes (no torch C++ ABI), so one build works across torch versions.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fp8kern/fp8kern.h"
#include "../common/check.h"

namespace py = pybind11;

namespace {

using fp8kern::DType;
using fp8kern::QuantProblem;

// Makes `device` current for a launch and restores the caller's device afterwards, so a call on cuda:1 does not
// change where the caller's later allocations land.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FP8KERN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) FP8KERN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

DType to_dtype(int code, const char* arg) {
  FP8KERN_CHECK(code >= 0 && code <= static_cast<int>(DType::kFloat8E8M0), arg, ": unknown dtype code ", code);
  return static_cast<DType>(code);
}

QuantProblem quant_problem(const std::string& kind, std::uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
                          int64_t x_row_stride, std::uintptr_t q, int64_t q_row_stride, std::uintptr_t scale,
                          int scale_dtype, int64_t scale_row_stride, int64_t scale_col_stride, int64_t group_size,
                          double scale_ub, std::uintptr_t workspace, std::uintptr_t stream) {
  QuantProblem p;
  p.x = reinterpret_cast<const void*>(x);
  p.x_dtype = to_dtype(x_dtype, "x");
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = x_row_stride;
  p.q = reinterpret_cast<void*>(q);
  p.q_row_stride = q_row_stride;
  p.scale = reinterpret_cast<void*>(scale);
  p.scale_dtype = to_dtype(scale_dtype, "scale");
  p.scale_row_stride = scale_row_stride;
  p.scale_col_stride = scale_col_stride;
  // The range check is validate_quantize's (group and static kinds); here only that it fits the int field.
  FP8KERN_CHECK(group_size >= INT32_MIN && group_size <= (int64_t(1) << 30), "group_size=", group_size,
                ", expected group_size <= 2^30");
  p.group_size = static_cast<int>(group_size);
  p.scale_ub = static_cast<float>(scale_ub);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  fp8kern::validate_quantize(p, kind.c_str());  // before touching the device: bad input fails the same way anywhere
  return p;
}

using QuantKernel = void (*)(const QuantProblem&);

QuantKernel quant_kernel(const std::string& kind) {  // validate_quantize has refused any other kind
  return kind == "token" ? &fp8kern::quantize_per_token
         : kind == "group" ? &fp8kern::quantize_per_group
         : kind == "tensor" ? &fp8kern::quantize_per_tensor
                            : &fp8kern::quantize_static;
}

void quantize(const std::string& kind, int device, std::uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
              int64_t x_row_stride, std::uintptr_t q, int64_t q_row_stride, std::uintptr_t scale, int scale_dtype,
              int64_t scale_row_stride, int64_t scale_col_stride, int64_t group_size, double scale_ub,
              std::uintptr_t workspace, std::uintptr_t stream) {
  const auto p = quant_problem(kind, x, x_dtype, rows, cols, x_row_stride, q, q_row_stride, scale, scale_dtype,
                               scale_row_stride, scale_col_stride, group_size, scale_ub, workspace, stream);
  const QuantKernel run = quant_kernel(kind);
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  run(p);
}

// Fields shared by the GEMM problem types, from the raw values the Python layer passes.
template <class Problem>
Problem gemm_problem(std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, int64_t m, int64_t n, int64_t k,
                     int64_t lda, int64_t ldb, int64_t ldd, int d_dtype, std::uintptr_t scale_a, std::uintptr_t scale_b,
                     std::uintptr_t bias, std::uintptr_t workspace, std::size_t workspace_bytes,
                     std::uintptr_t stream) {
  Problem p;
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.d = reinterpret_cast<void*>(d);
  p.m = m;
  p.n = n;
  p.k = k;
  p.lda = lda;
  p.ldb = ldb;
  p.ldd = ldd;
  p.d_dtype = to_dtype(d_dtype, "d");
  p.scale_a = reinterpret_cast<const float*>(scale_a);
  p.scale_b = reinterpret_cast<const float*>(scale_b);
  p.bias = reinterpret_cast<const void*>(bias);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_bytes = workspace_bytes;
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  return p;
}

fp8kern::GemmProblem scaled_mm_problem(const std::string& family, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d,
                                       int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldd,
                                       int d_dtype, std::uintptr_t scale_a, bool scale_a_vector, std::uintptr_t scale_b,
                                       bool scale_b_vector, std::uintptr_t bias, bool fast_accum, int config,
                                       std::uintptr_t workspace, std::size_t workspace_bytes, std::uintptr_t stream) {
  FP8KERN_CHECK(family == "sm90" || family == "sm89", "scaled_mm: family='", family, "', expected 'sm90' or 'sm89'");
  auto p = gemm_problem<fp8kern::GemmProblem>(a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_b, bias,
                                              workspace, workspace_bytes, stream);
  p.scale_a_vector = scale_a_vector;
  p.scale_b_vector = scale_b_vector;
  p.fast_accum = fast_accum;
  p.config = config;
  fp8kern::validate_gemm(p, family.c_str());  // before touching the device
  return p;
}

std::size_t gemm_workspace_size(const std::string& family, int device, std::uintptr_t a, std::uintptr_t b,
                                std::uintptr_t d, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                                int64_t ldd, int d_dtype, std::uintptr_t scale_a, bool scale_a_vector,
                                std::uintptr_t scale_b, bool scale_b_vector, std::uintptr_t bias, bool fast_accum,
                                int config) {
  const auto p = scaled_mm_problem(family, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_a_vector, scale_b,
                                   scale_b_vector, bias, fast_accum, config, 0, 0, 0);
  DeviceGuard guard(device);  // stream-K sizes its workspace by the device's SM count
  return fp8kern::gemm_workspace_size(p, family.c_str());
}

void scaled_mm(const std::string& family, int device, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d,
               int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldd, int d_dtype,
               std::uintptr_t scale_a, bool scale_a_vector, std::uintptr_t scale_b, bool scale_b_vector,
               std::uintptr_t bias, bool fast_accum, int config, std::uintptr_t workspace, std::size_t workspace_bytes,
               std::uintptr_t stream) {
  const auto p = scaled_mm_problem(family, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_a_vector, scale_b,
                                   scale_b_vector, bias, fast_accum, config, workspace, workspace_bytes, stream);
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  if (family == "sm90") fp8kern::scaled_mm_sm90(p);
  else fp8kern::scaled_mm_sm89(p);
}

fp8kern::BlockGemmProblem block_problem(const std::string& family, std::uintptr_t a, std::uintptr_t b,
                                        std::uintptr_t d, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                                        int64_t ldd, int d_dtype, std::uintptr_t scale_a, std::uintptr_t scale_b,
                                        std::uintptr_t bias, int config, std::uintptr_t workspace,
                                        std::size_t workspace_bytes, std::uintptr_t stream) {
  FP8KERN_CHECK(family == "sm90" || family == "sm89", "scaled_mm_block: family='", family,
                "', expected 'sm90' or 'sm89'");
  auto p = gemm_problem<fp8kern::BlockGemmProblem>(a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_b, bias,
                                                   workspace, workspace_bytes, stream);
  p.config = config;
  fp8kern::validate_gemm(p, (family + "_block").c_str());  // before touching the device
  return p;
}

std::size_t block_workspace_size(const std::string& family, int device, std::uintptr_t a, std::uintptr_t b,
                                 std::uintptr_t d, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                                 int64_t ldd, int d_dtype, std::uintptr_t scale_a, std::uintptr_t scale_b,
                                 std::uintptr_t bias, int config) {
  const auto p = block_problem(family, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_b, bias, config, 0, 0,
                               0);
  DeviceGuard guard(device);  // stream-K sizes its workspace by the device's SM count
  return fp8kern::gemm_workspace_size(p, (family + "_block").c_str());
}

void scaled_mm_block(const std::string& family, int device, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d,
                     int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldd, int d_dtype,
                     std::uintptr_t scale_a, std::uintptr_t scale_b, std::uintptr_t bias, int config,
                     std::uintptr_t workspace, std::size_t workspace_bytes, std::uintptr_t stream) {
  const auto p = block_problem(family, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_b, bias, config,
                               workspace, workspace_bytes, stream);
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  if (family == "sm90") fp8kern::blockwise_sm90(p);
  else fp8kern::blockwise_sm89(p);
}

// One linear layer's two launches in one call, both problems validated before either runs: x [rows, cols]
// quantized (kind as for quantize, fp32 scales at `scale` with row stride scale_row_stride and column stride 1, or
// the one static scale there) into q [rows, cols] (row stride cols), then the family's GEMM of q against b [n, cols]
// into d, block-scaled (scale per row and 128 of cols) or not (scale per row when a_vector).
void linear(const std::string& kind, int device, std::uintptr_t x, int x_dtype, int64_t rows, int64_t cols,
            int64_t x_row_stride, std::uintptr_t q, std::uintptr_t scale, int64_t scale_row_stride, int64_t group_size,
            std::uintptr_t quant_workspace, const std::string& family, bool block, std::uintptr_t b, std::uintptr_t d,
            int64_t n, int64_t ldb, int64_t ldd, int d_dtype, bool a_vector, std::uintptr_t scale_b, bool b_vector,
            std::uintptr_t bias, bool fast_accum, int config, std::uintptr_t workspace, std::size_t workspace_bytes,
            std::uintptr_t stream) {
  const bool is_static = kind == "static";
  const auto qp = quant_problem(kind, x, x_dtype, rows, cols, x_row_stride, q, cols, scale,
                                static_cast<int>(DType::kFloat32), scale_row_stride, is_static ? 0 : 1, group_size,
                                0.0, quant_workspace, stream);
  const QuantKernel run = quant_kernel(kind);
  if (block) {
    const auto gp = block_problem(family, q, b, d, rows, n, cols, cols, ldb, ldd, d_dtype, scale, scale_b, bias,
                                  config, workspace, workspace_bytes, stream);
    py::gil_scoped_release release;
    DeviceGuard guard(device);
    run(qp);
    if (family == "sm90") fp8kern::blockwise_sm90(gp);
    else fp8kern::blockwise_sm89(gp);
  } else {
    const auto gp = scaled_mm_problem(family, q, b, d, rows, n, cols, cols, ldb, ldd, d_dtype, scale, a_vector,
                                      scale_b, b_vector, bias, fast_accum, config, workspace, workspace_bytes, stream);
    py::gil_scoped_release release;
    DeviceGuard guard(device);
    run(qp);
    if (family == "sm90") fp8kern::scaled_mm_sm90(gp);
    else fp8kern::scaled_mm_sm89(gp);
  }
}

fp8kern::GroupedGemmProblem grouped_problem(bool block, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d,
                                                 std::uintptr_t scale_a, std::uintptr_t scale_b,
                                                 std::uintptr_t offsets, int64_t groups, int64_t rows, int64_t n,
                                                 int64_t k, int64_t lda, int64_t ldd, int d_dtype,
                                                 std::uintptr_t workspace, std::size_t workspace_bytes,
                                                 std::uintptr_t stream) {
  fp8kern::GroupedGemmProblem p;
  p.block = block;
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.d = reinterpret_cast<void*>(d);
  p.scale_a = reinterpret_cast<const float*>(scale_a);
  p.scale_b = reinterpret_cast<const float*>(scale_b);
  p.offsets = reinterpret_cast<const int64_t*>(offsets);
  p.groups = groups;
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.lda = lda;
  p.ldd = ldd;
  p.d_dtype = to_dtype(d_dtype, "d");
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_bytes = workspace_bytes;
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  fp8kern::validate_grouped(p);  // before touching the device
  return p;
}

std::size_t grouped_workspace_size(int device, bool block, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d,
                                   std::uintptr_t scale_a, std::uintptr_t scale_b, std::uintptr_t offsets,
                                   int64_t groups, int64_t rows, int64_t n, int64_t k, int64_t lda, int64_t ldd,
                                   int d_dtype) {
  const auto p = grouped_problem(block, a, b, d, scale_a, scale_b, offsets, groups, rows, n, k, lda, ldd, d_dtype, 0,
                                 0, 0);
  DeviceGuard guard(device);  // the TMA descriptor workspace is per SM
  return fp8kern::grouped_workspace_size(p);
}

void grouped_mm(int device, bool block, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, std::uintptr_t scale_a,
                      std::uintptr_t scale_b, std::uintptr_t offsets, int64_t groups, int64_t rows, int64_t n,
                      int64_t k, int64_t lda, int64_t ldd, int d_dtype, std::uintptr_t workspace,
                      std::size_t workspace_bytes, std::uintptr_t stream) {
  const auto p = grouped_problem(block, a, b, d, scale_a, scale_b, offsets, groups, rows, n, k, lda, ldd, d_dtype,
                                 workspace, workspace_bytes, stream);
  py::gil_scoped_release release;
  DeviceGuard guard(device);
  fp8kern::grouped_gemm_sm90(p);
}

py::list gemm_configs(const std::string& family) {
  py::list names;
  for (int i = 0;; ++i) {
    const char* name = fp8kern::gemm_config_name(family.c_str(), i);
    if (!*name) break;
    names.append(name);
  }
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fp8kern compiled core (CUDA kernels; torch-free ABI)";
  m.def("compiled_archs", [] { return std::string(fp8kern::compiled_archs()); },
        "CUDA architectures this module holds device code for, e.g. '89,90a'.");
  m.def("device_arch", &fp8kern::device_arch, py::arg("device"),
        "Compute capability of a device as major*10+minor (90 for H100).");
  m.def("gemm_families", [] {
          py::list out;
          for (const char* f : {"sm90", "sm89"})
            if (fp8kern::gemm_family_compiled(f)) out.append(f);
          return out;
        }, "Compiled scaled_mm kernel families, e.g. ['sm90', 'sm89'].");
  m.def("scaled_mm_block", &scaled_mm_block, py::arg("family"), py::arg("device"), py::arg("a"), py::arg("b"),
        py::arg("d"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb"), py::arg("ldd"),
        py::arg("d_dtype"), py::arg("scale_a"), py::arg("scale_b"), py::arg("bias"), py::arg("config"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "Launch a block-scaled (1x128 x 128x128) kernel of a family; scales fp32, K-major, contiguous.");
  m.def("gemm_configs", &gemm_configs, py::arg("family"),
        "Config names of a family ('sm90', 'sm89', 'sm90_block', 'sm89_block'), in table order.");
  m.def("gemm_select_config", [](const std::string& family, int64_t m, int64_t n, int64_t k, int sm_count) {
          return fp8kern::gemm_select_config(family.c_str(), m, n, k, sm_count);
        }, py::arg("family"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("sm_count"),
        "Index of the config the family's select_config picks for a problem shape on a GPU with sm_count SMs.");
  m.def("scaled_mm", &scaled_mm, py::arg("family"), py::arg("device"), py::arg("a"), py::arg("b"), py::arg("d"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb"), py::arg("ldd"), py::arg("d_dtype"),
        py::arg("scale_a"), py::arg("scale_a_vector"), py::arg("scale_b"), py::arg("scale_b_vector"),
        py::arg("bias"), py::arg("fast_accum"), py::arg("config"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "Launch a scaled_mm kernel of a family on the given stream (see fp8kern.scaled_mm).");
  m.def("gemm_workspace_size", &gemm_workspace_size, py::arg("family"), py::arg("device"), py::arg("a"), py::arg("b"),
        py::arg("d"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb"), py::arg("ldd"),
        py::arg("d_dtype"), py::arg("scale_a"), py::arg("scale_a_vector"), py::arg("scale_b"),
        py::arg("scale_b_vector"), py::arg("bias"), py::arg("fast_accum"), py::arg("config"),
        "Workspace bytes scaled_mm needs for the same arguments (0 unless the config is stream-K).");
  m.def("block_workspace_size", &block_workspace_size, py::arg("family"), py::arg("device"), py::arg("a"),
        py::arg("b"), py::arg("d"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb"),
        py::arg("ldd"), py::arg("d_dtype"), py::arg("scale_a"), py::arg("scale_b"), py::arg("bias"),
        py::arg("config"), "Workspace bytes scaled_mm_block needs for the same arguments (0 unless stream-K).");
  m.def("grouped_mm", &grouped_mm, py::arg("device"), py::arg("block"), py::arg("a"), py::arg("b"), py::arg("d"),
        py::arg("scale_a"), py::arg("scale_b"), py::arg("offsets"), py::arg("groups"), py::arg("rows"), py::arg("n"),
        py::arg("k"), py::arg("lda"), py::arg("ldd"), py::arg("d_dtype"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "Launch the sm90 grouped GEMM (MoE experts): group g computes rows offsets[g]:offsets[g+1] (int64 offsets "
        "on the device) with weights b[g]; fp32 contiguous scales, block (K-major) or per row and per column.");
  m.def("grouped_workspace_size", &grouped_workspace_size, py::arg("device"), py::arg("block"), py::arg("a"),
        py::arg("b"),
        py::arg("d"), py::arg("scale_a"), py::arg("scale_b"), py::arg("offsets"), py::arg("groups"), py::arg("rows"),
        py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldd"), py::arg("d_dtype"),
        "Workspace bytes grouped_mm needs for the same arguments on the device.");
  m.def("quantize", &quantize, py::arg("kind"), py::arg("device"), py::arg("x"), py::arg("x_dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("x_row_stride"), py::arg("q"), py::arg("q_row_stride"),
        py::arg("scale"), py::arg("scale_dtype"), py::arg("scale_row_stride"), py::arg("scale_col_stride"),
        py::arg("group_size"), py::arg("scale_ub"), py::arg("workspace"), py::arg("stream"),
        "Launch an activation quantization kernel on the given stream (see fp8kern.quantize).");
  m.def("linear", &linear, py::arg("kind"), py::arg("device"), py::arg("x"), py::arg("x_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("x_row_stride"), py::arg("q"), py::arg("scale"), py::arg("scale_row_stride"),
        py::arg("group_size"), py::arg("quant_workspace"), py::arg("family"), py::arg("block"), py::arg("b"),
        py::arg("d"), py::arg("n"), py::arg("ldb"), py::arg("ldd"), py::arg("d_dtype"), py::arg("a_vector"),
        py::arg("scale_b"), py::arg("b_vector"), py::arg("bias"), py::arg("fast_accum"), py::arg("config"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "One linear layer: the quantization launch, then the family's GEMM of its result, on the given stream "
        "(Fp8Linear's planned forward).");
}
