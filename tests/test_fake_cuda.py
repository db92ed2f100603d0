"""tools/fake_cuda.py emulates kernel launches for the CPU dry run of the GPU tests. These check that the emulation
can fail (a launch whose addresses leave the tensors it was given is refused, and the real binding's validation
still runs), and dry-run the GPU-check scripts on it. In subprocesses, since the fake device patches torch
globally."""

import os
import pathlib
import subprocess
import sys

import pytest

from fp8kern import _backend

pytestmark = pytest.mark.skipif("sm90" not in _backend.compiled_families(), reason="sm90 kernels not compiled")

_RUN = """
import re
import sys
sys.path.insert(0, sys.argv[1])
import fake_cuda
import torch, fp8kern
from fp8kern import _backend
from fp8kern.ops import gemm_launch
fp8kern.set_backend("sm90")
torch.manual_seed(0)
a = torch.randn(5, 64, device="cuda").to(torch.float8_e4m3fn)
b = torch.randn(24, 64, device="cuda").to(torch.float8_e4m3fn)
sa, sb = torch.rand(5, 1, device="cuda") + 0.5, torch.rand(24, device="cuda") + 0.5
before = fake_cuda.LAUNCHES["emulated"]
d = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
assert fake_cuda.LAUNCHES["emulated"] == before + 1, "the kernel path was not taken"
ref = fp8kern.reference.scaled_mm(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), torch.float32)
# Exact equality, no tolerance: the emulation computes with this same reference, so any difference is a launch
# argument (pointer, stride, flag, padding) passed wrong by fp8kern's kernel path.
assert torch.equal(d.cpu(), ref)
small = torch.empty(5, 8, device="cuda")  # too small for a [5, 24] result
args = ["sm90", 0, a.data_ptr(), b.data_ptr(), small.data_ptr(), 5, 24, 64, 64, 64, 24, 0, sa.data_ptr(), True,
        sb.data_ptr(), True, 0, False, -1, 0, 0, torch.cuda.current_stream().cuda_stream]
for what, i, value, message in [("d", 4, small.data_ptr(), "launch argument d: .* lie in no live CUDA tensor"),
                                 ("a", 2, a.data_ptr() + 1, "16-byte aligned"),
                                 ("k", 7, 40, "multiples of 16")]:
    bad = list(args)
    bad[i] = value
    try:
        _backend._C.scaled_mm(*bad)
    except (RuntimeError, ValueError) as e:
        assert re.search(message, str(e)), (what, str(e))
    else:
        raise AssertionError(f"an invalid {what} was accepted")
# Block-scaled with K padded to the kernels' multiple of 16, a stream-K problem (workspace sized per shape), and the
# fused quantizer: each through the emulated launch, each equal to the reference.
ga = torch.rand(3, 2, device="cuda") + 0.5
gb = torch.rand(2, 2, device="cuda") + 0.5
a3 = torch.randn(3, 200, device="cuda").to(torch.float8_e4m3fn)
b3 = torch.randn(136, 200, device="cuda").to(torch.float8_e4m3fn)
d3 = fp8kern.scaled_mm(a3, b3, ga, gb)
assert torch.equal(d3.cpu(), fp8kern.reference.scaled_mm(a3.cpu(), b3.cpu(), ga.cpu(), gb.cpu()))
a4 = torch.randn(256, 2048, device="cuda").to(torch.float8_e4m3fn)
s4 = torch.ones(256, device="cuda")
assert "streamk" in gemm_launch.config_label("sm90", False, 256, 256, 2048, a4.device)
d4 = fp8kern.scaled_mm(a4, a4, s4, s4)
assert torch.equal(d4.cpu(), fp8kern.reference.scaled_mm(a4.cpu(), a4.cpu(), s4.cpu(), s4.cpu()))
assert fake_cuda.STREAMK_WORKSPACE in gemm_launch._ws_bytes.values()
x = torch.randn(4, 300, device="cuda", dtype=torch.bfloat16)
q, s = fp8kern.quantize(x, "group")
rq, rs = fp8kern.reference.quantize(x.cpu(), "group")
assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)
assert fake_cuda.LAUNCHES["emulated"] == before + 4
# An operand whose rows are not K apart, reaching the launch without scaled_mm's validation (the custom op, as a
# compiled graph calls it), is copied to rows K apart, not read with the wrong row stride.
a5 = torch.randn(5, 128, device="cuda").to(torch.float8_e4m3fn)[:, :64]
d5 = torch.ops.fp8kern.scaled_mm(a5, b, sa, sb, torch.float32, None, False)
assert torch.equal(d5.cpu(), fp8kern.reference.scaled_mm(a5.cpu(), b.cpu(), sa.cpu(), sb.cpu(), torch.float32))
ws = torch.empty(fake_cuda.STREAMK_WORKSPACE, dtype=torch.uint8, device="cuda")
big = ["sm90", 0, a4.data_ptr(), a4.data_ptr(), d4.data_ptr(), 256, 256, 2048, 2048, 2048, 256, 2, s4.data_ptr(),
       True, s4.data_ptr(), True, 0, False, -1, ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream]
_backend._C.scaled_mm(*big)
for what, i, value, message in [("workspace", 20, 16, "needs .* bytes of workspace"),
                                ("stream", 21, 12345, "not the current stream"),
                                ("device", 1, 1, "launch on device 1")]:
    bad = list(big)
    bad[i] = value
    try:
        _backend._C.scaled_mm(*bad)
    except RuntimeError as e:
        assert re.search(message, str(e)), (what, str(e))
    else:
        raise AssertionError(f"an invalid {what} was accepted")
print("ok")
"""


