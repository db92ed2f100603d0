"""from_pretrained: build a transformers model without weight memory, swap its quantized Linears for Fp8Linear, and
stream the safetensors shards straight into it (FP8 weights and scales are copied, never dequantized)."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import Fp8Experts, Fp8Linear, fused_experts_unsupported, is_fused_experts
from .common import (ZERO_POINT, CheckpointFormat, LayerSpec, TensorInfo, check_scale, check_scaled_weights_quantized,
                     check_zero_point, open_shard, progress, read_config, read_header, read_weight_scales, require)
from .compressed_tensors import CompressedTensors
from .fp8_block import Fp8Block
from .grok2 import Grok2
from .quark import Quark
from ..parallel.tensor_parallel_experts import local_scale, local_weight, read_range, shard_layout
from .tensor_parallel import TensorParallelLoad
from .torchao import TorchAO

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)

# Grok-2 first: it is recognised by tensor names, whatever quantization_config the config carries.
FORMATS: dict[str, type[CheckpointFormat]] = {f.name: f for f in (Grok2, CompressedTensors, Fp8Block, Quark,
                                                                  TorchAO)}


def _detect(config: dict, header: dict[str, TensorInfo]) -> str:
    for name, cls in FORMATS.items():
        if cls.matches(config, header):
            return name
    qc = config.get("quantization_config")
    if qc is None:
        raise ValueError("unsupported checkpoint: config.json has no quantization_config and no tensor is named "
                         "'*.weight.scale' (Grok-2 FP8), so this is not an FP8 checkpoint fp8kern knows; formats "
                         f"read: {sorted(FORMATS)}")
    raise ValueError(f"unsupported checkpoint: quantization_config.quant_method is {qc.get('quant_method')!r}; "
                     f"fp8kern reads {sorted(FORMATS)} (compressed-tensors float-quantized, quant_method 'fp8' "
                     "per tensor, per channel or in 128x128 blocks, AMD Quark FP8 and INT4-FP8, Grok-2 FP8, torchao "
                     "Float8); not AWQ, GPTQ, bitsandbytes, MXFP4/MXFP8 or NVFP4")


def open_format(path: str, format: str = "auto") -> tuple[dict, dict[str, TensorInfo], CheckpointFormat]:
    """(config, header, format object) of the checkpoint directory path; format='auto' detects it."""
    config = read_config(path)
    header = read_header(path)
    if format == "auto":
        format = _detect(config, header)
    elif format not in FORMATS:
        raise ValueError(f"format={format!r}, expected 'auto' or one of {sorted(FORMATS)}")
    return config, header, FORMATS[format](config, header)


def detect_format(path: str) -> str:
    """The name of the FP8 checkpoint format in directory path: one of FORMATS' keys; ValueError naming what was
    found when it is none of them."""
    return _detect(read_config(path), read_header(path))


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers for real: non-persistent buffers (rotary inv_freq) are
    computed in __init__ and never stored in a checkpoint, so they must not be lost to meta."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _class_names(module: nn.Module) -> tuple:
    return tuple(c.__name__ for c in type(module).__mro__)


def _key_renamer(model: nn.Module):
    """checkpoint key -> the model's key, by the renamings transformers itself applies when loading this model class
    (e.g. Mixtral's 'block_sparse_moe.' -> 'mlp.'); the identity where it has none. Fusions (MoE experts) are not
    renamings: fp8kern reads per-expert tensors itself."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # a transformers without conversion mappings renames nothing
        renamings = []
    if not renamings:
        return lambda key: key
    cache: dict[str, str] = {}

    def rename(key: str) -> str:
        out = cache.get(key)
        if out is None:
            out = cache[key] = apply_renamings(key, renamings)
        return out

    return rename


def _module_renamer(rename):
    """checkpoint module name -> model module name (renamed as its '.weight' key is)."""
    return lambda module: rename(f"{module}.weight")[: -len(".weight")]


def _swap_linears(model: nn.Module, fmt: CheckpointFormat, stored: dict, ckpt_of: dict,
                  dtype) -> dict[str, tuple[Fp8Linear, LayerSpec]]:
    """Replace each nn.Linear whose weight the checkpoint stores in FP8 by a meta Fp8Linear of its spec.
    stored: model module name -> (N, K) of its FP8 weight; ckpt_of: model module name -> checkpoint module name."""
    swapped = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name not in stored:
            continue
        ckpt = ckpt_of[name]
        spec = fmt.layer_spec(ckpt, _class_names(module))
        if spec is None:
            raise ValueError(f"checkpoint stores {ckpt}.weight as float8_e4m3fn but its quantization_config excludes "
                             f"{ckpt} (ignore / exclude / modules_to_not_convert); the config and tensors disagree")
        if stored[name] != (module.out_features, module.in_features):
            raise ValueError(f"checkpoint tensor {ckpt}.weight has shape {stored[name]}, expected "
                             f"{(module.out_features, module.in_features)} for the model built from config.json")
        fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None, device="meta", dtype=dtype,
                        **spec.fp8linear_kwargs())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fp8)
        swapped[name] = (fp8, spec)
    return swapped


