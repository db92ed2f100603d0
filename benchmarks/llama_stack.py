"""A Llama-3.1-8B-shaped stack of decoder layers (random weights) with fp8kern.Fp8Linear vs bf16, under CUDA graphs.

    python benchmarks/llama_stack.py --json out.json            # GPU: 4 layers of Llama-3.1-8B dims
    python benchmarks/llama_stack.py --small                    # CPU smoke run: tiny dims, reference path, no timing

Prefill runs [1, T] tokens through the layers (causal attention); decode runs [B, 1] tokens (one new token per
sequence, attending only to itself, no KV cache: the linear layers, which dominate decode, see exactly the decode
shapes M = B). Plain torch layers: no transformers needed. Each forward is
captured once in a CUDA graph and replayed; the median over replays is reported, with the fp8 speedup, and the
cosine similarity of what the fp8 and the bf16 layers add to the residual stream.
"""

import argparse
import copy
import json
import statistics
import sys

import torch

import fp8kern


class DecoderLayer(torch.nn.Module):
    """A Llama decoder layer (RMSNorm, GQA attention with rotary embeddings, SwiGLU MLP) in plain torch, so the
    benchmark needs no transformers on the GPU machine. Its seven nn.Linear are what quantize_model converts."""

    def __init__(self, hidden, inter, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.q_proj, self.k_proj = lin(hidden, hidden), lin(hidden, kv_heads * self.head_dim)
        self.v_proj, self.o_proj = lin(hidden, kv_heads * self.head_dim), lin(hidden, hidden)
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        self.norm1, self.norm2 = torch.nn.RMSNorm(hidden), torch.nn.RMSNorm(hidden)

    def rope(self, t):
        T, d = t.shape[2], self.head_dim
        inv = 500000.0 ** (-torch.arange(0, d, 2, device=t.device, dtype=torch.float32) / d)
        ang = torch.arange(T, device=t.device, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos().to(t.dtype), ang.sin().to(t.dtype)
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    def forward(self, x):
        B, T, H = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True,
                                                             enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, H))
        h = self.norm2(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def build(small: bool, layers: int, device):
    """(hidden size, stack): Llama-3.1-8B dims (hidden 4096, MLP 14336, 32 q / 8 kv heads), or tiny ones."""
    hidden, inter, heads, kv = (256, 688, 8, 2) if small else (4096, 14336, 32, 8)
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*[DecoderLayer(hidden, inter, heads, kv) for _ in range(layers)])
    for m in stack.modules():  # unit-gain random weights, so each layer changes the residual stream by O(1)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return hidden, stack.to(device, torch.bfloat16).eval()


def time_graph(fn, x, reps):
    """Median replay time (us) of fn(x) captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)  # warm-up: allocator, workspaces, kernel selection
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(x)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny dims on the CPU (reference path), a smoke test")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scheme", default="dynamic_per_token", choices=sorted(fp8kern.nn.SCHEMES))
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--decode", type=int, nargs="*", default=[1, 8, 16, 64])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--backend", default=None, choices=["auto", "reference", "sm89", "sm90"],
                   help="fp8kern kernel family (default: FP8KERN_BACKEND or auto; auto runs only GPU-verified kernels)")
    args = p.parse_args(argv)
    if args.backend:
        fp8kern.set_backend(args.backend)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    hidden, ref = build(args.small, args.layers, device)
    fp8 = copy.deepcopy(ref)
    report = fp8kern.quantize_model(fp8, args.scheme, skip=())
    print(f"{report}\nstack: {args.layers} layers, hidden {hidden}, device {device}", file=sys.stderr)
    shapes = [("prefill", 1, t) for t in args.prefill] + [("decode", b, 1) for b in args.decode]
    if args.small:
        shapes = [("prefill", 1, 16), ("decode", 4, 1)]
    rows = []
    with torch.no_grad():
        for phase, B, T in shapes:
            x = torch.randn(B, T, hidden, device=device, dtype=torch.bfloat16)
            if device == "cuda":
                t_bf16, y_ref = time_graph(ref, x, args.reps)
                try:
                    t_fp8, y_fp8 = time_graph(fp8, x, args.reps)
                except NotImplementedError as e:
                    print(f"llama_stack: {e}\n(pass --backend sm90 or sm89 to time kernels not yet verified on a GPU)",
                          file=sys.stderr)
                    return 1
            else:
                t_bf16 = t_fp8 = None
                y_ref, y_fp8 = ref(x), fp8(x)
            # Compare what the layers added to the residual stream (the input itself would dominate a plain cosine).
            d_ref, d_fp8 = (y_ref.float() - x.float()).flatten(), (y_fp8.float() - x.float()).flatten()
            cos = torch.nn.functional.cosine_similarity(d_ref, d_fp8, dim=0).item()
            rows.append(dict(phase=phase, batch=B, tokens=T, M=B * T, bf16_us=t_bf16, fp8_us=t_fp8,
                             speedup=(t_bf16 / t_fp8) if t_fp8 else None, cosine=cos,
                             gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", scheme=args.scheme,
                             layers=args.layers, backend=fp8kern.get_backend()))
    print(f"{'phase':<8} {'B':>4} {'T':>5} {'bf16 us':>9} {'fp8 us':>9} {'speedup':>8} {'cosine':>8}")
    for r in rows:
        fmt = lambda v, f: format(v, f) if v is not None else "-"
        print(f"{r['phase']:<8} {r['batch']:>4} {r['tokens']:>5} {fmt(r['bf16_us'], '9.1f'):>9} "
              f"{fmt(r['fp8_us'], '9.1f'):>9} {fmt(r['speedup'], '8.2f'):>8} {r['cosine']:>8.5f}")
    return finish(rows, device, args.json)


def finish(rows: list, device: str, json_path: str | None) -> int:
    """The end of a benchmark run (also moe_layer's): the CPU note, the JSON, and the exit status (1 when an fp8 output
    strays from its bf16 counterpart, cosine <= 0.99)."""
    if device == "cpu":
        print("CPU run: fp8kern's reference path; timings need a GPU.")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["cosine"] > 0.99 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
