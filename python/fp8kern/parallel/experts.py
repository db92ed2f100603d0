"""Expert parallelism: the routed experts of a MoE layer spread over the ranks, E / W each.

Every rank routes every token (the router is replicated), runs only its own experts (tokens routed to another
rank's expert go to the no-expert index and add nothing), and the partial outputs are summed with one fp32
all_reduce. With dynamic per-tensor activations and match_single_device, the down projection's input amax is
reduced with max over the ranks first (one more small all_reduce), so each expert sees one device's scale. An
expert index outside [0, E] still reaches the local experts as an invalid index, so it raises (or gives a NaN row
on the grouped path) as it does on one device, never a silently missing term.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..nn import Fp8Experts

_EXPERT_BUFFERS = ("gate_up_weight", "gate_up_scale", "down_weight", "down_scale", "gate_up_input_scale",
                   "down_input_scale")


def expert_range(num_experts: int, size: int, rank: int, where: str = "experts") -> tuple[int, int]:
    """[e0, e1) of rank: num_experts must split evenly (every rank the same GEMM sizes and memory)."""
    if num_experts % size:
        raise ValueError(f"{where} has {num_experts} experts, not divisible by ep_size={size}; use an ep_size that "
                         "divides the number of experts")
    per = num_experts // size
    return rank * per, (rank + 1) * per


def local_experts(experts: Fp8Experts, num_local: int, device) -> Fp8Experts:
    """An empty Fp8Experts like experts with num_local experts."""
    return Fp8Experts(num_local, experts.hidden_size, experts.intermediate_size, experts.scheme,
                      act_fn=experts.act_fn, weight_granularity=experts.weight_granularity,
                      scale_format=experts.scale_format, fast_accum=experts.fast_accum, device=device)


class ExpertParallel(nn.Module):
    """This rank's experts [e0, e1) of a MoE layer with num_experts experts, summed over group."""

    def __init__(self, local: Fp8Experts, e0: int, e1: int, num_experts: int, group=None,
                 match_single_device: bool = True):
        super().__init__()
        self.local, self.experts, self.num_experts, self.group = local, (e0, e1), num_experts, group
        self.match_single_device = match_single_device
        # Dynamic per-tensor activations: the down projection's input scale from every rank's rows, as on one device
        # (per-token and per-group scales depend only on the row, which is whole on its rank)
        per_tensor = local.dynamic and local.act_granularity == "tensor"
        local.amax_reduce = self._max_over_ranks if match_single_device and per_tensor else None

    def _max_over_ranks(self, amax: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    @classmethod
    def from_experts(cls, experts: Fp8Experts, e0: int, e1: int, group=None,
                     match_single_device: bool = True) -> "ExpertParallel":
        if not isinstance(experts, Fp8Experts):
            raise TypeError(f"expert parallelism shards Fp8Experts, got {type(experts).__name__}")
        local = local_experts(experts, e1 - e0, experts.gate_up_weight.device)
        with torch.no_grad():
            for name in _EXPERT_BUFFERS:
                src = getattr(experts, name)
                if src is not None:
                    getattr(local, name).copy_(src[e0:e1])
        local.grouped = experts.grouped
        return cls(local, e0, e1, experts.num_experts, group, match_single_device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        e0, e1 = self.experts
        idx = top_k_index.long()
        mine = (idx >= e0) & (idx < e1)
        valid = (idx >= 0) & (idx <= self.num_experts)
        local = torch.where(mine, idx - e0, torch.where(valid, torch.full_like(idx, e1 - e0), torch.full_like(idx, -1)))
        y = self.local(hidden_states, local, top_k_weights).float()
        dist.all_reduce(y, group=self.group)
        return y.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts} of {self.num_experts}"
