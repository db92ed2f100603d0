"""The plan of one Fp8Linear: what its forward needs that depends only on the module's own tensors and the backend,
decided and checked once and kept on the module, so that an eager forward checks only its input.

At decode a layer's arithmetic takes microseconds, so the host work around it sets the speed. A plan holds:
- the path (ops/gemm.py: gemm_path) and the scaling layout, with the weight side validated once (validation.py);
- the weight scales' values checked once (finite, > 0: validation.check_values) where the device checks values;
- block scales converted to fp32 once where they are stored as bf16 / fp16 / UE8M0, and the bias cast once per
  input dtype;
- the launch itself: one binding call that quantizes and multiplies, on the CPU family (fp8kern._cpu.linear, no
  intermediate tensors) and on a compiled GPU family (fp8kern._C.linear: both launches, the activations and their
  scales in one allocation); where the fused quantizer does not run or the output needs padding, the quantization
  and GEMM launches with validation and path choice already done (ops/quantization.py: _quantize_impl,
  ops/gemm_launch.py: run_gemm).
Other paths (torch's FP8 GEMM, the dequantizing GEMM, the reference), torch.compile tracing and FP8KERN_PRINT_CONFIG
take the unplanned forward, which validates everything on each call.

A plan is keyed by the identity, version counter and data address of the module's weight, weight_scale, bias and
input_scale, and by the backend: replacing any of them (load_state_dict copies in place, bumping the version; .to()
and assignment give new tensors; `.data =` changes the address) or switching the backend builds a new plan on the next
forward. The plan keeps the tensors it was built from alive, so an identity is never reused while it is in use.
Tensors made under torch.inference_mode track no version, so a module holding them takes the unplanned forward, as
does a first forward inside a CUDA graph capture (a plan is built outside captures; one built before is used inside).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._constants import BLOCK, DTYPE_CODE, E4M3
from .gemm import gemm_path
from .gemm_launch import _k_run, launch, run_gemm
from .layout import _BLOCK_LAYOUT, Layout
from .quantization import _CPU_KIND, _quantize_impl, as_rows
from .validation import check_values, validate_scaled_mm


class LinearPlan:
    __slots__ = ("key", "keep", "run")

    def __init__(self, key, keep, run):
        self.key, self.keep, self.run = key, keep, run


def plan_key(weight, weight_scale, bias, input_scale) -> tuple:
    """What a plan depends on (raises RuntimeError for inference tensors, which have no version counter)."""
    key = (id(weight), weight._version, weight.data_ptr(), id(weight_scale), weight_scale._version,
           weight_scale.data_ptr(), _backend._state["backend"], _backend._state["print_config"])
    if bias is not None:
        key += (id(bias), bias._version, bias.data_ptr())
    if input_scale is not None:
        key += (id(input_scale), input_scale._version, input_scale.data_ptr())
    return key


def linear_runner(module):
    """The planned forward of an Fp8Linear (a callable x -> y, or None where x must take the unplanned forward),
    building the plan when the module's tensors or the backend changed since the last one."""
    # The module's dicts directly (each attribute read through Module.__getattr__ costs more than the key itself);
    # tensors a user moved elsewhere (a weight assigned as an nn.Parameter) are found by the attribute.
    buffers = module._buffers
    weight, weight_scale = buffers.get("weight"), buffers.get("weight_scale")
    if weight is None or weight_scale is None:
        weight, weight_scale = module.weight, module.weight_scale
    bias = module._parameters.get("bias")
    if bias is None:
        bias = module.bias
    input_scale = buffers.get("input_scale")
    if input_scale is None and not module.dynamic:
        input_scale = module.input_scale
    try:
        key = plan_key(weight, weight_scale, bias, input_scale)
    except RuntimeError:  # inference tensors: no version counter, so no plan can be trusted across calls
        return None
    plan = module.__dict__.get("_plan")
    if plan is None or plan.key != key:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # a plan's one-time copies made here would hold data only after the graph's replay
        run = _build(module, weight, weight_scale, bias, input_scale)
        plan = module.__dict__["_plan"] = LinearPlan(key, (weight, weight_scale, bias, input_scale), run)
    return plan.run