# Per-expert projections as checkpoints name them: '<experts>.<e>.gate_proj' (Qwen-MoE, DeepSeek, ...) or
# '<experts>.<e>.w1' (Mixtral: w1 gate, w3 up, w2 down).
_EXPERT_PROJ = re.compile(r"^(?P<parent>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$")
_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


@dataclass
class _ExpertsLoad:
    """A fused experts module being filled from per-expert checkpoint tensors."""

    module: Fp8Experts
    spec: LayerSpec
    names: dict  # (expert, role) -> checkpoint module name ('model.layers.0.mlp.experts.3.gate_proj')
    filled: set = field(default_factory=set)  # (expert, role, buffer)
    experts: tuple = (0, 0)  # [e0, e1): the experts this process holds (all of them, or its expert-parallel share)
    foreign: set = field(default_factory=set)  # checkpoint modules of experts other ranks hold: never read here
    sizes: tuple = (0, 0)  # (H, I) of the whole experts, as stored
    rows: tuple | None = None  # tensor-parallel experts: the intermediate rows [r0, r1) this process holds

    def missing(self, fmt: CheckpointFormat) -> list[str]:
        buffers = ("weight", "weight_scale") + (() if self.module.dynamic else ("input_scale",))
        return [fmt.checkpoint_key(mod, b) for (e, role), mod in sorted(self.names.items()) for b in buffers
                if (e, role, b) not in self.filled]


