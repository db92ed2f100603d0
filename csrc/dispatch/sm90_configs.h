// The sm90 per-token/per-channel config table and select_config: data, in one place, testable on the CPU.
#pragma once

#include <cstdint>

namespace fp8kern::sm90 {

// Config ids; the table in sm90_configs.cpp gives each one's name and the M range it serves.
enum Config : int {
  kSwap64x32 = 0,   // M <= 32: swap A/B so the tiny M is the MMA's N (kernel tile 64 x 32 x 128, pingpong)
  kSwap64x64 = 1,   // M in (32, 64]: swapped, kernel tile 64 x 64 x 128, pingpong
  kTile128x128 = 2, // M > 64: 128 x 128 x 128 cooperative, cluster 1x2
  kNumConfigs = 3,
};

struct ConfigInfo {
  const char* name;
  int64_t max_m;  // serves M <= max_m (the first matching row wins)
  bool swap_ab;
};

const ConfigInfo& config_info(int id);
int select_config(int64_t m, int64_t n, int64_t k);

}  // namespace fp8kern::sm90
