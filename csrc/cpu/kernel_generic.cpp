// The CPU family's portable kernel: plain C++ for every CPU (ARM included), also the reference the instruction-set
// kernels are tested against. A is converted to float once per call; each tile converts its rows of B to float
// (a table lookup, exact) into per-thread scratch, then sums exact products in fp32, 8 interleaved partial sums
// per dot product, one 128-block of K at a time.
#include <algorithm>

#include "kernels.h"

namespace fp8kern {
namespace cpu {
namespace {

struct Table {
  float v[256];
  Table() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_to_float(uint8_t(i));
  }
};
const Table& table() {
  static const Table t;
  return t;
}

void convert_row(const uint8_t* src, int64_t k, int64_t kp, float* dst) {
  const float* t = table().v;
  for (int64_t i = 0; i < k; ++i) dst[i] = t[src[i]];
  for (int64_t i = k; i < kp; ++i) dst[i] = 0.0f;
}

int64_t a_bytes(int64_t m, int64_t kp) { return m * kp * int64_t(sizeof(float)); }

void convert_a(const GemmProblem& p, int64_t kp, void* dst, int64_t m0, int64_t m1) {
  for (int64_t i = m0; i < m1; ++i) convert_row(p.a + i * p.lda, p.k, kp, static_cast<float*>(dst) + i * kp);
}

int64_t scratch_bytes(int64_t, int64_t kp) { return kTileN * kp * int64_t(sizeof(float)); }

// sum_{k0 <= k < k1} a[k] b[k] in fp32, 8 interleaved partial sums (k1 - k0 a multiple of 8: rows are padded).
inline float dot(const float* a, const float* b, int64_t k0, int64_t k1) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = k0; k < k1; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[k + l] * b[k + l];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void tile(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch) {
  const GemmProblem& p = *pp.p;
  float* bt = static_cast<float*>(scratch);
  for (int j = 0; j < nt; ++j) convert_row(p.b + (n0 + j) * p.ldb, p.k, pp.kp, bt + j * pp.kp);
  const float* a = static_cast<const float*>(pp.a);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int j = 0; j < nt; ++j) {
      if (!p.block) {
        c[i * nt + j] = dot(a + i * pp.kp, bt + j * pp.kp, 0, pp.kp);
        continue;
      }
      float total = 0.0f;
      for (int64_t kb = 0; kb < pp.kblocks; ++kb) {
        const int64_t k1 = std::min(pp.kp, (kb + 1) * kBlock);
        const float s = p.scale_a[i * p.lds_a + kb] * p.scale_b[(n0 / kBlock) * p.lds_b + kb];
        total += dot(a + i * pp.kp, bt + j * pp.kp, kb * kBlock, k1) * s;
      }
      c[i * nt + j] = total;
    }
  }
}

}  // namespace

extern const Kernels kGenericKernels = {"generic", kTileN, a_bytes, convert_a, scratch_bytes, tile, epilogue_rows};

}  // namespace cpu
}  // namespace fp8kern
