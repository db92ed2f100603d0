#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine without network: build, all tests (GPU ones included),
# compute-sanitizer on small problems, the quick benchmark, the accumulation-mode error/speed figures, the
# Llama-8B-shaped stack (fp8 vs bf16, CUDA graphs), MoE experts layers (Fp8Experts vs bf16, eager).
# Logs, JSON and a summary go to DIR.
#   bash tools/gpu_check.sh DIR [STAGE...]      stages: build test sanitize bench (default: all, in order)
# A device command may run 10 minutes: on a cold machine run `build test`, then `sanitize`, then `bench`, one call
# each (the build stays in the working tree between calls on a warm machine; later stages rebuild nothing).
# Needs torch (CUDA), pybind11, cmake, ninja, pytest, nvcc there, and in .whl/ (ignored by git; name it in the
# device tool's carry) the wheels it lacks, prepared here with (the second line: matplotlib for the bench plot,
# for the device's Python 3.12; about 30 MB in all):
#   pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0 nvidia-cuda-cuobjdump==13.2.86
#   pip download --no-deps -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any matplotlib contourpy \
#     cycler fonttools kiwisolver pillow pyparsing python-dateutil six packaging
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_check.sh DIR [build|test|sanitize|bench ...]}
shift
stages=${*:-build test sanitize bench}
mkdir -p "$out"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} FP8KERN_REQUIRE_CUDA=1
export PATH="/usr/local/cuda/bin:$PATH"
{
  date -u +"date: %Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
  echo "stages: $stages"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
cuobj=$(python -c "import glob, sys; print(next((p for d in sys.path for p in glob.glob(d + '/nvidia/cu*/bin')), ''))")
if [ -n "$cuobj" ]; then export PATH="$PATH:$cuobj"; fi
rc=0

stage_build() {
  pip install -q --no-deps --no-index .whl/nvidia_*.whl
  # The plot's dependencies only where the device lacks them; without them the bench just skips its PNG.
  pip install -q --no-index --find-links .whl matplotlib > "$out/plot_deps.log" 2>&1 \
    || echo "matplotlib not installed (bench PNG skipped): see plot_deps.log"
  pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  python -c "import fp8kern, json; print(json.dumps(fp8kern.info()))" | tee "$out/info.json"
}

stage_test() {
  # GPU tests first: should the device call's time limit end the stage, their results are already in the logs.
  python -m pytest -ra -q -m gpu --durations=15 --junitxml="$out/pytest_gpu.xml" > "$out/pytest_gpu.log" 2>&1 || rc=1
  tail -5 "$out/pytest_gpu.log"
  grep -qE "[0-9]+ passed" "$out/pytest_gpu.log" || { echo "no GPU test passed (all skipped?): see pytest_gpu.log"; rc=1; }
  python -m pytest -ra -q -m "not gpu" --junitxml="$out/pytest.xml" > "$out/pytest.log" 2>&1 || rc=1
  tail -3 "$out/pytest.log"
}

stage_sanitize() {
  local san
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$san" ]; then echo "compute-sanitizer: not found" | tee "$out/sanitizer_memcheck.log"; return; fi
  for tool in memcheck racecheck; do
    "$san" --tool "$tool" --error-exitcode 9 python tools/sanitize_smoke.py > "$out/sanitizer_$tool.log" 2>&1 || rc=1
    echo "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
}

stage_bench() {
  # Hopper: time the sm90 kernels even before they are marked verified (the tests are what verifies them).
  # Main run: the suites the speed goals are stated on (Llama rowwise, DeepSeek block-scaled), M from decode to
  # large prefill; it prints the goal figures last. Then the sm89 kernels (fp8kern only), the accumulation modes,
  # the Llama-8B-shaped stack and the MoE experts layers.
  local backend r
  backend=$(python -c "import torch; print('sm90' if torch.cuda.get_device_capability() == (9, 0) else 'auto')")
  python -m fp8kern.bench --suite llama8b,llama70b,deepseek --m 1,16,128,4096,16384 --reps 20 \
    --backend "$backend" --json "$out/bench.json" > "$out/bench.txt" 2>&1
  r=$?; echo "bench: rc=$r"; [ $r -eq 0 ] || rc=1
  python -m fp8kern.bench --quick --no-peers --backend sm89 --json "$out/bench_sm89.json" > "$out/bench_sm89.txt" 2>&1
  r=$?; echo "bench sm89 (fp8kern-sm89 rows): rc=$r"; [ $r -eq 0 ] || rc=1
  python benchmarks/accumulation.py --json "$out/accumulation.json" > "$out/accumulation.txt" 2>&1
  r=$?; echo "accumulation (promoted vs fast, K=4096/16384): rc=$r"; [ $r -eq 0 ] || rc=1
  python benchmarks/llama_stack.py --backend "$backend" --json "$out/llama_stack.json" \
    > "$out/llama_stack.txt" 2>&1
  r=$?; echo "llama_stack: rc=$r"; [ $r -eq 0 ] || rc=1
  python benchmarks/moe_layer.py --backend "$backend" --json "$out/moe_layer.json" > "$out/moe_layer.txt" 2>&1
  r=$?; echo "moe_layer: rc=$r"; [ $r -eq 0 ] || rc=1
  # per-channel experts (the grouped row/col kernel), Qwen3-30B-A3B dims
  python benchmarks/moe_layer.py --backend "$backend" --scheme dynamic_per_token --models qwen3-30b-a3b \
    --json "$out/moe_layer_channel.json" > "$out/moe_layer_channel.txt" 2>&1
  r=$?; echo "moe_layer (per-channel): rc=$r"; [ $r -eq 0 ] || rc=1
  cat "$out/llama_stack.txt" "$out/moe_layer.txt" "$out/moe_layer_channel.txt" "$out/accumulation.txt"
  tail -60 "$out/bench.txt"
}

case " $stages " in
  *" build "*) ;;
  *) python -c "import fp8kern._C" 2>/dev/null || { echo "fp8kern._C not built here: building first"; stages="build $stages"; } ;;
esac
for stage in $stages; do
  case $stage in
    build|test|sanitize|bench) echo "== $stage"; "stage_$stage" ;;
    *) echo "unknown stage '$stage', expected build, test, sanitize or bench"; exit 2 ;;
  esac
done
exit $rc
