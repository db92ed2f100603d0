"""fp8kern-dequantize: turn an FP8 checkpoint (any format fp8kern.checkpoints reads) into a BF16 one.

    fp8kern-dequantize --input Qwen3-8B-FP8 --output Qwen3-8B-bf16 [--verify Qwen3-8B]
    python -m fp8kern.dequantize --input ... --output ...

Shards are processed one at a time (memory holds one shard plus every scale tensor, which are small), written with
the same names and an updated model.safetensors.index.json. FP8 weights become BF16 through the format's own scale
convention (fp8kern.checkpoints, the same code the loader uses); scale tensors are dropped; other tensors are kept
as stored. config.json loses quantization_config; other non-safetensors files are copied.
--verify ORIGINAL_DIR compares each written tensor with the original model's: cosine similarity and relative
error ||a - b|| / ||b||, as a table and a summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch

from .checkpoints.common import (CONFIG_NAME, INDEX_NAME, ZERO_POINT, check_scaled_weights_quantized, check_zero_point,
                                 open_shard, progress, read_header, read_weight_scales, require, shard_files)
from .checkpoints.loader import FORMATS, open_format


def dequantize_checkpoint(src: str, dst: str, format: str = "auto") -> list[str]:
    """Write the BF16 version of checkpoint src to dst; returns the shard names written."""
    save_file = require("safetensors.torch", "safetensors").save_file
    config, header, fmt = open_format(src, format)
    check_scaled_weights_quantized(src, fmt)
    quantized = fmt.quantized_modules()
    scales = read_weight_scales(src, fmt, quantized)
    # Dropped: every scale of a quantized module, and KV-cache scales (the output has no quantized KV cache).
    scale_keys = {k for k in header if fmt.kv_cache_scale(k) or ((hit := fmt.split(k)) is not None
                                                                 and hit[0] in quantized and hit[1] != "weight")}
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--output {dst!r} is the --input directory; pass a new directory")
    os.makedirs(dst, exist_ok=True)
    weight_map, total = {}, 0
    shards = shard_files(src)
    for shard in progress(shards, desc=f"Dequantizing {fmt.name} checkpoint"):
        out = {}
        with open_shard(src, shard) as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                if key in scale_keys:
                    hit = fmt.split(key)
                    if hit is not None and hit[1] == ZERO_POINT:  # dropped, but checked as the loader checks it
                        check_zero_point(f.get_tensor(key), key, shard)
                    continue
                t = f.get_tensor(key)
                hit = fmt.split(key)
                if hit is not None and hit[0] in quantized and hit[1] == "weight":
                    key = f"{hit[0]}.weight"  # the unquantized model's name (e.g. for torchao's _weight_qdata)
                    t = fmt.dequantize_weight(hit[0], t, scales[hit[0]]).to(torch.bfloat16)
                out[key] = t
                weight_map[key] = shard
                total += t.numel() * t.element_size()
        save_file(out, os.path.join(dst, shard), metadata={**metadata, "format": "pt"})
        del out
    if os.path.isfile(os.path.join(src, INDEX_NAME)) or len(shards) > 1:
        with open(os.path.join(dst, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    config = dict(config)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if os.path.isfile(p) and not name.endswith(".safetensors") and name not in (CONFIG_NAME, INDEX_NAME):
            shutil.copy2(p, os.path.join(dst, name))
    return shards


def _compare(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of flat tensors a (dequantized) and b (original), accumulated in
    float64 over chunks so memory stays at a few chunks, not 8 bytes per element of a whole embedding."""
    ab = aa = bb = dd = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        ab, aa, bb = ab + float(x @ y), aa + float(x @ x), bb + float(y @ y)
        dd += float((x - y).square().sum())
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na > 0 and nb > 0:
        cos = ab / (na * nb)
    else:
        cos = float(torch.equal(a, b))
    rel = math.sqrt(dd) / nb if nb > 0 else math.sqrt(dd)
    return cos, rel


def verify(dequantized: str, original: str, out=None) -> list[tuple]:
    """Per tensor of dequantized also in original: (name, cosine, relative error ||a - b|| / ||b||), in float64.
    Prints a table and a summary line to out (default sys.stdout)."""
    out = out if out is not None else sys.stdout
    safe_open = require("safetensors").safe_open
    orig = read_header(original)
    rows, absent = [], []
    handles = {}
    try:
        for shard in progress(shard_files(dequantized), desc="Verifying"):
            with safe_open(os.path.join(dequantized, shard), framework="pt") as f:
                for key in f.keys():
                    if key not in orig:
                        absent.append(key)
                        continue
                    o = orig[key].shard
                    if o not in handles:
                        handles[o] = safe_open(os.path.join(original, o), framework="pt").__enter__()
                    a, b = f.get_tensor(key), handles[o].get_tensor(key)
                    if a.shape != b.shape:
                        raise ValueError(f"{key}: dequantized shape {tuple(a.shape)} != original {tuple(b.shape)}")
                    rows.append((key, *_compare(a.flatten(), b.flatten())))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    width = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'cosine':>10}  {'rel_error':>10}", file=out)
    for key, cos, rel in rows:
        print(f"{key:<{width}}  {cos:10.6f}  {rel:10.6f}", file=out)
    if rows:
        worst_cos, worst_rel = min(rows, key=lambda r: r[1]), max(rows, key=lambda r: r[2])
        print(f"verified {len(rows)} tensors: min cosine {worst_cos[1]:.6f} ({worst_cos[0]}), max rel error "
              f"{worst_rel[2]:.6f} ({worst_rel[0]})" + (f"; not in the original: {absent}" if absent else ""), file=out)
    else:
        print(f"verified 0 tensors: none of {absent} is in the original {original!r}", file=out)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fp8kern-dequantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="FP8 checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--output", required=True, help="directory to write the BF16 checkpoint to")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="checkpoint format (default: detect it)")
    p.add_argument("--verify", metavar="ORIGINAL_DIR", help="compare the output with this unquantized checkpoint")
    args = p.parse_args(argv)
    dequantize_checkpoint(args.input, args.output, args.format)
    if args.verify:
        verify(args.output, args.verify)
    return 0


if __name__ == "__main__":
    sys.exit(main())
