#!/usr/bin/env bash
# The whole GPU check in one command, for the lent GPU machine (no network, nothing compiled there, a 10-minute
# command limit, at most 8 files back). It installs the prebuilt wheel (tools/build_wheel.sh, carried in .whl/),
# then runs, most valuable first, each step cut at its own time budget so the rest still runs:
#   tests     the GPU tests of each family: quantization kernels, sm90 and sm89 scaled_mm (block-scaled and grouped
#             included), the MoE experts, torch's FP8 GEMM and the dequantizing paths (JUnit XML per file)
#   sweep     tools/gpu_sweep.py: random shapes against the float64 oracle on sm90, sm89, torch and dequant
#   sanitize  compute-sanitizer memcheck over tools/sanitize_smoke.py (a refusal of the device is recorded)
#   bench     fp8kern-bench --quick on Llama-3.1-8B, Llama-3.3-70B and DeepSeek-V3 shapes, against torch._scaled_mm
#             and bf16, ending with the goal figures
# Everything is packed into OUT: summary.txt (the table, printed last too), info.json, bench.json, sweep.json and
# logs.tar.gz (every log, JUnit XML and JSON).
#   bash tools/gpu_check.sh OUT                       on the GPU machine, from the repository root
#   STEPS="tests bench" bash tools/gpu_check.sh OUT   a shorter rerun (steps: tests sweep sanitize bench, and
#                                                     extras: accumulation modes, the Llama-8B stack and MoE layer
#                                                     benchmarks, fp8kern-bench of the torch and dequant paths;
#                                                     about 6 minutes, for a second command)
#   bash tools/gpu_check.sh OUT --dry-run             rehearsal here: the same steps on the fake CUDA device
#                                                     (tools/fake_cuda.py), with a wheel for this machine's Python
#                                                     (PYTHON=.venv/bin/python bash tools/build_wheel.sh), so the
#                                                     GPU run can fail on nothing but the kernels; sanitize and
#                                                     bench are skipped there (no device; the bench's GPU path is
#                                                     rehearsed by tests/test_bench.py)
# Device call: run(command="bash tools/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_check.sh OUT [--dry-run]}
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
steps=${STEPS:-tests sweep sanitize bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
py=${PYTHON:-$( [ $dry = 1 ] && echo "${FP8KERN_VENV:-.venv}/bin/python" || echo python3 )}
start=$(date +%s)

# Seconds per step, stated once: about 7.7 minutes in all, inside the 10-minute command limit with room for the
# install and the packing.
# The test files' budgets come with the files from tests/gpu_test_files.txt (tests_NAME).
declare -A BUDGET=([sweep_sm90]=25 [sweep_sm89]=15 [sweep_torch]=15 [sweep_dequant]=15 [sanitize]=60 [bench]=90
                   [extras_accumulation]=80 [extras_llama_stack]=80 [extras_moe_layer]=80 [extras_bench_torch]=60
                   [extras_bench_dequant]=60)

gpu_tests=()  # NAME:FILE, in the list's order
while read -r name file secs; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  gpu_tests+=("$name:$file")
  BUDGET[tests_$name]=$secs
done < tests/gpu_test_files.txt

note() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$work/steps.log"; }

# run NAME CMD...: the command under its budget; its output in $work/NAME.log; exit status noted (124: cut). A step
# that ignores the interrupt for 15 s is killed (timeout's 137): that is a cut too, where its budget had run out.
run() {
  local name=$1 rc t0=$SECONDS
  shift
  timeout -s INT -k 15 "${BUDGET[$name]}" "$@" > "$work/$name.log" 2>&1
  rc=$?
  [ $rc -eq 137 ] && [ $((SECONDS - t0)) -ge "${BUDGET[$name]}" ] && rc=124
  [ $rc -eq 124 ] && note "$name: CUT at its ${BUDGET[$name]} s budget" || note "$name: exit $rc"
  echo "$name $rc" >> "$work/status.txt"
}

# $pyrun: Python with the installed wheel first on the path and, in a dry run, the fake CUDA device loaded first.
site="$work/site"
export PYTHONPATH="$site"
pyrun=("$py")
pytest_fake=()
if [ $dry = 1 ]; then
  export PYTHONPATH="$site:$PWD/tools"
  pyrun=("$py" "$PWD/tools/fake_run.py")
  pytest_fake=(-p fake_cuda)
fi

{
  date -u +"date: %Y-%m-%d %H:%M:%S UTC"
  [ $dry = 1 ] && echo "DRY RUN on the fake CUDA device (tools/fake_cuda.py): no kernel ran"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "command: bash tools/gpu_check.sh $* (steps: $steps)"
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$work/env.txt" 2>&1
cat "$work/env.txt"

tag=$("$py" -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
whl=$(ls .whl/fp8kern-*-cp"$tag"-*.whl 2>/dev/null | head -1)
if [ -z "$whl" ]; then
  echo "gpu_check: no .whl/fp8kern-*-cp$tag-*.whl: build it first (bash tools/build_wheel.sh, PYTHON=... for cp$tag)"
  exit 2
fi
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl" > "$work/install.log" 2>&1 \
  || { cat "$work/install.log"; exit 2; }
"${pyrun[@]}" -c "import fp8kern, json; i = fp8kern.info(); i['file'] = fp8kern.__file__; print(json.dumps(i))" \
  > "$work/info.json" 2> "$work/info.err"
grep -q "\"file\": \"$site" "$work/info.json" \
  || { echo "gpu_check: fp8kern was not imported from the wheel:"; cat "$work/info.json" "$work/info.err"; exit 2; }
grep -q '"compiled": true' "$work/info.json" || { echo "gpu_check: the wheel's _C does not load:"; cat "$work/info.json"; exit 2; }
note "installed $whl"

# The compiled family the benchmarks time: Hopper's on an sm_90 GPU (verified or not: every result is checked first).
backend=$("$py" -c "import torch; print('sm90' if torch.cuda.get_device_capability() == (9, 0) else 'auto')" \
          2>/dev/null || echo auto)
[ $dry = 1 ] && backend=sm90
for step in $steps; do
  case $step in
    tests)
      for part in "${gpu_tests[@]}"; do
        run "tests_${part%%:*}" "$py" -m pytest -q -rfE -p no:cacheprovider "${pytest_fake[@]}" "tests/${part#*:}" \
          --junitxml="$work/junit_${part%%:*}.xml"
      done ;;
    sweep)
      for path in sm90 sm89 torch dequant; do
        run "sweep_$path" "${pyrun[@]}" tools/gpu_sweep.py --backend "$path" --seconds "$((BUDGET[sweep_$path] - 8))" \
          --json "$work/sweep_$path.json"
      done ;;
    sanitize)
      san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
      if [ $dry = 1 ] || [ -z "$san" ]; then
        note "sanitize: skipped ($([ $dry = 1 ] && echo 'dry run: no device' || echo 'compute-sanitizer not found'))"
        echo "sanitize skipped" >> "$work/status.txt"
      else
        run sanitize "$san" --tool memcheck --error-exitcode 9 "$py" tools/sanitize_smoke.py
      fi ;;
    bench)
      if [ $dry = 1 ]; then  # its peak measurement alone is minutes of CPU emulation
        note "bench: skipped (dry run: the fake device computes every GEMM on the CPU; tests/test_bench.py runs the
  benchmark's GPU path on the fake device with small shapes)"
        echo "bench skipped" >> "$work/status.txt"
      else  # the layouts the goals are stated on (per-token x per-channel, block-scaled)
        run bench "${pyrun[@]}" -m fp8kern.bench --quick --suite llama8b,llama70b,deepseek \
          --layouts token_channel,block --backend "$backend" --json "$work/bench.json"
      fi ;;
    extras)
      run extras_accumulation "${pyrun[@]}" benchmarks/accumulation.py --json "$work/accumulation.json"
      run extras_llama_stack "${pyrun[@]}" benchmarks/llama_stack.py --backend "$backend" --json "$work/llama_stack.json"
      run extras_moe_layer "${pyrun[@]}" benchmarks/moe_layer.py --backend "$backend" --json "$work/moe_layer.json"
      for path in torch dequant; do
        run "extras_bench_$path" "${pyrun[@]}" -m fp8kern.bench --quick --no-peers --backend "$path" \
          --json "$work/bench_$path.json"
      done ;;
    *) note "unknown step '$step' (expected tests, sweep, sanitize, bench, extras)" ;;
  esac
done

"$py" tools/gpu_check_summary.py "$work" > "$work/summary.txt" 2>&1
cp "$work/summary.txt" "$work/info.json" "$out/"
[ -f "$work/bench.json" ] && cp "$work/bench.json" "$out/"
"$py" - "$work" "$out/sweep.json" <<'EOF'
import glob, json, os, sys
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "sweep_*.json")))]
json.dump(runs, open(sys.argv[2], "w"), indent=1)
EOF
tar -czf "$out/logs.tar.gz" -C "$work" --exclude=./site . 2>/dev/null
note "packed $(ls "$out" | wc -l) files into $out"
cat "$work/summary.txt"
grep -q "^RESULT: PASS" "$work/summary.txt"
