"""AMD Quark INT4-FP8 (W4A8) weights as the tests write them, from the published format rather than from fp8kern:
the two quantization stages and the INT4 packing. Shared by the dense and the MoE checkpoint tests."""

from __future__ import annotations

import numpy as np
import torch

E4M3 = torch.float8_e4m3fn


QUARK_FP8_TENSOR = {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False, "symmetric": True,
                    "ch_axis": None, "group_size": None, "round_method": "half_even", "scale_type": "float"}
QUARK_INT4_CHANNEL = {"dtype": "int4", "qscheme": "per_channel", "is_dynamic": False, "symmetric": True, "ch_axis": 0,
                      "group_size": None, "round_method": "half_even", "scale_type": "float"}
REORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # Quark's default pack_method 'reorder'


def pack_int4(q: torch.Tensor, order) -> torch.Tensor:
    """Quark's INT4 storage, written from the published rule (not from fp8kern): int32 [N, K/8], nibble i (bits
    4i..4i+3) of word c holding the two's-complement INT4 value of column 8c + order[i]."""
    n, k = q.shape
    u = q.to(torch.int64).numpy() & 0xF
    words = np.zeros((n, k // 8), dtype=np.uint32)
    for c in range(k // 8):
        for i, col in enumerate(order):
            words[:, c] |= (u[:, 8 * c + col] << (4 * i)).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32))


def int4_fp8_quantize(w: torch.Tensor):
    """Quark's INT4-FP8 two stages: FP8 e4m3 per tensor (s_t = amax / 448), then symmetric INT4 per output channel
    of the FP8 values (s_ch = row amax / 7). Returns (q int values [N, K], s_t (), s_ch [N]), all float32."""
    w = w.float()
    s_t = w.abs().max() / 448
    w8 = (w / s_t).to(E4M3).float()
    s_ch = w8.abs().amax(1).clamp(min=1e-6) / 7
    q = torch.round(w8 / s_ch[:, None]).clamp(-8, 7)
    return q, s_t, s_ch
