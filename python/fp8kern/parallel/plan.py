"""shard_model: turn a model in memory (from_pretrained, quantize_model, or one built by hand) into this rank's
tensor-parallel shard, following the model's tensor-parallel plan (transformers' config.base_model_tp_plan, or one
given as a dict).

Plan styles read: 'colwise' (ColumnParallel), 'rowwise' (RowParallel), 'colwise_gather_output' and
'rowwise_split_input' (the same, with the output all-gathered and the whole input cut by the layer: fused
projections such as Phi-3's qkv_proj and gate_up_proj, whose parts are not contiguous per rank), and
'replicated_with_grad_allreduce' (kept whole: per-head norms). Attention projections of the 'colwise' /
'rowwise' styles split on head boundaries (q/o by attention heads, k/v by KV heads), everything else on any row
or column: block-scaled shards that are not multiples of 128 are exact (sharding.py). Embeddings, norms and
lm_head stay whole on every rank, so every rank returns the full logits. MoE routed experts, named by the plan or
not: tensor parallel (tensor_parallel_experts.py: every expert's intermediate rows split over the ranks), or with
ep_size expert parallel (experts.py: whole experts spread over the ranks). Everything is checked before the model
is touched.
"""

from __future__ import annotations

import re

import torch.distributed as dist
from torch import nn

from ..nn import Fp8Experts, Fp8Linear, is_fused_experts
from .experts import ExpertParallel, expert_range
from .layers import COLUMN_STYLES, ROW_STYLES, shard_of
from .sharding import split_bounds
from .tensor_parallel_experts import TensorParallelExperts, intermediate_rows

STYLES = COLUMN_STYLES + ROW_STYLES + ("replicated_with_grad_allreduce",)
_MOE_STYLES = ("packed_colwise", "moe_tp_experts", "ep_router", "grouped_gemm")


def group_of(tp_size, group, device_mesh):
    """(process group, its size), checked against tp_size / device_mesh."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fp8kern.parallel needs an initialized default process group: launch with torchrun (or "
                           "another launcher) and call torch.distributed.init_process_group first")
    if device_mesh is not None:
        if group is not None:
            raise ValueError("pass either group or device_mesh, not both")
        if device_mesh.ndim != 1:
            raise ValueError(f"device_mesh has {device_mesh.ndim} dimensions; pass the 1-D tensor-parallel mesh "
                             "(e.g. mesh['tp'])")
        group = device_mesh.get_group()
    size = dist.get_world_size(group)
    if tp_size is not None and tp_size != size:
        raise ValueError(f"tp_size={tp_size} but the process group{' of device_mesh' if device_mesh else ''} has "
                         f"{size} ranks; launch {tp_size} processes (torchrun --nproc-per-node {tp_size}) or pass a "
                         "group / mesh of that size")
    return group, size


def _pattern(key: str) -> re.Pattern:
    return re.compile(r"(?:^|.*\.)" + re.escape(key).replace(r"\*", r"\d+") + "$")


def _heads(config, name: str):
    """(heads, head_dim) a projection of attention splits on, or None for a projection split anywhere."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if heads is None or ".self_attn." not in f".{name}":
        return None
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("k_proj", "v_proj"):
        return kv, head_dim, "num_key_value_heads"
    return heads, head_dim, "num_attention_heads"


