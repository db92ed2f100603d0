"""fp8kern-bench without a GPU: fp8kern's CPU kernel family against torch's bf16 F.linear, torch's CPU _scaled_mm
(where it runs the layout) and fp8kern's reference, on real model shapes, side by side in one run.

- The machine's DRAM read bandwidth is measured first, in the same run: a float32 sum over a buffer of at least
  1 GiB and 4x the last-level cache.
- Decode rows (M <= 16) cycle through a stack of distinct weights whose total is at least twice the last-level cache,
  as a model's layers do, so every call streams its weight from DRAM (a weight that fits in the cache would time the
  cache). The same holds for the bf16 peer, with its own stack.
- Every problem is checked against the reference (fp32 dequantization, fp32 GEMM) before it is timed: the two differ
  only in the order of fp32 sums.
- Times are medians of several repetitions (the machine may be shared and noisy).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time

import torch

import fp8kern
from fp8kern import _backend, reference

# (suite, N, K) of the CPU run: weights as N x K.
CPU_SUITES = {
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama70b": [(10240, 8192), (8192, 28672)],
    "deepseek": [(24576, 1536), (7168, 16384)],
    "qwen3moe": [(1536, 2048), (2048, 768)],  # one Qwen3-30B-A3B expert: fused gate_up, down
}
DECODE_M = (1, 4, 16)
PREFILL_M = (256,)
QUICK = {"suites": ["llama8b"], "m": (1, 4, 16, 256)}
SMOKE = {"shapes": [("smoke", 384, 1000), ("smoke", 256, 512)], "m": (1, 3, 17), "buffer_bytes": 64 << 20}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_bytes() -> int:
    """Size of the last-level cache (Linux sysfs; 32 MiB where it cannot be read)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(f"{base}/{idx}/size") as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or (32 << 20)


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slow_peer_s(fn, reps: int) -> float:
    """Time of a peer that may take seconds per call (torch's CPU _scaled_mm per tensor): one call, and the median
    of a few more only when it took under a second."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return first if first > 1.0 else min(first, median_s(fn, max(1, reps // 2)))


def dram_read_gbps(nbytes: int, reps: int) -> float:
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / median_s(lambda: buf.sum(), reps) / 1e9


CHECK_COLS = 256  # columns of each problem checked against the reference before timing
WEIGHT_GRANULARITY = {"tensor": "tensor", "token_channel": "channel", "block": "block"}
ACT_GRANULARITY = {"tensor": "tensor", "token_channel": "token", "block": "group"}


def _problem(M, N, K, layout, gen):
    """Activations (bf16 and quantized) and an e4m3 weight with its scales, as checkpoints and fp8kern make them."""
    x = (torch.randn(M, K, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=gen) * 0.02).to(torch.bfloat16)
    b, sb = fp8kern.quantize_weight(w, WEIGHT_GRANULARITY[layout])
    a, sa = fp8kern.quantize(x, ACT_GRANULARITY[layout])
    return x, w, a, sa, b, sb


def _weight_like(shape, gen) -> torch.Tensor:
    """An e4m3 weight of random finite codes (the decode stacks' other weights, made fast)."""
    codes = torch.randint(0, 126, shape, dtype=torch.uint8, generator=gen)
    codes |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=gen) << 7
    return codes.view(torch.float8_e4m3fn)


