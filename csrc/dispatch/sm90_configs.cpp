// select_config for the GEMM families: sm90's ordered table by M (thresholds appear once); sm89 has one config.
#include "sm90_configs.h"

#include <cstring>

#include "../common/check.h"

namespace fp8kern::sm90 {
namespace {

constexpr ConfigInfo kTable[kNumConfigs] = {
    {"sm90_swap_64x32x128_pingpong", 32, true},
    {"sm90_swap_64x64x128_pingpong", 64, true},
    {"sm90_128x128x128_coop_c1x2", INT64_MAX, false},
};

}  // namespace

const ConfigInfo& config_info(int id) {
  FP8KERN_CHECK(id >= 0 && id < kNumConfigs, "sm90 config ", id, " out of range [0, ", int(kNumConfigs), ")");
  return kTable[id];
}

int select_config(int64_t m, int64_t /*n*/, int64_t /*k*/) {
  for (int i = 0; i < kNumConfigs; ++i)
    if (m <= kTable[i].max_m) return i;
  return kNumConfigs - 1;
}

}  // namespace fp8kern::sm90

namespace fp8kern {

const char* gemm_config_name(const char* family, int index) {
  if (std::strcmp(family, "sm90") == 0 && index >= 0 && index < sm90::kNumConfigs) return sm90::kTable[index].name;
  if (std::strcmp(family, "sm89") == 0 && index == 0) return "sm89_128x64x64_4stage";  // one config so far
  return "";
}

int gemm_select_config(const char* family, int64_t m, int64_t n, int64_t k) {
  if (std::strcmp(family, "sm89") == 0) return 0;
  FP8KERN_CHECK(std::strcmp(family, "sm90") == 0, "unknown GEMM family '", family, "', expected 'sm90' or 'sm89'");
  return sm90::select_config(m, n, k);
}

}  // namespace fp8kern
