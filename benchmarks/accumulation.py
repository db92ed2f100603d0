"""Error and speed of the two accumulation modes (promoted, the default, and fast_accum=True) at K = 4096 and 16384.

    python benchmarks/accumulation.py --json out.json       # GPU: every compiled family, per-token x per-channel
    python benchmarks/accumulation.py --backend sm90        # one family (unverified families need naming)

Operands are real-looking activations and weights (bf16 randn, x / sqrt(K)) quantized per token and per channel, so
the dot products cancel the way a model's do. The error is measured against a float64 product of the same e4m3
operands and scales (exact up to float64 rounding), two ways per output element:
  rel_to_abs = |y - D| / (|scale_a| |scale_b| sum_k |a_k b_k|): the error in units of the magnitudes summed, the
               quantity accumulation bounds are stated in (insensitive to cancellation);
  rel        = |y - D| / |D| over elements with |D| above the median (cancelled sums excluded).
Both are reported as median and max over the output, with the output rounded to float32 so that the bf16 output
rounding does not hide the accumulation error. Time is the median of CUDA-event timings after an L2 flush.
"""

import argparse
import json
import math
import statistics
import sys

import torch

import fp8kern
from fp8kern import _backend

SHAPES = [(128, 4096, 4096), (4096, 4096, 4096), (128, 4096, 16384), (4096, 4096, 16384)]


def problem(M, N, K, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(M, K, generator=g) / math.sqrt(K)).to(torch.bfloat16).cuda()
    w = torch.randn(N, K, generator=g).to(torch.bfloat16).cuda()
    a, sa = fp8kern.quantize(x, "token")
    b, sb = fp8kern.quantize_weight(w, "channel")
    return a, b, sa, sb


def exact(a, b, sa, sb):
    """(D, S): the float64 product and the scaled sum of absolute products, per output element."""
    a64, b64 = a.double(), b.double()
    scale = sa.double().reshape(-1, 1) * sb.double().reshape(1, -1)
    return (a64 @ b64.t()) * scale, (a64.abs() @ b64.abs().t()) * scale


def errors(y, D, S) -> dict:
    err = (y.double() - D).abs()
    rel_abs = (err / S.clamp_min(1e-300)).flatten()
    big = D.abs() > D.abs().median()
    rel = (err[big] / D.abs()[big]).flatten()
    return {"rel_to_abs_median": rel_abs.median().item(), "rel_to_abs_max": rel_abs.max().item(),
            "rel_median": rel.median().item(), "rel_max": rel.max().item()}


def time_us(fn, reps=50) -> float:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.max()  # a read: leaves no dirty lines for the timed kernel to write back
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["sm90", "sm89"], action="append",
                   help="family to measure (repeatable; default: every compiled family this GPU runs)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or _backend._C is None:
        print("accumulation.py: needs a CUDA GPU and the compiled fp8kern._C; nothing measured", file=sys.stderr)
        return 0
    cap = torch.cuda.get_device_capability()
    families = args.backend or [f for f in _backend.compiled_families()
                                if (f == "sm90" and cap == (9, 0)) or (f == "sm89" and cap >= (8, 9))]
    gpu = torch.cuda.get_device_name()
    rows, failed = [], 0
    prev = fp8kern.get_backend()
    try:
        for M, N, K in SHAPES:
            a, b, sa, sb = problem(M, N, K, seed=M + K)
            D, S = exact(a, b, sa, sb)
            for family, fast in ((f, fast) for f in families for fast in (False, True)):
                fp8kern.set_backend(family)
                mode = "fast" if fast else "promoted"
                try:
                    y = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, fast_accum=fast)
                    us = time_us(lambda: fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, fast_accum=fast))
                except Exception as e:  # one failing kernel must not lose the other rows
                    failed += 1
                    rows.append({"gpu": gpu, "family": family, "M": M, "N": N, "K": K, "mode": mode,
                                 "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"{family:5} M={M:5} N={N} K={K:5} {mode:8} FAILED: {rows[-1]['error']}", flush=True)
                    continue
                row = {"gpu": gpu, "family": family, "M": M, "N": N, "K": K,
                       "mode": mode, "median_us": us,
                       "tflops": 2 * M * N * K / us / 1e6, **errors(y, D, S)}
                rows.append(row)
                print(f"{family:5} M={M:5} N={N} K={K:5} {row['mode']:8} {us:9.1f} us {row['tflops']:7.1f} TFLOPS"
                      f"  err/sum|ab| median {row['rel_to_abs_median']:.2e} max {row['rel_to_abs_max']:.2e}"
                      f"  rel median {row['rel_median']:.2e} max {row['rel_max']:.2e}", flush=True)
    finally:
        fp8kern.set_backend(prev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
