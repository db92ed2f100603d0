"""Run a Python script or module with the fake CUDA device (tools/fake_cuda.py) installed first: the CPU rehearsal
of the GPU check (tools/gpu_check.sh --dry-run).

    python tools/fake_run.py SCRIPT [ARGS...]
    python tools/fake_run.py -m MODULE [ARGS...]
    python tools/fake_run.py -c CODE
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_cuda  # noqa: E402,F401  (installs the fake device on import)

args = sys.argv[1:]
if not args:
    sys.exit(__doc__)
if args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<fake_run -c>", "exec"), {"__name__": "__main__"})  # noqa: S102
elif args[0] == "-m":
    sys.argv = args[1:]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
