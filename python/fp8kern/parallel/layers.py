"""Tensor-parallel Linear layers: each rank holds its shard (sharding.py) of an Fp8Linear or nn.Linear, and the
layer does its own collective through torch.distributed.

ColumnParallel: the input is whole on every rank; the rank computes its output rows [r0, r1) and returns them
(no collective: the next layer is row parallel, or attention over the rank's own heads).
RowParallel: the input is the rank's slice [c0, c1) of the features; each rank computes a partial product in fp32,
the partials are summed with one all_reduce in fp32, then the bias is added once and the result cast. With
match_single_device (the default) the dynamic activation scales are the single-device ones: each rank's amax per
token (per tensor, per 1x128 group) is reduced with an all_reduce(max) before quantizing, so every FP8 value equals
the single-device model's and the result differs from it only in the fp32 summation order. Without it each rank
scales its own slice (one collective fewer, results a little further from one device's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from .._constants import E8M0
from ..nn import Fp8Linear
from .sharding import block_pad, block_range, column_shard, on_whole_grid, row_shard, split_bounds


def _local_fp8(layer: Fp8Linear, in_features: int, out_features: int, bias: bool, device) -> Fp8Linear:
    """An Fp8Linear of layer's scheme and local shape (uninitialized values on device, which may be 'meta')."""
    dtype = layer.bias.dtype if layer.bias is not None else torch.bfloat16
    return Fp8Linear(in_features, out_features, bias, layer.scheme, weight_granularity=layer.weight_granularity,
                     scale_format=layer.scale_format, fast_accum=layer.fast_accum, device=device, dtype=dtype)


def _local_linear(layer: nn.Linear, in_features: int, out_features: int, bias: bool, device) -> nn.Linear:
    local = nn.Linear(in_features, out_features, bias, device=device, dtype=layer.weight.dtype)
    return local.requires_grad_(False)


def _local(layer: nn.Module, in_features: int, out_features: int, bias: bool, device) -> nn.Module:
    if isinstance(layer, Fp8Linear):
        return _local_fp8(layer, in_features, out_features, bias, device)
    if isinstance(layer, nn.Linear):
        return _local_linear(layer, in_features, out_features, bias, device)
    raise TypeError(f"tensor parallelism shards an Fp8Linear or nn.Linear, got {type(layer).__name__}")


@torch.no_grad()
def _fill(inner: nn.Module, layer: nn.Module, plain_cut, shard, start: int, end: int) -> None:
    """Copy layer's shard [start, end) into the empty local inner: plain_cut for a high-precision weight, shard
    (column_shard / row_shard) for an FP8 weight and its scale; a static input scale whole."""
    gran = _granularity(layer)
    if gran is None:
        inner.weight.copy_(plain_cut(layer.weight))
        return
    w, scale, _ = shard(layer.weight, layer.weight_scale, gran, start, end)
    inner.weight.copy_(w)
    inner.weight_scale.copy_(scale.reshape(inner.weight_scale.shape))
    if not layer.dynamic:
        inner.input_scale.copy_(layer.input_scale)


def _granularity(layer: nn.Module):
    return layer.weight_granularity if isinstance(layer, Fp8Linear) else None


