"""The table tools/gpu_check.sh prints last and packs as summary.txt: per family the GPU tests passed / failed /
skipped (from the JUnit XML), per path the sweep's cases and mismatches, the sanitizer's errors, each step cut at its
budget, and per speed goal the figure the benchmark measured. The last line is RESULT: PASS (every step ran to its
end, every step ran, and nothing failed), FAIL or INCOMPLETE (a step was cut or did not run, nothing failed).

    python tools/gpu_check_summary.py WORKDIR
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def family_of(part: str, name: str) -> str:
    """The kernel family or path a GPU test checks, from its file and its (parametrized) name."""
    if part == "quant":
        return "quant kernels"
    if part == "paths":
        return "torch path" if "torch" in name else "dequant path" if "dequant" in name else "default path"
    grouped = "grouped" in name
    fam = "sm90" if "sm90" in name or grouped else "sm89" if "sm89" in name else "other"
    if part == "experts":
        return f"experts {fam}{' grouped' if grouped else ''}"
    return f"{fam} grouped" if grouped else fam


def tests(work: str) -> tuple[dict, list]:
    counts, failed = {}, []
    for path in sorted(glob.glob(os.path.join(work, "junit_*.xml"))):
        part = os.path.basename(path)[len("junit_"):-len(".xml")]
        try:
            cases = ET.parse(path).getroot().iter("testcase")
        except ET.ParseError as e:
            counts[f"{part} (unreadable JUnit: {e})"] = [0, 1, 0]
            continue
        for case in cases:
            name = case.get("name", "")
            if not name:  # the test a budget's interrupt cut short (the step is reported as cut)
                continue
            c = counts.setdefault(family_of(part, name), [0, 0, 0])
            if case.find("failure") is not None or case.find("error") is not None:
                c[1] += 1
                failed.append(f"{part}: {name}")
            elif case.find("skipped") is not None:
                c[2] += 1
            else:
                c[0] += 1
    return counts, failed


def sanitizer(work: str) -> str:
    path = os.path.join(work, "sanitize.log")
    if not os.path.exists(path):
        return "did not run"
    text = open(path, errors="replace").read()
    if "Device not supported" in text or "device not supported" in text.lower():
        return "refused the device (recorded, not a failure)"
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return f"{m[-1]} errors" if m else "no ERROR SUMMARY (see sanitize.log)"


def goals(work: str) -> list[str]:
    path = os.path.join(work, "bench.json")
    if not os.path.exists(path):
        return ["benchmark: did not run"]
    data = json.load(open(path))
    s = data.get("summary") or {}
    lines = [f"default paths on this GPU: {data.get('meta', {}).get('auto_paths')}"]

    def fig(key, field, goal):
        v = (s.get(key) or {}).get(field)
        lines.append(f"{key}.{field}: {'n/a' if v is None else f'{v:.3g}'}  (goal {goal})")

    fig("rowwise_vs_scaled_mm", "geomean", ">= 1.10")
    fig("rowwise_vs_scaled_mm", "min", ">= 0.95 each shape")
    fig("decode_weight_bw_pct_of_hbm_read", "min", ">= 80 (% of measured HBM read bandwidth, M <= 16)")
    fig("block_vs_scaled_mm_blockwise", "geomean", ">= 1.2")
    fig("large_m_llama70b_tflops", "pct_of_spec_peak_min", ">= 70 (% of the FP8 dense peak, M >= 4096)")
    label = {r.get("backend") for r in data.get("rows", [])} & {"fp8kern", "fp8kern-sm89"}
    for r in data.get("rows", []):
        if r.get("suite") == "deepseek" and r.get("M") == 4096 and r.get("backend") in label and r.get("tflops"):
            lines.append(f"deepseek {r['N']}x{r['K']} M=4096 {r['layout']}: {r['tflops']:.0f} TFLOPS (goal >= 1000)")
    lines.append(f"wrong results in the benchmark: {s.get('wrong_results', 'n/a')}")
    return lines


def main(work: str) -> int:
    status = {}
    if os.path.exists(os.path.join(work, "status.txt")):
        for line in open(os.path.join(work, "status.txt")):
            step, _, rc = line.strip().partition(" ")
            status[step] = rc
    counts, failed = tests(work)
    print(open(os.path.join(work, "env.txt")).read().strip() if os.path.exists(os.path.join(work, "env.txt")) else "")
    print("\nGPU tests            passed  failed  skipped")
    for fam in sorted(counts):
        p, f, sk = counts[fam]
        print(f"  {fam:20s} {p:6d}  {f:6d}  {sk:7d}")
    for name in failed[:40]:
        print(f"  FAILED {name}")
    sweeps = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "sweep_*.json")))]
    print("\nsweep vs float64     cases  mismatches  worst error/bound")
    for sw in sweeps:
        print(f"  {sw['backend']:18s} {sw['cases']:6d}  {sw['mismatches']:10d}  {sw['worst_err_over_bound']:.3g}")
    print(f"\ncompute-sanitizer memcheck: {sanitizer(work)}")
    print("\nspeed goals (fp8kern-bench --quick)")
    for line in goals(work):
        print(f"  {line}")
    cut = [s for s, rc in status.items() if rc == "124"]
    errored = [s for s, rc in status.items() if rc not in ("0", "124", "skipped")]
    print(f"\nsteps cut at their budget: {', '.join(cut) or 'none'}; steps that exited non-zero: "
          f"{', '.join(errored) or 'none'}")
    bad = failed or any(sw["mismatches"] for sw in sweeps) or re.match(r"[1-9]", sanitizer(work)) or errored
    missing = [what for what, ran in (
        ("tests", any(c[0] for c in counts.values())), ("sweep", any(sw["cases"] for sw in sweeps)),
        ("sanitize", sanitizer(work) != "did not run"), ("bench", os.path.exists(os.path.join(work, "bench.json"))))
        if not ran]
    if missing:
        print(f"did not run: {', '.join(missing)}")
    result = "FAIL" if bad else ("INCOMPLETE" if cut or missing else "PASS")
    print(f"RESULT: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
