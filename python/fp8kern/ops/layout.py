"""Scaling layouts: how scale_a and scale_b broadcast over a [M, K] and b [N, K], read from the scale shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._constants import BLOCK


@dataclass(frozen=True)
class Layout:
    """How scale_a and scale_b broadcast. a: 'tensor' | 'token' | 'group' (1x128); b: 'tensor' | 'channel' |
    'block' (128x128). 'group' and 'block' come together (the block-scaled layout)."""

    a: str
    b: str

    @property
    def name(self) -> str:
        """'tensor', 'token_channel' (any mix of per-tensor, per-token and per-channel) or 'block'."""
        if self.a == "group":
            return "block"
        return "tensor" if (self.a, self.b) == ("tensor", "tensor") else "token_channel"

    def a_block(self, M: int, K: int):
        return {"tensor": (M, K), "token": (1, K), "group": (1, BLOCK)}[self.a]

    def b_block(self, N: int, K: int):
        return {"tensor": (N, K), "channel": (1, K), "block": (BLOCK, BLOCK)}[self.b]


_BLOCK_LAYOUT = Layout("group", "block")  # infer_layout returns this instance: the hot path tests `is _BLOCK_LAYOUT`
# (scale_a per-tensor?, scale_b per-tensor?) -> layout; per-tensor wins where a shape fits two (same numbers).
_PLAIN_LAYOUTS = {(ta, tb): Layout("tensor" if ta else "token", "tensor" if tb else "channel")
                  for ta in (False, True) for tb in (False, True)}


def infer_layout(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> Layout:
    """The layout given by the scale shapes (a [M, K], b [N, K]); raises ValueError when they fit none.

    Shapes that fit two layouts (M=1, or K <= 128) mean the same numbers in both, so either choice is right.
    """
    M, K = a.shape
    N = b.shape[0]
    sa, sb = scale_a.shape, scale_b.shape
    # The common calls decide in a few comparisons (this runs on every call: host overhead).
    na, nb = len(sa), len(sb)
    a_tensor = na <= 2 and scale_a.numel() == 1
    b_tensor = nb <= 2 and scale_b.numel() == 1
    a_token = (na == 1 and sa[0] == M) or (na == 2 and sa[1] == 1 and sa[0] == M)
    b_channel = (nb == 1 and sb[0] == N) or (nb == 2 and sb[1] == 1 and sb[0] == N)
    G, GN = -(-K // BLOCK), -(-N // BLOCK)
    a_group = na == 2 and sa[0] == M and sa[1] == G
    b_block = nb == 2 and sb[0] == GN and sb[1] == G
    if a_group and b_block:  # first: where shapes also fit a plain layout, block allows more scale dtypes
        return _BLOCK_LAYOUT
    if (a_tensor or a_token) and (b_tensor or b_channel):
        return _PLAIN_LAYOUTS[a_tensor, b_tensor]
    sa, sb = tuple(sa), tuple(sb)
    if not (a_tensor or a_token or a_group):
        raise ValueError(
            f"scale_a has shape {sa}, which fits no layout for a of shape (M, K)=({M}, {K}); expected () or (1,) "
            f"per-tensor, ({M},) or ({M}, 1) per-token, or ({M}, {G}) per-1x128-group (block-scaled)")
    if not (b_tensor or b_channel or b_block):
        hint = (" (torch._scaled_mm's rowwise (1, N) scale_b: pass scale_b.reshape(-1))"
                if sb == (1, N) and N > 1 else "")
        raise ValueError(
            f"scale_b has shape {sb}, which fits no layout for b of shape (N, K)=({N}, {K}); expected () or (1,) "
            f"per-tensor, ({N},) or ({N}, 1) per-channel, or ({GN}, {G}) per-128x128-block{hint}")
    if b_tensor or b_channel:
        raise ValueError(
            f"scale_a of shape {sa} is per-1x128-group (block-scaled) but scale_b of shape {sb} is not per-128x128-"
            f"block; the block-scaled layout needs scale_b of shape ({GN}, {G})")
    raise ValueError(
        f"scale_b of shape {sb} is per-128x128-block but scale_a of shape {sa} is not per-1x128-group; the "
        f"block-scaled layout needs scale_a of shape ({M}, {G}) (fp8kern.quantize(x, granularity='group'))")
