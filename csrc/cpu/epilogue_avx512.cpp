// The scaled_mm epilogue (gemm.cpp: epilogue_rows) with AVX-512, for the AVX-512 and AMX kernels: the same fp32
// operations in the same order (c * (scale_a * sb), then + bias; no fused multiply-add), 16 columns at a time, and
// the same round-to-nearest-even to bf16 done on the integer bits, so the output bits are those of the portable
// epilogue. fp16 outputs take the portable epilogue (its NaN and subnormal rules are written out there).
// Compiled with the AVX-512 target flags (this file only) and run only where dispatch.cpp chose one of those kernels.
#include <immintrin.h>

#include "kernels.h"

namespace fp8kern {
namespace cpu {
namespace {

// bf16 bits of 16 fp32 values: number_formats.h's float_to_bf16, lane by lane.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace

void epilogue_rows_avx512(const GemmProblem& p, int64_t n0, int nt, const float* c, const float* sb,
                          const float* bias) {
  if (p.d_type == OutType::kFloat16) {
    epilogue_rows(p, n0, nt, c, sb, bias);
    return;
  }
  for (int64_t i = 0; i < p.m; ++i) {
    const float* ci = c + i * nt;
    const __m512 sa = _mm512_set1_ps(p.block ? 1.0f : p.scale_a[p.scale_a_vector ? i : 0]);
    for (int j = 0; j < nt; j += 16) {
      const __mmask16 k = nt - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nt - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(k, ci + j);
      if (!p.block) v = _mm512_mul_ps(v, _mm512_mul_ps(sa, _mm512_maskz_loadu_ps(k, sb + j)));
      if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + j));
      if (p.d_type == OutType::kFloat32) {
        _mm512_mask_storeu_ps(static_cast<float*>(p.d) + i * p.ldd + n0 + j, k, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.d) + i * p.ldd + n0 + j, k, to_bf16(v));
      }
    }
  }
}

}  // namespace cpu
}  // namespace fp8kern
