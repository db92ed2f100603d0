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
// - More: K is taken in slices of 4096; each slice of the call's 128 rows of B is converted once into panels that
//   stay in L2, and every 32 rows of A sweep them (each block of A's slice is read once for all the panels), the
//   sums of each (block of A, panel) pair kept in per-thread scratch between slices.
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
constexpr int64_t kSlab = 64;             // narrow mode: K converted per panel at a time (32 x 64 bf16: 4 KB)
// Narrow mode, K up to this: the next panel is prefetched into L2, one line per row per slab. A panel's 32 rows then
// lie within 32 K bytes, and reading 64 bytes of each per slab (a few lines per 4 KB page, strided) is a pattern the
// hardware prefetchers do not follow. 2 threads, M = 4 / 16, weights beyond the LLC: K = 768 9.2 -> 11.1-12.5 GB/s,
// 1536 9.1-9.6 -> 12.4-13.8, 2048 10.8-11.7 -> 13.8-14.7, 3072 12.4-12.9 -> 12.5-15.3; at 4096 and more (rows of a
// page or longer, which the hardware follows) slower: 18-20 -> 14-15.
constexpr int64_t kPrefetchMaxK = 3072;

constexpr int kABlock = 32;  // rows of A per block of the converted layout
constexpr int kAccFloats = 4 * kTile * kTile;  // one panel's sums against one block of A: 4 tiles of 16 x 16 fp32
// Wide mode: K per slice. A slice of the tile's 128 rows of B, converted (1 MB), and a block of A's slice (256 KB)
// stay in L2 (2 MB per core on the Xeons with AMX) while the blocks of A sweep the panels. A multiple of 128.
constexpr int64_t kSliceK = 4096;

inline int64_t rows_padded(int64_t m) { return (m + kTile - 1) / kTile * kTile; }

// Row stride (bf16) of a converted weight panel. kp is a multiple of 64, so rows kp bf16 apart would start a
// multiple of 128 bytes apart (of 4 KB when kp is a multiple of 2048, as in most models), putting the 16 lines a
// tile load reads in one L1 set (12 ways), where they evict each other. One more cache line per row spreads them
// (M = 256, one thread: 4096 x 4096 +0-4%, 4096 x 14336 block-scaled +4%).
inline int64_t panel_stride(int64_t kp) { return kp + 32; }

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

// A tile call's scratch: the wide mode's panels (the tile's rows of B, one slice of K, panel_stride apart), staging
// for the result tiles, each (block of A, panel) pair's sums, and the narrow mode's two slab buffers (kPanel x kSlab
// bf16 each).
struct TileScratch {
  uint16_t* panels;
  float* stage;
  float* acc;
  uint16_t* chunk;
};

int64_t panel_bytes(int64_t kp) { return kTileRows * panel_stride(std::min(kp, kSliceK)) * 2; }
int64_t acc_bytes(int64_t m) { return (m + kABlock - 1) / kABlock * (kTileRows / kPanel) * kAccFloats * 4; }

TileScratch scratch_layout(int64_t m, int64_t kp, void* scratch) {
  TileScratch s;
  s.panels = static_cast<uint16_t*>(scratch);
  s.stage = reinterpret_cast<float*>(reinterpret_cast<char*>(scratch) + panel_bytes(kp));
  s.acc = s.stage + kAccFloats;
  s.chunk = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(s.acc) + acc_bytes(m));
  return s;
}

