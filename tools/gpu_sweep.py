"""Randomized shape sweep of fp8kern.scaled_mm on one path against the float64 oracle, for the GPU check.

Each case draws M (1..300, or large: 512..2048), N and K that are multiples of 128, multiples of 16 but not 128, or
neither, a layout (per-tensor, per-token x per-channel and their mixes, block-scaled with fp32 / bf16 / UE8M0 scales),
an output dtype, a bias or none, and writes into an `out=` view of a NaN-poisoned buffer; the result must meet the
path's error bound (the tests' own: tests/test_gpu_scaled_mm.py's bound for fp8kern's kernels, its fast-accumulation
bound for torch's FP8 GEMM, tests/test_gemm_paths.py's dequant_bound for the dequantizing GEMM), be finite, and leave
the poison outside the view. Runs until --seconds or --cases; writes JSON (cases run, mismatches with their shapes)
and exits 1 on any mismatch or error.

    python tools/gpu_sweep.py --backend sm90 --seconds 60 --json sweep_sm90.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fp8kern  # noqa: E402
from conftest import LAYOUTS, exact_scaled_mm, make_operands  # noqa: E402
from test_gemm_paths import dequant_bound  # noqa: E402
from test_gpu_scaled_mm import bound as tensor_core_bound  # noqa: E402

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def draw_dim(rng: random.Random, top: int) -> int:
    kind = rng.choice(("128", "16", "odd"))
    if kind == "128":
        return 128 * rng.randint(1, max(1, top // 128))
    if kind == "16":
        return 16 * rng.choice([v for v in range(1, top // 16 + 1) if v % 8] or [1])
    return rng.randint(1, top)


def draw_case(rng: random.Random) -> dict:
    M = rng.randint(1, 300) if rng.random() < 0.85 else rng.choice((512, 1000, 2048))
    big = M > 300  # keeps the float64 oracle's time per case to about a second
    layout = rng.choice(LAYOUTS)
    scale_dtype = rng.choice(("fp32", "bf16", "ue8m0")) if layout == "block" else "fp32"
    return dict(M=M, N=draw_dim(rng, 1024 if big else 2048), K=draw_dim(rng, 1024 if big else 3000), layout=layout,
                out_dtype=rng.choice(list(OUT_DTYPES)), bias=rng.random() < 0.5, scale_dtype=scale_dtype,
                pad=rng.choice((0, 3, 8)), seed=rng.randrange(1 << 30))


def run_case(case: dict, path: str) -> dict:
    M, N, K = case["M"], case["N"], case["K"]
    out_dtype = OUT_DTYPES[case["out_dtype"]]
    scale_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "ue8m0": torch.float8_e8m0fnu}[case["scale_dtype"]]
    gen = torch.Generator().manual_seed(case["seed"])
    a, b, sa, sb = make_operands(M, N, K, case["layout"], gen, scale_dtype)
    if out_dtype == torch.float16:  # keep |D| inside fp16's range; a power of two, exact in every scale dtype
        sa = (sa.float() / 1024).to(sa.dtype)
    bias = (torch.randn(N, generator=gen) * 10).to(out_dtype) if case["bias"] else None
    pad = case["pad"]
    buf = torch.full((M, N + 2 * pad), float("nan"), dtype=out_dtype, device="cuda")
    view = buf[:, pad:pad + N]
    fp8kern.scaled_mm(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(), out_dtype=out_dtype,
                      bias=bias.cuda() if bias is not None else None, out=view)
    got = buf.double().cpu().numpy()
    D, S = exact_scaled_mm(a, b, sa, sb, bias)
    if path == "dequant":
        lim = dequant_bound(D, S, K, out_dtype, bias)
    else:  # torch's FP8 GEMM: cuBLASLt states no promotion interval, so the bound of one that never promotes
        lim = tensor_core_bound(D, S, K, out_dtype, fast=path == "torch")
    y = got[:, pad:pad + N]
    err = np.abs(y - D)
    ratio = float(np.max(err / lim)) if err.size else 0.0
    poison_kept = bool(np.isnan(got[:, :pad]).all() and np.isnan(got[:, pad + N:]).all())
    ok = bool(np.isfinite(y).all() and (err <= lim).all() and poison_kept)
    return dict(case, ok=ok, max_err_over_bound=ratio, poison_kept=poison_kept)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", required=True, choices=["sm90", "sm89", "torch", "dequant"])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cases", type=int, default=100000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="sweep.json")
    args = p.parse_args(argv)
    fp8kern.set_backend(args.backend)
    if args.backend == "dequant":  # dequant_bound assumes the 16-bit GEMM reduces in fp32 (docs/layouts.md)
        matmul = torch.backends.cuda.matmul
        matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    rng = random.Random(args.seed)
    done, bad, worst, start = 0, [], 0.0, time.time()
    while done < args.cases and time.time() - start < args.seconds:
        case = draw_case(rng)
        try:
            r = run_case(case, args.backend)
        except NotImplementedError as e:  # a layout this path does not run here (torch's block-wise, say)
            r = dict(case, ok=True, skipped=str(e)[:200])
        except Exception as e:  # noqa: BLE001 - an error in an unverified kernel is a finding, not the end
            r = dict(case, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", trace=traceback.format_exc()[-800:])
        done += 1
        worst = max(worst, r.get("max_err_over_bound", 0.0))
        if not r["ok"]:
            bad.append(r)
            print(f"MISMATCH {r}", file=sys.stderr)
    summary = dict(backend=args.backend, cases=done, mismatches=len(bad), worst_err_over_bound=worst,
                   seconds=round(time.time() - start, 1), failed=bad[:50])
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"sweep {args.backend}: {done} cases, {len(bad)} mismatches, worst error/bound {worst:.3g}")
    return 1 if bad or done == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
