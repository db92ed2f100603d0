// The CPU family's scaled_mm: validation, then the driver every instruction set shares. A is converted once per
// call (rows split over the threads); N is split into tasks of whole tiles (4 rows of B, never crossing a 128-row
// block), which the threads take in turn; each tile's fp32 sums go through one epilogue (scales, bias, rounding to
// the output type). Threads split N only, so every output is computed by the same sequence of operations whatever
// the thread count.
#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_buffer.h"
#include "thread_pool.h"

namespace fp8kern {
namespace cpu {

const Kernels& kernels_for(int64_t m);  // dispatch.cpp: the active instruction set's kernels for m rows of A

namespace {

constexpr int64_t kRowsPerTask = kMaxTileN;   // rows of B per task: a multiple of every kernel's tile_n
constexpr int64_t kMinParallelMacs = 1 << 18;  // smaller problems run on the calling thread alone
void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgument("fp8kern.cpu.scaled_mm: " + what);
}

float load_bias(const GemmProblem& p, int64_t n) {
  switch (p.d_type) {
    case OutType::kFloat32: return static_cast<const float*>(p.bias)[n];
    case OutType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p.bias)[n]);
    default: return bf16_to_float(static_cast<const uint16_t*>(p.bias)[n]);
  }
}

// The per-column factors of a tile (nt <= kRowsPerTask columns from n0) as fp32, gathered once, then the rows
// through the kernel's epilogue (kernels.h: epilogue_rows and its AVX-512 build).
void epilogue(const Kernels& kern, const GemmProblem& p, int64_t n0, int nt, const float* c) {
  alignas(64) float sb[kRowsPerTask], bias[kRowsPerTask];
  for (int j = 0; j < nt; ++j) {
    sb[j] = p.block ? 1.0f : p.scale_b[p.scale_b_vector ? n0 + j : 0];
    bias[j] = p.bias ? load_bias(p, n0 + j) : 0.0f;
  }
  kern.epilogue(p, n0, nt, c, sb, bias);
}

}  // namespace

// D[i, n0 + j] from the tile's fp32 sums c[i * nt + j]: v = c * (scale_a[i] * sb[j]) (+ bias[j]) in fp32, rounded
// once to the output type; block-scaled sums are already scaled. Each row is plain loops the compiler vectorises
// for the baseline instruction set, so the epilogue costs little next to the GEMM even at large M.
void epilogue_rows(const GemmProblem& p, int64_t n0, int nt, const float* c, const float* sb, const float* bias) {
  float v[kMaxTileN];
  for (int64_t i = 0; i < p.m; ++i) {
    const float* ci = c + i * nt;
    if (p.block) {
      for (int j = 0; j < nt; ++j) v[j] = ci[j];
    } else {
      const float sa = p.scale_a[p.scale_a_vector ? i : 0];
      for (int j = 0; j < nt; ++j) v[j] = ci[j] * (sa * sb[j]);
    }
    if (p.bias)
      for (int j = 0; j < nt; ++j) v[j] += bias[j];
    switch (p.d_type) {
      case OutType::kFloat32: {
        float* d = static_cast<float*>(p.d) + i * p.ldd + n0;
        for (int j = 0; j < nt; ++j) d[j] = v[j];
        break;
      }
      case OutType::kFloat16: {
        uint16_t* d = static_cast<uint16_t*>(p.d) + i * p.ldd + n0;
        for (int j = 0; j < nt; ++j) d[j] = float_to_fp16(v[j]);
        break;
      }
      default: {
        uint16_t* d = static_cast<uint16_t*>(p.d) + i * p.ldd + n0;
        for (int j = 0; j < nt; ++j) d[j] = float_to_bf16(v[j]);
        break;
      }
    }
  }
}

