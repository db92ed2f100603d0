#!/usr/bin/env bash
# The CPU kernel family on a CPU this machine is not: tests/cpu/test_cpu_kernels.cpp and the family's portable sources,
# cross-compiled for aarch64 (Debian's g++-aarch64-linux-gnu) into a static binary and run under qemu-aarch64 -cpu max
# (Debian's qemu-user). There only the portable kernel exists (the x86 kernels are not built), so this tests the path
# every ARM CPU runs today: correctness only, no speed (emulated).
#   bash tools/cpu_cross_check.sh        (as root, installs the two packages when missing; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user > /dev/null
fi
out=$(mktemp -d)
aarch64-linux-gnu-g++ -O2 -std=c++17 -static -pthread -Icsrc/include \
  csrc/cpu/gemm.cpp csrc/cpu/quantize.cpp csrc/cpu/linear.cpp csrc/cpu/dispatch.cpp csrc/cpu/thread_pool.cpp csrc/cpu/kernel_generic.cpp \
  tests/cpu/test_cpu_kernels.cpp -o "$out/test_cpu_kernels"
aarch64-linux-gnu-readelf -h "$out/test_cpu_kernels" | grep -q "Machine: *AArch64" \
  || { echo "cpu_cross_check: not an aarch64 binary" >&2; exit 1; }
qemu-aarch64 -cpu max "$out/test_cpu_kernels"
rm -rf "$out"