def _build(module, weight, weight_scale, bias, input_scale):
    """The planned forward for these tensors, or None (the unplanned forward then runs, and raises what is wrong)."""
    if _backend._state["print_config"] or not isinstance(weight, torch.Tensor) or weight.dtype != E4M3:
        return None
    device = weight.device
    block = module.act_granularity == "group"
    try:
        path = gemm_path(device, block, torch.bfloat16, bias is not None)
    except NotImplementedError:
        return None
    if path != "cpu" and path not in _backend.FAMILY_ARCH:
        return None
    N, K = module.out_features, module.in_features
    # The weight side of scaled_mm's validation, once: a one-row activation stands in for x.
    probe = torch.empty((1, K), dtype=E4M3, device=device)
    probe_scale = torch.ones((1, -(-K // BLOCK)) if block else (1, 1), dtype=torch.float32, device=device)
    try:
        layout = validate_scaled_mm(probe, weight, probe_scale, weight_scale, torch.bfloat16, None, None)
    except (TypeError, ValueError):
        return None
    if (layout is _BLOCK_LAYOUT) != block or weight.shape[0] != N:
        return None
    # The layout the layer's operands always have, stated: the one-row probe's scale also fits per-tensor, which
    # would apply row 0's scale to every row of a per-token layer.
    if not block:
        layout = Layout("token" if module.dynamic and module.act_granularity == "token" else "tensor", layout.b)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or bias.device != device):
        return None
    if _backend.value_checks_on(device):
        check_values(weight_scale, "scale_b")
        if input_scale is not None:
            check_values(input_scale, "scale")
    biases = _BiasCasts(bias)
    if path == "cpu":
        return _cpu_runner(module, weight, weight_scale, biases, input_scale, block)
    if _k_run(path, block, K) != K or weight.data_ptr() % 16:
        return None  # the unplanned launch pads K (a copy of the weight per call) or aligns a view
    return _gpu_runner(module, path, weight, weight_scale, biases, input_scale, layout)


class _BiasCasts:
    """The bias in each input dtype, cast once."""

    __slots__ = ("casts",)

    def __init__(self, bias):
        self.casts = None if bias is None else {bias.dtype: bias.contiguous()}

    def get(self, dtype):
        if self.casts is None:
            return None
        b = self.casts.get(dtype)
        if b is None:
            b = self.casts[dtype] = next(iter(self.casts.values())).to(dtype).contiguous()
        return b


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] rows the kernels read: unit column stride, rows that do not overlap."""
    if x.is_contiguous():  # the common input, decided in one query (host overhead)
        return x if x.dim() == 2 else x.view(-1, x.shape[-1])
    if x.dim() == 2 and x.stride(1) == 1 and (x.stride(0) >= x.shape[1] or x.shape[0] <= 1):
        return x
    x2 = as_rows(x)
    return x2 if x2.stride(0) >= x2.shape[1] or x2.shape[0] <= 1 else x2.contiguous()


def _cpu_runner(module, weight, weight_scale, biases, input_scale, block):
    """One fp8kern._cpu.linear call per forward."""
    N, K = weight.shape
    ws = weight_scale
    if ws.dtype is not torch.float32 or not ws.is_contiguous():
        ws = ws.float().contiguous()
    kind = 3 if not module.dynamic else _CPU_KIND[module.act_granularity]
    e8m0 = module.scale_format == "ue8m0"
    static = input_scale.data_ptr() if input_scale is not None else 0
    ldw = weight.stride(0) if N > 1 else K
    lds_w = ws.stride(0) if block and ws.shape[0] > 1 else -(-K // BLOCK)
    w_ptr, ws_ptr, vector = weight.data_ptr(), ws.data_ptr(), module.weight_granularity == "channel"
    linear = _backend._cpu.linear

    def run(x):
        if not x.is_cpu:
            return None
        x2 = _rows(x)
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=x.dtype)
        if M:
            bias = biases.get(x.dtype)
            code = DTYPE_CODE[x.dtype]
            linear(kind, x2.data_ptr(), code, M, K, x2.stride(0) if M > 1 else K, e8m0, static, 0.0, w_ptr, N, ldw,
                   ws_ptr, vector, block, lds_w, y.data_ptr(), N, code, bias.data_ptr() if bias is not None else 0,
                   torch.get_num_threads())
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    run.weight_scale = ws  # the address passed on each call stays valid while the runner lives
    return run


def _gpu_runner(module, family, weight, weight_scale, biases, input_scale, layout):
    """The quantization launch and the GEMM launch, validated and chosen once: from addresses, with the activations
    and their scales in one allocation, where the fused quantization kernels run and the output rows are whole
    16-byte units; else through _quantize_impl and run_gemm (the reference quantization, UE8M0 activation scales,
    odd N)."""
    N, K = weight.shape
    index = weight.get_device()
    block = layout is _BLOCK_LAYOUT
    ws = weight_scale
    if block and (ws.dtype is not torch.float32 or not ws.is_contiguous()):
        ws = ws.float().contiguous()  # run_gemm would convert it on every call
    granularity = module.act_granularity if module.dynamic else "tensor"
    scale_format, fast_accum = module.scale_format, module.fast_accum
    device = weight.device

    def run_tensors(x):
        if x.get_device() != index:
            return None
        x2 = _rows(x)
        M = x2.shape[0]
        if M == 0:
            return torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
        q, s = _quantize_impl(x2, granularity, BLOCK, input_scale, None, scale_format)
        y = run_gemm(family, q, weight, s, ws, x.dtype, biases.get(x.dtype), layout, fast_accum, None)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    if not _backend.quant_kernels_available(device) or scale_format != "fp32" or N % 8:
        run_tensors.weight_scale = ws
        return run_tensors

    kind = "static" if input_scale is not None else granularity
    kb = -(-K // BLOCK)
    scales_per_row = kb if block else 1 if granularity == "token" else 0
    gs = min(BLOCK, K) if block else 1
    static_ptr = input_scale.data_ptr() if input_scale is not None else 0
    w_ptr, ws_ptr = weight.data_ptr(), ws.data_ptr()
    ldw = weight.stride(0) if N > 1 else K
    vector_a, vector_b = layout.a == "token", layout.b == "channel"

    def run(x):
        if x.get_device() != index:
            return None
        x2 = _rows(x)
        M = x2.shape[0]
        if M == 0:
            return x.new_empty((*x.shape[:-1], N))
        # [M, K] e4m3 activations (K % 16 == 0 keeps what follows 16-byte aligned), then their fp32 scales (per row,
        # per row and 128 of K, or one with the per-tensor kernel's int32 scratch after it)
        buf = x.new_empty(M * K + max(M * scales_per_row * 4, 32), dtype=torch.uint8)
        y = x.new_empty((M, N))
        q = buf.data_ptr()
        s = q + M * K
        dtype = x.dtype
        code = DTYPE_CODE[dtype]
        if kind == "static":
            s, s_rs, scratch = static_ptr, 0, 0
        else:
            s_rs, scratch = (scales_per_row if M > 1 else 0), (s + 16 if kind == "tensor" else 0)
        bias = biases.get(dtype)
        # one binding call: the quantization launch, then the GEMM's (fp8kern._C.linear)
        launch(family, block, index, q, w_ptr, y.data_ptr(), M, N, K, K, ldw, N, code, s, vector_a, ws_ptr, vector_b,
               bias.data_ptr() if bias is not None else 0, fast_accum, None,
               (kind, x2.data_ptr(), code, x2.stride(0), s_rs, gs, scratch))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    run.weight_scale = ws
    return run
