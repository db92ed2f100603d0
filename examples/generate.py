"""Quantize a Llama-shaped model with fp8kern, generate tokens, and compare with the bf16 model.

    python examples/generate.py                      # a small random-weight Llama (no download)
    python examples/generate.py --model DIR          # a local Hugging Face checkpoint (bf16, or FP8 via from_pretrained)

Runs on the GPU when there is one, otherwise on the CPU (fp8kern's reference path).
"""

import argparse
import copy

import torch

import fp8kern


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model directory; default: a random Llama-shaped model")
    p.add_argument("--scheme", default="dynamic_per_token", choices=sorted(fp8kern.nn.SCHEMES))
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.model is None:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
        ref = LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        try:
            fmt = fp8kern.detect_format(args.model)
        except ValueError:
            fmt = None
        if fmt is not None:  # an FP8 checkpoint: load it as it is, no bf16 reference to compare with
            model = fp8kern.from_pretrained(args.model, device=device)
            ids = torch.randint(0, model.config.vocab_size, (1, 8), device=device)
            print(model.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0].tolist())
            return
        ref = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    ref = ref.to(device).eval()
    fp8 = copy.deepcopy(ref)
    print(fp8kern.quantize_model(fp8, args.scheme, skip=("lm_head",)))

    ids = torch.randint(0, ref.config.vocab_size, (1, 8), device=device)
    with torch.no_grad():
        out_ref = ref.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:]
        out_fp8 = fp8.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:]
        lr, lf = ref(ids).logits.float(), fp8(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(lr.flatten(), lf.flatten(), dim=0).item()
    same = (out_ref == out_fp8).float().mean().item()
    print(f"bf16 tokens: {out_ref.tolist()}\nfp8  tokens: {out_fp8.tolist()}")
    print(f"prompt logits cosine similarity fp8 vs bf16: {cos:.5f}; generated tokens identical: {same:.0%}")


if __name__ == "__main__":
    main()
