"""The benchmark command on the CPU: it runs the reference path, checks it, and writes comparable JSON rows."""

import json

import pytest

from fp8kern.bench.__main__ import main, parse_args

REQUIRED = {"gpu", "layout", "backend", "M", "N", "K", "out_dtype", "median_us", "tflops"}


def test_cpu_run_writes_checked_rows(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--quick", "--cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["layout"] for r in rows} == {"tensor", "token_channel", "block"}
    for r in rows:
        assert REQUIRED <= set(r), f"missing {REQUIRED - set(r)}"
        assert r["ok"] and r["diff_vs_fp64"] < 1e-9
    assert data["meta"]["command"].startswith("fp8kern-bench")
    assert "Timings need a GPU" in capsys.readouterr().err


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
