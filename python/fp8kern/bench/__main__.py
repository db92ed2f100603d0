"""fp8kern-bench: scaled_mm and quantization on model shapes, against torch._scaled_mm and bf16 torch.matmul.

    fp8kern-bench --quick                 # about a minute on a GPU
    fp8kern-bench --suite llama8b --m 1,16,4096 --json out.json

On a machine without a CUDA GPU it runs fp8kern's reference path on small shapes, checks every layout against a
float64 computation and says that timings need a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import fp8kern
from fp8kern import _backend
from fp8kern.bench.shapes import CPU_SHAPES, M_VALUES, QUICK_M, SUITES

LAYOUTS = ("tensor", "token_channel", "block")
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity in float64, independent of magnitude (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def make_problem(M, N, K, layout, device, seed=0):
    """bf16 activations and weights quantized the way real checkpoints are, per layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(M, K, generator=g) / math.sqrt(K)).to(torch.bfloat16).to(device)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16).to(device)
    if layout == "tensor":
        (a, sa), (b, sb) = fp8kern.quantize(x, "tensor"), fp8kern.quantize_weight(w, "tensor")
    elif layout == "token_channel":
        (a, sa), (b, sb) = fp8kern.quantize(x, "token"), fp8kern.quantize_weight(w, "channel")
    else:
        (a, sa), (b, sb) = fp8kern.quantize(x, "group"), fp8kern.quantize_weight(w, "block")
    return x, w, a, b, sa, sb


# ---------------------------------------------------------------------------------------------------------------
# CPU: reference path and a correctness check


def run_cpu(args) -> list[dict]:
    print("fp8kern-bench: no CUDA GPU found; running the reference path (pure PyTorch, CPU) on small shapes.\n"
          "Timings need a GPU; these rows check every layout against a float64 computation.", file=sys.stderr)
    rows = []
    for M, N, K in CPU_SHAPES:
        for layout in args.layouts:
            x, w, a, b, sa, sb = make_problem(M, N, K, layout, "cpu")
            t0 = time.perf_counter()
            d = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
            ms = (time.perf_counter() - t0) * 1e3
            exact = fp8kern.reference.dequantize(a, sa.reshape(M, -1) if layout != "tensor" else sa,
                                                 (1, 128) if layout == "block" else None).double() @ \
                fp8kern.reference.dequantize(b, sb, (128, 128) if layout == "block" else None).double().t()
            diff_exact = calc_diff(d, exact)
            diff_bf16 = calc_diff(d, x.double() @ w.double().t())
            ok = diff_exact < 1e-9 and diff_bf16 < 1e-2
            rows.append(dict(gpu="cpu", layout=layout, backend="fp8kern-reference", M=M, N=N, K=K, out_dtype="fp32",
                             median_us=ms * 1e3, tflops=2 * M * N * K / (ms * 1e-3) / 1e12,
                             diff_vs_fp64=diff_exact, diff_vs_bf16=diff_bf16, ok=ok))
    print(f"{'M':>5} {'N':>6} {'K':>6}  {'layout':<14} {'ref ms':>8}  {'diff vs fp64':>12}  {'diff vs bf16':>12}  check")
    for r in rows:
        print(f"{r['M']:>5} {r['N']:>6} {r['K']:>6}  {r['layout']:<14} {r['median_us'] / 1e3:>8.2f}  "
              f"{r['diff_vs_fp64']:>12.2e}  {r['diff_vs_bf16']:>12.2e}  {'ok' if r['ok'] else 'FAILED'}")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# GPU timing


