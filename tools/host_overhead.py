"""Python-side cost per eager call of fp8kern's kernel path, measured on the CPU (no GPU needed): validation, layout
inference, output allocation and argument marshalling, with the compiled launch itself replaced by a no-op and CPU
tensors standing in for CUDA ones. On a GPU the benchmark reports the whole host overhead against
torch._scaled_mm; this isolates the part fp8kern's Python controls, for working on it without a device.

    python tools/host_overhead.py [--n 20000]
"""

import argparse
import timeit
import types

import torch

import fp8kern
from fp8kern import _backend
from fp8kern.ops import gemm_launch


def stub_launches():
    """Make the kernel path run on CPU tensors, ending in no-op launches."""
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    _backend.compiled_family = lambda device: "sm90"
    _backend.value_checks_on = lambda device: False
    _backend.quant_kernels_available = lambda device: True
    _backend.current_stream = lambda index: 0
    _backend._C = types.SimpleNamespace(scaled_mm=lambda *a: None, scaled_mm_block=lambda *a: None,
                                        gemm_workspace_size=lambda *a: 0, block_workspace_size=lambda *a: 0,
                                        grouped_mm=lambda *a: None, grouped_workspace_size=lambda *a: 0,
                                        quantize=lambda *a: None)
    gemm_launch._workspace = lambda index: ws


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per measurement (best of 5 is reported)")
    args = parser.parse_args(argv)
    stub_launches()
    M, N, K = 16, 4096, 4096
    a = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    b = torch.zeros(N, K, dtype=torch.float8_e4m3fn)
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    one = torch.ones(())
    sa, sb = torch.ones(M, 1), torch.ones(N, 1)
    ga, gb = torch.ones(M, K // 128), torch.ones(N // 128, K // 128)
    bias = torch.zeros(N, dtype=torch.bfloat16)
    lin = fp8kern.nn.Fp8Linear.from_linear(torch.nn.Linear(K, N, dtype=torch.bfloat16), scheme="dynamic_per_token")
    cases = {
        "scaled_mm per-tensor": lambda: fp8kern.scaled_mm(a, b, one, one),
        "scaled_mm per-token x per-channel": lambda: fp8kern.scaled_mm(a, b, sa, sb),
        "scaled_mm per-token + bias": lambda: fp8kern.scaled_mm(a, b, sa, sb, bias=bias),
        "scaled_mm block-scaled": lambda: fp8kern.scaled_mm(a, b, ga, gb),
        "quantize token": lambda: fp8kern.quantize(x),
        "quantize group": lambda: fp8kern.quantize(x, "group"),
        "Fp8Linear forward (token)": lambda: lin(x),
        "torch.empty (allocation, for scale)": lambda: torch.empty((M, N), dtype=torch.bfloat16),
    }
    print(f"fp8kern Python host cost per call, launch stubbed, M={M} N={N} K={K} (torch {torch.__version__})")
    for name, fn in cases.items():
        fn()
        best = min(timeit.repeat(fn, number=args.n, repeat=5)) / args.n * 1e6
        print(f"  {name:38s} {best:7.2f} us")
    # MoE experts. Per-expert path: one GEMM per active expert and projection, so the per-GEMM share is what matters;
    # grouped path (sm90): two grouped launches per call whatever the number of experts. Small dims keep
    # the CPU's own work on the gathered activations (a GPU's job) out of the figure.
    E, Hs, Is, k, T = 128, 256, 128, 8, 64
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w, xe = torch.rand(T, k, generator=g), torch.zeros(T, Hs, dtype=torch.bfloat16)
    print(f"Fp8Experts forward, E={E} H={Hs} I={Is} top-{k} T={T} ({int(idx.unique().numel())} experts active):")
    for scheme, grouped in (("block128", True), ("block128", False), ("dynamic_per_token", True),
                            ("dynamic_per_token", False)):
        m = fp8kern.nn.Fp8Experts(E, Hs, Is, scheme)
        m.grouped = grouped
        fn = lambda: m(xe, idx, w)  # noqa: E731
        fn()
        best = min(timeit.repeat(fn, number=max(args.n // 1000, 5), repeat=5)) / max(args.n // 1000, 5) * 1e6
        if grouped:
            print(f"  {scheme + ' grouped':38s} {best:7.0f} us per call (two grouped GEMM launches; mostly the CPU "
                  "running the layer's sort, gathers and elementwise ops, a GPU's work)")
        else:
            gemms = 2 * int(idx.unique().numel())
            print(f"  {scheme + ' per expert':38s} {best:7.0f} us per call, {best / gemms:5.1f} us per expert GEMM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
