// The CPU family's AVX-512 kernel (AVX-512 F/BW/VL + BF16 + VBMI: Zen 4/5, Ice Lake server byte lookups with
// Sapphire Rapids' and Zen 4's BF16 dot products). Compiled with those target flags (this file only) and run only
// where dispatch.cpp found them.
//
// Conversion: e4m3_avx512.h (exact; A and B share its lane order).
// Products: vdpbf16ps multiplies bf16 pairs exactly (8-bit significands) and adds into fp32 (e4m3 products are
// >= 2^-18 in magnitude, so its flushing of fp32 denormals never applies to a nonzero partial sum).
// Decode (M <= 4): B streams from memory and is converted in registers, each 64 bytes used by every row of A; the
// next tile's rows are prefetched one tile ahead (each row of B is its own stream, and the hardware prefetcher stops
// at page ends: a 4 KB row is a page).
// Otherwise: a tile of 4 rows of B is converted once into per-thread scratch (32 KB at K = 4096) and reused by every
// group of 4 rows of A.
#include <immintrin.h>

#include <algorithm>

#include "e4m3_avx512.h"
#include "kernels.h"

namespace fp8kern {
namespace cpu {
namespace {

int64_t a_bytes(int64_t m, int64_t kp) { return m * kp * 2; }

void convert_a(const GemmProblem& p, int64_t kp, void* dst, int64_t m0, int64_t m1) {
  const E4m3Lut lut;
  for (int64_t i = m0; i < m1; ++i) convert_row_bf16(lut, p.a + i * p.lda, p.k, kp, static_cast<uint16_t*>(dst) + i * kp);
}

int64_t scratch_bytes(int64_t, int64_t kp) { return kTileN * kp * 2; }

inline float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 s = _mm512_castps512_ps128(v);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// Rows [i0, i0 + MT) of A against NT rows of B, chunks [c0, c1) of K. B comes from e4m3 rows converted in registers
// (kStream) or from converted scratch rows. acc[i][j] += the 64-value dot products, in 16 fp32 lanes.
template <int MT, int NT, bool kStream>
inline void chunks(const Prepared& pp, const E4m3Lut& lut, const uint16_t* const* arow, const uint8_t* const* brow,
                   const uint8_t* const* next, const uint16_t* bt, int64_t c0, int64_t c1, __m512 (&acc)[MT][NT]) {
  const int64_t k = pp.p->k;
  for (int64_t c = c0; c < c1; c += kChunk) {
    __m512i a0[MT], a1[MT];  // A's chunk, loaded once for the NT rows of B (from L2 at large K)
    for (int i = 0; i < MT; ++i) {
      a0[i] = _mm512_loadu_si512(arow[i] + c);
      a1[i] = _mm512_loadu_si512(arow[i] + c + 32);
    }
    for (int j = 0; j < NT; ++j) {
      __m512i w0, w1;
      if (kStream) {
        if (next[j] != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next[j] + c), _MM_HINT_T1);
        lut.convert(load_chunk(brow[j] + c, k - c), w0, w1);
      } else {
        w0 = _mm512_loadu_si512(bt + j * pp.kp + c);
        w1 = _mm512_loadu_si512(bt + j * pp.kp + c + 32);
      }
      for (int i = 0; i < MT; ++i) {
        acc[i][j] = dp(acc[i][j], a0[i], w0);
        acc[i][j] = dp(acc[i][j], a1[i], w1);
      }
    }
  }
}

template <int MT, int NT, bool kStream>
void block_tile(const Prepared& pp, const E4m3Lut& lut, int64_t i0, int64_t n0, const uint16_t* bt, float* c, int nt) {
  const GemmProblem& p = *pp.p;
  const uint16_t* arow[MT];
  const uint8_t* brow[NT];
  for (int i = 0; i < MT; ++i) arow[i] = static_cast<const uint16_t*>(pp.a) + (i0 + i) * pp.kp;
  const uint8_t* next[NT];  // streaming: the next tile's rows of B, fetched one tile ahead
  for (int j = 0; j < NT; ++j) {
    brow[j] = p.b + (n0 + j) * p.ldb;
    next[j] = kStream && n0 + NT + j < p.n ? brow[j] + NT * p.ldb : nullptr;
  }
  const int64_t kend = (p.k + kChunk - 1) / kChunk * kChunk;  // chunks past k hold only zeros: skipped
  __m512 acc[MT][NT];
  if (!p.block) {
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
    chunks<MT, NT, kStream>(pp, lut, arow, brow, next, bt, 0, kend, acc);
  } else {
    __m512 total[MT][NT];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) total[i][j] = _mm512_setzero_ps();
    const float* sb = p.scale_b + (n0 / kBlock) * p.lds_b;
    for (int64_t kb = 0; kb < pp.kblocks; ++kb) {
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
      chunks<MT, NT, kStream>(pp, lut, arow, brow, next, bt, kb * kBlock, std::min(kend, (kb + 1) * kBlock), acc);
      for (int i = 0; i < MT; ++i) {
        const __m512 s = _mm512_set1_ps(p.scale_a[(i0 + i) * p.lds_a + kb] * sb[kb]);
        for (int j = 0; j < NT; ++j) total[i][j] = _mm512_fmadd_ps(acc[i][j], s, total[i][j]);
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = total[i][j];
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) c[(i0 + i) * nt + j] = hsum(acc[i][j]);
}

template <int NT, bool kStream>
void rows_of_a(const Prepared& pp, const E4m3Lut& lut, int64_t n0, const uint16_t* bt, float* c) {
  int64_t i = 0;
  const int64_t m = pp.p->m;
  for (; i + 4 <= m; i += 4) block_tile<4, NT, kStream>(pp, lut, i, n0, bt, c, NT);
  switch (m - i) {
    case 1: block_tile<1, NT, kStream>(pp, lut, i, n0, bt, c, NT); break;
    case 2: block_tile<2, NT, kStream>(pp, lut, i, n0, bt, c, NT); break;
    case 3: block_tile<3, NT, kStream>(pp, lut, i, n0, bt, c, NT); break;
    default: break;
  }
}

template <int NT>
void tile_nt(const Prepared& pp, const E4m3Lut& lut, int64_t n0, float* c, uint16_t* bt) {
  if (pp.p->m <= 4) return rows_of_a<NT, true>(pp, lut, n0, nullptr, c);
  for (int j = 0; j < NT; ++j) convert_row_bf16(lut, pp.p->b + (n0 + j) * pp.p->ldb, pp.p->k, pp.kp, bt + j * pp.kp);
  rows_of_a<NT, false>(pp, lut, n0, bt, c);
}

void tile(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch) {
  const E4m3Lut lut;
  uint16_t* bt = static_cast<uint16_t*>(scratch);
  switch (nt) {
    case 1: return tile_nt<1>(pp, lut, n0, c, bt);
    case 2: return tile_nt<2>(pp, lut, n0, c, bt);
    case 3: return tile_nt<3>(pp, lut, n0, c, bt);
    default: return tile_nt<4>(pp, lut, n0, c, bt);
  }
}

}  // namespace

extern const Kernels kAvx512Kernels = {"avx512", kTileN, a_bytes, convert_a, scratch_bytes, tile, epilogue_rows_avx512};

}  // namespace cpu
}  // namespace fp8kern