def _swap_experts(model: nn.Module, fmt: CheckpointFormat, stored: dict, ckpt_of: dict, dtype,
                  device, tp: TensorParallelLoad | None = None) -> dict[str, _ExpertsLoad]:
    """Replace each fused experts module (3-D gate_up_proj / down_proj) whose per-expert projections the checkpoint
    stores in FP8 by an Fp8Experts allocated on device, which the loading loop fills in place.
    stored and ckpt_of as for _swap_linears. tp: hold only this rank's share (tp.experts_share): experts [e0, e1),
    numbered from 0 (expert parallel), or every expert's intermediate rows [r0, r1) (tensor parallel).
    Returns {experts module name: its _ExpertsLoad}."""
    groups: dict[str, list] = {}
    for mod in stored:
        hit = _EXPERT_PROJ.match(mod)
        if hit:
            groups.setdefault(hit["parent"], []).append((mod, int(hit["e"]), hit["proj"]))
    loads = {}
    for name, module in list(model.named_modules()):
        if name not in groups or not is_fused_experts(module):
            continue
        why = fused_experts_unsupported(module)
        if why:
            raise ValueError(f"checkpoint stores FP8 experts for {name}, but fp8kern cannot run its "
                             f"{type(module).__name__}: {why}")
        E, two_i, H = module.gate_up_proj.shape
        I = two_i // 2
        entries = groups[name]
        convention = {proj for *_, proj in entries}
        if not (convention <= {"gate_proj", "up_proj", "down_proj"} or convention <= {"w1", "w2", "w3"}):
            raise ValueError(f"checkpoint names {name}'s expert projections {sorted(convention)}: expected "
                             "gate_proj/up_proj/down_proj or w1/w3/w2, not a mix")
        names = {(e, _ROLE[proj]): ckpt_of[mod] for mod, e, proj in entries}
        shapes = {ckpt_of[mod]: stored[mod] for mod, *_ in entries}
        want = {(e, r) for e in range(E) for r in ("gate", "up", "down")}
        if set(names) != want:
            lack, extra = sorted(want - set(names)), sorted(set(names) - want)
            raise ValueError(f"{name} has {E} experts (config.json) but the checkpoint's FP8 expert projections "
                             f"do not match: missing (expert, projection) {lack[:6]}{'...' if len(lack) > 6 else ''}"
                             f", unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}")
        for (e, role), mod in names.items():
            shape = (H, I) if role == "down" else (I, H)
            if shapes[mod] != shape:
                raise ValueError(f"checkpoint tensor {mod}.weight has shape {shapes[mod]}, expected {shape} for the "
                                 f"model built from config.json")
        specs = {mod: fmt.layer_spec(mod) for mod in names.values()}
        excluded = sorted(m for m, sp in specs.items() if sp is None)
        if excluded:
            raise ValueError(f"checkpoint stores {excluded[0]}.weight as float8_e4m3fn but its quantization_config "
                             "excludes it (ignore / exclude / modules_to_not_convert); the config and tensors disagree")
        kinds = set(specs.values())
        if len(kinds) > 1:
            raise ValueError(f"the experts of {name} are quantized in different ways ({sorted(map(str, kinds))}); "
                             "fp8kern holds one scheme per experts module")
        spec = kinds.pop()
        (e0, e1), (r0, r1) = tp.experts_share(name) if tp is not None else ((0, E), (0, I))
        foreign = {mod for (e, _), mod in names.items() if not e0 <= e < e1}
        names = {(e - e0, role): mod for (e, role), mod in names.items() if e0 <= e < e1}
        rows = (r0, r1) if tp is not None and not tp.expert_parallel else None
        layout = shard_layout(spec.weight_granularity, r0, r1) if rows else {"intermediate_size": I}
        fp8 = Fp8Experts(e1 - e0, H, scheme=spec.scheme, act_fn=module.act_fn,
                         weight_granularity=spec.weight_granularity, scale_format=spec.scale_format, device=device,
                         dtype=dtype, **layout)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fp8)
        loads[name] = _ExpertsLoad(fp8, spec, names, experts=(e0, e1), foreign=foreign, sizes=(H, I), rows=rows)
    return loads


def _plain_expert_tensor(module: nn.Module, e: int, role: str, value: torch.Tensor, key: str, dtype, device,
                         filled: set) -> None:
    """Copy a high-precision per-expert checkpoint tensor into the fused experts module's 3-D parameters, as
    transformers fuses them (gate rows, then up rows, of gate_up_proj [E, 2I, H]; down_proj [E, H, I]); the
    parameters are allocated on first use (they are on the meta device until then)."""
    if value.dtype in _FP8_DTYPES or not value.is_floating_point():
        raise ValueError(f"checkpoint tensor {key!r} has dtype {value.dtype}; per-expert tensors without FP8 scales "
                         "must be floating point in high precision")
    if (e, role) in filled:
        raise ValueError(f"checkpoint holds {key!r} twice")
    for pname in ("gate_up_proj", "down_proj"):
        p = getattr(module, pname)
        if p.device.type == "meta":
            setattr(module, pname, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                requires_grad=False))
    E, two_i, H = module.gate_up_proj.shape
    I = two_i // 2
    if e >= E:
        raise ValueError(f"checkpoint tensor {key!r} is for expert {e}, but the model has {E} experts")
    target = {"gate": module.gate_up_proj[e, :I], "up": module.gate_up_proj[e, I:],
              "down": module.down_proj[e]}[role]
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)
    filled.add((e, role))