int64_t scratch_bytes(int64_t m, int64_t kp) {
  return panel_bytes(kp) + kAccFloats * 4 + acc_bytes(m) + 2 * kPanel * kSlab * 2;
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

// Tiles from acc (the layout store writes).
template <int NW, int MT>
inline void load(const float* acc) {
  _tile_loadd(0, acc, 64);
  if (MT > 1) _tile_loadd(1, acc + 256, 64);
  if (NW > 1) _tile_loadd(2, acc + 512, 64);
  if (NW > 1 && MT > 1) _tile_loadd(3, acc + 768, 64);
}

// Where a step's weight tiles come from: a converted panel (rows panel_stride apart), or, narrow, e4m3 rows
// converted 64 of K at a time into a small buffer just before use.
struct Weights {
  const uint16_t* panel = nullptr;  // wide: kPanel rows, panel_stride apart, of one slice of K
  int64_t k0 = 0;                   // wide: the slice's first column
  const uint8_t* b = nullptr;       // narrow: the panel's first row of B
  int rows = 0;                     // narrow: rows of B in the panel (the rest of the buffer stays zero)
  uint16_t* chunk = nullptr;        // narrow: 2 x kPanel x kSlab bf16 (one half converted while the other is read)
  const uint8_t* next = nullptr;    // narrow: the next panel's first row (prefetched slab by slab), or null
  int next_rows = 0;
};

struct NoFlush {
  void operator()(int64_t) const {}
};

// Steps over [k0, k1) (multiples of 32) of K. Narrow: flush(kb) runs after the last step of each 128 of K (block kb)
// and after the last step, so that block scales can be applied without restarting the pipeline below.
template <int NW, int MT, class Flush = NoFlush>
inline void steps(const Prepared& pp, const E4m3Lut& lut, const Weights& w, const uint32_t* x, int64_t k0, int64_t k1,
                  Flush flush = Flush()) {
  constexpr int64_t x_stride = kABlock * 4;
  if (w.panel != nullptr) {
    const int64_t w_stride = panel_stride(std::min(pp.kp, kSliceK)) * 2;
    for (int64_t k = k0; k < k1; k += 32) step<NW, MT>(w.panel + (k - w.k0), w_stride, x + (k / 2) * kABlock, x_stride);
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
    if (w.next != nullptr && s0 < kk)
      for (int j = 0; j < w.next_rows; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w.next + j * ldb + s0), _MM_HINT_T1);
    for (int64_t k = s0; k < std::min(k1, s0 + kSlab); k += 32)
      step<NW, MT>(buf[half] + (k - s0), kSlab * 2, x + (k / 2) * kABlock, x_stride);
    if ((s0 + kSlab) % kBlock == 0 || s0 + kSlab >= k1) flush(s0 / kBlock);
  }
}

// Adds one 128 of K's sums (stage: the tiles' sums over block kb of K) times sa[i, kb] * sb[kb] into total, for rows
// [i0, i0 + 16 MT) of A.
template <int NW, int MT>
void add_scaled_block(const GemmProblem& p, const float* sb, int64_t kb, int64_t i0, const float* stage, float* total) {
  for (int t = 0; t < MT; ++t) {  // scale per row of A (a tile's column)
    alignas(64) float s[kTile];
    for (int m = 0; m < kTile; ++m) {
      const int64_t i = i0 + t * kTile + m;
      s[m] = i < p.m ? p.scale_a[i * p.lds_a + kb] * sb[kb] : 0.0f;
    }
    const __m512 sv = _mm512_load_ps(s);
    for (int wi = 0; wi < NW; ++wi) {
      const float* st = stage + (2 * wi + t) * 256;
      float* to = total + (2 * wi + t) * 256;
      for (int n = 0; n < kTile; ++n)
        _mm512_storeu_ps(to + n * kTile, _mm512_fmadd_ps(_mm512_loadu_ps(st + n * kTile), sv,
                                                         _mm512_loadu_ps(to + n * kTile)));
    }
  }
}

