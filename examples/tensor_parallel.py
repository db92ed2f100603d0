"""Run an FP8 model across W processes with tensor parallelism (fp8kern.parallel), greedy-generate, print on rank 0.

    torchrun --nproc-per-node 8 examples/tensor_parallel.py --model /models/Llama-3.3-70B-Instruct-FP8   # 8 GPUs
    torchrun --nproc-per-node 2 examples/tensor_parallel.py      # 2 processes, a small random FP8 Llama (CPU ok)

With --model every rank reads only its shard of the planned layers from the files (from_pretrained(tp_size=W));
without, every rank builds the same random model, quantizes it and keeps its shard (shard_model). NCCL on GPUs
(one per process), gloo on the CPU.
"""

import argparse
import os

import torch
import torch.distributed as dist

import fp8kern


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="FP8 checkpoint directory; default: a small random Llama quantized here")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.model:
        model = fp8kern.from_pretrained(args.model, tp_size=world, device=device)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)  # the same model on every rank
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        fp8kern.quantize_model(model, "block128")
        fp8kern.parallel.shard_model(model, tp_size=world).to(device)
    ids = torch.arange(1, 9, device=device).reshape(1, 8)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if cuda else 'gloo'}): {out[0].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
