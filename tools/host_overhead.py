"""Host cost per eager call of fp8kern's operations, in one run, on this machine (no GPU needed):

1. the CPU family's default path, real kernels, at a shape whose arithmetic is negligible (M=1, N=K=128, one
   thread): Fp8Linear forward against nn.Linear forward, fp8kern.scaled_mm against torch._scaled_mm on the same
   tensors;
2. the CUDA path with the compiled launches replaced by no-ops and CPU tensors standing in for CUDA ones:
   validation, layout, path choice, output allocation and argument marshalling, everything fp8kern's Python does
   before a launch, printed next to nn.Linear's and torch._scaled_mm's CPU times as the yardstick;
3. Fp8Experts on the stubbed CUDA path: the Python cost per expert GEMM of the per-expert path.

Cases are timed in interleaved rounds (every case once per round, so a noisy neighbour hits them alike); the figure
is the median over rounds of the mean per call within a round.

    python tools/host_overhead.py [--n 5000] [--rounds 9]
"""

import argparse
import platform
import statistics
import timeit
import types

import torch

import fp8kern
from fp8kern import _backend
from fp8kern.bench.cpu import cpu_model
from fp8kern.ops import gemm_launch


def timed(cases: dict, n: int, rounds: int) -> dict:
    """{name: median over rounds of microseconds per call}."""
    for fn in cases.values():
        fn()
    per = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            per[name].append(timeit.timeit(fn, number=n) / n * 1e6)
    return {name: statistics.median(v) for name, v in per.items()}


