"""Per-rank weight memory of an FP8 model under fp8kern tensor parallelism, computed from the shards
fp8kern.parallel would make (plan_shards on a meta-device model: no weights are needed).

    .venv/bin/python tools/tp_memory.py --preset llama-3.3-70b --tp 8 [--granularity channel|block]
    .venv/bin/python tools/tp_memory.py --config path/to/config.json --tp 8

FP8 layers count 1 byte per weight element (block shards include their < 128 padded rows or columns) plus fp32
scales; everything else (embeddings, norms, lm_head) is bf16 and whole on every rank. MoE experts are not sharded
by fp8kern.parallel yet, so MoE models are refused.
"""

import argparse
import json
import math

import torch
from torch import nn

PRESETS = {  # published config.json values
    "llama-3.3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                      "vocab_size": 128256, "tie_word_embeddings": False},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
}


def linear_bytes(n: int, k: int, granularity: str) -> int:
    """FP8 weight [n, k] plus its fp32 scale."""
    scale = {"channel": n, "tensor": 1, "block": math.ceil(n / 128) * math.ceil(k / 128)}[granularity]
    return n * k + 4 * scale


def per_rank_bytes(config_dict: dict, tp: int, granularity: str) -> dict:
    import transformers

    from fp8kern.parallel.plan import plan_shards
    from fp8kern.parallel.sharding import block_pad

    config = transformers.AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    ranks = []
    for rank in range(tp):
        planned = {n: (style, s, e) for n, style, s, e in plan_shards(model, tp, rank)}
        fp8 = high = 0
        seen = set()
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
                if name in planned:  # a row shard keeps the whole per-channel scale: n = out_features
                    style, s, e = planned[name]
                    pad = block_pad(s) if granularity == "block" else 0
                    n, k = (pad + e - s, m.in_features) if style == "colwise" else (m.out_features, pad + e - s)
                    fp8 += linear_bytes(n, k, granularity)
                else:
                    fp8 += linear_bytes(m.out_features, m.in_features, granularity)
            else:  # embeddings, norms, lm_head (a tied lm_head shares the embedding's parameter: counted once)
                params = [p for p in m.parameters(recurse=False) if id(p) not in seen]
                seen.update(id(p) for p in params)
                high += sum(p.numel() * 2 for p in params)
        ranks.append({"fp8_layers": fp8, "replicated_bf16": high})
    return {"ranks": ranks, "single_device": sum(
        linear_bytes(m.out_features, m.in_features, granularity) for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")) + ranks[0]["replicated_bf16"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--config", help="a Hugging Face config.json")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor", "block"])
    args = p.parse_args()
    cfg = PRESETS[args.preset] if args.preset else json.load(open(args.config))
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    out = per_rank_bytes(cfg, args.tp, args.granularity)
    gib = 2.0**30
    worst = max(r["fp8_layers"] + r["replicated_bf16"] for r in out["ranks"])
    r0 = out["ranks"][0]
    print(f"tp={args.tp}, {args.granularity} scales: per rank {worst / gib:.2f} GiB at most "
          f"(FP8 layers {r0['fp8_layers'] / gib:.2f} GiB + replicated bf16 {r0['replicated_bf16'] / gib:.2f} GiB on "
          f"rank 0); one device {out['single_device'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
