// The CPU family's AVX2 kernel (AVX2 + FMA; x86 CPUs since 2013): e4m3 converted to float 8 at a time in integer
// arithmetic, exactly, then fp32 FMAs of exact products. Compiled with -mavx2 -mfma -mf16c (this file only) and run
// only where dispatch.cpp found those instructions. Like the portable kernel, each tile converts its rows of B into
// per-thread scratch (L1/L2 resident) once and reuses them for every row of A; converting a row prefetches the same
// bytes of the next tile's row (a row of B is its own stream, and the hardware prefetcher stops at page ends).
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace fp8kern {
namespace cpu {
namespace {

// 8 e4m3 bytes (zero-extended into 32-bit lanes) -> 8 floats, exactly. Magnitude bits placed as a float's exponent
// and mantissa with the exponent rebiased by 120 give (1 + m/8) 2^(e-7), the value of every normal code; subnormal
// codes (e = 0) get exponent 121, (1 + m/8) 2^-6, minus 2^-6 leaves m 2^-9 (exact: Sterbenz). 0x7f is NaN.
inline __m256 e4m3x8_to_float(__m256i x) {
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
  const __m256i sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag);  // e == 0
  __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23));
  bits = _mm256_add_epi32(bits, _mm256_and_si256(sub, _mm256_set1_epi32(1 << 23)));
  __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(bits),
                           _mm256_and_ps(_mm256_castsi256_ps(sub), _mm256_set1_ps(0.015625f)));
  const __m256i nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f));
  f = _mm256_blendv_ps(f, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), _mm256_castsi256_ps(nan));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
  return _mm256_or_ps(f, _mm256_castsi256_ps(sign));
}

void convert_row(const uint8_t* src, int64_t k, int64_t kp, float* dst, const uint8_t* next = nullptr) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    if (next != nullptr && (i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
    int64_t raw;
    std::memcpy(&raw, src + i, 8);
    _mm256_storeu_ps(dst + i, e4m3x8_to_float(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw))));
  }
  if (i < k) {  // the tail, without reading past the row
    uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, src + i, size_t(k - i));
    int64_t raw;
    std::memcpy(&raw, tail, 8);
    _mm256_storeu_ps(dst + i, e4m3x8_to_float(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw))));
    i += 8;
  }
  for (; i < kp; i += 8) _mm256_storeu_ps(dst + i, _mm256_setzero_ps());
}

int64_t a_bytes(int64_t m, int64_t kp) { return m * kp * int64_t(sizeof(float)); }

void convert_a(const GemmProblem& p, int64_t kp, void* dst, int64_t m0, int64_t m1) {
  for (int64_t i = m0; i < m1; ++i) convert_row(p.a + i * p.lda, p.k, kp, static_cast<float*>(dst) + i * kp);
}

int64_t scratch_bytes(int64_t, int64_t kp) { return kTileN * kp * int64_t(sizeof(float)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of A against NT rows of B over [k0, k1) (multiples of 8): NT independent FMA chains, two per row.
template <int NT>
inline void dots(const float* a, const float* bt, int64_t kp, int64_t k0, int64_t k1, float* out) {
  __m256 acc0[NT], acc1[NT];
  for (int j = 0; j < NT; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(a + k), x1 = _mm256_loadu_ps(a + k + 8);
    for (int j = 0; j < NT; ++j) {
      acc0[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(bt + j * kp + k), acc0[j]);
      acc1[j] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(bt + j * kp + k + 8), acc1[j]);
    }
  }
  if (k < k1) {
    const __m256 x0 = _mm256_loadu_ps(a + k);
    for (int j = 0; j < NT; ++j) acc0[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(bt + j * kp + k), acc0[j]);
  }
  for (int j = 0; j < NT; ++j) out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j]));
}

template <int NT>
void tile_nt(const Prepared& pp, int64_t n0, float* c, float* bt) {
  const GemmProblem& p = *pp.p;
  const float* a = static_cast<const float*>(pp.a);
  for (int64_t i = 0; i < p.m; ++i) {
    const float* ai = a + i * pp.kp;
    if (!p.block) {
      dots<NT>(ai, bt, pp.kp, 0, pp.kp, c + i * NT);
      continue;
    }
    float total[NT] = {}, part[NT];
    for (int64_t kb = 0; kb < pp.kblocks; ++kb) {
      dots<NT>(ai, bt, pp.kp, kb * kBlock, std::min(pp.kp, (kb + 1) * kBlock), part);
      const float s = p.scale_a[i * p.lds_a + kb] * p.scale_b[(n0 / kBlock) * p.lds_b + kb];
      for (int j = 0; j < NT; ++j) total[j] += part[j] * s;
    }
    for (int j = 0; j < NT; ++j) c[i * NT + j] = total[j];
  }
}

void tile(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch) {
  const GemmProblem& p = *pp.p;
  float* bt = static_cast<float*>(scratch);
  for (int j = 0; j < nt; ++j) {
    const int64_t row = n0 + j;
    convert_row(p.b + row * p.ldb, p.k, pp.kp, bt + j * pp.kp, row + nt < p.n ? p.b + (row + nt) * p.ldb : nullptr);
  }
  switch (nt) {
    case 1: return tile_nt<1>(pp, n0, c, bt);
    case 2: return tile_nt<2>(pp, n0, c, bt);
    case 3: return tile_nt<3>(pp, n0, c, bt);
    default: return tile_nt<4>(pp, n0, c, bt);
  }
}

}  // namespace

extern const Kernels kAvx2Kernels = {"avx2", kTileN, a_bytes, convert_a, scratch_bytes, tile, epilogue_rows};

}  // namespace cpu
}  // namespace fp8kern