def test_emulated_launches_check_their_arguments():
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _RUN, str(root / "tools")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]


_SCRIPT = """
import runpy
import sys
sys.path.insert(0, sys.argv[1])
import fake_cuda
script, sys.argv = sys.argv[2], sys.argv[2:]
if script.endswith("accumulation.py"):  # its K = 16384 problems take minutes in the CPU's float64 reference
    g = runpy.run_path(script, run_name="dry_run")
    g["SHAPES"][:] = [(16, 256, 512), (64, 128, 1024)]
    sys.exit(g["main"]())
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", [
    ["tools/sanitize_smoke.py"],
    ["benchmarks/accumulation.py"],
    ["benchmarks/llama_stack.py", "--backend", "sm90", "--layers", "1", "--prefill", "16", "--decode", "1",
     "--reps", "2"],
    ["benchmarks/moe_layer.py", "--backend", "sm90", "--models", "qwen3-30b-a3b", "--tokens", "1", "9",
     "--reps", "2"],
    ["tools/gpu_sweep.py", "--backend", "sm90", "--cases", "6", "--json", os.devnull],
    ["tools/gpu_sweep.py", "--backend", "torch", "--cases", "6", "--json", os.devnull],
    ["tools/gpu_sweep.py", "--backend", "dequant", "--cases", "6", "--json", os.devnull],
], ids=["sanitize_smoke", "accumulation", "llama_stack", "moe_layer", "sweep_sm90", "sweep_torch", "sweep_dequant"])
def test_gpu_check_scripts_on_a_fake_device(script):
    """The scripts tools/gpu_check.sh runs on a GPU (besides the bench, which test_bench covers) run through on the
    fake device, kernel launches emulated, so a mistake in them costs no device time. Their numbers mean nothing."""
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(root / "tools"), *script], capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


_CAPTURE = """
import sys
sys.path.insert(0, sys.argv[1])
import fake_cuda
import torch
x = torch.arange(6, device="cuda")
mask, reps = x > 2, torch.full((6,), 2, device="cuda")
ops = {"item": lambda: x[0].item(), "tolist": lambda: x.tolist(), "bincount": lambda: torch.bincount(x, minlength=8),
       "unique": lambda: torch.unique(x), "mask index": lambda: x[mask],
       "mask assign": lambda: x.clone().__setitem__(mask, 0), "nonzero": lambda: x.nonzero(),
       "repeat_interleave": lambda: torch.repeat_interleave(x, reps)}
fine = {"gather": lambda: x[reps], "sized repeat_interleave": lambda: torch.repeat_interleave(x, reps, output_size=12),
        "where": lambda: torch.where(mask, x, 0)}
for name, op in {**ops, **fine}.items():
    op()  # all fine eagerly
for name, op in {**ops, **fine}.items():
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            op()
    except RuntimeError as e:
        assert name in ops and "capture" in str(e), (name, str(e))
    else:
        assert name in fine, f"{name} was captured, but a real capture fails on its host read"
print("ok")
"""


def test_capture_refuses_host_reads():
    """The fake device refuses, inside a graph capture, the operations a real capture fails on (host reads of device
    data, output sizes taken from data), so a capture test on it can fail the way it would on a GPU."""
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _CAPTURE, str(root / "tools")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]


_PATHS = """
import sys
import warnings
sys.path[:0] = sys.argv[1:3]
import fake_cuda
import torch, fp8kern
from conftest import fp32_gemm_bound, make_operands
from test_gemm_paths import check, dequant_bound
expected = dict(zip(("tensor", "token_channel", "block"), sys.argv[3].split(",")))
paths = fp8kern.info()["gemm_paths"]
for layout, want in expected.items():
    assert paths[layout].startswith({"torch": "torch._scaled_mm", "dequant": "dequantize + GEMM"}[want]), paths
    a, b, sa, sb = make_operands(7, 130, 200, layout, torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fp8kern.scaled_mm(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(), out_dtype=torch.float32)
    check(y.cpu(), a, b, sa, sb, torch.float32, bound=dequant_bound if want == "dequant" else fp32_gemm_bound)
print("ok")
"""


@pytest.mark.parametrize("cap,expected", [("8,0", "dequant,dequant,dequant"), ("8,9", "torch,torch,dequant"),
                                          ("9,0", "torch,torch,dequant"), ("10,0", "torch,torch,dequant"),
                                          ("12,0", "torch,torch,dequant")])
def test_default_path_on_simulated_gpus(cap, expected):
    """With no fp8kern family verified, a simulated sm_80 dequantizes every layout; sm_89 and newer run per-tensor and
    per-channel layouts on torch's FP8 GEMM, and block-scaled ones dequantized (torch's block-wise GEMM is sm_90
    only, needs CUDA >= 12.9, and fp8kern's glue to it waits for a GPU run). Results checked against the oracle."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, FAKE_CAP=cap, FP8KERN_BACKEND="auto")
    r = subprocess.run([sys.executable, "-c", _PATHS, str(root / "tools"), str(root / "tests"), expected],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]
