"""tools/gpu_check_summary.py, the table the GPU check ends with, on a made-up work directory: test counts per family
from JUnit XML, sweep mismatches, the sanitizer's errors or refusal, steps cut at their budget, and the result line
(a failure anywhere is FAIL, a cut step without failures INCOMPLETE)."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gpu_check_summary.py"


def junit(cases: list[tuple[str, str]]) -> str:
    body = "".join(f'<testcase classname="t" name="{name}">'
                   + {"pass": "", "fail": "<failure message='x'/>", "skip": "<skipped message='y'/>"}[status]
                   + "</testcase>" for name, status in cases)
    return f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


def make_work(tmp_path, gemm_fail=False, mismatches=0, sanitizer="========= ERROR SUMMARY: 0 errors", cut=False,
              no_bench=False):
    (tmp_path / "env.txt").write_text("date: now\n")
    (tmp_path / "junit_quant.xml").write_text(junit([("test_m_sweep[1]", "pass"), ("test_m_sweep[2]", "pass")]))
    (tmp_path / "junit_gemm.xml").write_text(junit([
        ("test_m_sweep[sm90-1]", "pass"), ("test_m_sweep[sm89-1]", "fail" if gemm_fail else "pass"),
        ("test_grouped_block_mm[1-2]", "pass"), ("test_every_config[sm89_block-0]", "skip")]))
    (tmp_path / "junit_paths.xml").write_text(junit([("test_torch_path[block-1-16-16]", "skip"),
                                                     ("test_dequant_path[block-1-16-16]", "pass")]))
    (tmp_path / "sweep_sm90.json").write_text(json.dumps(dict(backend="sm90", cases=40, mismatches=mismatches,
                                                              worst_err_over_bound=0.25)))
    (tmp_path / "sanitize.log").write_text(sanitizer)
    steps = ["tests_quant 0", "tests_gemm 0", "sweep_sm90 0", "sanitize 0", f"bench {124 if cut else 0}"]
    (tmp_path / "status.txt").write_text("\n".join(steps) + "\n")
    bench = dict(meta=dict(auto_paths={"block": "dequantize + GEMM"}),
                 summary=dict(rowwise_vs_scaled_mm=dict(geomean=1.234, min=0.97), wrong_results=0),
                 rows=[dict(suite="deepseek", M=4096, N=16384, K=7168, layout="block", backend="fp8kern",
                            tflops=1012.4)])
    if not no_bench:
        (tmp_path / "bench.json").write_text(json.dumps(bench))
    return tmp_path


def summary(work) -> str:
    r = subprocess.run([sys.executable, str(TOOL), str(work)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_counts_per_family_and_pass(tmp_path):
    out = summary(make_work(tmp_path))
    rows = {m[1]: [m[2], m[3], m[4]] for m in re.finditer(r"^  (\S.*?)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)}
    assert rows["quant kernels"] == ["2", "0", "0"]
    assert rows["sm90"] == ["1", "0", "0"] and rows["sm89"] == ["1", "0", "1"] and rows["sm90 grouped"] == ["1", "0", "0"]
    assert "compute-sanitizer memcheck: 0 errors" in out
    assert "rowwise_vs_scaled_mm.geomean: 1.23  (goal >= 1.10)" in out and "rowwise_vs_scaled_mm.min: 0.97" in out
    assert "block_vs_scaled_mm_blockwise.geomean: n/a" in out
    assert "deepseek 16384x7168 M=4096 block: 1012 TFLOPS (goal >= 1000)" in out
    assert out.rstrip().endswith("RESULT: PASS")


@pytest.mark.parametrize("kw,result", [
    (dict(gemm_fail=True), "FAIL"), (dict(mismatches=2), "FAIL"),
    (dict(sanitizer="========= ERROR SUMMARY: 3 errors"), "FAIL"), (dict(cut=True), "INCOMPLETE"),
    (dict(sanitizer="========= Device not supported", cut=True), "INCOMPLETE"),
    (dict(sanitizer="========= Device not supported"), "PASS"), (dict(no_bench=True), "INCOMPLETE")])
def test_result_line(tmp_path, kw, result):
    out = summary(make_work(tmp_path, **kw))
    assert out.rstrip().endswith(f"RESULT: {result}"), out
    if kw.get("gemm_fail"):
        assert "FAILED gemm: test_m_sweep[sm89-1]" in out
