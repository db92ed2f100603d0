"""fp8kern-bench: scaled_mm and quantization on model shapes, against torch._scaled_mm and bf16 torch.matmul.

    fp8kern-bench --quick                 # about a minute on a GPU (a few minutes on a CPU)
    fp8kern-bench --suite llama8b --m 1,16,4096 --json out.json

On a machine without a CUDA GPU (or with --cpu) it times fp8kern's CPU kernel family against torch's bf16 F.linear,
torch's CPU _scaled_mm and the reference, with the DRAM read bandwidth measured in the same run (fp8kern/bench/cpu.py).
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
from fp8kern.bench import cpu as cpu_bench
from fp8kern.bench.shapes import M_VALUES, QUICK_M, SUITES

LAYOUTS = ("tensor", "token_channel", "block")
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity in float64, independent of magnitude (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def make_weights(N, K, layout, device, seed=0):
    """bf16 weights [N, K] and their e4m3 quantization with the layout's weight scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=device).to(torch.bfloat16)
    gran = {"tensor": "tensor", "token_channel": "channel", "block": "block"}[layout]
    b, sb = fp8kern.quantize_weight(w, gran)
    return w, b, sb


def make_acts(M, K, layout, device, seed=1):
    """bf16 activations [M, K] (unit-variance dot products) and their quantization for the layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(M, K, generator=g, device=device) / math.sqrt(K)).to(torch.bfloat16)
    a, sa = fp8kern.quantize(x, {"tensor": "tensor", "token_channel": "token", "block": "group"}[layout])
    return x, a, sa


def make_problem(M, N, K, layout, device, seed=0):
    """bf16 activations and weights quantized the way real checkpoints are, per layout."""
    w, b, sb = make_weights(N, K, layout, device, seed)
    x, a, sa = make_acts(M, K, layout, device, seed + 1)
    return x, w, a, b, sa, sb


# ---------------------------------------------------------------------------------------------------------------
# GPU timing


class Timer:
    """Median time of fn on the current stream with events. Before every repetition L2 is flushed by reading a
    buffer twice its size (a read leaves no dirty lines for the timed kernel to write back), then the GPU spins
    for a while so the host has queued fn, host overhead included, before the start event: the time is the GPU's."""

    SPIN_CYCLES = 400_000  # ~0.2 ms at H100 clocks, more than any eager call's host path

    def __init__(self, reps: int, warmup: int = 3):
        self.reps, self.warmup = reps, warmup
        props = torch.cuda.get_device_properties(0)
        nbytes = max(2 * getattr(props, "L2_cache_size", 50 << 20), 64 << 20)
        self.flush = torch.zeros(nbytes // 4, dtype=torch.float32, device="cuda")
        self.spin = getattr(torch.cuda, "_sleep", None)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.amax()
            if self.spin is not None:
                self.spin(self.SPIN_CYCLES)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # us


PEAK_SHAPES = [(8192, 8192, 8192), (16384, 8192, 16384)]  # (M, N, K) of the FP8 peak measurement
HBM_BYTES = 1 << 30  # read / copied for the bandwidth measurement


def measure_peaks(timer: Timer) -> dict:
    """Measured FP8 dense throughput (torch._scaled_mm: the best of fast and promoted accumulation on two large
    shapes) and HBM bandwidth: read (a reduction over 1 GiB, what GEMM weight streaming does) and copy."""
    best = 0.0
    for m, n, k in PEAK_SHAPES:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        for fast in (False, True):
            us = timer(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=fast))
            best = max(best, 2 * m * n * k / us / 1e6)
    src = torch.zeros(HBM_BYTES // 4, dtype=torch.float32, device="cuda")
    read_us = timer(lambda: src.sum())
    dst = torch.empty_like(src)
    copy_us = timer(lambda: dst.copy_(src))
    nbytes = src.numel() * 4
    return {"fp8_tflops": best, "hbm_read_gbps": nbytes / read_us / 1e3, "hbm_copy_gbps": 2 * nbytes / copy_us / 1e3}


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
        out["torch._scaled_mm"] = blockwise_peer(a, b, sa, sb, out_dtype)
    ok = {}
    for name, fn in out.items():
        try:
            fn()
            torch.cuda.synchronize()
            ok[name] = fn
        except Exception as e:  # a peer this torch / GPU cannot run for this shape: say so once per kind
            _note_once(f"{name} {layout}", f"peer {name} ({layout}) skipped for M={M} N={N}: "
                                           f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return ok


def blockwise_peer(a, b, sa, sb, out_dtype):
    """torch._scaled_mm with 1x128 x 128x128 block scales (cuBLASLt): mat2 is b.t() [K, N] column-major, so its
    scales are given for [K, N] too: sb.t(), [ceil(K/128), ceil(N/128)]; A's scales [M, ceil(K/128)] must be
    column-major (M contiguous)."""
    sa_cm = sa.t().contiguous().t()
    sb_t = sb.t()
    return lambda: torch._scaled_mm(a, b.t(), sa_cm, sb_t, out_dtype=out_dtype)


_noted: set = set()


def _note_once(key: str, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        print(f"\nfp8kern-bench: {message}", file=sys.stderr)


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


# fp8kern rows whose result differs from the reference by more than this (calc_diff: about half the squared RMS
# relative error, so 1e-4 is ~1.4% RMS, 100x what bf16 output rounding gives) are failures, not timings.
MAX_DIFF = 1e-4


def run_gpu(args, write) -> tuple[list[dict], dict]:
    """Time every problem; `write(rows)` is called after each, so a crash later keeps what was measured."""
    gpu = torch.cuda.get_device_name(0)
    timer = Timer(reps=args.reps)
    peaks = measure_peaks(timer)
    print(f"fp8kern-bench on {gpu}: measured FP8 {peaks['fp8_tflops']:.0f} TFLOPS (torch._scaled_mm, best of 2 "
          f"shapes x 2 accumulation modes), HBM read {peaks['hbm_read_gbps']:.0f} GB/s, copy "
          f"{peaks['hbm_copy_gbps']:.0f} GB/s", file=sys.stderr)
    out_dtype = OUT_DTYPES[args.out_dtype]
    weights = [(suite, N, K) for suite in args.suites for (N, K) in SUITES[suite]]
    rows, total, done = [], len(weights) * len(args.layouts) * len(args.m), 0
    for suite, N, K in weights:
        for layout in args.layouts:
            try:
                w, b, sb = make_weights(N, K, layout, "cuda")
            except Exception as e:  # e.g. out of memory for the largest suites: record it and go on
                rows.append(dict(gpu=gpu, suite=suite, layout=layout, backend=args.label, N=N, K=K, M=None,
                                 out_dtype=args.out_dtype, median_us=None, tflops=None, ok=False,
                                 error=f"weights: {type(e).__name__}: {e}"))
                done += len(args.m)
                continue
            for M in args.m:
                done += 1
                print(f"\r[{done}/{total}] {suite} M={M} N={N} K={K} {layout}          ", end="", file=sys.stderr)
                rows += time_problem(args, timer, peaks, gpu, suite, layout, M, N, K, w, b, sb, out_dtype)
                write(rows)
            del w, b, sb
    print(file=sys.stderr)
    rows += host_overhead_rows(args, gpu)
    for r in rows:
        r["peaks"] = peaks
    write(rows)
    print_gpu_table(rows, peaks)
    summary = summarize(rows, args.label, peaks)
    print_summary(summary)
    return rows, summary


def time_problem(args, timer, peaks, gpu, suite, layout, M, N, K, w, b, sb, out_dtype) -> list[dict]:
    """Rows for one problem: fp8kern (checked against the reference first), the peers, fp8kern.quantize."""
    base = dict(gpu=gpu, suite=suite, layout=layout, M=M, N=N, K=K, out_dtype=args.out_dtype,
                repro=f"fp8kern-bench --suite {suite} --m {M} --layouts {layout} --out-dtype {args.out_dtype}"
                      + (f" --backend {args.backend}" if args.backend else ""))
    ours = {}
    try:
        x, a, sa = make_acts(M, K, layout, "cuda")
        quant_diff = _quantize_diff(x, a, sa, layout)
        if quant_diff >= MAX_DIFF:
            raise RuntimeError(f"fp8kern.quantize differs from the reference: diff {quant_diff:.3g}")
    except Exception as e:  # the activations could not be made: nothing of this problem can be timed
        _note_once(f"quant {layout} {M} {K}", f"fp8kern.quantize FAILED at M={M} K={K} {layout}: {e}")
        return [dict(base, backend="fp8kern.quantize", median_us=None, tflops=None, ok=False,
                     error=f"{type(e).__name__}: {str(e)[:300]}")]
    fns = {} if args.no_peers else peers(layout, x, w, a, b, sa, sb, out_dtype)
    try:
        y = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype)
        diff = calc_diff(y, fp8kern.reference.scaled_mm(a, b, sa, sb, out_dtype))
        del y
        family = _backend.compiled_family(a.device)
        ours = dict(diff_vs_reference=diff, ok=diff < MAX_DIFF,
                    config=family and fp8kern.ops.gemm_launch.config_label(family, layout == "block", M, N, K, a.device))
        if ours["ok"]:
            fns[args.label] = lambda: fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype)
        else:
            _note_once(f"diff {layout} {M} {N} {K}", f"{args.label} WRONG RESULT at M={M} N={N} K={K} {layout}: "
                                                     f"diff {diff:.3g} > {MAX_DIFF} (not timed)")
    except NotImplementedError as e:
        _note_once(f"nokernel {layout}", f"{args.label} has no kernel here ({layout}): {str(e)[:160]}")
    except Exception as e:  # an error in an unverified kernel must not end the run
        ours = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        _note_once(f"err {layout} {M} {N} {K}", f"{args.label} FAILED at M={M} N={N} K={K} {layout}: {ours['error']}")
    rows = []
    if ours and not ours.get("ok", True):
        rows.append(dict(base, backend=args.label, median_us=None, tflops=None, **ours))
    gran = {"tensor": "tensor", "token_channel": "token", "block": "group"}[layout]
    fns["fp8kern.quantize"] = lambda: fp8kern.quantize(x, gran)
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = timer(fn)
        except Exception as e:
            rows.append(dict(base, backend=name, median_us=None, tflops=None, ok=name != args.label,
                             error=f"timing: {type(e).__name__}: {str(e)[:300]}"))
    ref_us = times.get("torch._scaled_mm")
    for name, us in times.items():
        is_q = name == "fp8kern.quantize"
        flops = 0 if is_q else 2 * M * N * K
        if is_q:
            nbytes = M * K * 2 + M * K + M * 4
        elif name == "torch.matmul-bf16":
            nbytes = 2 * (M * K + N * K) + M * N * 2
        else:
            nbytes = M * K + N * K + M * N * out_dtype.itemsize
        row = dict(base, backend=name, median_us=us, tflops=flops / us / 1e6, gbps=nbytes / us / 1e3,
                   weight_gbps=(N * K * (2 if name == "torch.matmul-bf16" else 1)) / us / 1e3 if not is_q else None,
                   pct_fp8_peak=100 * flops / us / 1e6 / peaks["fp8_tflops"],
                   pct_hbm=100 * nbytes / us / 1e3 / peaks["hbm_read_gbps"],
                   x_scaled_mm=(ref_us / us) if ref_us and not is_q else None)
        if name == args.label:
            row.update(ours)
        rows.append(row)
    return rows


def _quantize_diff(x, a, sa, layout) -> float:
    """calc_diff between the activations as fp8kern.quantize made them (kernels, when the backend runs them) and as
    the reference makes them, both dequantized: the GEMM check uses those operands, so it cannot see a quantization
    error itself."""
    gran = {"tensor": "tensor", "token_channel": "token", "block": "group"}[layout]
    ra, rsa = fp8kern.reference.quantize(x, gran)
    M = x.shape[0]
    block = (1, 128) if layout == "block" else None

    def deq(q, s):
        return fp8kern.reference.dequantize(q, s.reshape(M, -1) if layout != "tensor" else s, block)

    return calc_diff(deq(a, sa.float()), deq(ra, rsa.float()))


def host_overhead_rows(args, gpu) -> list[dict]:
    """Host time per eager call on a tiny problem (launch path only), fp8kern against torch._scaled_mm."""
    a = torch.ones(16, 128, device="cuda").to(torch.float8_e4m3fn)
    b = torch.ones(128, 128, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(16, 1, device="cuda"), torch.ones(1, 128, device="cuda")
    sa1, sb1, bt = sa.reshape(16), sb.reshape(128), b.t()  # views made once: each call times only the op
    calls = {"torch._scaled_mm": lambda: torch._scaled_mm(a, bt, sa, sb, out_dtype=torch.bfloat16),
             args.label: lambda: fp8kern.scaled_mm(a, b, sa1, sb1)}
    xq = torch.ones(16, 4096, dtype=torch.bfloat16, device="cuda")
    calls["fp8kern.quantize"] = lambda: fp8kern.quantize(xq)
    # A layer's forward (quantize + GEMM, planned once per set of weights) against nn.Linear's, at M = 1.
    lin = torch.nn.Linear(128, 128, dtype=torch.bfloat16, device="cuda")
    x1 = torch.ones(1, 128, dtype=torch.bfloat16, device="cuda")
    calls["nn.Linear forward"] = lambda: lin(x1)
    for scheme in ("dynamic_per_token", "block128"):
        layer = fp8kern.Fp8Linear.from_linear(lin, scheme)
        calls[f"Fp8Linear forward ({scheme})"] = lambda layer=layer: layer(x1)
    rows = []
    for name, fn in calls.items():
        try:
            us = host_overhead_us(fn)
        except Exception as e:
            _note_once(f"overhead {name}", f"host overhead of {name} not measured: {type(e).__name__}: {e}")
            continue
        rows.append(dict(gpu=gpu, layout="token_channel", backend=name, M=1 if "Linear" in name else 16, N=128,
                         K=4096 if name == "fp8kern.quantize" else 128, out_dtype="bf16",
                         median_us=None, tflops=None, host_overhead_us=us))
    return rows


def _geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


# H100 SXM FP8 dense peak (NVIDIA's datasheet), the reference of the M >= 4096 goal.
H100_FP8_DENSE_TFLOPS = 1979.0


def summarize(rows, label, peaks) -> dict:
    """The figures the project's speed goals are stated in, from one run's rows (missing pairs are counted, not
    guessed): rowwise speedup over torch._scaled_mm on the Llama suites, decode weight bandwidth against the
    measured HBM read bandwidth, large-M share of the FP8 peak, block-scaled against torch's blockwise and bf16."""
    by = {}
    for r in rows:
        if r.get("median_us"):
            by[(r.get("suite"), r["layout"], r["M"], r["N"], r["K"], r["backend"])] = r
    mine = [r for r in by.values() if r["backend"] == label]

    def ratios(pred, peer):
        got, missing = [], 0
        for r in mine:
            if pred(r):
                p = by.get((r["suite"], r["layout"], r["M"], r["N"], r["K"], peer))
                if p is None:
                    missing += 1
                else:
                    got.append(p["median_us"] / r["median_us"])
        return got, missing

    out = {}
    llama = ("llama8b", "llama70b")
    v, miss = ratios(lambda r: r["layout"] == "token_channel" and r["suite"] in llama, "torch._scaled_mm")
    out["rowwise_vs_scaled_mm"] = dict(geomean=_geomean(v), min=min(v) if v else None, n=len(v), missing=miss,
                                       goal="geomean >= 1.10, none below 0.95")
    dec = [100 * r["weight_gbps"] / peaks["hbm_read_gbps"] for r in mine
           if r["M"] <= 16 and r["layout"] in ("token_channel", "tensor")]
    out["decode_weight_bw_pct_of_hbm_read"] = dict(min=min(dec) if dec else None,
                                                   median=statistics.median(dec) if dec else None, n=len(dec),
                                                   goal=">= 80% for M <= 16")
    big = [r for r in mine if r["M"] >= 4096 and r["suite"] == "llama70b" and r["layout"] == "token_channel"]
    out["large_m_llama70b_tflops"] = dict(
        min=min((r["tflops"] for r in big), default=None), n=len(big),
        pct_of_spec_peak_min=min((100 * r["tflops"] / H100_FP8_DENSE_TFLOPS for r in big), default=None),
        pct_of_measured_peak_min=min((r["pct_fp8_peak"] for r in big), default=None),
        goal=f">= 70% of {H100_FP8_DENSE_TFLOPS:.0f} TFLOPS (H100 SXM)")
    v, miss = ratios(lambda r: r["layout"] == "block", "torch._scaled_mm")
    out["block_vs_scaled_mm_blockwise"] = dict(geomean=_geomean(v), n=len(v), missing=miss, goal="geomean >= 1.2")
    v, miss = ratios(lambda r: r["layout"] == "block" and r["M"] >= 128, "torch.matmul-bf16")
    out["block_vs_bf16_m128plus"] = dict(min=min(v) if v else None, n=len(v), missing=miss, goal="min >= 1.0")
    out["wrong_results"] = sum(1 for r in rows if r["backend"] == label and r.get("ok") is False)
    return out


def print_summary(summary) -> None:
    print("\ngoals (this run):")
    for name, d in summary.items():
        if isinstance(d, dict):
            figures = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
                                if k != "goal")
            print(f"  {name}: {figures}   [goal: {d['goal']}]")
        else:
            print(f"  {name}: {d}")


def print_gpu_table(rows, peaks):
    print(f"{'suite':<9} {'M':>6} {'N':>6} {'K':>6} {'layout':<13} {'backend':<18} {'us':>9} {'TFLOPS':>7} "
          f"{'GB/s':>6} {'x _scaled_mm':>12} {'%FP8':>5} {'%HBM':>5} {'diff':>8}")
    for r in rows:
        if r.get("error"):
            print(f"{r.get('suite', ''):<9} {r['M'] or '-':>6} {r['N']:>6} {r['K']:>6} {r['layout']:<13} "
                  f"{r['backend']:<18} ERROR {r['error'][:100]}")
        if r.get("median_us") is None:
            continue
        xs = f"{r['x_scaled_mm']:.2f}" if r.get("x_scaled_mm") else "-"
        diff = f"{r['diff_vs_reference']:.1e}" if r.get("diff_vs_reference") is not None else ""
        print(f"{r['suite']:<9} {r['M']:>6} {r['N']:>6} {r['K']:>6} {r['layout']:<13} {r['backend']:<18} "
              f"{r['median_us']:>9.1f} {r['tflops']:>7.1f} {r['gbps']:>6.0f} {xs:>12} {r['pct_fp8_peak']:>5.1f} "
              f"{r['pct_hbm']:>5.1f} {diff:>8}")
    for r in rows:
        if r.get("host_overhead_us") is not None:
            print(f"host overhead per eager call, {r['backend']}: {r['host_overhead_us']:.1f} us")
    if not any(r["backend"].startswith("fp8kern") and r["backend"] != "fp8kern.quantize" and r.get("median_us")
               for r in rows):
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
    ax.set_title(f"fp8kern-bench on {timed[0].get('cpu', timed[0]['gpu'])}")
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
    p.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when a GPU is present")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes and buffers, seconds (for tests); no goals")
    p.add_argument("--no-peers", action="store_true", help="time fp8kern only (e.g. a second backend's run)")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "sm89", "sm90", "torch", "dequant", "cpu"],
                   help="fp8kern path to time (default: FP8KERN_BACKEND or auto, which times the GPU's compiled "
                        "family even unverified); rows of sm89, torch and dequant are labelled fp8kern-<name>")
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