// The sums over [k0, k1) of K of one panel (rows n0 .. n0 + 16 NW of B) against rows [i0, i0 + 16 MT) of A (x: their
// converted rows), added into the pair's accumulators acc (kAccFloats, the tiles' layout), which start at zero when
// `first`. Block-scaled: each 128 of K is summed in the tiles, then scaled and added into acc (through stage).
template <int NW, int MT>
void panel_part(const Prepared& pp, const E4m3Lut& lut, const Weights& w, const uint32_t* x, int64_t n0, int64_t i0,
                int64_t k0, int64_t k1, bool first, float* stage, float* acc) {
  const GemmProblem& p = *pp.p;
  if (!p.block) {
    if (first) {
      zero<NW, MT>();
    } else {
      load<NW, MT>(acc);
    }
    steps<NW, MT>(pp, lut, w, x, k0, k1);
    store<NW, MT>(acc);
    return;
  }
  if (first) std::fill(acc, acc + kAccFloats, 0.0f);
  const float* sb = p.scale_b + (n0 / kBlock) * p.lds_b;
  if (w.panel == nullptr) {  // narrow: one pipelined pass over K, the tiles' sums taken out every 128 of K
    zero<NW, MT>();
    steps<NW, MT>(pp, lut, w, x, k0, k1, [&](int64_t kb) {
      store<NW, MT>(stage);
      zero<NW, MT>();
      add_scaled_block<NW, MT>(p, sb, kb, i0, stage, acc);
    });
    return;
  }
  for (int64_t kb = k0 / kBlock; kb * kBlock < k1; ++kb) {
    zero<NW, MT>();
    steps<NW, MT>(pp, lut, w, x, kb * kBlock, std::min(k1, (kb + 1) * kBlock));
    store<NW, MT>(stage);
    add_scaled_block<NW, MT>(p, sb, kb, i0, stage, acc);
  }
}

template <int MT>
void panel_part(const Prepared& pp, const E4m3Lut& lut, const Weights& w, const uint32_t* x, int64_t n0, int nw,
                int64_t i0, int64_t k0, int64_t k1, bool first, float* stage, float* acc) {
  if (nw > kTile) {
    panel_part<2, MT>(pp, lut, w, x, n0, i0, k0, k1, first, stage, acc);
  } else {
    panel_part<1, MT>(pp, lut, w, x, n0, i0, k0, k1, first, stage, acc);
  }
}

