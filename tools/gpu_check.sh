#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine without network: build, all tests (GPU ones included),
# compute-sanitizer on small problems, the quick benchmark, the Llama-8B-shaped stack (fp8 vs bf16, CUDA graphs).
# Logs, JSON and a summary go to DIR.
#   bash tools/gpu_check.sh DIR
# Needs torch (CUDA), pybind11, cmake, ninja, pytest, nvcc there, and in .whl/ (ignored by git; name it in the
# device tool's carry) the wheels it lacks, prepared here with:
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0 nvidia-cuda-cuobjdump==13.2.86
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_check.sh DIR}
mkdir -p "$out"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} FP8KERN_REQUIRE_CUDA=1
{
  date -u +"date: %Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

export PATH="/usr/local/cuda/bin:$PATH"
pip install -q --no-deps --no-index .whl/*.whl
cuobj=$(python -c "import glob, sys; print(next((p for d in sys.path for p in glob.glob(d + '/nvidia/cu*/bin')), ''))")
if [ -n "$cuobj" ]; then export PATH="$PATH:$cuobj"; fi
pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python -c "import fp8kern, json; print(json.dumps(fp8kern.info()))" | tee "$out/info.json"

python -m pytest -ra -q --junitxml="$out/pytest.xml" > "$out/pytest.log" 2>&1
test_rc=$?
tail -5 "$out/pytest.log"

san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$san" ]; then
  for tool in memcheck racecheck; do
    "$san" --tool "$tool" --error-exitcode 9 python tools/sanitize_smoke.py > "$out/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
else
  echo "compute-sanitizer: not found" | tee "$out/sanitizer_memcheck.log"
fi

# Hopper: time the sm90 kernels even before they are marked verified (the tests above are what verifies them).
backend=$(python -c "import torch; print('sm90' if torch.cuda.get_device_capability() == (9, 0) else 'auto')")
python -m fp8kern.bench --quick --backend "$backend" --json "$out/bench.json" > "$out/bench.txt" 2>&1
echo "bench: rc=$?"
python -m fp8kern.bench --quick --backend sm89 --json "$out/bench_sm89.json" \
  > "$out/bench_sm89.txt" 2>&1
echo "bench sm89 (fp8kern-sm89 rows): rc=$?"
FP8KERN_BACKEND="$backend" python benchmarks/llama_stack.py --json "$out/llama_stack.json" > "$out/llama_stack.txt" 2>&1
echo "llama_stack: rc=$?"
cat "$out/llama_stack.txt"
tail -40 "$out/bench.txt"
exit $test_rc