def run(args) -> tuple[list[dict], dict]:
    smoke = getattr(args, "smoke", False)
    threads = torch.get_num_threads()
    llc = llc_bytes()
    env = dict(cpu=cpu_model(), isa=_backend.cpu_isa() or "none (fp8kern._cpu not built: reference)",
               threads=threads, llc_mib=llc / 2**20, torch=torch.__version__)
    buffer = SMOKE["buffer_bytes"] if smoke else max(1 << 30, 4 * llc)
    reps = 3 if smoke else 5
    env["dram_read_gbps"] = dram_read_gbps(buffer, reps)
    stack_total = SMOKE["buffer_bytes"] if smoke else 2 * llc
    print(f"fp8kern-bench (CPU): {env['cpu']}, fp8kern CPU family {env['isa']}, {threads} threads, last-level cache "
          f"{env['llc_mib']:.0f} MiB, DRAM read {env['dram_read_gbps']:.1f} GB/s (float32 sum over "
          f"{buffer / 2**30:.2f} GiB)", file=sys.stderr)
    if smoke:
        shapes, ms = SMOKE["shapes"], SMOKE["m"]
    else:
        suites = QUICK["suites"] if args.quick else list(CPU_SUITES)
        shapes = [(s, n, k) for s in suites for n, k in CPU_SUITES[s]]
        ms = QUICK["m"] if args.quick else DECODE_M + PREFILL_M
    gen = torch.Generator().manual_seed(0)
    rows = []
    label = "fp8kern-cpu" if _backend._cpu is not None else "fp8kern-reference"
    for suite, N, K in shapes:
        # The other weights of the decode stacks, shared by every layout and M of the shape (made once: seconds).
        extra = max(0, math.ceil(stack_total / (N * K)) - 1)
        fp8_extra = [_weight_like((N, K), gen) for _ in range(extra)]
        bf16_extra = [torch.empty(N, K, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
                      for _ in range(max(0, math.ceil(stack_total / (2 * N * K)) - 1))]
        for layout in args.layouts:
            for M in ms:
                rows += _time_problem(suite, M, N, K, layout, gen, reps, fp8_extra, bf16_extra, env, label)
                r = next(r for r in reversed(rows) if r["backend"] == label and r["M"] == M)
                print(f"  {suite} {N}x{K} {layout} M={M}: {r['median_us']:.0f} us, {r['x_bf16']:.2f}x bf16"
                      f"{'' if r['ok'] else ', WRONG'}", file=sys.stderr)
        del fp8_extra, bf16_extra
    return rows, env


def _time_problem(suite, M, N, K, layout, gen, reps, fp8_extra, bf16_extra, env, label) -> list[dict]:
    x, w, a, sa, b, sb = _problem(M, N, K, layout, gen)
    # The check: the reference on the first CHECK_COLS columns (a column depends only on its row of b and its
    # scales; the first 128-row block keeps the block layout's scale grid).
    n_chk = min(N, CHECK_COLS)
    sb_chk = sb[: -(-n_chk // 128)] if layout == "block" else (sb[:n_chk] if sb.numel() > 1 else sb)
    y = fp8kern.scaled_mm(a, b[:n_chk], sa, sb_chk, out_dtype=torch.float32)
    ref = reference.scaled_mm(a, b[:n_chk], sa, sb_chk, torch.float32)
    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    ok = bool(torch.isfinite(y).all()) and err < 1e-5  # fp32 summation order only (see tests for the bound)
    decode = M <= 16
    fp8_stack = [b] + (fp8_extra if decode else [])
    bf16_stack = [w] + (bf16_extra if decode else [])

    def fp8():
        for bb in fp8_stack:
            fp8kern.scaled_mm(a, bb, sa, sb, out_dtype=torch.bfloat16)

    def bf16():
        for ww in bf16_stack:
            torch.nn.functional.linear(x, ww)

    common = dict(gpu="cpu", cpu=env["cpu"], isa=env["isa"], threads=env["threads"], suite=suite, layout=layout,
                  M=M, N=N, K=K, out_dtype="bf16", stack=len(fp8_stack))
    t8 = median_s(fp8, reps) / len(fp8_stack)
    tb = median_s(bf16, reps) / len(bf16_stack)
    out = [dict(common, backend=label, median_us=t8 * 1e6, tflops=2 * M * N * K / t8 / 1e12,
                weight_gbps=N * K / t8 / 1e9, pct_dram=100 * N * K / t8 / 1e9 / env["dram_read_gbps"],
                x_bf16=tb / t8, ok=ok, rel_err_vs_reference=err),
           dict(common, backend="torch-bf16-linear", median_us=tb * 1e6, tflops=2 * M * N * K / tb / 1e12,
                weight_gbps=2 * N * K / tb / 1e9, pct_dram=100 * 2 * N * K / tb / 1e9 / env["dram_read_gbps"])]
    # torch's CPU _scaled_mm: no block scales, and per tensor seconds per call beyond one row (timed at M = 1 there)
    if layout != "block" and (M == 1 or (layout == "token_channel" and M <= 16)):
        try:
            tensorwise = layout == "tensor"
            sa_t = sa.reshape(()) if tensorwise else sa.reshape(M, 1)
            sb_t = sb.reshape(()) if tensorwise else sb.reshape(1, N)
            ts = _slow_peer_s(lambda: torch._scaled_mm(a, b.t(), sa_t, sb_t, out_dtype=torch.bfloat16), reps)
            out.append(dict(common, stack=1, backend="torch._scaled_mm", median_us=ts * 1e6,
                            tflops=2 * M * N * K / ts / 1e12, weight_gbps=N * K / ts / 1e9))
            out[0]["x_scaled_mm"] = ts / t8
        except (RuntimeError, NotImplementedError, ValueError) as e:
            out.append(dict(common, backend="torch._scaled_mm", median_us=None, error=str(e)[:200]))
    if M == 1 and N * K <= (64 << 20):  # the reference: slow, timed once per shape at M = 1
        tr = median_s(lambda: reference.scaled_mm(a, b, sa, sb, torch.bfloat16), 1)
        out.append(dict(common, stack=1, backend="fp8kern-reference", median_us=tr * 1e6,
                        tflops=2 * M * N * K / tr / 1e12, weight_gbps=N * K / tr / 1e9))
        out[0]["x_reference"] = tr / t8
    return out


def _geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def summarize(rows, env) -> dict:
    mine = [r for r in rows if r["backend"] in ("fp8kern-cpu", "fp8kern-reference") and r.get("stack") is not None
            and r.get("x_bf16") is not None]
    bf16 = [r for r in rows if r["backend"] == "torch-bf16-linear" and r["M"] <= 16]
    dec4 = [r["pct_dram"] for r in mine if r["M"] <= 4]
    dec = [r["x_bf16"] for r in mine if r["M"] <= 16]
    pre = [r["x_bf16"] for r in mine if r["M"] >= 256]
    sm = [r["x_scaled_mm"] for r in mine if r.get("x_scaled_mm")]
    bf16_pct = [r["pct_dram"] for r in bf16]
    return {
        "decode_m_le_4_pct_of_dram_read": dict(min=min(dec4, default=None),
                                               median=statistics.median(dec4) if dec4 else None, n=len(dec4),
                                               goal=">= 85%"),
        "decode_m_le_16_vs_bf16": dict(geomean=_geomean(dec), min=min(dec, default=None), n=len(dec),
                                       goal="geomean >= 2.5x, none below 2.0x"),
        "bf16_linear_decode_pct_of_dram_read": dict(median=statistics.median(bf16_pct) if bf16_pct else None,
                                                    n=len(bf16_pct),
                                                    goal="context: FP8 halves the bytes, so the decode ratio "
                                                         "cannot pass 2 x 100 / this"),
        "prefill_m_ge_256_vs_bf16": dict(geomean=_geomean(pre), min=min(pre, default=None), n=len(pre),
                                         goal="geomean >= 0.9x, none below 0.8x"),
        "vs_torch_scaled_mm": dict(geomean=_geomean(sm), min=min(sm, default=None), n=len(sm), goal=">= 5x"),
        "wrong_results": sum(1 for r in mine if r.get("ok") is False),
    }


def print_table(rows) -> None:
    print(f"{'suite':<9} {'M':>5} {'N':>6} {'K':>6} {'layout':<13} {'backend':<18} {'us':>10} {'GB/s':>6} "
          f"{'%DRAM':>6} {'TFLOPS':>7} {'x bf16':>7} {'x _s_mm':>8}  check")
    for r in rows:
        if r.get("median_us") is None:
            print(f"{r['suite']:<9} {r['M']:>5} {r['N']:>6} {r['K']:>6} {r['layout']:<13} {r['backend']:<18} "
                  f"not run: {r.get('error', '')[:80]}")
            continue
        pct = f"{r['pct_dram']:.0f}" if r.get("pct_dram") is not None else "-"
        xb = f"{r['x_bf16']:.2f}" if r.get("x_bf16") else "-"
        xs = f"{r['x_scaled_mm']:.1f}" if r.get("x_scaled_mm") else "-"
        chk = "" if "ok" not in r else ("ok" if r["ok"] else "WRONG")
        print(f"{r['suite']:<9} {r['M']:>5} {r['N']:>6} {r['K']:>6} {r['layout']:<13} {r['backend']:<18} "
              f"{r['median_us']:>10.1f} {r['weight_gbps']:>6.1f} {pct:>6} {r['tflops']:>7.3f} {xb:>7} {xs:>8}  {chk}")
