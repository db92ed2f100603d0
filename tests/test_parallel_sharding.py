"""fp8kern.parallel.sharding without processes: for many (N, K, W) and every scale layout, each rank's dequantized
shard is exactly the matching slice of the dequantized full weight (the padding rows / columns are zero and are
the only extra), and the shards cover the weight once."""

from __future__ import annotations

import itertools

import pytest
import torch

import fp8kern
from fp8kern.parallel import column_shard, row_shard, split_bounds

SHAPES = [(160, 96), (320, 160), (384, 256), (130, 300), (257, 129), (96, 512), (1000, 72)]
WORLDS = [1, 2, 3, 4, 5, 8]
LAYOUTS = [("tensor", "fp32"), ("channel", "fp32"), ("block", "fp32"), ("block", "ue8m0")]


def deq(q, s, granularity):
    """float64 q * s with each element's own scale (per tensor, per row, or its 128x128 block)."""
    n, k = q.shape
    S = s.double()
    if granularity == "block":
        S = S[(torch.arange(n) // 128)[:, None], (torch.arange(k) // 128)[None, :]]
    return q.double() * S.reshape(-1, 1) if granularity == "channel" else q.double() * S


def quantized(n, k, granularity, scale_format, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.rand(n, 1, generator=g) * 8 - 4)
    return fp8kern.quantize_weight(w, granularity, scale_format=scale_format)


def test_split_bounds():
    for n, world, unit in itertools.product([1, 7, 96, 320, 1000], [1, 2, 3, 4, 7], [1]):
        if n < world:
            continue
        b = split_bounds(n, world, unit)
        sizes = [e - s for s, e in b]
        assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(world - 1))
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert split_bounds(160, 4, 40) == [(0, 40), (40, 80), (80, 120), (120, 160)]
    b = split_bounds(240, 4, 40)  # 6 heads of 40 over 4 ranks: 2, 2, 1, 1 heads
    assert b == [(0, 80), (80, 160), (160, 200), (200, 240)]
    with pytest.raises(ValueError, match="not a multiple of unit"):
        split_bounds(100, 2, 40)


@pytest.mark.parametrize("granularity,scale_format", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_column_shards_are_exact_slices(shape, granularity, scale_format):
    n, k = shape
    q, s = quantized(n, k, granularity, scale_format, seed=n * k)
    full = deq(q, s, granularity)
    for world in WORLDS:
        covered = torch.zeros(n, dtype=torch.int32)
        for r0, r1 in split_bounds(n, world):
            wl, sl, pad = column_shard(q, s, granularity, r0, r1)
            assert pad == (r0 % 128 if granularity == "block" else 0)
            assert wl.dtype == q.dtype and sl.dtype == s.dtype and wl.shape == (pad + r1 - r0, k)
            if granularity == "block":  # the local scale grid is the global one's rows that the shard touches
                assert sl.shape == (-(-(pad + r1 - r0) // 128), s.shape[1])
            local = deq(wl, sl, granularity)
            assert not bool(local[:pad].any()), (world, r0, r1)
            assert torch.equal(local[pad:], full[r0:r1]), (world, r0, r1)
            covered[r0:r1] += 1
        assert bool((covered == 1).all())


@pytest.mark.parametrize("granularity,scale_format", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_shards_are_exact_slices(shape, granularity, scale_format):
    n, k = shape
    q, s = quantized(n, k, granularity, scale_format, seed=n + k)
    full = deq(q, s, granularity)
    for world in WORLDS:
        if k < world:
            continue
        for c0, c1 in split_bounds(k, world):
            wl, sl, pad = row_shard(q, s, granularity, c0, c1)
            assert wl.shape == (n, pad + c1 - c0)
            local = deq(wl, sl, granularity)
            assert not bool(local[:, :pad].any())
            assert torch.equal(local[:, pad:], full[:, c0:c1]), (world, c0, c1)


def test_row_shards_sum_to_the_product():
    """The row-parallel partial products, each with its shard's activations front-padded like its weight, add up
    to the full product: the 1x128 activation groups line up with the weight blocks (float64, so only the order of
    the sum differs)."""
    n, k = 200, 330
    q, s = quantized(n, k, "block", "fp32", seed=5)
    x = torch.randn(7, k, dtype=torch.float64)
    ref = x @ deq(q, s, "block").T
    for world in (2, 3, 4):
        total = torch.zeros_like(ref)
        for c0, c1 in split_bounds(k, world):
            wl, sl, pad = row_shard(q, s, "block", c0, c1)
            xl = torch.nn.functional.pad(x[:, c0:c1], (pad, 0))
            total += xl @ deq(wl, sl, "block").T
        torch.testing.assert_close(total, ref, rtol=1e-12, atol=1e-12)


def test_bad_bounds():
    q, s = quantized(64, 64, "channel", "fp32", seed=1)
    with pytest.raises(ValueError, match=r"rows \[10, 70\) are not inside \[0, 64\)"):
        column_shard(q, s, "channel", 10, 70)
    with pytest.raises(ValueError, match="granularity='group'"):
        row_shard(q, s, "group", 0, 8)
