"""Tensor-parallel experts: every routed expert of a MoE layer on every rank, each rank holding the intermediate rows
[r0, r1) of all of them (the gate and up rows alike, and the matching down_proj columns), summed over the ranks.

The rows split near-equally (split_bounds), with no multiple-of-128 rule. Scales go with their rows and columns as
for dense layers (sharding.py): per-tensor whole, per-channel with the gate/up rows (down's whole), 128x128 blocks
on the whole grid: a shard keeps the blocks it touches. Its gate and up rows are stored unpadded and their GEMMs
are cut where the grid's blocks end; its down columns are front-padded with r0 % 128 zero columns, as a RowParallel
shard's are, and so are the activations (Fp8Experts' block_offset). Each rank computes its partial output in fp32
(its columns of every down projection, weighted and combined per token) and one fp32 all_reduce sums them.

The gate/up input is whole on every rank and quantized as on one device. With match_single_device (the default) the
down projection's dynamic input scale is one device's too: the amax per token, per 1x128 group (placed on the whole
grid) or per tensor is reduced with all_reduce(max) first, so every FP8 value equals the single-device layer's and
the output differs from it only in the summation order and the final rounding. Every rank routes every token the
same way, so an expert index outside [0, E] raises on every rank alike, before any collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..nn import Fp8Experts
from .sharding import block_pad, block_range, column_scale, on_whole_grid, row_scale, row_weight, split_bounds


def intermediate_rows(intermediate_size: int, size: int, rank: int, where: str = "experts") -> tuple[int, int]:
    """[r0, r1) of rank: the experts' intermediate rows split near-equally over size ranks."""
    if intermediate_size < size:
        raise ValueError(f"{where} has experts of intermediate size {intermediate_size}, fewer rows than the "
                         f"tensor-parallel size {size}; pass ep_size={size} to spread whole experts over the ranks "
                         "instead")
    return split_bounds(intermediate_size, size)[rank]


def shard_layout(granularity: str, r0: int, r1: int) -> dict:
    """The Fp8Experts arguments of the shard holding rows [r0, r1) (see Fp8Experts' block_offset)."""
    return {"intermediate_size": r1 - r0, "block_offset": block_pad(r0) if granularity == "block" else None}


def read_range(role: str, r0: int, r1: int) -> dict:
    """What a rank reads of one expert's stored weight: its rows of gate and up, its columns of down."""
    return {"cols": (r0, r1)} if role == "down" else {"rows": (r0, r1)}


def local_weight(role: str, part: torch.Tensor, granularity: str, r0: int) -> torch.Tensor:
    """The shard's weight of one projection from the rows / columns read (read_range): gate and up as read, down
    front-padded onto the block grid."""
    return row_weight(part, granularity, r0) if role == "down" else part


def local_scale(role: str, scale: torch.Tensor, granularity: str, r0: int, r1: int) -> torch.Tensor:
    """The shard's weight scale of one projection from the whole one."""
    return (row_scale if role == "down" else column_scale)(scale, granularity, r0, r1)


class TensorParallelExperts(nn.Module):
    """Rows [r0, r1) of the intermediate dimension (of intermediate_size) of every expert, summed over group.
    `local` is the shard, an Fp8Experts returning fp32 partial outputs."""

    def __init__(self, local: Fp8Experts, r0: int, r1: int, intermediate_size: int, group=None,
                 match_single_device: bool = True):
        super().__init__()
        self.local, self.rows, self.intermediate_size, self.group = local, (r0, r1), intermediate_size, group
        self.num_experts = local.num_experts
        self.match_single_device = match_single_device
        local.partial_sums = True
        local.amax_reduce = self._max_over_ranks if match_single_device and local.dynamic else None

    def _max_over_ranks(self, amax: torch.Tensor) -> torch.Tensor:
        """The whole down input's amax from this rank's (on the local grid: groups of block_range(r0, r1))."""
        if self.local.act_granularity != "group":
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
            return amax
        whole = on_whole_grid(amax, *self.rows, self.intermediate_size)
        dist.all_reduce(whole, op=dist.ReduceOp.MAX, group=self.group)
        return whole[:, block_range(*self.rows)]

    @classmethod
    def from_experts(cls, experts: Fp8Experts, r0: int, r1: int, group=None,
                     match_single_device: bool = True) -> "TensorParallelExperts":
        """The shard of whole experts in memory."""
        if not isinstance(experts, Fp8Experts) or experts.block_offset is not None:
            raise TypeError(f"tensor-parallel experts shard whole Fp8Experts, got {type(experts).__name__}")
        I = experts.intermediate_size
        if not 0 <= r0 < r1 <= I:
            raise ValueError(f"rows [{r0}, {r1}) are not a non-empty range inside [0, {I})")
        gran = "block" if experts.weight_granularity == "block" else "channel"  # 'tensor' is stored per channel
        local = Fp8Experts(experts.num_experts, experts.hidden_size, scheme=experts.scheme, act_fn=experts.act_fn,
                           weight_granularity=experts.weight_granularity, scale_format=experts.scale_format,
                           fast_accum=experts.fast_accum, device=experts.gate_up_weight.device,
                           **shard_layout(gran, r0, r1))
        with torch.no_grad():
            for e in range(experts.num_experts):
                for role in ("gate", "up", "down"):
                    w, s = experts.projection(e, role)
                    part = w[:, r0:r1] if role == "down" else w[r0:r1]
                    lw, ls = local.projection(e, role)
                    lw.copy_(local_weight(role, part, gran, r0))
                    ls.copy_(local_scale(role, s, gran, r0, r1))
            if not experts.dynamic:
                local.gate_up_input_scale.copy_(experts.gate_up_input_scale)
                local.down_input_scale.copy_(experts.down_input_scale)
        local.grouped = experts.grouped
        return cls(local, r0, r1, I, group, match_single_device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        y = self.local(hidden_states, top_k_index, top_k_weights)  # fp32 partial sums
        dist.all_reduce(y, group=self.group)
        return y.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"rows={self.rows} of {self.intermediate_size}"