class Timer:
    """Median time of fn on the current stream with events, flushing L2 before every repetition."""

    def __init__(self, reps: int, warmup: int = 3):
        self.reps, self.warmup = reps, warmup
        props = torch.cuda.get_device_properties(0)
        self.flush = torch.empty(max(2 * getattr(props, "L2_cache_size", 50 << 20), 64 << 20), dtype=torch.uint8,
                                 device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # us


def measure_peaks(timer: Timer) -> dict:
    """Measured FP8 dense throughput (torch._scaled_mm, 8192^3) and HBM bandwidth (device copy, read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    us = timer(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16))
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cus = timer(lambda: dst.copy_(src))
    return {"fp8_tflops": 2 * n**3 / us / 1e6, "hbm_gbps": 2 * src.numel() / cus / 1e3}


def peers(layout, x, w, a, b, sa, sb, out_dtype):
    """Callables of the peers for this layout; absent when this torch/GPU cannot run them."""
    out = {"torch.matmul-bf16": lambda: torch.matmul(x, w.t())}
    M, N = a.shape[0], b.shape[0]
    if layout == "tensor":
        sa0, sb0 = sa.reshape(()), sb.reshape(())
        out["torch._scaled_mm"] = lambda: torch._scaled_mm(a, b.t(), sa0, sb0, out_dtype=out_dtype)
    elif layout == "token_channel":
        sa1, sb1 = sa.reshape(M, 1).contiguous(), sb.reshape(1, N).contiguous()
        out["torch._scaled_mm"] = lambda: torch._scaled_mm(a, b.t(), sa1, sb1, out_dtype=out_dtype)
    else:
        # cuBLASLt blockwise: A scales (M, K/128) with stride (1, M), B scales (N/128, K/128) row-major.
        sa_cm = sa.t().contiguous().t()
        out["torch._scaled_mm"] = lambda: torch._scaled_mm(a, b.t(), sa_cm, sb, out_dtype=out_dtype)
    ok = {}
    for name, fn in out.items():
        try:
            fn()
            torch.cuda.synchronize()
            ok[name] = fn
        except (RuntimeError, NotImplementedError, ValueError):
            pass
    return ok


def host_overhead_us(fn, n=2000) -> float:
    """Wall time per eager call on a tiny problem, without synchronizing: the launch path's host cost."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / n * 1e6


def run_gpu(args) -> list[dict]:
    gpu = torch.cuda.get_device_name(0)
    timer = Timer(reps=args.reps)
    peaks = measure_peaks(timer)
    print(f"fp8kern-bench on {gpu}: measured FP8 {peaks['fp8_tflops']:.0f} TFLOPS (torch._scaled_mm 8192^3), "
          f"HBM {peaks['hbm_gbps']:.0f} GB/s (copy)", file=sys.stderr)
    out_dtype = OUT_DTYPES[args.out_dtype]
    problems = [(suite, M, N, K) for suite in args.suites for (N, K) in SUITES[suite] for M in args.m]
    rows, total = [], len(problems) * len(args.layouts)
    done = 0
    for suite, M, N, K in problems:
        for layout in args.layouts:
            done += 1
            print(f"\r[{done}/{total}] {suite} M={M} N={N} K={K} {layout}          ", end="", file=sys.stderr)
            x, w, a, b, sa, sb = make_problem(M, N, K, layout, "cuda")
            fns = peers(layout, x, w, a, b, sa, sb, out_dtype)
            try:
                ours = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype)
                fns[args.label] = lambda: fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype)
                diff = calc_diff(ours, fp8kern.reference.scaled_mm(a, b, sa, sb, out_dtype))
                family = _backend.gemm_family(a.device)
                config = family and fp8kern.ops._config_label(family, layout == "block", M, N, K, a.device)
            except NotImplementedError:
                diff = config = None
            gran = {"tensor": "tensor", "token_channel": "token", "block": "group"}[layout]
            fns["fp8kern.quantize"] = lambda: fp8kern.quantize(x, gran)
            times = {name: timer(fn) for name, fn in fns.items()}
            base = times.get("torch._scaled_mm")
            for name, us in times.items():
                is_q = name == "fp8kern.quantize"
                flops = 0 if is_q else 2 * M * N * K
                nbytes = M * K * 2 + M * K + (M * 4) if is_q else M * K + N * K + M * N * out_dtype.itemsize
                rows.append(dict(
                    gpu=gpu, suite=suite, layout=layout, backend=name, M=M, N=N, K=K, out_dtype=args.out_dtype,
                    median_us=us, tflops=flops / us / 1e6, gbps=nbytes / us / 1e3,
                    pct_fp8_peak=100 * flops / us / 1e6 / peaks["fp8_tflops"],
                    pct_hbm=100 * nbytes / us / 1e3 / peaks["hbm_gbps"],
                    x_scaled_mm=(base / us) if base and not is_q else None,
                    diff_vs_reference=diff if name == args.label else None,
                    config=config if name == args.label else None,
                    repro=f"fp8kern-bench --suite {suite} --m {M} --layouts {layout} --out-dtype {args.out_dtype}"))
    print(file=sys.stderr)
    # Host overhead per eager call (tiny problem: launch cost only).
    a, b = torch.ones(16, 128, device="cuda").to(torch.float8_e4m3fn), torch.ones(128, 128, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(16, 1, device="cuda"), torch.ones(1, 128, device="cuda")
    overhead = {"torch._scaled_mm": host_overhead_us(lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16))}
    try:
        fp8kern.scaled_mm(a, b, sa.reshape(16), sb.reshape(128))
        overhead[args.label] = host_overhead_us(lambda: fp8kern.scaled_mm(a, b, sa.reshape(16), sb.reshape(128)))
    except NotImplementedError:
        pass
    xq = torch.ones(16, 4096, dtype=torch.bfloat16, device="cuda")
    overhead["fp8kern.quantize"] = host_overhead_us(lambda: fp8kern.quantize(xq))
    for name, us in overhead.items():
        rows.append(dict(gpu=gpu, layout="token_channel", backend=name, M=16, N=128, K=128, out_dtype="bf16",
                         median_us=None, tflops=None, host_overhead_us=us))
    print_gpu_table(rows, peaks)
    for r in rows:
        r["peaks"] = peaks
    return rows


