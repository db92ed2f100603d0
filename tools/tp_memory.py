"""Per-rank weight memory of an FP8 model under fp8kern tensor parallelism, computed from the shards
fp8kern.parallel would make (plan_shards on a meta-device model: no weights are needed).

    .venv/bin/python tools/tp_memory.py --preset llama-3.3-70b --tp 8 [--granularity channel|block]
    .venv/bin/python tools/tp_memory.py --config path/to/config.json --tp 8 [--ep]

FP8 layers count 1 byte per weight element (block shards include their < 128 padded rows or columns) plus fp32
scales; everything else (embeddings, norms, lm_head) is bf16 and whole on every rank. MoE experts count the buffers
of the Fp8Experts a rank holds: tensor parallel (the default), every expert's intermediate rows split over the
ranks; with --ep (ep_size = tp), E / W whole experts each. Layers the plan does not name (DeepSeek-V3's MLA
attention) are whole on every rank.
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
    "deepseek-v3": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
                    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
                    "topk_group": 4, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                    "vocab_size": 129280, "tie_word_embeddings": False},
    "qwen3-235b-a22b": {"model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64,
                        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                        "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                      "tie_word_embeddings": False},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
}


def linear_bytes(n: int, k: int, granularity: str) -> int:
    """FP8 weight [n, k] plus its fp32 scale."""
    scale = {"channel": n, "tensor": 1, "block": math.ceil(n / 128) * math.ceil(k / 128)}[granularity]
    return n * k + 4 * scale


def experts_bytes(num: int, hidden: int, granularity: str, **layout) -> int:
    """The buffers of num FP8 experts as an Fp8Experts holds them (built on the meta device): gate_up and down with
    their scales. layout: intermediate_size, and block_offset for a tensor-parallel shard."""
    from fp8kern.nn import Fp8Experts

    scheme = {"block": "block128", "channel": "dynamic_per_token", "tensor": "dynamic_per_tensor"}[granularity]
    m = Fp8Experts(num, hidden, scheme=scheme, device="meta", **layout)
    return sum(b.numel() * b.element_size() for b in m.buffers())


def per_rank_bytes(config_dict: dict, tp: int, granularity: str, expert_parallel: bool = False) -> dict:
    import transformers

    from fp8kern.nn import is_fused_experts
    from fp8kern.parallel.plan import plan_experts, plan_shards
    from fp8kern.parallel.sharding import block_pad
    from fp8kern.parallel.tensor_parallel_experts import shard_layout

    config = transformers.AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    ranks = []
    one_device = 0
    for rank in range(tp):
        planned = {n: (style, s, e) for n, style, s, e in plan_shards(model, tp, rank)}
        shares = {n: (e, r) for n, e, r in plan_experts(model, tp, rank, expert_parallel)}
        fp8 = high = 0
        seen = set()
        for name, m in model.named_modules():
            if is_fused_experts(m):
                E, two_i, H = m.gate_up_proj.shape
                (e0, e1), (r0, r1) = shares[name]
                layout = {"intermediate_size": r1 - r0} if expert_parallel else shard_layout(granularity, r0, r1)
                fp8 += experts_bytes(e1 - e0, H, granularity, **layout)
                seen.update(id(p) for p in m.parameters(recurse=False))
                one_device += experts_bytes(E, H, granularity, intermediate_size=two_i // 2) if rank == 0 else 0
            elif isinstance(m, nn.Linear) and not name.endswith("lm_head"):
                if name in planned:  # a row shard keeps the whole per-channel scale: n = out_features
                    style, s, e = planned[name]
                    pad = block_pad(s) if granularity == "block" else 0
                    column = style.startswith("colwise")
                    n, k = (pad + e - s, m.in_features) if column else (m.out_features, pad + e - s)
                    fp8 += linear_bytes(n, k, granularity)
                else:
                    fp8 += linear_bytes(m.out_features, m.in_features, granularity)
            else:  # embeddings, norms, routers, lm_head (a tied lm_head shares the embedding's parameter: once)
                params = [p for p in m.parameters(recurse=False) if id(p) not in seen]
                seen.update(id(p) for p in params)
                high += sum(p.numel() * 2 for p in params)
        ranks.append({"fp8_layers": fp8, "replicated_bf16": high})
    return {"ranks": ranks, "single_device": one_device + sum(
        linear_bytes(m.out_features, m.in_features, granularity) for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")) + ranks[0]["replicated_bf16"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--config", help="a Hugging Face config.json")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor", "block"])
    p.add_argument("--ep", action="store_true", help="MoE experts spread whole over the ranks (ep_size = tp) "
                   "instead of tensor parallel")
    args = p.parse_args()
    cfg = PRESETS[args.preset] if args.preset else json.load(open(args.config))
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    out = per_rank_bytes(cfg, args.tp, args.granularity, args.ep)
    gib = 2.0**30
    worst = max(r["fp8_layers"] + r["replicated_bf16"] for r in out["ranks"])
    r0 = out["ranks"][0]
    print(f"tp={args.tp}{', ep' if args.ep else ''}, {args.granularity} scales: per rank {worst / gib:.2f} GiB at most "
          f"(FP8 layers {r0['fp8_layers'] / gib:.2f} GiB + replicated bf16 {r0['replicated_bf16'] / gib:.2f} GiB on "
          f"rank 0); one device {out['single_device'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
