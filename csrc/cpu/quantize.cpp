// The CPU family's activation quantization (fp8kern/cpu.h: QuantProblem): the reference's steps in scalar C++, so
// the results agree with fp8kern.reference.quantize bit for bit (tests/test_cpu_family.py checks every kind).
// Rows are split over the threads; a per-tensor scale first takes the amax of every row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace fp8kern {
namespace cpu {
namespace {

constexpr float kE4M3Max = 448.0f;
constexpr float kMinScale = 1.1754943508222875e-38f;  // 2^-126
constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kMinParallelElems = 1 << 16;

void require(bool ok, const std::string& what) {
  if (!ok) throw InvalidArgument("fp8kern.cpu.quantize: " + what);
}

inline float load(const QuantProblem& p, int64_t i, int64_t j) {
  const int64_t at = i * p.x_rs + j;
  switch (p.x_type) {
    case OutType::kFloat32: return static_cast<const float*>(p.x)[at];
    case OutType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p.x)[at]);
    default: return bf16_to_float(static_cast<const uint16_t*>(p.x)[at]);
  }
}

// max(|x|) over a run of columns; NaN wins (as torch's amax).
inline float amax(const QuantProblem& p, int64_t i, int64_t j0, int64_t j1) {
  float a = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    const float v = std::fabs(load(p, i, j));
    if (std::isnan(v)) return v;
    a = std::max(a, v);
  }
  return a;
}

// The reference's scale_from_amax: NaN propagates through both clamps.
inline float scale_from_amax(float a, float ub, bool pow2) {
  if (ub > 0.0f && !(a <= ub)) a = std::isnan(a) ? a : ub;
  float s = a / kE4M3Max;
  if (!(s >= kMinScale)) s = std::isnan(s) ? s : kMinScale;
  if (pow2 && std::isfinite(s)) {
    int e;
    const float m = std::frexp(s, &e);  // s = m 2^e, m in [0.5, 1)
    s = std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
  }
  return s;
}

inline uint8_t quantize_one(float x, float inv) {
  float v = x * inv;
  if (v > kE4M3Max) v = kE4M3Max;
  if (v < -kE4M3Max) v = -kE4M3Max;
  return to_e4m3(v);
}

void store_scale(const QuantProblem& p, int64_t at, float s) {
  if (p.scale_e8m0) {
    uint32_t u;
    std::memcpy(&u, &s, 4);
    static_cast<uint8_t*>(p.scale)[at] = uint8_t((u >> 23) & 0xff);  // s is a power of two, inf or NaN
  } else {
    static_cast<float*>(p.scale)[at] = s;
  }
}

void rows(const QuantProblem& p, int64_t i0, int64_t i1, float tensor_scale) {
  const bool pow2 = p.scale_e8m0;
  for (int64_t i = i0; i < i1; ++i) {
    uint8_t* q = p.q + i * p.q_rs;
    switch (p.kind) {
      case QuantKind::kToken:
      case QuantKind::kTensor: {
        float s = tensor_scale;
        if (p.kind == QuantKind::kToken) {
          s = scale_from_amax(amax(p, i, 0, p.k), p.scale_ub, pow2);
          store_scale(p, i * p.s_rs, s);
        }
        const float inv = 1.0f / s;
        for (int64_t j = 0; j < p.k; ++j) q[j] = quantize_one(load(p, i, j), inv);
        break;
      }
      case QuantKind::kGroup:
        for (int64_t j0 = 0, g = 0; j0 < p.k; j0 += p.group, ++g) {
          const int64_t j1 = std::min(p.k, j0 + p.group);
          const float s = scale_from_amax(amax(p, i, j0, j1), p.scale_ub, pow2);
          store_scale(p, i * p.s_rs + g * p.s_cs, s);
          const float inv = 1.0f / s;
          for (int64_t j = j0; j < j1; ++j) q[j] = quantize_one(load(p, i, j), inv);
        }
        break;
      case QuantKind::kStatic: {
        const float* sc = static_cast<const float*>(p.scale);
        for (int64_t j = 0; j < p.k; ++j)
          q[j] = quantize_one(load(p, i, j), 1.0f / sc[i * p.s_rs + (j / p.group) * p.s_cs]);
        break;
      }
    }
  }
}

}  // namespace

void validate_quantize(const QuantProblem& p) {
  require(p.m >= 0 && p.k >= 0, "negative size m=" + std::to_string(p.m) + " k=" + std::to_string(p.k));
  require(int(p.kind) >= 0 && int(p.kind) <= 3, "unknown kind " + std::to_string(int(p.kind)));
  require(p.x_type == OutType::kFloat32 || p.x_type == OutType::kFloat16 || p.x_type == OutType::kBFloat16,
          "x dtype code " + std::to_string(int(p.x_type)) + " is not float32, float16 or bfloat16");
  require(p.group >= 1, "group=" + std::to_string(p.group) + " (expected >= 1)");
  require(p.threads >= 1, "threads=" + std::to_string(p.threads) + " (expected >= 1)");
  require(!(p.kind == QuantKind::kStatic && p.scale_e8m0), "static scales are fp32");
  if (p.m == 0 || p.k == 0) return;
  require(p.x != nullptr && p.q != nullptr && p.scale != nullptr, "null pointer");
  require(p.m == 1 || (p.x_rs >= p.k && p.q_rs >= p.k), "row strides x_rs=" + std::to_string(p.x_rs) + ", q_rs=" +
                                                             std::to_string(p.q_rs) + " shorter than k=" +
                                                             std::to_string(p.k));
  // Two rows or groups writing one dynamic scale would race and lose one: distinct cells are required.
  if (p.kind == QuantKind::kToken || p.kind == QuantKind::kGroup)
    require(p.m == 1 || p.s_rs >= (p.kind == QuantKind::kGroup ? ((p.k + p.group - 1) / p.group) * p.s_cs : 1),
            "scale row stride " + std::to_string(p.s_rs) + " makes two rows share scales");
  if (p.kind == QuantKind::kGroup) require(p.k <= p.group || p.s_cs >= 1, "scale column stride must be >= 1");
}

void quantize(const QuantProblem& p) {
  validate_quantize(p);
  if (p.m == 0 || p.k == 0) return;
  const int threads = double(p.m) * double(p.k) >= double(kMinParallelElems) ? p.threads : 1;
  const int64_t tasks = (p.m + kRowsPerTask - 1) / kRowsPerTask;
  float tensor_scale = 0.0f;
  if (p.kind == QuantKind::kTensor) {
    std::vector<float> row_amax(static_cast<size_t>(p.m));
    parallel_for(threads, tasks, [&](int64_t t, int) {
      for (int64_t i = t * kRowsPerTask; i < std::min(p.m, (t + 1) * kRowsPerTask); ++i)
        row_amax[size_t(i)] = amax(p, i, 0, p.k);
    });
    float a = 0.0f;
    for (float v : row_amax) a = std::isnan(a) ? a : (std::isnan(v) ? v : std::max(a, v));
    tensor_scale = scale_from_amax(a, p.scale_ub, p.scale_e8m0);
    store_scale(p, 0, tensor_scale);
  }
  parallel_for(threads, tasks, [&](int64_t t, int) {
    rows(p, t * kRowsPerTask, std::min(p.m, (t + 1) * kRowsPerTask), tensor_scale);
  });
}

}  // namespace cpu
}  // namespace fp8kern
