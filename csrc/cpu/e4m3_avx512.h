// e4m3 -> bf16 conversion with AVX-512 VBMI byte lookups, shared by the kernels compiled for AVX-512 (kernel_avx512.cpp,
// kernel_amx.cpp; include it only from a file compiled with -mavx512f -mavx512bw -mavx512vbmi).
//
// Every e4m3 value is exactly a bf16 value (4 significant bits, exponents 2^-9 .. 2^8), so 64 bytes become 64 bf16
// with two 128-entry byte lookups (vpermi2b: the high and low byte of bf16(|x|)), the sign OR-ed into the high byte,
// and two byte interleaves. The interleave orders the 64 values by 128-bit lane: out[0:32] holds x[0:8], x[16:24],
// x[32:40], x[48:56] and out[32:64] the other four runs of 8. Both operands of a product are converted with this
// function, so they share the order: pairs (k, k+1) stay adjacent, and each 64-chunk (so each 128-block) of K keeps
// its values.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace fp8kern {
namespace cpu {

// bf16(e4m3 magnitude i) for i < 128, as low and high bytes: exact, a truncation of the float's bits. Built once.
struct E4m3Bf16Bytes {
  alignas(64) uint8_t lo[128], hi[128];
  E4m3Bf16Bytes() {
    for (int i = 0; i < 128; ++i) {
      const float f = e4m3_to_float(uint8_t(i));
      uint32_t u;
      std::memcpy(&u, &f, 4);
      const uint16_t h = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t(u >> 16);
      lo[i] = uint8_t(h & 0xff);
      hi[i] = uint8_t(h >> 8);
    }
  }
  static const E4m3Bf16Bytes& get() {
    static const E4m3Bf16Bytes t;
    return t;
  }
};

// The lookup tables in registers (construct one per kernel call, not per chunk).
struct E4m3Lut {
  __m512i lo0, lo1, hi0, hi1, sign;
  E4m3Lut() {
    const E4m3Bf16Bytes& t = E4m3Bf16Bytes::get();
    lo0 = _mm512_load_si512(t.lo);
    lo1 = _mm512_load_si512(t.lo + 64);
    hi0 = _mm512_load_si512(t.hi);
    hi1 = _mm512_load_si512(t.hi + 64);
    sign = _mm512_set1_epi8(char(0x80));
  }
  // x: 64 e4m3 bytes -> w0, w1: 32 bf16 each, in the order above.
  inline void convert(__m512i x, __m512i& w0, __m512i& w1) const {
    const __m512i lo = _mm512_permutex2var_epi8(lo0, x, lo1);
    __m512i hi = _mm512_permutex2var_epi8(hi0, x, hi1);
    hi = _mm512_ternarylogic_epi32(hi, x, sign, 0xF8);  // hi | (x & 0x80)
    w0 = _mm512_unpacklo_epi8(lo, hi);
    w1 = _mm512_unpackhi_epi8(lo, hi);
  }
};

inline __mmask64 tail_mask(int64_t remaining) {
  return remaining >= 64 ? ~__mmask64(0) : ((__mmask64(1) << remaining) - 1);
}

// 64 bytes at src, of which `remaining` (> 0) are inside the row: a plain load when all are, else a masked one (never
// touching memory past the row).
inline __m512i load_chunk(const uint8_t* src, int64_t remaining) {
  return remaining >= 64 ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(tail_mask(remaining), src);
}

// A row of k e4m3 bytes -> kp bf16 (zero-padded to kp, a multiple of 64), in the order above.
inline void convert_row_bf16(const E4m3Lut& lut, const uint8_t* src, int64_t k, int64_t kp, uint16_t* dst) {
  for (int64_t c = 0; c < kp; c += kChunk) {
    const __m512i x = c < k ? load_chunk(src + c, k - c) : _mm512_setzero_si512();
    __m512i w0, w1;
    lut.convert(x, w0, w1);
    _mm512_storeu_si512(dst + c, w0);
    _mm512_storeu_si512(dst + c + 32, w1);
  }
}

}  // namespace cpu
}  // namespace fp8kern
