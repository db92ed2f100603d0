#!/usr/bin/env bash
# fp8kern built as on a machine without the CUDA toolkit: FP8KERN_NO_CUDA=1 takes setup.py's no-nvcc branch (CMake
# never enables CUDA), which must still build the CPU kernel family (fp8kern._cpu) and no fp8kern._C. The wheel is
# installed into a scratch folder and must run the CPU family, exact against the reference.
#   bash tools/cpu_only_build.sh [PYTHON]     (default: .venv/bin/python; needs torch, pybind11, cmake, ninja there)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")
work=$(mktemp -d)
# The sources only (tracked and new files, not what a build left in the tree, like an editable install's modules).
mkdir "$work/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$work/src"
(cd "$work/src" && env -u FP8KERN_REQUIRE_CUDA FP8KERN_NO_CUDA=1 FP8KERN_BUILD_DIR="$work/build" \
  "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" . > "$work/build.log" 2>&1) \
  || { cat "$work/build.log"; exit 1; }
"$py" -m pip install -q --no-index --no-deps --target "$work/site" "$work"/wheel/fp8kern-*.whl
PYTHONPATH="$work/site" "$py" - <<'PY'
import torch, fp8kern
from fp8kern import _backend, reference
assert "/site/fp8kern/" in fp8kern.__file__, fp8kern.__file__
assert _backend._C is None and _backend._cpu is not None, (_backend._C, _backend._CPU_ERROR)
info = fp8kern.info()
a = torch.randn(5, 300).to(torch.float8_e4m3fn)
b = torch.randn(70, 300).to(torch.float8_e4m3fn)
sa, sb = torch.rand(5, 3) + 0.5, torch.rand(1, 3) + 0.5
y = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
r = reference.scaled_mm(a, b, sa, sb, torch.float32)
assert (y - r).abs().max() <= 1e-5 * r.abs().max(), "the CPU family differs from the reference"
print(f"cpu_only_build: a build without CUDA has fp8kern._cpu ({info['cpu_isa']}), no fp8kern._C; "
      f"paths {info['gemm_paths']}")
PY
rm -rf "$work"