def _read_expert_weight(fmt: CheckpointFormat, load: _ExpertsLoad, f, key: str, module: str, role: str):
    """One expert's stored weight, converted: whole, or (tensor-parallel experts) only this rank's rows of gate and
    up or columns of down, laid out as the shard holds them."""
    if load.rows is None:
        return fmt.read_weight(f, key, module)
    part = fmt.read_weight(f, key, module, **read_range(role, *load.rows))
    return local_weight(role, part, load.spec.weight_granularity, load.rows[0])


def _expert_tensor(fmt: CheckpointFormat, load: _ExpertsLoad, e: int, role: str, buffer: str, raw: torch.Tensor,
                   key: str, shard: str) -> None:
    """Copy a tensor of one expert's projection into its Fp8Experts: a weight and a weight scale already converted
    (by _read_expert_weight, and by the format's checked_weight_scale: this rank's part of it), a static input
    scale as stored."""
    if (e, role, buffer) in load.filled:
        raise ValueError(f"checkpoint holds {key!r} twice")
    fp8, spec = load.module, load.spec
    weight, scale = fp8.projection(e, role)
    if buffer == "weight":
        weight.copy_(raw)
    elif buffer == "weight_scale":
        scale.copy_(raw.reshape(-1, 1).expand(scale.shape) if spec.weight_granularity == "tensor" else raw)
    else:
        check_scale(raw, key, shard)
        if fp8.dynamic:
            raise ValueError(f"checkpoint tensor {key!r} is a static activation scale, but its experts load as "
                             f"scheme {fp8.scheme!r} (dynamic activations) per the quantization_config")
        v = fmt.input_scale(raw, key)[0]
        if role == "down":
            fp8.down_input_scale[e] = v
        else:  # gate and up read the same input: the larger scale clips neither
            other = "up" if role == "gate" else "gate"
            seen = (e, other, "input_scale") in load.filled
            fp8.gate_up_input_scale[e] = torch.maximum(fp8.gate_up_input_scale[e], v) if seen else v
    load.filled.add((e, role, buffer))


