// select_config for the GEMM families: ordered tables by M, so each threshold appears once. The thresholds are
// first choices from the tile shapes (a tile's M side should not be mostly empty), not yet tuned by measurement.
#include "gemm_configs.h"

#include <cstring>

#include "../common/check.h"
#include "../common/gemm_checks.h"
#include "fp8kern/fp8kern.h"

namespace fp8kern {
namespace {

struct Family {
  const char* name;
  const char* entry;  // launch function, named in errors
  const ConfigInfo* table;
  int size;
  bool block;
  int64_t min_k;      // the sm90 block kernel's TMA tiles need K >= 128; the others zero-fill partial K tiles
};

// The stream-K row's max_m is never used: select_config picks it by tile count and K (below).
constexpr ConfigInfo kSm90[sm90::kNumConfigs] = {
    {"sm90_swap_64x32x128_pingpong", 32, 32, 64},
    {"sm90_swap_64x64x128_pingpong", 64, 64, 64},
    {"sm90_streamk_128x128x128_coop", 64, 128, 128},
    {"sm90_128x128x128_coop_c1x2", INT64_MAX, 128, 128},
};
// Ada per-token: a 32-row tile for decode, 64x128 while M fills few 128-row tiles, 128x64 beyond; smaller tiles
// where these would leave more than half of the SMs idle (select_filling).
constexpr ConfigInfo kSm89[sm89::kNumConfigs] = {
    {"sm89_32x64x128_4stage", 32, 32, 64},
    {"sm89_64x128x64_4stage", 128, 64, 128},
    {"sm89_128x64x64_4stage", INT64_MAX, 128, 64},
};
// select_block_config picks these rows itself (by M, then by tile count and K, as for kSm90's stream-K row).
constexpr ConfigInfo kSm90Block[sm90::kNumBlockConfigs] = {
    {"sm90_block_swap_128x32x128_coop_streamk", sm90::kBlockSwapMaxM, 32, 128},
    {"sm90_block_streamk_128x128x128_coop", 0, 128, 128},
    {"sm90_block_128x128x128_coop_c1x2", INT64_MAX, 128, 128},
};
// Ada has 128 (RTX 4090) to 142 (L40S) SMs: 32x32 tiles keep N / 32 CTAs streaming weights at decode sizes, 64x128
// tiles halve the wasted rows of a 128-row tile up to M = 256, 128x128 tiles reuse both operands most for large M.
constexpr ConfigInfo kSm89Block[sm89::kNumBlockConfigs] = {
    {"sm89_block_32x32x128_4stage", 32, 32, 32},
    {"sm89_block_64x128x128_4stage", 256, 64, 128},
    {"sm89_block_128x128x128_3stage", INT64_MAX, 128, 128},
};

constexpr Family kFamilies[] = {
    {"sm90", "scaled_mm_sm90", kSm90, sm90::kNumConfigs, false, 16},
    {"sm89", "scaled_mm_sm89", kSm89, sm89::kNumConfigs, false, 16},
    {"sm90_block", "blockwise_sm90", kSm90Block, sm90::kNumBlockConfigs, true, 128},
    {"sm89_block", "blockwise_sm89", kSm89Block, sm89::kNumBlockConfigs, true, 16},
};

const Family* find(const char* name) {
  for (const Family& f : kFamilies)
    if (std::strcmp(f.name, name) == 0) return &f;
  return nullptr;
}

int select(const Family& f, int64_t m) {
  for (int i = 0; i < f.size; ++i)
    if (m <= f.table[i].max_m) return i;
  return f.size - 1;
}

}  // namespace

// Whether 128x128 tiles leave enough SMs idle, and K is long enough, for stream-K to split K (see gemm_configs.h).
bool sm90::stream_k_128x128(int64_t m, int64_t n, int64_t k, int sm_count) {
  const int64_t tiles = ((m + 127) / 128) * ((n + 127) / 128);
  return 2 * tiles < sm_count && k > kStreamKMinK;
}

int sm90::select_config(int64_t m, int64_t n, int64_t k, int sm_count) {
  const int by_m = select(*find("sm90"), m);
  if (by_m != kTile128x128) return by_m;
  return stream_k_128x128(m, n, k, sm_count) ? kStreamK128x128 : kTile128x128;
}

int sm90::select_block_config(int64_t m, int64_t n, int64_t k, int sm_count) {
  if (m <= kBlockSwapMaxM) return kBlockSwap128x32;
  return stream_k_128x128(m, n, k, sm_count) ? kBlockStreamK128x128 : kBlockTile128x128;
}
// Ada tables are ordered by tile size: step down from the M row while fewer than half of the SMs get a tile.
static int select_filling(const Family& f, int64_t m, int64_t n, int sm_count) {
  int i = select(f, m);
  for (; i > 0; --i) {
    const ConfigInfo& c = f.table[i];
    const int64_t tiles = ((m + c.tile_m - 1) / c.tile_m) * ((n + c.tile_n - 1) / c.tile_n);
    if (2 * tiles >= sm_count) break;
  }
  return i;
}

int sm89::select_config(int64_t m, int64_t n, int64_t /*k*/, int sm_count) {
  return select_filling(*find("sm89"), m, n, sm_count);
}
int sm89::select_block_config(int64_t m, int64_t n, int64_t /*k*/, int sm_count) {
  return select_filling(*find("sm89_block"), m, n, sm_count);
}

const char* gemm_config_name(const char* family, int index) {
  const Family* f = find(family);
  return f != nullptr && index >= 0 && index < f->size ? f->table[index].name : "";
}

static const Family& family_or_throw(const char* family) {
  const Family* f = find(family);
  FP8KERN_CHECK(f != nullptr, "unknown GEMM family '", family,
                "', expected 'sm90', 'sm89', 'sm90_block' or 'sm89_block'");
  return *f;
}

int gemm_select_config(const char* family, int64_t m, int64_t n, int64_t k, int sm_count) {
  const Family& f = family_or_throw(family);
  FP8KERN_CHECK(sm_count >= 1, "gemm_select_config: sm_count=", sm_count, ", expected the GPU's multiprocessor count");
  if (std::strcmp(f.name, "sm90") == 0) return sm90::select_config(m, n, k, sm_count);
  if (std::strcmp(f.name, "sm90_block") == 0) return sm90::select_block_config(m, n, k, sm_count);
  if (std::strcmp(f.name, "sm89") == 0) return sm89::select_config(m, n, k, sm_count);
  return sm89::select_block_config(m, n, k, sm_count);
}

template <class Problem>
static void validate_family(const Problem& p, const char* family, bool block) {
  const Family& f = family_or_throw(family);
  FP8KERN_CHECK(f.block == block, f.entry, ": family '", family, "' is for ",
                f.block ? "block-scaled" : "per-tensor / per-token", " problems");
  validate_operands(p, f.entry, f.min_k);
  FP8KERN_CHECK(p.config >= -1 && p.config < f.size, f.entry, ": config=", p.config,
                ", expected -1 (select by shape) or 0..", f.size - 1);
}

void validate_gemm(const GemmProblem& p, const char* family) { validate_family(p, family, false); }
void validate_gemm(const BlockGemmProblem& p, const char* family) { validate_family(p, family, true); }

}  // namespace fp8kern
