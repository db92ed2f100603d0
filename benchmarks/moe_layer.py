"""One MoE layer's routed experts (random weights): fp8kern.nn.Fp8Experts vs the same experts in bf16.

    python benchmarks/moe_layer.py --json out.json        # GPU: Qwen3-30B-A3B and DeepSeek-V3 expert dims
    python benchmarks/moe_layer.py --small                # CPU smoke run: tiny dims, reference path, no timing

The bf16 side computes what transformers' eager experts do (tokens gathered per expert, gate_up and down
projections, index_add of the weighted outputs) in plain torch, so no transformers is needed on the GPU machine; the
fp8 side is Fp8Experts (block128 or dynamic_per_token), quantized from the same bf16 weights. Routing is random top-k
(softmax weights), the same for both. The bf16 side synchronizes with the host once per call (the per-expert token
counts), so both run eagerly: the median of CUDA-event timings around each call, after warm-up, is reported with the
fp8 speedup, the cosine similarity of the outputs and the number of experts that got tokens. Where Fp8Experts runs
its grouped kernels (the sm90 family), two more timings: the same layer with one GEMM per expert
(grouped=False, as every other case runs), and the grouped layer captured in a CUDA graph (replay, as decoding
engines run it; the per-expert path cannot be captured).
"""

import argparse
import os
import statistics
import sys

import torch

import fp8kern
from fp8kern.nn import Fp8Experts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_stack import finish, time_graph  # noqa: E402  (the sibling benchmark's graph timing and ending)

# name -> (experts, hidden, intermediate, top_k)
MODELS = {"qwen3-30b-a3b": (128, 2048, 768, 8), "deepseek-v3": (256, 7168, 2048, 8)}


class Bf16Experts(torch.nn.Module):
    """transformers' fused experts layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and eager algorithm, with
    one host read of the per-expert counts (as Fp8Experts), so the two differ only in the GEMMs."""

    def __init__(self, E, H, I, device, seed=0):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(seed)
        gu = torch.empty(E, 2 * I, H, device=device, dtype=torch.bfloat16)
        down = torch.empty(E, H, I, device=device, dtype=torch.bfloat16)
        for e in range(E):  # one expert at a time: DeepSeek-V3's 256 experts in fp32 at once would need 45 GB
            gu[e] = torch.randn(2 * I, H, generator=gen, device=device) * H ** -0.5
            down[e] = torch.randn(H, I, generator=gen, device=device) * I ** -0.5
        self.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
        self.down_proj = torch.nn.Parameter(down, requires_grad=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x, idx, w):
        E, I = self.gate_up_proj.shape[0], self.down_proj.shape[2]
        k = idx.shape[1]
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=E).tolist()
        sel = torch.argsort(flat, stable=True)
        token = sel // k
        xs = x[token]
        out = torch.empty((xs.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        r = 0
        for e, c in enumerate(counts):
            if c:
                gu = xs[r:r + c] @ self.gate_up_proj[e].T
                out[r:r + c] = (self.act_fn(gu[:, :I]) * gu[:, I:]) @ self.down_proj[e].T
            r += c
        return torch.zeros_like(x).index_add_(0, token, (out * w.reshape(-1)[sel, None]).to(x.dtype))


def quantize_experts(ref: Bf16Experts, scheme: str) -> Fp8Experts:
    """ref's weights as an Fp8Experts (each expert's gate, up and down quantized by fp8kern.quantize_weight)."""
    E, two_i, H = ref.gate_up_proj.shape
    I = two_i // 2
    m = Fp8Experts(E, H, I, scheme, device=ref.gate_up_proj.device)
    gran = m.weight_granularity
    for e in range(E):
        for role, w in (("gate", ref.gate_up_proj[e, :I]), ("up", ref.gate_up_proj[e, I:]),
                        ("down", ref.down_proj[e])):
            q, s = fp8kern.quantize_weight(w, gran)
            wq, ws = m.projection(e, role)
            wq.copy_(q)
            ws.copy_(s.reshape(ws.shape))
    return m


def time_eager(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny dims on the CPU (reference path), a smoke test")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--scheme", default="block128", choices=["block128", "dynamic_per_token"])
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 128, 1024, 4096])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--backend", default=None, choices=["auto", "reference", "sm89", "sm90"],
                   help="fp8kern kernel family (default: FP8KERN_BACKEND or auto; auto runs only GPU-verified kernels)")
    args = p.parse_args(argv)
    if args.backend:
        fp8kern.set_backend(args.backend)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    models = {"tiny": (8, 256, 128, 2)} if args.small else {m: MODELS[m] for m in args.models.split(",")}
    tokens = [1, 6] if args.small else args.tokens
    rows = []
    with torch.no_grad():
        for name, (E, H, I, k) in models.items():
            gen = torch.Generator().manual_seed(1)
            ref = Bf16Experts(E, H, I, device)
            fp8 = quantize_experts(ref, args.scheme)
            for T in tokens:
                x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
                idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(device)
                w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1).to(device)
                if device == "cuda":
                    t_bf16, y_ref = time_eager(lambda: ref(x, idx, w), args.reps)
                    try:
                        t_fp8, y_fp8 = time_eager(lambda: fp8(x, idx, w), args.reps)
                    except NotImplementedError as e:
                        print(f"moe_layer: {e}\n(pass --backend sm90 or sm89 to time kernels not yet verified on a "
                              "GPU)", file=sys.stderr)
                        return 1
                    t_loop = t_graph = None
                    if fp8._grouped_runs(x):
                        fp8.grouped = False
                        t_loop, _ = time_eager(lambda: fp8(x, idx, w), args.reps)
                        fp8.grouped = True
                        t_graph, _ = time_graph(lambda _: fp8(x, idx, w), None, args.reps)
                else:
                    t_bf16 = t_fp8 = t_loop = t_graph = None
                    y_ref, y_fp8 = ref(x, idx, w), fp8(x, idx, w)
                cos = torch.nn.functional.cosine_similarity(y_ref.float().flatten(), y_fp8.float().flatten(),
                                                            dim=0).item()
                rows.append(dict(model=name, experts=E, hidden=H, intermediate=I, top_k=k, tokens=T,
                                 active_experts=int(idx.unique().numel()), bf16_us=t_bf16, fp8_us=t_fp8,
                                 fp8_per_expert_us=t_loop, fp8_graph_us=t_graph,
                                 speedup=(t_bf16 / t_fp8) if t_fp8 else None, cosine=cos, scheme=args.scheme,
                                 gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 backend=fp8kern.get_backend()))
            ref = fp8 = None  # free this model's weights before the next one's
    print(f"{'model':<14} {'T':>5} {'active':>6} {'bf16 us':>9} {'fp8 us':>9} {'speedup':>8} {'per-exp us':>10} "
          f"{'graph us':>9} {'cosine':>8}")
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    for r in rows:
        print(f"{r['model']:<14} {r['tokens']:>5} {r['active_experts']:>6} {fmt(r['bf16_us'], '9.1f'):>9} "
              f"{fmt(r['fp8_us'], '9.1f'):>9} {fmt(r['speedup'], '8.2f'):>8} "
              f"{fmt(r['fp8_per_expert_us'], '10.1f'):>10} {fmt(r['fp8_graph_us'], '9.1f'):>9} {r['cosine']:>8.5f}")
    return finish(rows, device, args.json)


if __name__ == "__main__":
    sys.exit(main())