def print_gpu_table(rows, peaks):
    print(f"{'suite':<9} {'M':>6} {'N':>6} {'K':>6} {'layout':<13} {'backend':<18} {'us':>9} {'TFLOPS':>7} "
          f"{'GB/s':>6} {'x _scaled_mm':>12} {'%FP8':>5} {'%HBM':>5}")
    for r in rows:
        if r.get("median_us") is None:
            continue
        xs = f"{r['x_scaled_mm']:.2f}" if r.get("x_scaled_mm") else "-"
        print(f"{r['suite']:<9} {r['M']:>6} {r['N']:>6} {r['K']:>6} {r['layout']:<13} {r['backend']:<18} "
              f"{r['median_us']:>9.1f} {r['tflops']:>7.1f} {r['gbps']:>6.0f} {xs:>12} {r['pct_fp8_peak']:>5.1f} "
              f"{r['pct_hbm']:>5.1f}")
    for r in rows:
        if r.get("host_overhead_us") is not None:
            print(f"host overhead per eager call, {r['backend']}: {r['host_overhead_us']:.1f} us")
    if not any(r["backend"].startswith("fp8kern") and r["backend"] != "fp8kern.quantize" for r in rows):
        print("fp8kern.scaled_mm has no compiled GEMM kernel for this GPU yet: rows show the peers and fp8kern.quantize.")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fp8kern-bench: matplotlib not installed; skipping the plot", file=sys.stderr)
        return
    timed = [r for r in rows if r.get("tflops") and r["backend"] != "fp8kern.quantize"]
    if not timed:
        return
    fig, ax = plt.subplots(figsize=(12, 5))
    backends = sorted({r["backend"] for r in timed})
    keys = sorted({(r["layout"], r["N"], r["K"], r["M"]) for r in timed})
    for i, be in enumerate(backends):
        vals = {(r["layout"], r["N"], r["K"], r["M"]): r["tflops"] for r in timed if r["backend"] == be}
        ax.bar([k + i / (len(backends) + 1) for k in range(len(keys))], [vals.get(k, 0) for k in keys],
               width=1 / (len(backends) + 1), label=be)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{l[:5]} {n}x{k} M{m}" for l, n, k, m in keys], rotation=90, fontsize=5)
    ax.set_ylabel("TFLOPS")
    ax.set_title(f"fp8kern-bench on {timed[0]['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"fp8kern-bench: plot written to {path}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fp8kern-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama-8B shapes, M in {1, 16, 128, 4096}, fewer repetitions")
    p.add_argument("--suite", default="all", help=f"comma list of {','.join(SUITES)} or 'all'")
    p.add_argument("--m", default=None, help="comma list of M values (default: " + ",".join(map(str, M_VALUES)) + ")")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of " + ",".join(LAYOUTS))
    p.add_argument("--out-dtype", default="bf16", choices=sorted(OUT_DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (median)")
    p.add_argument("--json", default="bench_out/results.json", help="where to write the JSON rows")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--cpu", action="store_true", help="run the CPU reference check even when a GPU is present")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "sm89", "sm90"],
                   help="fp8kern kernel family to time (default: FP8KERN_BACKEND or auto); sm89 rows are labelled "
                        "fp8kern-sm89")
    args = p.parse_args(argv)
    suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
    bad = [s for s in suites if s not in SUITES]
    if bad:
        p.error(f"--suite: unknown {bad}, expected some of {list(SUITES)}")
    args.suites = ["llama8b"] if args.quick and args.suite == "all" else suites
    args.m = [int(v) for v in args.m.split(",")] if args.m else (QUICK_M if args.quick else M_VALUES)
    args.layouts = args.layouts.split(",")
    if any(l not in LAYOUTS for l in args.layouts):
        p.error(f"--layouts: expected some of {LAYOUTS}")
    args.reps = args.reps or (10 if args.quick else 50)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend:
        fp8kern.set_backend(args.backend)
    args.label = "fp8kern-sm89" if fp8kern.get_backend() == "sm89" else "fp8kern"
    on_gpu = torch.cuda.is_available() and not args.cpu
    rows = run_gpu(args) if on_gpu else run_cpu(args)
    meta = {"fp8kern": fp8kern.info(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "fp8kern-bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"fp8kern-bench: {len(rows)} rows written to {args.json}", file=sys.stderr)
    if on_gpu:
        plot(rows, args.plot or os.path.splitext(args.json)[0] + ".png")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
