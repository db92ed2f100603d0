"""The benchmark command on the CPU: it times the CPU family against its peers, checks every result first, and writes
comparable JSON rows."""

import json
import math

import pytest
import torch

from fp8kern.bench.__main__ import blockwise_peer, main, parse_args, summarize
from fp8kern.bench.shapes import SUITES

REQUIRED = {"gpu", "layout", "backend", "M", "N", "K", "out_dtype", "median_us", "tflops"}


def test_cpu_run_writes_checked_rows(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--smoke", "--cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["layout"] for r in rows} == {"tensor", "token_channel", "block"}
    mine = [r for r in rows if r["backend"].startswith("fp8kern") and "ok" in r]
    assert mine and {r["backend"] for r in rows} >= {mine[0]["backend"], "torch-bf16-linear"}
    for r in rows:
        if r.get("median_us") is not None:
            assert REQUIRED <= set(r), f"missing {REQUIRED - set(r)}"
    for r in mine:
        assert r["ok"] and r["rel_err_vs_reference"] < 1e-5 and r["x_bf16"] > 0
    assert data["meta"]["command"].startswith("fp8kern-bench")
    assert data["meta"]["cpu"]["dram_read_gbps"] > 0 and data["meta"]["cpu"]["threads"] >= 1
    assert "DRAM read" in capsys.readouterr().err


def test_args():
    a = parse_args(["--quick"])
    assert a.suites == ["llama8b"] and a.m == [1, 16, 128, 4096]
    assert parse_args(["--suite", "deepseek,grok2", "--m", "1,7"]).suites == ["deepseek", "grok2"]
    with pytest.raises(SystemExit):
        parse_args(["--suite", "gpt5"])
    with pytest.raises(SystemExit):
        parse_args(["--layouts", "rowwise"])



def test_llama_stack_smoke(capsys):
    """benchmarks/llama_stack.py --small on the CPU: the fp8 stack's residual updates stay close to bf16's
    (cosine > 0.99 after 4 layers, its exit code), and it says timings need a GPU."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "llama_stack.py"
    spec = importlib.util.spec_from_file_location("llama_stack", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--small"]) == 0
    assert "timings need a GPU" in capsys.readouterr().out


@pytest.mark.parametrize("N,K", SUITES["deepseek"] + SUITES["llama8b"])
def test_blockwise_peer_call_fits_torch(N, K):
    """The torch._scaled_mm blockwise call the GPU run makes, checked by torch's own shape rules on meta tensors
    (B's scales are given for mat2 = b.t(), i.e. [ceil(K/128), ceil(N/128)])."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    M = 16
    a = torch.empty(M, K, dtype=torch.float8_e4m3fn, device="meta")
    b = torch.empty(N, K, dtype=torch.float8_e4m3fn, device="meta")
    sa = torch.empty(M, math.ceil(K / 128), device="meta")
    sb = torch.empty(math.ceil(N / 128), math.ceil(K / 128), device="meta")
    assert blockwise_peer(a, b, sa, sb, torch.bfloat16)().shape == (M, N)


def test_summary_pairs_rows_with_their_peers():
    """Goal figures from synthetic rows: ratios are peer time / fp8kern time over matching problems; unmatched
    rows are counted as missing, wrong results are counted."""
    peaks = {"fp8_tflops": 1000.0, "hbm_read_gbps": 3000.0}

    def row(backend, suite, layout, M, N, K, us, **kw):
        flops = 2 * M * N * K
        return dict(backend=backend, suite=suite, layout=layout, M=M, N=N, K=K, median_us=us,
                    tflops=flops / us / 1e6, pct_fp8_peak=100 * flops / us / 1e6 / 1000.0,
                    weight_gbps=N * K / us / 1e3, **kw)

    rows = [row("fp8kern", "llama8b", "token_channel", 1, 4096, 4096, 10.0),
            row("torch._scaled_mm", "llama8b", "token_channel", 1, 4096, 4096, 12.0),
            row("fp8kern", "llama70b", "token_channel", 4096, 8192, 8192, 500.0),
            row("torch._scaled_mm", "llama70b", "token_channel", 4096, 8192, 8192, 450.0),
            row("fp8kern", "deepseek", "block", 128, 7168, 2048, 20.0),
            row("torch.matmul-bf16", "deepseek", "block", 128, 7168, 2048, 30.0),
            dict(backend="fp8kern", layout="block", M=1, N=7168, K=2048, median_us=None, ok=False, error="x")]
    s = summarize(rows, "fp8kern", peaks)
    r = s["rowwise_vs_scaled_mm"]
    assert r["n"] == 2 and r["missing"] == 0
    assert r["geomean"] == pytest.approx(math.sqrt(1.2 * 0.9)) and r["min"] == pytest.approx(0.9)
    assert s["decode_weight_bw_pct_of_hbm_read"]["min"] == pytest.approx(100 * 4096 * 4096 / 10.0 / 1e3 / 3000.0)
    assert s["large_m_llama70b_tflops"]["n"] == 1
    assert s["block_vs_scaled_mm_blockwise"]["missing"] == 1
    assert s["block_vs_bf16_m128plus"]["min"] == pytest.approx(1.5)
    assert s["wrong_results"] == 1


_FAKE_GPU_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fake_cuda  # a fake CUDA device; kernel launches emulated with the reference
import fp8kern.bench.__main__ as bench
bench.PEAK_SHAPES = [(128, 128, 256)]
bench.HBM_BYTES = 1 << 20
bench.SUITES["llama8b"] = [(256, 384), (130, 200)]
bench.SUITES["deepseek"] = [(260, 300)]
sys.exit(bench.main(["--suite", "llama8b,deepseek", "--m", "1,16", "--reps", "2", "--json", sys.argv[2]]))
"""


def test_gpu_path_on_a_fake_device(tmp_path):
    """The GPU code path (backend choice, peaks, peers, checks, rows, goal summary, incremental JSON) end to end on
    the CPU with tools/fake_cuda.py, in a subprocess since the fake device patches torch globally. Timings are
    meaningless."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-c", _FAKE_GPU_RUN, str(root / "tools"), str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    mine = [row for row in data["rows"] if row["backend"] == "fp8kern" and row.get("median_us")]
    assert {row["layout"] for row in mine} == {"tensor", "token_channel", "block"}
    assert all(REQUIRED <= set(row) and row["ok"] and row["diff_vs_reference"] < 1e-9 for row in mine)
    assert data["summary"]["rowwise_vs_scaled_mm"]["n"] == 4 and data["summary"]["wrong_results"] == 0
    assert any(row.get("host_overhead_us") for row in data["rows"])
    assert "goals (this run)" in r.stdout
    # With the default backend it times the compiled (unverified) family, saying so, and repro lines name it.
    assert "sm90 kernels are not yet verified on a GPU; timing them anyway" in r.stderr
    assert all("--backend sm90" in row["repro"] for row in mine)
