"""Tensor-parallel shards computed in turn in one process, on the CPU and, where there is one, on the GPU: the W
ranks' column shards side by side, and the sum of the W row shards' fp32 partial products, against the float64
product of the single-device layer's operands. No process group: RowParallel.partial is the rank's work without
its collectives, fed the amax the all_reduce(max) would give.

Bound. The single-device operands are A (the input quantized as one device does it, dequantized) and B (the
dequantized weight); exact = A B^T (+ bias), S = |A| |B|^T. Each GEMM is within the bound of the path its device
takes for the layer's layout (fp8kern.ops.gemm.gemm_path), path_bound below:
- an FP8 GEMM (fp8kern's kernels, torch's) or an fp32 GEMM of the exact operands (the CPU's paths):
  test_gpu_scaled_mm.bound(fast=True), derived for an FP8 accumulation that never promotes, 2^-13 per 32 of K,
  which also covers fp32 accumulation (gamma_K, about K 2^-24);
- the dequantizing GEMM (a GPU with no FP8 GEMM for the layout, e.g. block scales until a family is verified):
  test_gemm_paths.dequant_bound. Its operands are not exact: each is dequantized in fp32 (one rounding, 2^-24)
  then rounded to the output dtype (u), so e = u + 2^-24 per operand and (2e + e^2) S for the product, plus the fp32
  accumulation gamma_K S, the bias' rounding u S and the output's u |D|. For bf16 out that is about 2^-7 S, which
  bound(fast=True) (about 2^-13 K/32 S) does not cover at small K with fp32 block scales (a UE8M0 scale is a power
  of two, so there the dequantized operands stay exact and both bounds hold).
Column shards: the path's bound (bf16 out, with the bias) on each output. Row shards: the W partials (fp32 out, no
bias) each within their path's bound, their fp32 sum adds W roundings (W 2^-24 S), the bias one more, and the cast
to bf16 2^-8 |exact| (plus the error above, below 2^-8 of itself).
"""

from __future__ import annotations

import pytest
import torch

import fp8kern
from fp8kern import reference
from fp8kern.ops import gemm
from fp8kern.parallel import ColumnParallel, RowParallel, split_bounds
from test_gemm_paths import dequant_bound
from test_gpu_scaled_mm import bound

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCHEMES = [("dynamic_per_token", "fp32"), ("dynamic_per_tensor", "fp32"), ("static_per_tensor", "fp32"),
           ("block128", "fp32"), ("block128", "ue8m0")]


def make_layer(n, k, scheme, scale_format, device, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.exp2(torch.rand(n, 1, generator=g) * 6 - 3))
        lin.bias.copy_(torch.randn(n, generator=g))
    x = (torch.randn(7, k, generator=g) * torch.exp2(torch.rand(1, k, generator=g) * 4 - 2)).to(torch.bfloat16)
    kw = {"scale_format": scale_format} if scheme == "block128" else {}
    static = {"input_scale": float(x.float().abs().max()) / 448 * 2} if scheme == "static_per_tensor" else {}
    layer = fp8kern.Fp8Linear.from_linear(lin.to(device), scheme, **static, **kw)
    return layer, x.to(device)


def operands(layer, x):
    """float64 A, B: the single-device layer's quantized input and weight, dequantized."""
    if layer.scheme == "block128":
        q, s = fp8kern.quantize(x, "group", scale_format=layer.scale_format)
        return (reference.dequantize(q.cpu(), s.cpu(), block_size=(1, 128)).double(),
                reference.dequantize(layer.weight.cpu(), layer.weight_scale.cpu(), block_size=(128, 128)).double())
    q, s = (fp8kern.quantize(x, layer.act_granularity) if layer.dynamic
            else fp8kern.quantize(x, "tensor", scale=layer.input_scale))
    return (reference.dequantize(q.cpu(), s.cpu()).double(),
            reference.dequantize(layer.weight.cpu(), layer.weight_scale.cpu()).double())


def path_bound(layer, device, out_dtype, bias):
    """bound(D, S, K) of the path scaled_mm takes for this layer's layout on `device` (module docstring)."""
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    path = gemm.gemm_path(dev, layer.scheme == "block128", out_dtype, bias is not None)
    if path == "dequant":
        return lambda D, S, K: dequant_bound(D, S, K, out_dtype, bias)
    return lambda D, S, K: bound(D, S, K, out_dtype, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,scale_format", SCHEMES)
@pytest.mark.parametrize("n,k", [(320, 192), (200, 330)])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_in_turn(device, scheme, scale_format, n, k, world):
    layer, x = make_layer(n, k, scheme, scale_format, device, seed=n + k + world)
    A, B = operands(layer, x)
    bias = layer.bias.double().cpu()
    exact, S = A @ B.T + bias, A.abs() @ B.abs().T

    with torch.no_grad():
        cols = [ColumnParallel.from_layer(layer, r0, r1)(x) for r0, r1 in split_bounds(n, world)]
    y = torch.cat(cols, dim=1).double().cpu()
    lim = torch.from_numpy(path_bound(layer, device, torch.bfloat16, bias)(exact.numpy(), S.numpy(), k))
    assert bool(((y - exact).abs() <= lim).all()), f"column shards: {float(((y - exact).abs() - lim).max())} over"

    shards = [RowParallel.from_layer(layer, c0, c1) for c0, c1 in split_bounds(k, world)]
    parts = [x[:, c0:c1] for c0, c1 in split_bounds(k, world)]
    with torch.no_grad():
        amax = None
        if shards[0].syncs_scales():  # what all_reduce(max) gives every rank
            amax = torch.stack([sh.local_amax(p) for sh, p in zip(shards, parts)]).amax(dim=0)
        partials = [sh.partial(p, amax) for sh, p in zip(shards, parts)]
    total = sum(partials) + layer.bias.float()
    y = total.to(torch.bfloat16).double().cpu()
    part_bound = path_bound(layer, device, torch.float32, None)
    lim = sum(torch.from_numpy(part_bound((A[:, c0:c1] @ B[:, c0:c1].T).numpy(),
                                          (A[:, c0:c1].abs() @ B[:, c0:c1].abs().T).numpy(), c1 - c0))
              for c0, c1 in split_bounds(k, world))
    lim = (lim + (world + 1) * 2.0**-24 * (S + bias.abs())) * (1 + 2.0**-8) + 2.0**-8 * exact.abs() + 2.0**-133
    assert bool(((y - exact).abs() <= lim).all()), f"row shards: {float(((y - exact).abs() - lim).max())} over"
