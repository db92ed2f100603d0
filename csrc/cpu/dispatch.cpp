// Which instruction set the CPU family runs: the best this CPU and OS support, or the one FP8KERN_CPU_ISA /
// set_isa forced. Detection uses the compiler's CPU-feature builtins, which also check that the OS saves the vector
// registers (XCR0), and for AMX the CPUID bits plus the OS's grant of the tile data (amx_permitted). A new
// instruction set (ARM's NEON / BF16 dot products, say) is a Kernels table plus a line in kIsas and in supported().
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <atomic>
#include <cstring>
#include <string>

#include "kernels.h"

namespace fp8kern {
namespace cpu {

#ifdef FP8KERN_CPU_AMX
bool amx_permitted();  // kernel_amx.cpp
#endif

namespace {

// Problems with at most this many rows of A run the AVX-512 kernel even where AMX is in use (one row of A fills a
// sixteenth of a result tile, and the AVX-512 kernel converts in registers). Measured on a 14336 x 4096 weight
// beyond the LLC, 2 threads: M = 2 22.5 GB/s AVX-512 against 19-20 AMX; M = 3 18 against 19-20; M = 4 15-16 against
// 18.5-19 (1 thread: 7.7 against 10.0).
constexpr int64_t kAmxMinRows = 2;

struct Isa {
  const char* name;
  const Kernels* kernels;
};

const Isa kIsas[] = {  // best first
#ifdef FP8KERN_CPU_AMX
    {"amx", &kAmxKernels},
#endif
#ifdef FP8KERN_CPU_AVX512  // set by the build where the compiler has these target flags
    {"avx512", &kAvx512Kernels},
#endif
#ifdef FP8KERN_CPU_AVX2
    {"avx2", &kAvx2Kernels},
#endif
    {"generic", &kGenericKernels},
};

bool supported(const char* name) {
  if (std::strcmp(name, "generic") == 0) return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                      __builtin_cpu_supports("avx512vbmi");
  if (std::strcmp(name, "avx512") == 0) return avx512;
#ifdef FP8KERN_CPU_AMX
  if (std::strcmp(name, "amx") == 0) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool tiles = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);  // BF16, TILE
    return avx512 && tiles && amx_permitted();
  }
#endif
#endif
  return false;
}

const Isa* find(const char* name) {
  for (const Isa& isa : kIsas)
    if (std::strcmp(isa.name, name) == 0) return &isa;
  return nullptr;
}

const Isa* best() {
  for (const Isa& isa : kIsas)
    if (supported(isa.name)) return &isa;
  return &kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
}

std::atomic<const Isa*>& active() {
  static std::atomic<const Isa*> a{best()};
  return a;
}

}  // namespace

bool isa_supported(const char* name) { return find(name) != nullptr && supported(name); }

const char* isa() { return active().load()->name; }

void set_isa(const char* name) {
  if (name == nullptr || !*name || std::strcmp(name, "auto") == 0) {
    active().store(best());
    return;
  }
  const Isa* isa = find(name);
  if (isa == nullptr) {
    std::string known;
    for (const Isa& i : kIsas) known += std::string(known.empty() ? "" : ", ") + i.name;
    throw InvalidArgument(std::string("unknown CPU instruction set '") + name + "'; this build has " + known +
                          " (or auto)");
  }
  if (!supported(name))
    throw InvalidArgument(std::string("this CPU lacks the '") + name + "' instruction set (best here: " +
                          best()->name + ")");
  active().store(isa);
}

const Kernels& kernels_for(int64_t m) {
  const Isa* isa = active().load();
#if defined(FP8KERN_CPU_AMX) && defined(FP8KERN_CPU_AVX512)
  if (isa->kernels == &kAmxKernels && m <= kAmxMinRows) return kAvx512Kernels;
#endif
  return *isa->kernels;
}

}  // namespace cpu
}  // namespace fp8kern
