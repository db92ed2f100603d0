"""from_pretrained's tensor-parallel side: the planned layers become this rank's ColumnParallel / RowParallel
shells before any weight is read, and each of their tensors is read as the rank's slice only (safetensors
get_slice on contiguous rows or columns), then laid on the block grid as fp8kern.parallel.sharding says. Scales,
static input scales and row-parallel biases are small and read whole. MoE experts: this rank's share of each
experts module (fp8kern.parallel.plan_experts: whole experts with ep_size, else every expert's intermediate rows),
which the loader reads into an Fp8Experts of the share's shape and wrap_experts wraps."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import Fp8Linear
from ..nn import is_fused_experts
from ..parallel.experts import ExpertParallel
from ..parallel.layers import COLUMN_STYLES, shard_of
from ..parallel.plan import expert_parallel_of, group_of, plan_experts, plan_shards
from ..parallel.sharding import column_scale, column_weight, row_scale, row_weight
from ..parallel.tensor_parallel_experts import TensorParallelExperts


class TensorParallelLoad:
    """The planned layers of one rank: name -> (style, start, end, shell), and how their stored tensors land."""

    def __init__(self, tp_size, device_mesh, ep_size=None):
        import torch.distributed as dist

        self.group, self.size = group_of(tp_size, None, device_mesh)
        self.rank = dist.get_rank(self.group)
        self.expert_parallel = expert_parallel_of(ep_size, self.size)
        self.layers: dict[str, tuple] = {}
        self.experts: dict[str, tuple] = {}  # experts module name -> ((e0, e1), (r0, r1)) this rank holds

    def install(self, model: nn.Module, plan, match_single_device: bool) -> None:
        """Replace each planned (meta) layer by an empty shard of this rank's shape, on the meta device, after
        checking that every experts module splits (evenly by experts, or into non-empty row ranges)."""
        self.experts = {name: (e, r) for name, e, r in plan_experts(model, self.size, self.rank,
                                                                   self.expert_parallel)}
        for name, style, start, end in plan_shards(model, self.size, self.rank, plan):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            layer = getattr(owner, child)
            shell = shard_of(layer, style, start, end, self.size, self.group, match_single_device, empty=True)
            setattr(owner, child, shell)
            self.layers[name] = (style, start, end, shell, layer)

    def experts_share(self, name: str) -> tuple:
        """((e0, e1), (r0, r1)): the experts of module name this rank holds, and their intermediate rows."""
        return self.experts[name]

    def check_experts(self, model: nn.Module) -> None:
        """Before any weight is read: every experts module left is one the checkpoint stores in high precision,
        which neither tensor-parallel nor expert-parallel experts shard."""
        for name, m in model.named_modules():
            if is_fused_experts(m):
                raise ValueError(f"{name}: the checkpoint stores these experts in high precision; fp8kern.parallel "
                                 "shards FP8 experts (load without tp_size / ep_size, or quantize the experts)")

    def wrap_experts(self, model: nn.Module, loads: dict, match_single_device: bool = True) -> None:
        """Wrap each loaded experts module (this rank's share, see experts_share) in ExpertParallel or
        TensorParallelExperts. loads: experts module name -> the loader's record of it (experts, sizes)."""
        for name, load in loads.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            (e0, e1), (r0, r1) = self.experts[name]
            local = getattr(owner, child)
            setattr(owner, child, ExpertParallel(local, e0, e1, (e1 - e0) * self.size, self.group, match_single_device)
                    if self.expert_parallel else
                    TensorParallelExperts(local, r0, r1, load.sizes[1], self.group, match_single_device))

    def _range(self, name):
        style, start, end, _, _ = self.layers[name]
        return {"rows": (start, end)} if style in COLUMN_STYLES else {"cols": (start, end)}

    def weight_scale(self, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(model key, local value) of a planned Fp8Linear's weight scale (value: the whole converted scale)."""
        style, start, end, shell, layer = self.layers[name]
        cut = column_scale if style in COLUMN_STYLES else row_scale
        local = cut(value.reshape(layer.weight_scale.shape), layer.weight_granularity, start, end)
        return f"{name}.inner.weight_scale", local.reshape(shell.inner.weight_scale.shape)

    def fp8_weight(self, name: str, fmt, f, key: str, ckpt_module: str) -> tuple[str, torch.Tensor]:
        """(model key, local weight) of a planned Fp8Linear, reading only its rows or columns."""
        style, start, end, _, layer = self.layers[name]
        part = fmt.read_weight(f, key, ckpt_module, **self._range(name))
        pad = column_weight if style in COLUMN_STYLES else row_weight
        return f"{name}.inner.weight", pad(part, layer.weight_granularity, start)

    def plain(self, name: str, attr: str, f, key: str, dtype) -> tuple[str, torch.Tensor]:
        """(model key, local value) of a planned layer's weight (high precision layers) or bias."""
        style, start, end, shell, layer = self.layers[name]
        if attr == "bias":
            if style not in COLUMN_STYLES:  # added once, after the reduction: whole
                return f"{name}.bias", f.get_tensor(key).to(dtype)
            part = f.get_slice(key)[start:end].to(dtype)
            local = torch.zeros(shell.pad + end - start, dtype=dtype)
            local[shell.pad:] = part
            return f"{name}.inner.bias", local
        if attr != "weight" or isinstance(layer, Fp8Linear):
            raise ValueError(f"checkpoint tensor {key!r} fits nothing in the tensor-parallel {name}")
        sl = f.get_slice(key)
        part = sl[start:end] if style in COLUMN_STYLES else sl[:, start:end]
        return f"{name}.inner.weight", part.to(dtype)

    def input_scale_key(self, name: str) -> str:
        return f"{name}.inner.input_scale"
