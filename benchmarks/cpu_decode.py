"""End-to-end decode on the CPU: tokens/s of a Llama-architecture model in FP8 through fp8kern against the same model in
bf16 under transformers, on the same machine, prompt and greedy decoding, with the Linear weight bytes of each.

    python benchmarks/cpu_decode.py                     # 4 layers, hidden 2048, intermediate 5632, vocab 8192
    python benchmarks/cpu_decode.py --compile           # also transformers' static cache + torch.compile
    python benchmarks/cpu_decode.py --json out.json

The model is randomly initialised (the speed of a forward does not depend on the values); the FP8 models are that model
converted in place by fp8kern.quantize_model (per-token activations x per-channel weights, and 128x128 blocks), lm_head
kept in bf16 as checkpoints do. Decode time per token = (time of prompt + N new tokens - time of prompt + 1 token) /
(N - 1), median of several runs, so the prompt's prefill is not counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

import fp8kern
from fp8kern import _backend


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
                      vocab_size=args.vocab, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def linear_weight_bytes(model) -> int:
    """Bytes of the weights (and their scales) of the decoder's Linear layers (lm_head and embeddings excluded)."""
    total = 0
    for name, mod in model.named_modules():
        if name.endswith("lm_head") or not (isinstance(mod, (torch.nn.Linear, fp8kern.Fp8Linear))):
            continue
        for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if p.dim() >= 1 and p.numel() > 1 and p is not getattr(mod, "bias", None):
                total += p.numel() * p.element_size()
    return total


def decode_ms_per_token(model, ids, new_tokens: int, reps: int) -> float:
    def gen(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
    gen(new_tokens)  # warm-up (and compilation, if any)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        gen(new_tokens)
        t2 = time.perf_counter()
        t.append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1))
    return statistics.median(t) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time static cache + torch.compile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    bf16 = build(args)
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    models = {"bf16 (transformers)": bf16}
    for scheme in ("dynamic_per_token", "block128"):
        m = copy.deepcopy(bf16)
        fp8kern.quantize_model(m, scheme=scheme)
        models[f"fp8kern {scheme}"] = m
    env = dict(cpu=_cpu_model(), isa=_backend.cpu_isa(), threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), command="python benchmarks/cpu_decode.py " + " ".join(sys.argv[1:]))
    print(f"{env['cpu']}, fp8kern CPU family {env['isa']}, {env['threads']} threads; {args.layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy")
    rows = []
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        for name, model in models.items():
            m = model
            if mode == "compiled":
                m = copy.deepcopy(model)
                m.generation_config.cache_implementation = "static"
                m.forward = torch.compile(m.forward, fullgraph=False, dynamic=False)
            try:
                ms = decode_ms_per_token(m, ids, args.new_tokens, args.reps)
                rows.append(dict(model=name, mode=mode, ms_per_token=ms, tokens_per_s=1e3 / ms,
                                 linear_weight_bytes=linear_weight_bytes(model)))
            except Exception as e:  # a mode that fails is reported, not hidden
                rows.append(dict(model=name, mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}"))
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["model"].startswith("bf16") and "tokens_per_s" in r}
    print(f"{'model':<28} {'mode':<9} {'ms/token':>9} {'tokens/s':>9} {'x bf16':>7} {'Linear weights':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<28} {r['mode']:<9} failed: {r['error']}")
            continue
        r["x_bf16"] = r["tokens_per_s"] / base[r["mode"]] if r["mode"] in base else None
        xb = f"{r['x_bf16']:.2f}" if r["x_bf16"] else "-"
        print(f"{r['model']:<28} {r['mode']:<9} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f} {xb:>7} "
              f"{r['linear_weight_bytes'] / 2**20:>11.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": env, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _cpu_model() -> str:
    from fp8kern.bench.cpu import cpu_model
    return cpu_model()


if __name__ == "__main__":
    sys.exit(main())
