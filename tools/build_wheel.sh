#!/usr/bin/env bash
# Build the fp8kern wheel the GPU check installs on the device machine, so nothing compiles there: every kernel for
# FP8KERN_CUDA_ARCHS (default 89;90a), for the device's Python (3.12, x86-64). The compiled core links neither torch
# nor a shared CUDA runtime, so a wheel built here runs with the device's torch. It goes into .whl/ (git-ignored;
# name .whl in the device tool's carry) and the size is printed; the device already has pytest, numpy, safetensors,
# cuobjdump and compute-sanitizer (the device tool's KINDS.md), so no other wheel travels.
#   bash tools/build_wheel.sh                 the wheel for Python 3.12
#   PYTHON=python3.11 bash tools/build_wheel.sh   for another interpreter (the CPU rehearsal: gpu_check.sh --dry-run)
# Needs nvcc here and the package index once (the build tools go into build/wheel-venv-pyXY, kept between builds).
# One CMake tree, build/cmake-wheel, serves every Python: the kernels do not depend on it, so after the first build
# (about 10 minutes on 2 cores) a wheel for another Python, or after a source change, recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then  # the first Python 3.12 that runs (a pyenv shim may exist without working)
  for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$cand" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then py=$cand; break; fi
  done
fi
[ -n "$py" ] && "$py" -c "" || { echo "build_wheel: no Python 3.12 found; set PYTHON=/path/to/python3.12" >&2; exit 2; }
tag=$("$py" -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
venv=build/wheel-venv-py$tag
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q setuptools wheel "pybind11>=2.12" "cmake>=3.24" ninja
# The CUTLASS headers in one place for every Python, so the kernels' compile commands (their include paths) stay the
# same and a wheel for another Python recompiles none of them.
headers=$PWD/build/cutlass-headers
[ -f "$headers/cutlass_library/source/include/cutlass/cutlass.h" ] \
  || "$venv/bin/python" -m pip install -q --no-deps --target "$headers" nvidia-cutlass==4.2.0.0
tree=${FP8KERN_BUILD_DIR:-$PWD/build/cmake-wheel}
if [ -f "$tree/CMakeCache.txt" ] && ! grep -qx "PYBIND11_PYTHON_EXECUTABLE_LAST:INTERNAL=$PWD/$venv/bin/python" \
     "$tree/CMakeCache.txt"; then
  # Another Python built last: configure afresh (its cached findings would mislead CMake). The compile commands of
  # the kernels come out the same, so ninja keeps their objects; only the binding recompiles.
  rm -f "$tree/CMakeCache.txt"
fi
mkdir -p .whl
rm -f .whl/fp8kern-*-cp"$tag"-*.whl
PATH="$PWD/$venv/bin:$PATH" FP8KERN_REQUIRE_CUDA=1 FP8KERN_CUDA_ARCHS="${FP8KERN_CUDA_ARCHS:-89;90a}" \
  FP8KERN_BUILD_DIR="$tree" CUTLASS_DIR="$headers/cutlass_library/source" \
  "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w .whl .
whl=$(ls .whl/fp8kern-*-cp"$tag"-*.whl)
"$venv/bin/python" - "$whl" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("fp8kern/_C.") and n.endswith(".so") for n in names), "the wheel holds no fp8kern/_C"
EOF
# The wheel in a clean virtual environment of its Python: its compiled module loads there without torch (the core
# links none) and holds every requested arch; every tracked Python file of the package is in it.
check=$(mktemp -d)
"$py" -m venv "$check/venv"
"$check/venv/bin/python" -m pip install -q --no-index --no-deps "$whl"
"$check/venv/bin/python" - "$(git ls-files python/fp8kern | sed 's#^python/##' | tr '\n' ' ')" <<'EOF'
import glob, importlib.util, os, sys, sysconfig
pkg = os.path.join(sysconfig.get_paths()["purelib"], "fp8kern")
missing = [f for f in sys.argv[1].split() if not os.path.exists(os.path.join(os.path.dirname(pkg), f))]
assert not missing, f"files missing from the wheel: {missing}"
so = glob.glob(os.path.join(pkg, "_C.*.so"))[0]
spec = importlib.util.spec_from_file_location("fp8kern._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(f"build_wheel: {os.path.basename(so)} loads in a clean venv: archs {mod.compiled_archs()}, "
      f"GEMM families {list(mod.gemm_families())}")
EOF
rm -rf "$check"
du -h "$whl" | cut -f1 | xargs -I{} echo "build_wheel: $whl ({})"
du -sh .whl | cut -f1 | xargs -I{} echo "build_wheel: .whl/ holds {} (the device tool carries at most 64 MiB)"
