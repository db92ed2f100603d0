"""The tensor operations of fp8kern. Each call reads top-down: the public function (gemm.py, quantization.py,
grouped.py, linear.py) checks its arguments (validation.py, layout.py), picks a path (_backend.py: a compiled
family or the reference), and a compiled family is launched through the binding (gemm_launch.py for scaled_mm)."""

from .gemm import scaled_mm
from .grouped import grouped_block_mm, grouped_scaled_mm, grouped_supported
from .layout import _BLOCK_LAYOUT, Layout, infer_layout
from .linear import block_fp8_linear
from .quantization import as_rows, quantize, quantize_weight

__all__ = ["scaled_mm", "quantize", "quantize_weight", "block_fp8_linear", "grouped_block_mm", "grouped_scaled_mm",
           "grouped_supported", "infer_layout", "Layout", "as_rows"]
