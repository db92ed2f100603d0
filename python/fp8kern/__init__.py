"""fp8kern: fused FP8 GEMM and quantization kernels for PyTorch (Ada sm_89, Hopper sm_90a).

    import fp8kern
    x_fp8, x_scale = fp8kern.quantize(x)                       # dynamic per-token
    w_fp8, w_scale = fp8kern.quantize_weight(w)                # per-channel
    y = fp8kern.scaled_mm(x_fp8, w_fp8, x_scale, w_scale, out_dtype=torch.bfloat16)
"""

from . import nn, ops, parallel, reference
from ._backend import get_backend, set_backend, set_value_checks
from .checkpoints import detect_format, from_pretrained
from .nn import Fp8Experts, Fp8Linear, quantize_model
from .ops import (Layout, block_fp8_linear, grouped_block_mm, grouped_scaled_mm, infer_layout, quantize,
                  quantize_weight, scaled_mm)

__version__ = "0.1.0"

__all__ = [
    "scaled_mm", "block_fp8_linear", "grouped_block_mm", "grouped_scaled_mm", "quantize", "quantize_weight",
    "Fp8Linear", "Fp8Experts", "quantize_model", "from_pretrained", "detect_format",
    "infer_layout", "Layout", "nn",
    "reference", "info", "set_backend", "get_backend", "set_value_checks", "__version__",
]


def info() -> dict:
    """What this install can run: version, compiled archs, GEMM families, backend, the CUDA device if any, and the
    path scaled_mm takes for each layout there (gemm_paths)."""
    import torch

    from . import _backend

    d = {
        "version": __version__,
        "torch": torch.__version__,
        "compiled": _backend._C is not None,
        "compiled_archs": _backend.compiled_archs(),
        "gemm_families": list(_backend._C.gemm_families()) if _backend._C is not None else [],
        "backend": get_backend(),
        # The CPU family: its instruction set in use (FP8KERN_CPU_ISA forces one), None where fp8kern._cpu is not built.
        "cpu_isa": _backend.cpu_isa(),
        "cuda_device": None,
    }
    if _backend._C is None:
        d["compiled_error"] = str(_backend._C_ERROR)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        d["cuda_device"] = _backend.device_label(dev)
    # The path scaled_mm takes for each layout (bfloat16 output) on this device, and why: fp8kern's verified
    # kernels, torch's FP8 GEMM, the dequantizing GEMM or the reference.
    d["gemm_paths"] = ops.gemm.describe_paths(dev)
    return d
