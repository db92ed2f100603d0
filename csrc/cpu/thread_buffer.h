// Working memory of one OS thread, reused across calls: a fresh allocation per call costs page faults that dominate
// small problems. One buffer per thread and purpose, so concurrent calls never share one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace fp8kern {
namespace cpu {

constexpr size_t kKeepBytes = size_t(64) << 20;  // a thread keeps buffers up to this size between calls

constexpr size_t kLineBytes = 64;

// Grown when a call needs more; one larger than kKeepBytes is given back at the next call that needs less. Never
// zeroed: every user writes what it reads. Starts on a cache line: the AMX kernel's tile loads read 64-byte rows of
// its converted operands, and a row that straddles two lines costs two (one thread, M = 256, 4096 x 4096: ~2x).
struct ThreadBuffer {
  std::unique_ptr<char[]> data;
  char* aligned = nullptr;
  size_t size = 0;
  char* get(size_t n) {
    if (n > size || (size > kKeepBytes && n <= kKeepBytes)) {  // grow, or give back what a large call took
      data.reset(new char[n + kLineBytes - 1]);
      aligned = data.get() + (kLineBytes - reinterpret_cast<uintptr_t>(data.get()) % kLineBytes) % kLineBytes;
      size = n;
    }
    return aligned;
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