def cpu_section(n: int, rounds: int) -> dict:
    """The CPU family's default path at M=1, N=K=128, one thread, against torch's own ops."""
    M, N, K = 1, 128, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).bfloat16()
    lin = torch.nn.Linear(K, N, dtype=torch.bfloat16)
    tok = fp8kern.nn.Fp8Linear.from_linear(lin, "dynamic_per_token")
    blk = fp8kern.nn.Fp8Linear.from_linear(lin, "block128")
    a, sa = fp8kern.quantize(x)
    b, sb = tok.weight, tok.weight_scale
    sb_row = sb.reshape(1, N)  # torch._scaled_mm's row-wise scale_b shape
    cases = {
        "nn.Linear forward": lambda: lin(x),
        "Fp8Linear forward (dynamic_per_token)": lambda: tok(x),
        "Fp8Linear forward (block128)": lambda: blk(x),
        "torch._scaled_mm (row-wise)": lambda: torch._scaled_mm(a, b.t(), sa, sb_row, out_dtype=torch.bfloat16),
        "fp8kern.scaled_mm (token x channel)": lambda: fp8kern.scaled_mm(a, b, sa, sb),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timed(cases, n, rounds)
    finally:
        torch.set_num_threads(before)


def stub_launches():
    """Make the CUDA kernel path run on CPU tensors, ending in no-op launches."""
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    _backend.set_backend("sm90")  # the CPU family is what 'auto' takes for CPU tensors
    _backend.compiled_family = lambda device: "sm90"
    _backend.value_checks_on = lambda device: False
    _backend.quant_kernels_available = lambda device: True
    _backend.cpu_quant_available = lambda: False
    _backend.current_stream = lambda index: 0
    _backend._C = types.SimpleNamespace(scaled_mm=lambda *a: None, scaled_mm_block=lambda *a: None,
                                        gemm_workspace_size=lambda *a: 0, block_workspace_size=lambda *a: 0,
                                        grouped_mm=lambda *a: None, grouped_workspace_size=lambda *a: 0,
                                        quantize=lambda *a: None, linear=lambda *a: None)
    gemm_launch._workspace = lambda index: ws


def cuda_section(n: int, rounds: int) -> dict:
    M, N, K = 16, 4096, 4096
    a = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    b = torch.zeros(N, K, dtype=torch.float8_e4m3fn)
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    one = torch.ones(())
    sa, sb = torch.ones(M, 1), torch.ones(N, 1)
    ga, gb = torch.ones(M, K // 128), torch.ones(N // 128, K // 128)
    bias = torch.zeros(N, dtype=torch.bfloat16)
    lin = torch.nn.Linear(K, N, dtype=torch.bfloat16)
    tok = fp8kern.nn.Fp8Linear.from_linear(lin, "dynamic_per_token")
    blk = fp8kern.nn.Fp8Linear.from_linear(lin, "block128")
    cases = {
        "scaled_mm per-tensor": lambda: fp8kern.scaled_mm(a, b, one, one),
        "scaled_mm per-token x per-channel": lambda: fp8kern.scaled_mm(a, b, sa, sb),
        "scaled_mm per-token + bias": lambda: fp8kern.scaled_mm(a, b, sa, sb, bias=bias),
        "scaled_mm block-scaled": lambda: fp8kern.scaled_mm(a, b, ga, gb),
        "quantize token": lambda: fp8kern.quantize(x),
        "quantize group": lambda: fp8kern.quantize(x, "group"),
        "Fp8Linear forward (dynamic_per_token)": lambda: tok(x),
        "Fp8Linear forward (block128)": lambda: blk(x),
        "torch.empty (one allocation, for scale)": lambda: torch.empty((M, N), dtype=torch.bfloat16),
    }
    return timed(cases, n, rounds)


def experts_section(n: int, rounds: int) -> list:
    """The per-expert path's GEMM loop (Fp8Experts._gemms: one GEMM per active expert) per expert GEMM, the Python
    cost each active expert adds to a forward. The loop alone: the rest of a forward is torch ops on the gathered
    activations (a GPU's work), and on the no-op launches' unwritten outputs their CPU time depends on what the
    memory held."""
    E, Hs, Is, k, T = 128, 256, 128, 8, 64
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    rows_n, active = sum(counts), sum(1 for c in counts if c)
    rows = []
    for scheme in ("block128", "dynamic_per_token"):
        m = fp8kern.nn.Fp8Experts(E, Hs, Is, scheme)
        q, s = fp8kern.quantize(torch.zeros(rows_n, Hs, dtype=torch.bfloat16),
                                "group" if scheme == "block128" else "token")
        out = torch.empty((rows_n, m.gate_up_weight.shape[1]), dtype=torch.bfloat16)
        us = timed({"": lambda: m._gemms(q, s, m.gate_up_weight, m.gate_up_scale, counts, out)},  # noqa: B023
                   max(n // 200, 3), rounds)[""]
        rows.append((scheme, us / active))
    return rows, (E, Hs, Is, k, T, active)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="calls per case and round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (the median is reported)")
    args = parser.parse_args(argv)
    print(f"fp8kern host cost per call: {cpu_model()}, torch {torch.__version__}, Python {platform.python_version()}")

    isa = _backend.cpu_isa()
    if isa is None:
        print("1. CPU family: not built here (fp8kern._cpu missing); skipped")
    else:
        cpu = cpu_section(args.n, args.rounds)
        print(f"1. CPU family, default path ({isa}), M=1 N=K=128, 1 thread: median us per call (ratio)")
        lin, tsm = cpu["nn.Linear forward"], cpu["torch._scaled_mm (row-wise)"]
        for name, us in cpu.items():
            ref = tsm if "scaled_mm" in name else lin
            print(f"  {name:40s} {us:8.2f} us  ({us / ref:4.2f}x {'torch._scaled_mm' if ref is tsm else 'nn.Linear'})")

    yard = cpu_section(args.n, args.rounds) if isa is None else cpu
    stub_launches()
    cuda = cuda_section(args.n, args.rounds)
    print("2. CUDA path, launches stubbed (CPU tensors stand in), M=16 N=K=4096: median us per call")
    for name, us in cuda.items():
        print(f"  {name:40s} {us:8.2f} us")
    print(f"  yardstick (CPU, M=1 N=K=128, 1 thread): nn.Linear forward {yard['nn.Linear forward']:.2f} us, "
          f"torch._scaled_mm {yard['torch._scaled_mm (row-wise)']:.2f} us")

    rows, (E, Hs, Is, k, T, active) = experts_section(args.n, args.rounds)
    print(f"3. Fp8Experts per-expert path, launches stubbed, E={E} H={Hs} I={Is} top-{k} T={T} ({active} experts "
          "active): the GEMM loop per expert GEMM")
    for scheme, us in rows:
        print(f"  {scheme:40s} {us:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
