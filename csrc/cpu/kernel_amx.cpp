// The CPU family's AMX kernel (Intel AMX-BF16 tiles: Sapphire Rapids and later Xeons). Compiled with the AMX and
// AVX-512 target flags (this file only) and run only where dispatch.cpp found AMX and the OS granted the tile data
// state (arch_prctl); dispatch.cpp sends problems with few rows of A to the AVX-512 kernel instead.
//
// Roles: the weight is the tiles' left operand (16 rows of B x 32 bf16 of K, B's natural row-major layout), the
// activations the right one (A converted once per call into the tiles' pair-interleaved layout, in blocks of 32 rows:
// [M/32][K/2][32][2] bf16, zero rows past M, so a tile's 16 rows of K pairs lie 128 bytes apart whatever M is), so a
// result tile is 16 rows of B x 16 rows of A.
// B is converted from e4m3 (e4m3_avx512.h: exact, in the lane order A shares) into per-thread scratch, and each step
// of 32 of K multiplies 2 weight tiles (32 rows of B, a panel) by 2 activation tiles (32 rows of A): 2 x 2 results.
// - Few rows of A (at most 32): each 64 of K of a panel is converted into one half of an 8 KB buffer (L1) while
//   the tiles read the previous 64 from the other half, so the weight streams from memory once, converted on the
//   way.
// - More: the call's 128 rows of B are converted once, in groups of panels that fit in L2 with a block of A, and
//   every 32 rows of A sweep each group (A is read once per group, not once per panel).
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and adds into fp32 (it flushes fp32 denormals, which a nonzero
// sum of e4m3 products never is: they are multiples of 2^-18). Block scales: each 128 of K is summed in the tiles,
// then scaled and added into fp32 totals.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#include "e4m3_avx512.h"
#include "kernels.h"

namespace fp8kern {
namespace cpu {
namespace {

constexpr int kTileRows = 128;  // rows of B per tile call (one 128-row block of B)
constexpr int kPanel = 32;      // rows of B per step: two 16-row weight tiles
constexpr int kTile = 16;
constexpr int64_t kGroupBytes = 1 << 20;  // converted weight kept in L2 per group of panels
constexpr int64_t kSlab = 64;             // narrow mode: K converted per panel at a time (32 x 64 bf16: 4 KB)

constexpr int kABlock = 32;  // rows of A per block of the converted layout

inline int64_t rows_padded(int64_t m) { return (m + kTile - 1) / kTile * kTile; }

int64_t a_bytes(int64_t m, int64_t kp) { return kp / 2 * ((m + kABlock - 1) / kABlock * kABlock) * 4; }

// Rows [m0, m1) of A (m0 a multiple of kARows = 32, at most 32 rows: the driver's row groups, one block each, so
// two threads never write neighbouring lines) into the blocked pair-interleaved layout:
// dst32[((i / 32) * kp / 2 + kk) * 32 + i % 32] = bf16 pair (2 kk, 2 kk + 1) of row i, zero for rows past M. Each
// half block of 16 rows is converted 64 of K at a time and written out as whole 64-byte lines (16 rows of one pair).
void convert_a(const GemmProblem& p, int64_t kp, void* dst, int64_t m0, int64_t m1) {
  static_assert(kARows == kABlock, "a row group is one block of the layout");
  const E4m3Lut lut;
  alignas(64) uint16_t rows[kTile][kChunk];
  for (int64_t h0 = m0; h0 < m0 + kABlock; h0 += kTile) {
    uint32_t* out = static_cast<uint32_t*>(dst) + (h0 / kABlock) * (kp / 2) * kABlock + h0 % kABlock;
    if (h0 >= m1) {
      for (int64_t kk = 0; kk < kp / 2; ++kk) std::memset(out + kk * kABlock, 0, kTile * 4);
      continue;
    }
    for (int64_t c = 0; c < kp; c += kChunk) {
      for (int64_t r = 0; r < kTile; ++r) {
        const int64_t i = h0 + r;
        const int64_t have = i < m1 ? std::max<int64_t>(0, std::min<int64_t>(kChunk, p.k - c)) : 0;
        convert_row_bf16(lut, p.a + (i < m1 ? i : h0) * p.lda + c, have, kChunk, rows[r]);
      }
      for (int64_t kk = 0; kk < kChunk / 2; ++kk) {
        uint32_t* line = out + (c / 2 + kk) * kABlock;
        for (int r = 0; r < kTile; ++r) std::memcpy(line + r, &rows[r][2 * kk], 4);
      }
    }
  }
}

// Panels of a group (each kPanel rows of kp bf16), staging for the result tiles (4 x 16 x 16 fp32) and block totals
// (same), and the narrow mode's two slab buffers (kPanel x kSlab bf16 each).
int64_t panels_per_group(int64_t kp) {
  return std::max<int64_t>(1, std::min<int64_t>(kTileRows / kPanel, kGroupBytes / (kPanel * kp * 2)));
}
int64_t scratch_bytes(int64_t, int64_t kp) {
  return panels_per_group(kp) * kPanel * kp * 2 + 2 * 4 * kTile * kTile * 4 + 2 * kPanel * kSlab * 2 + 64;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: results (n-tile w, m-tile t at 2 w + t); 4-5: weight tiles; 6-7: activation tiles.
void load_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One step of 32 of K for NW weight tiles x MT activation tiles.
template <int NW, int MT>
inline void step(const uint16_t* w, int64_t w_stride, const uint32_t* x, int64_t x_stride) {
  _tile_loadd(4, w, w_stride);
  if (NW > 1) _tile_loadd(5, w + kTile * (w_stride / 2), w_stride);
  _tile_loadd(6, x, x_stride);
  if (MT > 1) _tile_loadd(7, x + kTile, x_stride);
  _tile_dpbf16ps(0, 4, 6);
  if (MT > 1) _tile_dpbf16ps(1, 4, 7);
  if (NW > 1) _tile_dpbf16ps(2, 5, 6);
  if (NW > 1 && MT > 1) _tile_dpbf16ps(3, 5, 7);
}

template <int NW, int MT>
inline void zero() {
  _tile_zero(0);
  if (MT > 1) _tile_zero(1);
  if (NW > 1) _tile_zero(2);
  if (NW > 1 && MT > 1) _tile_zero(3);
}

// Results of tiles into stage[(2 w + t) * 256 + n * 16 + m].
template <int NW, int MT>
inline void store(float* stage) {
  _tile_stored(0, stage, 64);
  if (MT > 1) _tile_stored(1, stage + 256, 64);
  if (NW > 1) _tile_stored(2, stage + 512, 64);
  if (NW > 1 && MT > 1) _tile_stored(3, stage + 768, 64);
}

// Where a step's weight tiles come from: a converted panel (rows of kp bf16), or, narrow, e4m3 rows converted 64 of
// K at a time into a small buffer just before use.
struct Weights {
  const uint16_t* panel = nullptr;  // wide: kPanel rows of kp bf16
  const uint8_t* b = nullptr;       // narrow: the panel's first row of B
  int rows = 0;                     // narrow: rows of B in the panel (the rest of the buffer stays zero)
  uint16_t* chunk = nullptr;        // narrow: 2 x kPanel x kSlab bf16 (one half converted while the other is read)
};

// Steps over [k0, k1) (multiples of 32) of K.
template <int NW, int MT>
inline void steps(const Prepared& pp, const E4m3Lut& lut, const Weights& w, const uint32_t* x, int64_t k0, int64_t k1) {
  constexpr int64_t x_stride = kABlock * 4;
  if (w.panel != nullptr) {
    for (int64_t k = k0; k < k1; k += 32) step<NW, MT>(w.panel + k, pp.kp * 2, x + (k / 2) * kABlock, x_stride);
    return;
  }
  // Software-pipelined: slab s + 1 is converted into one half of the buffer before the tiles read slab s from the
  // other, so the tile loads do not wait on the vector stores just made (profiled converting each slab and then
  // using it: ~30% of the time sat on the tile loads; pipelined, M = 16 ran 11-14% faster on this project's Xeon).
  const E4m3Lut l = lut;  // in registers: the buffer's stores could alias a referenced table
  const int64_t ldb = pp.p->ldb, kk = pp.p->k;
  const uint8_t* const b = w.b;
  const int rows = w.rows;
  uint16_t* const buf[2] = {w.chunk, w.chunk + kPanel * kSlab};
  auto convert_slab = [&](int64_t s0, uint16_t* dst) {
    for (int j = 0; j < rows; ++j) {
      __m512i w0, w1;
      l.convert(s0 < kk ? load_chunk(b + j * ldb + s0, kk - s0) : _mm512_setzero_si512(), w0, w1);
      _mm512_storeu_si512(dst + j * kSlab, w0);
      _mm512_storeu_si512(dst + j * kSlab + 32, w1);
    }
  };
  static_assert(kSlab == kChunk, "one chunk of each row per slab");
  convert_slab(k0, buf[0]);
  int half = 0;
  for (int64_t s0 = k0; s0 < k1; s0 += kSlab, half ^= 1) {  // k0, k1: multiples of 64 here (whole chunks of K)
    if (s0 + kSlab < k1) convert_slab(s0 + kSlab, buf[half ^ 1]);
    for (int64_t k = s0; k < std::min(k1, s0 + kSlab); k += 32)
      step<NW, MT>(buf[half] + (k - s0), kSlab * 2, x + (k / 2) * kABlock, x_stride);
  }
}

// Rows [i0, i0 + 16 MT) of A (padded) against one panel (rows n0 .. n0 + nw, nw <= 32, of B): c[i * ldc + j0 + j].
template <int NW, int MT>
void block_of_a(const Prepared& pp, const E4m3Lut& lut, const Weights& w, int64_t n0, int nw, int64_t i0,
                float* stage, float* total, float* c, int ldc, int j0) {
  const GemmProblem& p = *pp.p;
  const uint32_t* x = static_cast<const uint32_t*>(pp.a) + (i0 / kABlock) * (pp.kp / 2) * kABlock + i0 % kABlock;
  const int64_t kend = (p.k + kChunk - 1) / kChunk * kChunk;
  if (!p.block) {
    zero<NW, MT>();
    steps<NW, MT>(pp, lut, w, x, 0, kend);
    store<NW, MT>(stage);
  } else {
    std::fill(total, total + 4 * 256, 0.0f);
    const float* sb = p.scale_b + (n0 / kBlock) * p.lds_b;
    for (int64_t kb = 0; kb < pp.kblocks; ++kb) {
      zero<NW, MT>();
      steps<NW, MT>(pp, lut, w, x, kb * kBlock, std::min(kend, (kb + 1) * kBlock));
      store<NW, MT>(stage);
      for (int t = 0; t < MT; ++t) {  // scale per row of A (a tile's column): sa[i, kb] * sb[kb]
        alignas(64) float s[kTile];
        for (int m = 0; m < kTile; ++m) {
          const int64_t i = i0 + t * kTile + m;
          s[m] = i < p.m ? p.scale_a[i * p.lds_a + kb] * sb[kb] : 0.0f;
        }
        const __m512 sv = _mm512_load_ps(s);
        for (int wi = 0; wi < NW; ++wi) {
          float* st = stage + (2 * wi + t) * 256;
          float* to = total + (2 * wi + t) * 256;
          for (int n = 0; n < kTile; ++n)
            _mm512_storeu_ps(to + n * kTile, _mm512_fmadd_ps(_mm512_loadu_ps(st + n * kTile), sv,
                                                             _mm512_loadu_ps(to + n * kTile)));
        }
      }
    }
    stage = total;
  }
  for (int wi = 0; wi < NW; ++wi)
    for (int t = 0; t < MT; ++t)
      for (int n = 0; n < kTile && wi * kTile + n < nw; ++n)
        for (int m = 0; m < kTile && i0 + t * kTile + m < p.m; ++m)
          c[(i0 + t * kTile + m) * ldc + j0 + wi * kTile + n] = stage[(2 * wi + t) * 256 + n * kTile + m];
}

// Every block of 32 rows of A (the last one maybe 16) against one panel.
template <int NW>
void panel_rows_of_a(const Prepared& pp, const E4m3Lut& lut, const Weights& w, int64_t n0, int nw, float* stage,
                     float* total, float* c, int ldc, int j0, int64_t i_begin, int64_t i_end) {
  int64_t i0 = i_begin;
  for (; i0 + 2 * kTile <= i_end; i0 += 2 * kTile)
    block_of_a<NW, 2>(pp, lut, w, n0, nw, i0, stage, total, c, ldc, j0);
  if (i0 < i_end) block_of_a<NW, 1>(pp, lut, w, n0, nw, i0, stage, total, c, ldc, j0);
}

void one_panel(const Prepared& pp, const E4m3Lut& lut, const Weights& w, int64_t n0, int nw, float* stage,
               float* total, float* c, int ldc, int j0, int64_t i_begin, int64_t i_end) {
  if (nw > kTile) {
    panel_rows_of_a<2>(pp, lut, w, n0, nw, stage, total, c, ldc, j0, i_begin, i_end);
  } else {
    panel_rows_of_a<1>(pp, lut, w, n0, nw, stage, total, c, ldc, j0, i_begin, i_end);
  }
}

void tile(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch) {
  const GemmProblem& p = *pp.p;
  const E4m3Lut lut;
  const int64_t mp = rows_padded(p.m), group = panels_per_group(pp.kp);
  uint16_t* panels = static_cast<uint16_t*>(scratch);
  float* stage = reinterpret_cast<float*>(panels + group * kPanel * pp.kp);
  float* total = stage + 4 * 256;
  uint16_t* chunk = reinterpret_cast<uint16_t*>(total + 4 * 256);
  load_config();  // every call: torch's own AMX code (oneDNN) may have loaded another configuration on this thread
  if (mp <= 2 * kTile) {  // narrow: stream each panel, converting 64 of K at a time
    for (int j0 = 0; j0 < nt; j0 += kPanel) {
      const int nw = std::min(kPanel, nt - j0);
      std::fill(chunk, chunk + 2 * kPanel * kSlab, uint16_t(0));
      const Weights w{nullptr, p.b + (n0 + j0) * p.ldb, nw, chunk};
      one_panel(pp, lut, w, n0 + j0, nw, stage, total, c, nt, j0, 0, mp);
    }
    return;
  }
  for (int g0 = 0; g0 < nt; g0 += int(group * kPanel)) {  // wide: convert a group of panels, then sweep A over it
    const int g1 = std::min(nt, g0 + int(group * kPanel));
    for (int j = g0; j < g1; ++j)
      convert_row_bf16(lut, p.b + (n0 + j) * p.ldb, p.k, pp.kp, panels + (j - g0) * pp.kp);
    const int padded = std::min(int(group * kPanel), (g1 - g0 + kTile - 1) / kTile * kTile);
    std::fill(panels + (g1 - g0) * pp.kp, panels + padded * pp.kp, uint16_t(0));  // a tile's rows past the end
    for (int64_t i0 = 0; i0 < mp; i0 += 2 * kTile) {
      const int64_t i1 = std::min(mp, i0 + 2 * kTile);
      for (int j0 = g0; j0 < g1; j0 += kPanel) {
        const Weights w{panels + (j0 - g0) * pp.kp, nullptr, 0, nullptr};
        one_panel(pp, lut, w, n0 + j0, std::min(kPanel, g1 - j0), stage, total, c, nt, j0, i0, i1);
      }
    }
  }
}

}  // namespace

// Whether this process may use the AMX tile data (Linux asks each process to request it once).
bool amx_permitted() {
#if defined(__linux__)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

extern const Kernels kAmxKernels = {"amx", kTileRows, a_bytes, convert_a, scratch_bytes, tile};

}  // namespace cpu
}  // namespace fp8kern