def plan_shards(model: nn.Module, size: int, rank: int, plan: dict | None = None) -> list[tuple]:
    """[(module name, style, start, end)] of this rank for model's tensor-parallel plan (default
    its config's base_model_tp_plan); reads only module types and shapes (works on the meta device) and raises
    for anything it cannot shard exactly. MoE experts modules are left to plan_experts, whatever the plan says."""
    config = getattr(model, "config", None)
    if plan is None:
        plan = getattr(config, "base_model_tp_plan", None)
        if not plan:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (config.base_model_tp_plan); pass "
                             "plan={'layers.*.self_attn.q_proj': 'colwise', ...}")
    rules = [(_pattern(k), v) for k, v in plan.items()]
    todo = []
    for name, module in model.named_modules():
        styles = {v for p, v in rules if p.match(name)}
        if not styles:
            continue
        if len(styles) > 1:
            raise ValueError(f"plan gives {name} several styles: {sorted(styles)}")
        style = styles.pop()
        if isinstance(module, Fp8Experts) or is_fused_experts(module):
            continue
        if style in _MOE_STYLES:
            raise ValueError(f"{name}: plan style {style!r} applies to MoE experts modules (3-D gate_up_proj and "
                             f"down_proj), not to {type(module).__name__}")
        if style not in STYLES:
            raise ValueError(f"{name}: plan style {style!r} is not one fp8kern.parallel reads: {STYLES}")
        if style == "replicated_with_grad_allreduce":
            continue
        if not isinstance(module, (Fp8Linear, nn.Linear)):
            raise TypeError(f"{name}: plan style {style!r} applies to Linear layers, got {type(module).__name__}")
        n = module.out_features if style in COLUMN_STYLES else module.in_features
        # Head boundaries matter where attention runs on the rank's heads; a gathered output or a split input is
        # whole on every rank.
        local_heads = style in ("colwise", "rowwise")
        heads = _heads(config, name) if config is not None and local_heads else None
        if heads is not None:
            count, head_dim, field = heads
            if count % size:
                raise ValueError(f"{field}={count} is not divisible by the tensor-parallel size {size}: {name} "
                                 "splits on head boundaries; use a size that divides it")
            if n != count * head_dim:
                raise ValueError(f"{name} has {n} features, expected {field} x head_dim = {count} x {head_dim}")
            bounds = split_bounds(n, size, head_dim)
        else:
            if n < size:
                raise ValueError(f"{name} has {n} features, fewer than the tensor-parallel size {size}")
            bounds = split_bounds(n, size)
        todo.append((name, style, *bounds[rank]))
    if not todo:
        raise ValueError(f"the plan matches no Linear layer of {type(model).__name__}: {sorted(plan)}")
    return todo


def expert_parallel_of(ep_size, size: int) -> bool:
    """Whether experts are spread over the group (ep_size given: it must be the group's size)."""
    if ep_size is None:
        return False
    if ep_size != size:
        raise ValueError(f"ep_size={ep_size} but the process group has {size} ranks; fp8kern.parallel spreads the "
                         "experts over the same ranks as the tensor-parallel layers: pass ep_size={size}")
    return True


def plan_experts(model: nn.Module, size: int, rank: int, expert_parallel: bool) -> list[tuple]:
    """[(experts module name, (e0, e1), (r0, r1))] of this rank for every fused experts module (Fp8Experts or
    transformers'): the experts it holds and their intermediate rows, [e0, e1) of E whole experts with expert
    parallelism, else every expert's rows [r0, r1) of I (tensor parallel)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Fp8Experts):
            E, I = m.num_experts, m.intermediate_size
        elif is_fused_experts(m):
            E, I = m.gate_up_proj.shape[0], m.gate_up_proj.shape[1] // 2
        else:
            continue
        if expert_parallel:
            out.append((name, expert_range(E, size, rank, name), (0, I)))
        else:
            out.append((name, (0, E), intermediate_rows(I, size, rank, name)))
    return out


def shard_model(model: nn.Module, *, tp_size: int | None = None, ep_size: int | None = None, group=None,
                device_mesh=None, plan: dict | None = None, match_single_device: bool = True) -> nn.Module:
    """Replace model's planned Linear / Fp8Linear layers by this rank's ColumnParallel / RowParallel shards, in
    place; returns model. Call it on every rank of the group with the same model (same weights) and feed every rank
    the same inputs: every rank then returns the full output.

    tp_size: the expected group size (checked); group / device_mesh: the tensor-parallel group (default: the whole
    default group); plan: {module pattern: style}, default the model config's base_model_tp_plan (patterns relative
    to the base model, '*' for a layer index); match_single_device: see RowParallel. MoE layers' Fp8Experts are
    tensor parallel (TensorParallelExperts: every expert's intermediate rows split over the ranks) or, with ep_size
    (it must equal the group's size), spread over the ranks as whole experts (ExpertParallel); routers, attention,
    dense MLPs and shared experts follow the plan.
    """
    group, size = group_of(tp_size, group, device_mesh)
    rank = dist.get_rank(group)
    ep = expert_parallel_of(ep_size, size)
    todo = plan_shards(model, size, rank, plan)
    moe = plan_experts(model, size, rank, ep)
    for name, *_ in moe:
        if not isinstance(model.get_submodule(name), Fp8Experts):
            raise TypeError(f"{name} is {type(model.get_submodule(name)).__name__} (experts in high precision); "
                            "fp8kern.parallel shards Fp8Experts (quantize_model or from_pretrained make them)")
    for name, style, start, end in todo:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        setattr(owner, child, shard_of(layer, style, start, end, size, group, match_single_device))
    for name, (e0, e1), (r0, r1) in moe:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        experts = getattr(owner, child)
        setattr(owner, child, ExpertParallel.from_experts(experts, e0, e1, group, match_single_device) if ep else
                TensorParallelExperts.from_experts(experts, r0, r1, group, match_single_device))
    return model
