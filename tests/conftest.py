"""Shared shape lists and helpers for the CPU and GPU tests."""

import math

import numpy as np
import pytest
import torch

from fp8kern import _backend

# (M, N, K): aligned, unaligned N and K (not multiples of 16 or 128), K <= 128, partial blocks, odd everything.
SHAPES = [
    (1, 1, 1), (1, 16, 16), (3, 5, 7), (7, 130, 200), (16, 256, 384), (33, 129, 257), (64, 200, 576),
    (5, 300, 1000), (128, 256, 640),
]
# Real model (N, K) pairs, small M so the CPU reference stays fast.
MODEL_NK = [(6144, 4096), (2112, 7168), (3420, 576)]

LAYOUTS = ["tensor", "token_channel", "tensor_channel", "token_tensor", "block"]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def gpu_ready():
    """(ok, reason) for tests that need a CUDA GPU with fp8kern's compiled kernels."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if _backend._C is None:
        return False, f"fp8kern._C is not built: {_backend._C_ERROR}"
    arch = _backend.device_arch(torch.device("cuda"))
    if arch < 89:
        return False, f"GPU is sm_{arch}; fp8kern kernels need sm_89 or newer"
    return True, ""


requires_gpu = pytest.mark.skipif(not gpu_ready()[0], reason=gpu_ready()[1] or "gpu")


def dynamic_scale_bound(A: torch.Tensor, granularity: str, scale_format: str, tensor_amax: float = 0.0):
    """Per element of A [M, K] (upper bounds on |activations|), an upper bound on the dynamic activation scale
    fp8kern.quantize gives it: amax / 448 of its row ('token'), of A or tensor_amax if larger ('tensor'), or of its
    1x128 group ('group'), at least 2^-126, at most doubled when rounded up to a power of two ('ue8m0')."""
    M, K = A.shape
    if granularity == "token":
        amax = A.amax(dim=1, keepdim=True).expand(M, K)
    elif granularity == "tensor":
        amax = torch.maximum(A.amax(), torch.as_tensor(tensor_amax, dtype=A.dtype)).expand(M, K)
    else:
        G = math.ceil(K / 128)
        g = torch.nn.functional.pad(A, (0, G * 128 - K)).reshape(M, G, 128).amax(dim=2)
        amax = g.repeat_interleave(128, dim=1)[:, :K]
    s = torch.clamp(amax / 448, min=2.0**-126)
    return s * 2 if scale_format == "ue8m0" else s


def random_scales(shape, gen, device="cpu"):
    """Positive scales spread over 2^-6 .. 2^2 so a wrongly broadcast scale changes results far beyond rounding."""
    return torch.exp2(torch.rand(shape, generator=gen) * 8 - 6).to(device)


def make_operands(M, N, K, layout, gen, scale_dtype=torch.float32):
    """Random e4m3 a [M, K], b [N, K] covering the whole e4m3 range, and scales for a layout name."""
    a = (torch.randn(M, K, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    G, GN = math.ceil(K / 128), math.ceil(N / 128)
    sa_shape = {"tensor": (), "token_channel": (M, 1), "tensor_channel": (1,), "token_tensor": (M,), "block": (M, G)}
    sb_shape = {"tensor": (1,), "token_channel": (N,), "tensor_channel": (N, 1), "token_tensor": (), "block": (GN, G)}
    sa = random_scales(sa_shape[layout], gen)
    sb = random_scales(sb_shape[layout], gen)
    if layout == "block" and scale_dtype is not torch.float32:
        if scale_dtype == torch.float8_e8m0fnu:
            sa, sb = torch.exp2(torch.round(torch.log2(sa))), torch.exp2(torch.round(torch.log2(sb)))
        sa, sb = sa.to(scale_dtype), sb.to(scale_dtype)
    return a, b, sa, sb


def exact_scaled_mm(a, b, sa, sb, bias=None):
    """Independent float64 oracle: explicit per-element scale indices with numpy (no shared code with the library).

    Returns (D, S) where S[m, n] = sum_k |a_deq[m, k] * b_deq[n, k]| bounds the rounding error of any summation.
    """
    M, K = a.shape
    N = b.shape[0]
    A = a.float().double().numpy()
    B = b.float().double().numpy()
    sa_ = sa.float().double().numpy()
    sb_ = sb.float().double().numpy()
    ks = np.arange(K)
    if sa_.size == 1:
        SA = np.full((M, K), sa_.reshape(-1)[0])
    elif sa_.reshape(M, -1).shape[1] == 1:
        SA = np.repeat(sa_.reshape(M, 1), K, axis=1)
    else:
        SA = sa_.reshape(M, -1)[:, ks // 128]
    if sb_.size == 1:
        SB = np.full((N, K), sb_.reshape(-1)[0])
    elif sb_.ndim == 1 or sb_.shape == (N, 1):
        SB = np.repeat(sb_.reshape(N, 1), K, axis=1)
    else:
        SB = sb_[np.arange(N)[:, None] // 128, ks[None, :] // 128]
    Ad, Bd = A * SA, B * SB
    D = Ad @ Bd.T
    S = np.abs(Ad) @ np.abs(Bd).T
    if bias is not None:
        D = D + bias.double().numpy()[None, :]
    return D, S


# Unit roundoff of each output dtype (half an ulp at 1.0).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def fp32_gemm_bound(D, S, K, out_dtype, bias=None):
    """Per-element bound on |result - D| for any fp32-accumulated GEMM of the dequantized operands.

    Dequantizing each operand rounds once (relative 2^-24 each), the fp32 sum of K products has error at most
    gamma_K * S with gamma_K = K * 2^-24 / (1 - K * 2^-24) (worst case, any summation order), the bias add one more
    rounding of |D|, and the conversion to out_dtype at most u_out * |D| (+ the fp32 error it carries).
    """
    u32 = 2.0**-24
    gamma = (K + 3) * u32 / (1 - (K + 3) * u32)
    fp32_err = gamma * S + (u32 * np.abs(D) if bias is not None else 0)
    u = UNIT_ROUNDOFF[out_dtype]
    # fp16 flushes below 2^-24 (subnormal spacing): allow half of that absolute.
    tiny = 2.0**-25 if out_dtype == torch.float16 else (2.0**-134 if out_dtype == torch.bfloat16 else 2.0**-150)
    return fp32_err * (1 + u) + u * np.abs(D) + tiny


def compile_recording(fn):
    """torch.compile(fn, fullgraph=True) through AOT autograd, recording each traced graph's ops as names ('aten.sort.
    stable', 'fp8kern.quantize.default'; a mutating op under auto_functionalized by its own name) into the returned
    list, one list per graph. fullgraph alone does not show host reads: it traces a .item() as a scalar output."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.args[0] if "auto_functionalized" in str(n.target) else n.target)
                       for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    return torch.compile(fn, backend=aot_autograd(fw_compiler=record), fullgraph=True), graphs


def host_reads(ops: list) -> list:
    """The ops of a recorded graph that read device data on the host (each a synchronization; none capturable)."""
    return [t for t in ops if t.split(".")[:2] in (["aten", "_local_scalar_dense"], ["aten", "nonzero"],
                                                   ["aten", "bincount"], ["aten", "item"], ["aten", "_unique2"])]
