#!/usr/bin/env bash
# Set up everything fp8kern needs in a virtual environment, build it, then run one job:
#   bash tools/run.sh bench [fp8kern-bench args]   the benchmark (reference check on a machine without a GPU)
#   bash tools/run.sh test  [pytest args]          the test suite
# Environment: FP8KERN_VENV (default .venv), TORCH_SPEC (default torch==2.13.0, used only when the environment has
# no torch), FP8KERN_REQUIRE_CUDA=1 (fail instead of installing without the CUDA kernels), FP8KERN_CUDA_ARCHS,
# FP8KERN_SYSTEM_SITE_PACKAGES=1 (a new environment also sees the system's packages, to reuse the CUDA torch of a GPU
# machine; by default it sees only what this script installs, so a missing install step fails here as it would on a
# fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
  bench|test) ;;
  *) echo "usage: bash tools/run.sh bench|test [args]" >&2; exit 2 ;;
esac

venv=${FP8KERN_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  if [ "${FP8KERN_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.fp8kern-deps"
if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
  python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  pip install -q -r requirements-dev.txt
  pip install -q --no-deps nvidia-cutlass==4.2.0.0
  touch "$stamp"
fi
# Incremental: CMake's build tree under build/ is reused, so only changed sources recompile.
pip install -q --no-build-isolation --no-deps -e .
# cuobjdump and nvdisasm from their wheels (nvidia/cu*/bin in site-packages), ahead of any other copy on PATH
cuobj=$(python -c "import glob, sys; print(next((p for d in sys.path for p in glob.glob(d + '/nvidia/cu*/bin')
                                                 if glob.glob(p + '/cuobjdump')), ''))")
if [ -n "$cuobj" ]; then export PATH="$cuobj:$PATH"; fi

if [ "$job" = bench ]; then
  exec python -m fp8kern.bench "$@"
else
  exec python -m pytest -ra "$@"
fi