class ColumnParallel(nn.Module):
    """The column-parallel shard (output rows [r0, r1)) of an Fp8Linear or nn.Linear: `inner` holds the local
    weight, front-padded with `pad` zero rows for block scales (see sharding.py), and the matching bias slice.
    gather: every rank's [r0, r1) in rank order to all_gather the whole output (the plan style
    'colwise_gather_output', for fused projections such as qkv_proj or gate_up_proj), or None to return the rank's
    rows."""

    def __init__(self, inner: nn.Module, r0: int, r1: int, pad: int, in_features: int, gather=None, group=None):
        super().__init__()
        self.inner, self.rows, self.pad, self.gather, self.group = inner, (r0, r1), pad, gather, group
        self.in_features = in_features
        self.out_features = gather[-1][1] if gather else r1 - r0

    @classmethod
    def empty(cls, layer: nn.Module, r0: int, r1: int, device="meta", gather=None, group=None) -> "ColumnParallel":
        """The shard's shape with uninitialized tensors (from_pretrained fills them from the files)."""
        pad = block_pad(r0) if _granularity(layer) == "block" else 0
        inner = _local(layer, layer.in_features, pad + r1 - r0, layer.bias is not None, device)
        return cls(inner, r0, r1, pad, layer.in_features, gather, group)

    @classmethod
    def from_layer(cls, layer: nn.Module, r0: int, r1: int, gather=None, group=None) -> "ColumnParallel":
        """The shard of a whole layer in memory."""
        out = cls.empty(layer, r0, r1, device=layer.weight.device, gather=gather, group=group)
        _fill(out.inner, layer, lambda w: w[r0:r1], column_shard, r0, r1)
        if layer.bias is not None:
            with torch.no_grad():
                out.inner.bias.zero_()
                out.inner.bias[out.pad:] = layer.bias.detach()[r0:r1]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        y = y[..., self.pad:].contiguous() if self.pad else y  # attention views the result per head
        if not self.gather:
            return y
        width = max(e - s for s, e in self.gather)  # all_gather takes equal sizes: pad, gather, cut
        y = F.pad(y, (0, width - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in self.gather]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat([p[..., : e - s] for p, (s, e) in zip(parts, self.gather)], dim=-1)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, pad={self.pad}" + (", gather_output=True" if self.gather else "")


class RowParallel(nn.Module):
    """The row-parallel shard (input columns [c0, c1)) of an Fp8Linear or nn.Linear, reduced over group: `inner`
    holds the local weight (front-padded with `pad` zero columns for block scales) without bias; `bias` is the
    whole bias, added once after the reduction."""

    def __init__(self, inner: nn.Module, bias, c0: int, c1: int, pad: int, full_in_features: int, group=None,
                 match_single_device: bool = True, split_input: bool = False):
        super().__init__()
        self.inner, self.bias, self.cols, self.pad = inner, bias, (c0, c1), pad
        self.group, self.match_single_device, self.full_in_features = group, match_single_device, full_in_features
        self.split_input = split_input  # the plan style 'rowwise_split_input': the whole input arrives, cut here
        self.in_features = full_in_features if split_input else c1 - c0
        self.out_features = inner.out_features

    @classmethod
    def empty(cls, layer: nn.Module, c0: int, c1: int, group=None, match_single_device: bool = True,
              device="meta", split_input: bool = False) -> "RowParallel":
        pad = block_pad(c0) if _granularity(layer) == "block" else 0
        inner = _local(layer, pad + c1 - c0, layer.out_features, False, device)
        bias = None
        if layer.bias is not None:
            bias = nn.Parameter(torch.empty(layer.out_features, dtype=layer.bias.dtype, device=device),
                                requires_grad=False)
        return cls(inner, bias, c0, c1, pad, layer.in_features, group, match_single_device, split_input)

    @classmethod
    def from_layer(cls, layer: nn.Module, c0: int, c1: int, group=None, match_single_device: bool = True,
                   split_input: bool = False) -> "RowParallel":
        out = cls.empty(layer, c0, c1, group, match_single_device, device=layer.weight.device,
                        split_input=split_input)
        _fill(out.inner, layer, lambda w: w[:, c0:c1], row_shard, c0, c1)
        if layer.bias is not None:
            with torch.no_grad():
                out.bias.copy_(layer.bias)
        return out

    def syncs_scales(self) -> bool:
        """Whether forward reduces the activation amax over the ranks (dynamic FP8 layers, match_single_device)."""
        return isinstance(self.inner, Fp8Linear) and self.inner.dynamic and self.match_single_device

    def local_amax(self, x2: torch.Tensor) -> torch.Tensor:
        """The amax of this rank's slice x2 [M, c1 - c0] on the whole input's scale grid: [M, 1] per token, [1, 1]
        per tensor, [M, ceil(K / 128)] per 1x128 group (zero outside this rank's groups), so that the max over the
        ranks is the whole input's amax."""
        gran, M = self.inner.act_granularity, x2.shape[0]
        if gran == "token":
            return reference.activation_amax(x2.detach(), gran) if x2.shape[1] else x2.new_zeros(M, 1).float()
        if gran == "tensor":
            return reference.activation_amax(x2.detach(), gran).reshape(1, 1)
        local = reference.activation_amax(F.pad(x2.detach(), (self.pad, 0)), gran)
        return on_whole_grid(local, *self.cols, self.full_in_features)

    def partial(self, x2: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's fp32 partial product of its 2-D input slice x2 [M, c1 - c0], no collective. amax: the whole
        input's amax on the grid local_amax describes (the max of every rank's local_amax), for dynamic FP8
        layers quantized as one device would; None quantizes the slice on its own."""
        inner = self.inner
        if isinstance(inner, nn.Linear):
            return x2.float() @ inner.weight.float().T
        if self.pad:
            x2 = F.pad(x2, (self.pad, 0))
        if not inner.dynamic:
            q, s = ops.quantize(x2, "tensor", scale=inner.input_scale)
        elif amax is not None:
            gran = inner.act_granularity
            if gran == "group":
                amax = amax[:, block_range(*self.cols)]
            ue8m0 = inner.scale_format == "ue8m0"
            s = reference.scale_from_amax(amax, None, ue8m0)  # the rule dynamic quantization applies
            if gran == "tensor":
                s = s.reshape(1)
            q, _ = ops.quantize(x2, gran, scale=s)
            if ue8m0:
                s = s.to(E8M0)
        else:
            q, s = ops.quantize(x2, inner.act_granularity, scale_format=inner.scale_format)
        return ops.scaled_mm(q, inner.weight, s, inner.weight_scale, out_dtype=torch.float32,
                             fast_accum=inner.fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"RowParallel: input has {x.shape[-1]} features, expected "
                             f"{'all' if self.split_input else 'this rank' + chr(39) + 's'} {self.in_features} "
                             f"(columns {self.cols} of {self.full_in_features})")
        if self.split_input:
            x = x[..., self.cols[0]:self.cols[1]]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        amax = None
        if self.syncs_scales():
            amax = self.local_amax(x2)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        y = self.partial(x2, amax)
        dist.all_reduce(y, group=self.group)  # fp32 partial sums
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"cols={self.cols}, pad={self.pad}, match_single_device={self.match_single_device}"
                + (", split_input=True" if self.split_input else ""))


COLUMN_STYLES = ("colwise", "colwise_gather_output")
ROW_STYLES = ("rowwise", "rowwise_split_input")


def shard_of(layer: nn.Module, style: str, start: int, end: int, size: int, group=None,
             match_single_device: bool = True, empty: bool = False) -> nn.Module:
    """The ColumnParallel / RowParallel shard [start, end) of layer for a plan style; empty: on the meta device,
    to be filled from the files."""
    if style in COLUMN_STYLES:
        gather = split_bounds(layer.out_features, size) if style == "colwise_gather_output" else None
        return (ColumnParallel.empty(layer, start, end, gather=gather, group=group) if empty else
                ColumnParallel.from_layer(layer, start, end, gather=gather, group=group))
    split = style == "rowwise_split_input"
    return (RowParallel.empty(layer, start, end, group, match_single_device, split_input=split) if empty else
            RowParallel.from_layer(layer, start, end, group, match_single_device, split_input=split))
