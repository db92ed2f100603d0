// Config tables and select_config of the GEMM families: data, in one place, testable on the CPU. Query families:
// "sm90" and "sm89" (per-tensor / per-token x per-channel), "sm90_block" and "sm89_block" (block-scaled).
#pragma once

#include <cstdint>

namespace fp8kern {

struct ConfigInfo {
  const char* name;
  int64_t max_m;        // serves M <= max_m (the first matching row wins)
  int tile_m, tile_n;   // output tile in problem terms (rows of D, columns of D), swapped configs included
};

namespace sm90 {
// Config ids of the sm90 per-tensor / per-token family, in table order.
enum Config : int {
  kSwap64x32 = 0,     // M <= 32: swap A/B so the tiny M is the MMA's N (kernel tile 64 x 32 x 128, pingpong)
  kSwap64x64 = 1,     // M in (32, 64]: swapped, kernel tile 64 x 64 x 128, pingpong
  kStreamK128x128 = 2,// M > 64, 128x128 tiles filling under half the SMs and K > kStreamKMinK: stream-K
  kTile128x128 = 3,   // M > 64 otherwise: 128 x 128 x 128 cooperative, cluster 1x2
  kNumConfigs = 4,
};
// Stream-K pays a partial-tile reduction; it wins when a data-parallel launch would leave most SMs idle and each
// tile has a long K loop to split. The limits are those of CUTLASS's own stream-K heuristic (data-parallel once
// 2 x tiles >= SMs, or with at most 8 K tiles of 128), so the selected kernel really splits K instead of running
// data-parallel without the 1x2 cluster of the plain config: at most 65 tiles on the 132 SMs of an H100 SXM / H200,
// 56 on the 114 of an H100 PCIe.
constexpr int64_t kStreamKMinK = 1024;
bool stream_k_128x128(int64_t m, int64_t n, int64_t k, int sm_count);
int select_config(int64_t m, int64_t n, int64_t k, int sm_count);
// Config ids of the sm90 block-scaled family: swapped for M <= kBlockSwapMaxM, else stream-K under the same
// conditions as above, else the plain 128x128 tile.
enum BlockConfig : int {
  kBlockSwap128x32 = 0,  // kernel tile 128 (weight rows) x 32 (tokens) x 128, stream-K scheduler
  kBlockStreamK128x128 = 1,
  kBlockTile128x128 = 2,
  kNumBlockConfigs = 3,
};
constexpr int64_t kBlockSwapMaxM = 32;
int select_block_config(int64_t m, int64_t n, int64_t k, int sm_count);
}  // namespace sm90

namespace sm89 {
// Config ids of the sm89 per-tensor / per-token family (tiles in csrc/sm89/scaled_mm_sm89.cuh).
enum Config : int {
  kTile32x64 = 0,
  kTile64x128 = 1,
  kTile128x64 = 2,
  kNumConfigs = 3,
};
// The table's tile by M, stepped down to a smaller tile while it would leave more than half of the SMs without a CTA
// (mid-size M with small N: e.g. M = 64, N = 4096 makes 32 tiles of 64x128 for 128 to 142 SMs); the smallest tile
// when none fills half.
int select_config(int64_t m, int64_t n, int64_t k, int sm_count);
// Config ids of the sm89 block-scaled family (tiles in csrc/sm89/blockwise_sm89.cuh).
enum BlockConfig : int {
  kBlock32x32 = 0,
  kBlock64x128 = 1,
  kBlock128x128 = 2,
  kNumBlockConfigs = 3,
};
int select_block_config(int64_t m, int64_t n, int64_t k, int sm_count);  // as select_config
}  // namespace sm89

}  // namespace fp8kern