void validate_gemm(const GemmProblem& p) {
  require(p.m >= 0 && p.n >= 0 && p.k >= 0, "negative size m=" + std::to_string(p.m) + " n=" + std::to_string(p.n) +
                                                 " k=" + std::to_string(p.k));
  require(p.d_type == OutType::kFloat32 || p.d_type == OutType::kFloat16 || p.d_type == OutType::kBFloat16,
          "output dtype code " + std::to_string(int(p.d_type)) + " is not float32, float16 or bfloat16");
  require(p.threads >= 1, "threads=" + std::to_string(p.threads) + " (expected >= 1)");
  if (p.m == 0 || p.n == 0) return;
  require(p.d != nullptr && p.scale_a != nullptr && p.scale_b != nullptr, "null output or scale pointer");
  require(p.k == 0 || (p.a != nullptr && p.b != nullptr), "null operand pointer");
  require(p.m == 1 || p.lda >= p.k, "lda=" + std::to_string(p.lda) + " is shorter than a row of A (k=" +
                                        std::to_string(p.k) + ")");
  require(p.n == 1 || p.ldb >= p.k, "ldb=" + std::to_string(p.ldb) + " is shorter than a row of B (k=" +
                                        std::to_string(p.k) + ")");
  require(p.m == 1 || p.ldd >= p.n, "ldd=" + std::to_string(p.ldd) + " is shorter than a row of D (n=" +
                                        std::to_string(p.n) + ")");
  if (p.block) {
    const int64_t kb = (p.k + kBlock - 1) / kBlock;
    require(p.m == 1 || p.lds_a >= kb, "scale_a row stride " + std::to_string(p.lds_a) + " < ceil(k/128)=" +
                                           std::to_string(kb));
    require(p.n <= kBlock || p.lds_b >= kb, "scale_b row stride " + std::to_string(p.lds_b) + " < ceil(k/128)=" +
                                                std::to_string(kb));
  }
}

namespace {

// Index of the first of `rows` x `cols` fp32 values (row stride ld) that is not finite and > 0, or -1.
int64_t first_bad(const float* s, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = s[i * ld + j];
      if (!(v > 0.0f && v <= std::numeric_limits<float>::max())) return i * cols + j;  // NaN fails both tests
    }
  return -1;
}

}  // namespace

int bad_scales(const GemmProblem& p) {
  if (p.m == 0 || p.n == 0) return 0;
  if (p.block) {
    const int64_t kb = (p.k + kBlock - 1) / kBlock;
    if (first_bad(p.scale_a, p.m, kb, p.lds_a) >= 0) return 1;
    return first_bad(p.scale_b, (p.n + kBlock - 1) / kBlock, kb, p.lds_b) >= 0 ? 2 : 0;
  }
  if (first_bad(p.scale_a, p.scale_a_vector ? p.m : 1, 1, 1) >= 0) return 1;
  return first_bad(p.scale_b, p.scale_b_vector ? p.n : 1, 1, 1) >= 0 ? 2 : 0;
}

void scaled_mm(const GemmProblem& p) {
  validate_gemm(p);
  if (p.m == 0 || p.n == 0) return;
  const Kernels& kern = kernels_for(p.m);
  Prepared pp;
  pp.p = &p;
  pp.kp = (p.k + kChunk - 1) / kChunk * kChunk;
  pp.kblocks = (p.k + kBlock - 1) / kBlock;
  const bool parallel = double(p.m) * double(p.n) * double(p.k) >= double(kMinParallelMacs);
  const int threads = parallel ? p.threads : 1;

  char* a = thread_buffer(Scratch::kConvertedA).get(size_t(kern.a_bytes(p.m, pp.kp)) + 64);
  pp.a = a;
  const int64_t a_tasks = (p.m + kARows - 1) / kARows;
  parallel_for(threads, a_tasks, [&](int64_t t, int) {
    kern.convert_a(p, pp.kp, a, t * kARows, std::min(p.m, (t + 1) * kARows));
  });

  const int64_t scratch = kern.scratch_bytes(p.m, pp.kp) + 64;
  const int64_t ctile = p.m * kern.tile_n;
  const int64_t tasks = (p.n + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(threads, tasks, [&](int64_t t, int) {
    const int64_t end = std::min(p.n, (t + 1) * kRowsPerTask);
    for (int64_t n0 = t * kRowsPerTask; n0 < end; n0 += kern.tile_n) {
      const int nt = int(std::min<int64_t>(kern.tile_n, end - n0));
      float* c = reinterpret_cast<float*>(thread_buffer(Scratch::kTileSums).get(size_t(ctile) * sizeof(float)));
      kern.tile(pp, n0, nt, c, thread_buffer(Scratch::kTile).get(size_t(scratch)));
      epilogue(kern, p, n0, nt, c);
    }
  });
}

}  // namespace cpu
}  // namespace fp8kern
