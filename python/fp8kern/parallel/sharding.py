"""Exact slicing of quantized weights for tensor parallelism, for every scale layout and any shard size.

A column-parallel shard owns output rows [r0, r1) of W [N, K]; a row-parallel shard owns input columns [c0, c1).
Per-tensor scales stay whole, per-channel scales follow the rows. 128x128 block scales are where other engines
refuse (vLLM, SGLang: shard sizes must be multiples of 128) or go wrong (chunking the scale independently of the
weight): here each shard is laid on the *global* block grid. A column shard of rows [r0, r1) takes the scale rows
r0 // 128 .. ceil(r1 / 128) and is front-padded with r0 % 128 zero rows, so its local row i is global row
(r0 // 128) * 128 + i and sits in the block its scale says; the padded outputs are dropped. A row shard of columns
[c0, c1) takes the scale columns c0 // 128 .. ceil(c1 / 128) and front-pads c0 % 128 zero columns, in the weight
and in the activations, so the 1x128 activation groups line up with the weight blocks. Ranks that share a block
each hold a copy of its scale. The cost is fewer than 128 padded rows or columns per shard.
"""

from __future__ import annotations

import math

import torch

from .._constants import BLOCK


def split_bounds(n: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of n split into world shards on multiples of unit, sizes differing by at most
    one unit (the first n / unit % world shards take one more). n must be a multiple of unit."""
    if world < 1:
        raise ValueError(f"world={world}, expected >= 1")
    if n % unit:
        raise ValueError(f"n={n} is not a multiple of unit={unit}")
    units = n // unit
    base, extra = divmod(units, world)
    bounds, start = [], 0
    for r in range(world):
        size = (base + (r < extra)) * unit
        bounds.append((start, start + size))
        start += size
    return bounds


def block_pad(start: int) -> int:
    """The zero rows (or columns) a block-scaled shard starting at start puts in front to sit on the global grid."""
    return start % BLOCK


def block_range(start: int, end: int) -> slice:
    """The 128-blocks of the whole grid that rows (or columns) [start, end) touch: start // 128 .. ceil(end / 128),
    the scale rows (columns) a shard keeps and the 1x128 activation groups a row shard's slice falls in."""
    return slice(start // BLOCK, math.ceil(end / BLOCK))


def on_whole_grid(local: torch.Tensor, start: int, end: int, size: int) -> torch.Tensor:
    """Per-group values of a row shard of columns [start, end) (local [M, groups of block_range], e.g. activation
    amax) placed on the grid of all size columns, [M, ceil(size / 128)], zero in the other groups."""
    out = local.new_zeros(local.shape[0], math.ceil(size / BLOCK))
    out[:, block_range(start, end)] = local
    return out


def _check(granularity: str) -> None:
    if granularity not in ("tensor", "channel", "block"):
        raise ValueError(f"granularity={granularity!r}, expected 'tensor', 'channel' or 'block'")


def column_weight(rows: torch.Tensor, granularity: str, r0: int) -> torch.Tensor:
    """The local weight of a column shard from its rows [r0, r0 + len(rows)): front-padded onto the block grid."""
    _check(granularity)
    pad = block_pad(r0) if granularity == "block" else 0
    out = torch.zeros(pad + rows.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
    out[pad:] = rows
    return out


def column_scale(scale: torch.Tensor, granularity: str, r0: int, r1: int) -> torch.Tensor:
    """The local weight scale of the column shard owning rows [r0, r1)."""
    _check(granularity)
    if granularity == "tensor":
        return scale.clone()
    if granularity == "channel":
        return scale[r0:r1].clone()
    return scale[block_range(r0, r1)].clone()


def row_weight(cols: torch.Tensor, granularity: str, c0: int) -> torch.Tensor:
    """The local weight of a row shard from its columns [c0, c0 + cols.shape[1]): front-padded onto the grid."""
    _check(granularity)
    pad = block_pad(c0) if granularity == "block" else 0
    out = torch.zeros(cols.shape[0], pad + cols.shape[1], dtype=cols.dtype, device=cols.device)
    out[:, pad:] = cols
    return out


def row_scale(scale: torch.Tensor, granularity: str, c0: int, c1: int) -> torch.Tensor:
    """The local weight scale of the row shard owning columns [c0, c1)."""
    _check(granularity)
    if granularity in ("tensor", "channel"):
        return scale.clone()
    return scale[:, block_range(c0, c1)].clone()


def column_shard(weight: torch.Tensor, scale: torch.Tensor, granularity: str, r0: int, r1: int):
    """(weight rows, scale, pad) of the column-parallel shard owning output rows [r0, r1) of weight [N, K].
    granularity: 'tensor' (scale [1]), 'channel' (scale [N, 1]) or 'block' (scale [ceil(N/128), ceil(K/128)]).
    The returned weight has pad leading zero rows (block only) whose outputs the caller drops."""
    N = weight.shape[0]
    if not 0 <= r0 <= r1 <= N:
        raise ValueError(f"rows [{r0}, {r1}) are not inside [0, {N})")
    w = column_weight(weight[r0:r1], granularity, r0)
    return w, column_scale(scale, granularity, r0, r1), w.shape[0] - (r1 - r0)


def row_shard(weight: torch.Tensor, scale: torch.Tensor, granularity: str, c0: int, c1: int):
    """(weight columns, scale, pad) of the row-parallel shard owning input columns [c0, c1) of weight [N, K]. The
    returned weight has pad leading zero columns (block only); the caller front-pads its activations the same."""
    K = weight.shape[1]
    if not 0 <= c0 <= c1 <= K:
        raise ValueError(f"columns [{c0}, {c1}) are not inside [0, {K})")
    w = row_weight(weight[:, c0:c1], granularity, c0)
    return w, row_scale(scale, granularity, c0, c1), w.shape[1] - (c1 - c0)
