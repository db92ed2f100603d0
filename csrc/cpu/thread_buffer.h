// Working memory of one OS thread, reused across calls: a fresh allocation per call costs page faults that dominate
// small problems. One buffer per thread and purpose, so concurrent calls never share one.
#pragma once

#include <cstddef>
#include <memory>

namespace fp8kern {
namespace cpu {

constexpr size_t kKeepBytes = size_t(64) << 20;  // a thread keeps buffers up to this size between calls

// Grown when a call needs more; one larger than kKeepBytes is given back at the next call that needs less. Never
// zeroed: every user writes what it reads.
struct ThreadBuffer {
  std::unique_ptr<char[]> data;
  size_t size = 0;
  char* get(size_t n) {
    if (n > size || (size > kKeepBytes && n <= kKeepBytes)) {  // grow, or give back what a large call took
      data.reset(new char[n]);
      size = n;
    }
    return data.get();
  }
};

enum class Scratch : int {
  kConvertedA = 0,  // scaled_mm: A converted for the kernels (calling thread)
  kTile,            // scaled_mm: a tile kernel's scratch (every worker)
  kTileSums,        // scaled_mm: a tile's fp32 sums (every worker)
  kLinearQ,         // linear: the quantized activations (calling thread)
  kLinearScales,    // linear: their scales (calling thread)
  kCount
};

inline ThreadBuffer& thread_buffer(Scratch purpose) {
  thread_local ThreadBuffer buffers[int(Scratch::kCount)];
  return buffers[int(purpose)];
}

}  // namespace cpu
}  // namespace fp8kern
