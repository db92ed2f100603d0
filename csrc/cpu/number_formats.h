// The number formats the CPU family reads and writes, converted in scalar C++: e4m3fn, bf16 and fp16 to and from
// fp32, every conversion exact or rounded to nearest even as stated. One place for all of them (the kernels, the
// epilogue and the quantizer share them).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fp8kern {
namespace cpu {

// e4m3fn byte -> float, exactly: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal
// (m * 2^-9); 0x7f / 0xff are NaN (e4m3fn has no infinity).
inline float e4m3_to_float(uint8_t x) {
  const int e = (x >> 3) & 15, m = x & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float v = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
  return (x & 0x80) ? -v : v;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff;
  float f;
  if (e == 0) {
    f = std::ldexp(float(m), -24);  // zero or subnormal, exact
  } else if (e == 31) {
    f = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    const uint32_t u = ((e + 112) << 23) | (m << 13);
    std::memcpy(&f, &u, 4);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, round to nearest even; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

// fp32 -> fp16, round to nearest even: overflow to infinity, subnormals rounded, NaN stays NaN.
inline uint16_t float_to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  u &= 0x7fffffff;
  if (u > 0x7f800000) return sign | 0x7e00;
  if (u >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds to infinity
  if (u < 0x38800000) {                        // below 2^-14: a multiple of 2^-24, rounded to nearest even
    float mag;
    std::memcpy(&mag, &u, 4);
    return sign | uint16_t(std::nearbyint(mag * 16777216.0f));  // exact scaling; default rounding mode: even
  }
  u += 0xfff + ((u >> 13) & 1);
  return sign | uint16_t((u - (112u << 23)) >> 13);
}

// fp32 (already in [-448, 448], or NaN) -> e4m3fn, round to nearest even.
inline uint8_t to_e4m3(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  u &= 0x7fffffff;
  if (u > 0x7f800000) return sign | 0x7f;
  if (u < (121u << 23)) {  // below 2^-6: a multiple of 2^-9 (subnormal codes; 8 is the smallest normal)
    float mag;
    std::memcpy(&mag, &u, 4);
    return sign | uint8_t(std::nearbyint(mag * 512.0f));
  }
  u += (uint32_t(7 - 127) << 23) + 0x7ffff + ((u >> 20) & 1);
  return sign | uint8_t(u >> 20);
}

}  // namespace cpu
}  // namespace fp8kern