def _unverified_family() -> str | None:
    """The compiled family backend 'auto' would run on this GPU if it were verified (None if 'auto' runs one)."""
    device = torch.device("cuda", torch.cuda.current_device())
    if _backend.compiled_family(device) is not None:
        return None
    want = {90: "sm90", 89: "sm89"}.get(_backend.device_arch(device))  # the arches 'auto' serves
    return want if want in _backend.compiled_families() else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend:
        fp8kern.set_backend(args.backend)
    on_gpu = torch.cuda.is_available() and not args.cpu
    auto_paths = None
    if on_gpu:  # what a user's call takes on this GPU by default, whatever this run times
        backend, device = fp8kern.get_backend(), torch.device("cuda", torch.cuda.current_device())
        fp8kern.set_backend("auto")
        auto_paths = fp8kern.ops.gemm.describe_paths(device)
        fp8kern.set_backend(backend)
        print("fp8kern-bench: by default scaled_mm on this GPU takes "
              + "; ".join(f"{layout}: {path}" for layout, path in auto_paths.items()), file=sys.stderr)
    if on_gpu and fp8kern.get_backend() == "auto":
        unverified = _unverified_family()
        if unverified:
            # Safe for a benchmark: every result is checked against the reference before it is timed.
            print(f"fp8kern-bench: the {unverified} kernels are not yet verified on a GPU; timing them anyway "
                  "(each result is checked against the reference first)", file=sys.stderr)
            fp8kern.set_backend(unverified)
            args.backend = unverified
    backend = fp8kern.get_backend()
    args.label = {"sm89": "fp8kern-sm89", "reference": "fp8kern-reference", "torch": "fp8kern-torch",
                  "dequant": "fp8kern-dequant"}.get(backend, "fp8kern")
    meta = {"fp8kern": fp8kern.info(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "auto_paths": auto_paths,
            "command": "fp8kern-bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def write(rows, summary=None):
        with open(args.json + ".tmp", "w") as f:
            json.dump({"meta": meta, "rows": rows, **({"summary": summary} if summary else {})}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)

    if on_gpu:
        rows, summary = run_gpu(args, write)
        write(rows, summary)
    else:
        rows, env = cpu_bench.run(args)
        meta["cpu"] = env
        cpu_bench.print_table(rows)
        summary = None if args.smoke else cpu_bench.summarize(rows, env)
        if summary:
            print_summary(summary)
        write(rows, summary)
    print(f"fp8kern-bench: {len(rows)} rows written to {args.json}", file=sys.stderr)
    if not args.smoke:
        plot(rows, args.plot or os.path.splitext(args.json)[0] + ".png")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