// r[0..15] (rows of 16 fp32) transposed in registers: r[j][i] becomes r[i][j] (the usual 4-stage shuffle network).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // per lane: column 4 L + c of rows 4 i .. 4 i + 3 in r[4 i + c]
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {  // then whole lanes
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// Rows [i0, i0 + 16 mt) of A against nw rows of B from tile column j0, from their accumulators (tiles of 16 rows of B
// x 16 rows of A) into c[i * ldc + j]: whole tiles transposed in registers, the edges one value at a time.
void write_sums(const GemmProblem& p, const float* acc, int mt, int nw, int64_t i0, float* c, int ldc, int j0) {
  for (int wi = 0; wi * kTile < nw; ++wi)
    for (int t = 0; t < mt; ++t) {
      const float* a = acc + (2 * wi + t) * 256;
      const int64_t r0 = i0 + t * kTile;
      float* out = c + r0 * ldc + j0 + wi * kTile;
      if (nw - wi * kTile >= kTile && r0 + kTile <= p.m) {
        __m512 r[kTile];
        for (int n = 0; n < kTile; ++n) r[n] = _mm512_loadu_ps(a + n * kTile);
        transpose16(r);
        for (int m = 0; m < kTile; ++m) _mm512_storeu_ps(out + m * ldc, r[m]);
        continue;
      }
      for (int n = 0; n < kTile && wi * kTile + n < nw; ++n)
        for (int m = 0; m < kTile && r0 + m < p.m; ++m) out[m * ldc + n] = a[n * kTile + m];
    }
}

inline const uint32_t* block_rows(const Prepared& pp, int64_t i0) {
  return static_cast<const uint32_t*>(pp.a) + (i0 / kABlock) * (pp.kp / 2) * kABlock + i0 % kABlock;
}

// Few rows of A (at most 32): each panel streams from memory once, converted 64 of K at a time, against the rows.
void narrow(const Prepared& pp, const E4m3Lut& lut, int64_t n0, int nt, float* c, float* stage, float* acc,
            uint16_t* chunk) {
  const GemmProblem& p = *pp.p;
  const int64_t mp = rows_padded(p.m), kend = (p.k + kChunk - 1) / kChunk * kChunk;
  const int mt = int(mp / kTile);
  for (int j0 = 0; j0 < nt; j0 += kPanel) {
    const int nw = std::min(kPanel, nt - j0);
    if (nw < kPanel) std::fill(chunk, chunk + 2 * kPanel * kSlab, uint16_t(0));  // rows past nw are read as zeros
    Weights w{nullptr, 0, p.b + (n0 + j0) * p.ldb, nw, chunk};
    if (j0 + kPanel < nt && p.k <= kPrefetchMaxK) {
      w.next = w.b + kPanel * p.ldb;
      w.next_rows = std::min(kPanel, nt - j0 - kPanel);
    }
    if (mt > 1) {
      panel_part<2>(pp, lut, w, block_rows(pp, 0), n0 + j0, nw, 0, 0, kend, true, stage, acc);
    } else {
      panel_part<1>(pp, lut, w, block_rows(pp, 0), n0 + j0, nw, 0, 0, kend, true, stage, acc);
    }
    write_sums(p, acc, mt, nw, 0, c, nt, j0);
  }
}

// More rows: K in slices of kSliceK. Each slice of the tile's rows of B is converted once into panels that stay in
// L2, then every block of 32 rows of A sweeps them (each block's slice of A is read once for all the panels); each
// (block, panel) pair adds the slice's sums to its accumulators. A slice of A and of the panels are the most of
// them L2 holds at once, whatever K is. Each output still sums its K in order.
void wide(const Prepared& pp, const E4m3Lut& lut, int64_t n0, int nt, float* c, uint16_t* panels, float* stage,
          float* acc) {
  const GemmProblem& p = *pp.p;
  const int64_t mp = rows_padded(p.m), kend = (p.k + kChunk - 1) / kChunk * kChunk;
  const int64_t ps = panel_stride(std::min(pp.kp, kSliceK));
  const int count = (nt + kPanel - 1) / kPanel;
  const int padded = (nt + kTile - 1) / kTile * kTile;
  if (kend == 0) std::fill(acc, acc + (mp + kABlock - 1) / kABlock * count * kAccFloats, 0.0f);  // K = 0: sums of 0
  for (int64_t k0 = 0; k0 < kend; k0 += kSliceK) {
    const int64_t k1 = std::min(kend, k0 + kSliceK);
    for (int j = 0; j < nt; ++j)
      convert_row_bf16(lut, p.b + (n0 + j) * p.ldb + k0, p.k - k0, k1 - k0, panels + j * ps);
    std::fill(panels + nt * ps, panels + padded * ps, uint16_t(0));  // a tile's rows past the end
    for (int64_t i0 = 0; i0 < mp; i0 += kABlock) {
      const uint32_t* x = block_rows(pp, i0);
      float* a = acc + (i0 / kABlock) * count * kAccFloats;
      for (int q = 0; q < count; ++q) {
        const Weights w{panels + q * kPanel * ps, k0, nullptr, 0, nullptr};
        const int nw = std::min(kPanel, nt - q * kPanel);
        if (mp - i0 > kTile) {
          panel_part<2>(pp, lut, w, x, n0 + q * kPanel, nw, i0, k0, k1, k0 == 0, stage, a + q * kAccFloats);
        } else {
          panel_part<1>(pp, lut, w, x, n0 + q * kPanel, nw, i0, k0, k1, k0 == 0, stage, a + q * kAccFloats);
        }
      }
    }
  }
  for (int64_t i0 = 0; i0 < mp; i0 += kABlock)
    for (int q = 0; q < count; ++q)
      write_sums(p, acc + ((i0 / kABlock) * count + q) * kAccFloats, mp - i0 > kTile ? 2 : 1,
                 std::min(kPanel, nt - q * kPanel), i0, c, nt, q * kPanel);
}

void tile(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch) {
  const E4m3Lut lut;
  const TileScratch s = scratch_layout(pp.p->m, pp.kp, scratch);
  load_config();  // every call: torch's own AMX code (oneDNN) may have loaded another configuration on this thread
  if (rows_padded(pp.p->m) <= 2 * kTile) {
    narrow(pp, lut, n0, nt, c, s.stage, s.acc, s.chunk);
  } else {
    wide(pp, lut, n0, nt, c, s.panels, s.stage, s.acc);
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

extern const Kernels kAmxKernels = {"amx", kTileRows, a_bytes, convert_a, scratch_bytes, tile,
                                     epilogue_rows_avx512};

}  // namespace cpu
}  // namespace fp8kern