def _model_tensor(model: nn.Module, key: str) -> torch.Tensor:
    """The (meta) parameter or buffer called key."""
    parent, _, attr = key.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put value in place of the (meta) parameter or buffer called key, checking its shape."""
    parent, _, attr = key.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor for {key!r} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def from_pretrained(path: str, *, format: str = "auto", device=None, dtype: torch.dtype = torch.bfloat16,
                    tp_size: int | None = None, ep_size: int | None = None, device_mesh=None,
                    tp_plan: dict | None = None, match_single_device: bool = True):
    """Load an FP8 Hugging Face checkpoint directory into a transformers model whose quantized Linears are
    fp8kern Fp8Linear layers and whose MoE experts modules (per-expert FP8 projections in the checkpoint) are
    Fp8Experts; returns the model in eval mode on device (default cpu).

    format: 'auto' (detect, see detect_format) or one of 'compressed-tensors', 'fp8', 'quark', 'grok2', 'torchao'.
    dtype: dtype of everything that is not FP8 (embeddings, norms, excluded Linears, biases) and of the outputs.
    FP8 weights and scales are copied as stored (converted only to fp8kern's real = fp8 * scale convention, e.g.
    Grok-2's inverse scales); weight-only checkpoints get dynamically quantized activations.
    Raises ValueError for unsupported formats, and for missing or unexpected tensors, naming them.

    Tensor parallel (fp8kern.parallel): with tp_size or a 1-D device_mesh, called on every rank of an initialized
    process group, returns this rank's shard: the layers of the model's tensor-parallel plan (tp_plan, default
    config.base_model_tp_plan) as ColumnParallel / RowParallel, each reading only its rows or columns from the
    files; everything else whole. Every rank given the same inputs returns the full output. match_single_device:
    see fp8kern.parallel.RowParallel. MoE experts are tensor parallel (fp8kern.parallel.TensorParallelExperts), each
    rank reading only its rows of every expert's gate and up and its columns of down; with ep_size (= the number of
    ranks) each MoE layer's experts are spread over the ranks whole (fp8kern.parallel.ExpertParallel), each rank
    reading only its experts' tensors.
    """
    transformers = require("transformers")
    tp = None
    if tp_size is not None or ep_size is not None or device_mesh is not None:
        tp = TensorParallelLoad(tp_size if tp_size is not None else ep_size, device_mesh, ep_size)
    config, header, fmt = open_format(path, format)
    device = torch.device(device if device is not None else "cpu")

    # Without quantization_config, transformers' own quantizers stay out of the way.
    cfg_dict = copy.deepcopy(config)
    cfg_dict.pop("quantization_config", None)
    hf_config = transformers.AutoConfig.for_model(**cfg_dict)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    # The model class's own loading rules, as transformers applies them: tensors it ignores (e.g. DeepSeek-V3's
    # multi-token-prediction layer) and modules kept in fp32 (_keep_in_fp32_modules when loading in fp16,
    # _keep_in_fp32_modules_strict in fp16 or bf16, e.g. MoE routers' correction biases).
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    fp32_names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) \
        if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        fp32_names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep_fp32 = re.compile("|".join(re.escape(m) for m in sorted(fp32_names))) if fp32_names else None
    rename = _key_renamer(model)
    module_name = _module_renamer(rename)
    check_scaled_weights_quantized(path, fmt)
    stored, ckpt_of = {}, {}  # FP8 weights by model module name; their checkpoint module names
    for ckpt, shape in fmt.quantized_modules().items():
        if not any(p.search(f"{ckpt}.weight") or p.search(f"{module_name(ckpt)}.weight") for p in ignore):
            stored[module_name(ckpt)] = shape
            ckpt_of[module_name(ckpt)] = ckpt
    swapped = _swap_linears(model, fmt, stored, ckpt_of, dtype)
    if tp is not None:  # before any weight memory is allocated: a plan it cannot shard raises here
        tp.install(model, tp_plan, match_single_device)
    experts = _swap_experts(model, fmt, {m: v for m, v in stored.items() if m not in swapped}, ckpt_of, dtype,
                            device, tp)
    slots = {ckpt: (name, e, role) for name, load in experts.items() for (e, role), ckpt in load.names.items()}
    foreign = {mod for load in experts.values() for mod in load.foreign}
    if tp is not None:
        tp.check_experts(model)
    unplaced = sorted(ckpt_of[m] for m in stored
                      if m not in swapped and ckpt_of[m] not in slots and ckpt_of[m] not in foreign)
    if unplaced:
        raise ValueError(f"checkpoint stores FP8 weights for modules that are neither nn.Linear nor MoE experts "
                         f"fp8kern runs in the model built from config.json: {unplaced}")

    # Fused experts modules the checkpoint stores per expert in high precision (e.g. excluded from quantization):
    # their per-expert tensors are fused here as transformers would.
    plain_experts = {name: (module, set()) for name, module in model.named_modules()
                     if is_fused_experts(module) and name not in experts and fused_experts_unsupported(module) is None}

    expected = set(model.state_dict().keys())
    loaded, unexpected, kv_scales, ignored = set(), [], [], []
    sources: dict[str, str] = {}  # model key -> the checkpoint tensor that filled it

    # Weight scales first (small; a weight and its scale may sit in different shards), checked once here.
    scale_keys = set()
    raw_scales = read_weight_scales(path, fmt, [ckpt_of[m] for m in swapped] + list(slots))
    for module, (layer, spec) in swapped.items():
        ckpt = ckpt_of[module]
        value = fmt.checked_weight_scale(ckpt, raw_scales[ckpt], spec, layer.out_features, layer.in_features)
        target = f"{module}.weight_scale"
        if tp is not None and module in tp.layers:
            target, value = tp.weight_scale(module, value)
        _assign(model, target, value.to(device))
        loaded.add(target)
        scale_keys.update(fmt.weight_scale_keys(ckpt))
    for ckpt, (name, e, role) in slots.items():
        keys = fmt.weight_scale_keys(ckpt)
        load = experts[name]
        H, I = load.sizes
        n, k = (H, I) if role == "down" else (I, H)
        value = fmt.checked_weight_scale(ckpt, raw_scales[ckpt], load.spec, n, k)
        if load.rows is not None:
            value = local_scale(role, value, load.spec.weight_granularity, *load.rows)
        _expert_tensor(fmt, load, e, role, "weight_scale", value, keys[0], header[keys[0]].shard)
        scale_keys.update(keys)

    for shard in progress(sorted({i.shard for i in header.values()}), desc=f"Loading {fmt.name} checkpoint"):
        with open_shard(path, shard) as f:
            for key in f.keys():
                if key in scale_keys:
                    continue
                hit = fmt.split(key)
                if hit is not None and hit[0] in foreign:  # another rank's expert: not read
                    continue
                if hit is not None and hit[1] == ZERO_POINT and (hit[0] in slots or module_name(hit[0]) in swapped):
                    check_zero_point(f.get_tensor(key), key, shard)
                    continue
                if hit is not None and hit[0] in slots:
                    name, e, role = slots[hit[0]]
                    value = (_read_expert_weight(fmt, experts[name], f, key, hit[0], role) if hit[1] == "weight"
                             else f.get_tensor(key))
                    _expert_tensor(fmt, experts[name], e, role, hit[1], value, key, shard)
                    continue
                module = module_name(hit[0]) if hit is not None else None
                mkey = rename(key)
                owner, _, attr = mkey.rpartition(".")
                if (tp is not None and module in tp.layers and module in swapped and ckpt_of[module] == hit[0]
                        and hit[1] == "weight"):
                    target, value = tp.fp8_weight(module, fmt, f, key, hit[0])
                elif module in swapped and ckpt_of[module] == hit[0]:
                    target = f"{module}.{hit[1]}"
                    value = _fp8_tensor(fmt, *swapped[module], hit[1], f.get_tensor(key), key, shard)
                    if tp is not None and module in tp.layers:  # a static input scale: whole
                        target = tp.input_scale_key(module)
                elif tp is not None and owner in tp.layers:
                    target, value = tp.plain(owner, attr, f, key, dtype)
                elif mkey in expected:
                    target, value = mkey, f.get_tensor(key)
                    if value.dtype in _FP8_DTYPES:
                        raise ValueError(f"checkpoint tensor {key!r} is {value.dtype} but {type(model).__name__} "
                                         "holds it in high precision: fp8kern reads FP8 weights of nn.Linear layers "
                                         "and per-expert MoE projections, not FP8 tensors of other shapes (e.g. "
                                         "experts stored fused as 3-D)")
                    if value.is_floating_point():
                        value = value.to(torch.float32 if keep_fp32 and keep_fp32.search(mkey) else dtype)
                    elif _model_tensor(model, mkey).is_floating_point():
                        raise ValueError(f"checkpoint tensor {key!r} in {shard} has dtype {value.dtype}, expected a "
                                         f"floating-point dtype: {type(model).__name__} holds {mkey} in {dtype}")
                elif fmt.kv_cache_scale(key):
                    kv_scales.append(key)
                    continue
                elif any(p.search(key) or p.search(mkey) for p in ignore):
                    ignored.append(key)
                    continue
                elif (mkey.endswith(".weight") and (plain := _EXPERT_PROJ.match(mkey[: -len(".weight")]))
                      and plain["parent"] in plain_experts):
                    module, filled = plain_experts[plain["parent"]]
                    _plain_expert_tensor(module, int(plain["e"]), _ROLE[plain["proj"]], f.get_tensor(key), key,
                                         dtype, device, filled)
                    continue
                else:
                    unexpected.append(key)
                    continue
                if target in loaded:  # e.g. both act_scale and input_scale: which one wins must not hang on order
                    raise ValueError(f"checkpoint holds two tensors for {target}: {sources[target]!r} and {key!r}")
                _assign(model, target, value.to(device))
                loaded.add(target)
                sources[target] = key
    if unexpected:
        raise ValueError(f"checkpoint {path!r} has {len(unexpected)} tensor(s) that fit nothing in the "
                         f"{type(model).__name__} built from config.json ({fmt.name} format): {sorted(unexpected)}")
    if ignored:
        warnings.warn(f"{type(model).__name__} does not use {len(ignored)} checkpoint tensor(s) such as "
                      f"{ignored[0]!r}; skipped them as transformers does", stacklevel=2)
    if kv_scales:
        warnings.warn(f"fp8kern keeps the KV cache in {dtype}: ignored {len(kv_scales)} KV-cache scale tensor(s) "
                      f"such as {kv_scales[0]!r}", stacklevel=2)
    loaded |= _tie_embeddings(model, hf_config, loaded)
    expert_missing = []
    for name, (module, filled) in plain_experts.items():
        if not filled:
            continue
        E = module.gate_up_proj.shape[0]
        lack = [f"{name}.{e}.{role}_proj.weight (or w1/w3/w2)" for e in range(E) for role in ("gate", "up", "down")
                if (e, role) not in filled]
        expert_missing += lack
        if not lack:
            loaded |= {f"{name}.gate_up_proj", f"{name}.down_proj"}
    for name, load in experts.items():
        lack = load.missing(fmt)
        expert_missing += lack
        if not lack:
            loaded |= {f"{name}.{k}" for k in load.module.state_dict()}
    missing = sorted(k for k in expected - loaded if k.rsplit(".", 1)[0] not in experts)
    if missing or expert_missing:
        names = [f"{k} (checkpoint tensor {fmt.checkpoint_key(ckpt_of[k.rsplit('.', 1)[0]], k.rsplit('.', 1)[1])})"
                 if k.rsplit(".", 1)[0] in swapped else k for k in missing] + expert_missing
        raise ValueError(f"checkpoint {path!r} lacks {len(names)} tensor(s) the model needs: {names}")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise ValueError(f"no checkpoint tensor filled {leftover}; they are still on the meta device")
    if tp is not None:
        tp.wrap_experts(model, experts, match_single_device)
    return model.to(device).eval()


def _fp8_tensor(fmt: CheckpointFormat, layer: Fp8Linear, spec: LayerSpec, buffer: str, raw: torch.Tensor,
                key: str, shard: str) -> torch.Tensor:
    """A stored weight or input scale of a quantized module, as the Fp8Linear buffer it fills."""
    if buffer == "weight":
        return fmt.weight(raw, fmt.split(key)[0], key)
    if buffer == "weight_scale":  # read up front by read_weight_scales; a second copy is a contradiction
        raise ValueError(f"checkpoint holds a second weight scale {key!r} for one layer")
    check_scale(raw, key, shard)
    if layer.dynamic:
        raise ValueError(f"checkpoint tensor {key!r} is a static activation scale, but its layer loads as scheme "
                         f"{layer.scheme!r} (dynamic activations) per the quantization_config")
    return fmt.input_scale(raw, key)


def _tie_embeddings(model: nn.Module, hf_config, loaded: set) -> set:
    """With tie_word_embeddings the checkpoint omits the output embedding: share the input embedding's weight.
    Returns the key it filled (empty when nothing was tied)."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not getattr(text_config, "tie_word_embeddings", False):
        return set()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or isinstance(out, Fp8Linear):
        return set()
    out_key = next((f"{n}.weight" for n, m in model.named_modules() if m is out), None)
    if out_key is None or out_key in loaded or "weight" not in getattr(inp, "_parameters", {}):
        return set()
    in_key = next(f"{n}.weight" for n, m in model.named_modules() if m is inp)
    if in_key not in loaded:
        return set()
    out.weight = inp.weight
    return {out_key}
