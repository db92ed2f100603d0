"""INT4-FP8 weights (AMD Quark W4A8, and the Grok-1 INT4-FP8 export): two quantizers chained on one weight, FP8 e4m3
per tensor and then INT4 per output channel, so that real = int4 * s_channel * s_tensor.

Storage: '<module>.weight' int32 (or uint32) [N, K / 8], each word holding eight signed two's-complement INT4
values along K: nibble i (bits 4i..4i+3) of word c holds column 8c + PACK_ORDER[i] (Quark's default pack_method
'reorder'; with pack_method 'order' nibble i holds column 8c + i). The scales: '<module>.weight_scale' the per-tensor
FP8 scale (one value), and the per-channel INT4 scale [N] as '<module>.weight_scale_2' (Quark) or
'<module>.weight_scale1' (the Grok-1 export).

fp8kern loads these exactly: every INT4 value (-8..7) is an e4m3 value, so the weight becomes e4m3 with the
per-channel scale s_channel * s_tensor (float32) and runs on the per-channel kernels. (Rounding int4 * s_channel into
e4m3 under the per-tensor scale, as some runtimes do, would not be exact.) Weight memory is then one byte per value,
twice the INT4 size.
"""

from __future__ import annotations

import torch

from .._constants import E4M3
from .common import TensorInfo

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # Quark's 'reorder': nibble i of a word holds column PACK_ORDER[i]
IDENTITY_ORDER = tuple(range(8))
PACK_METHODS = {"reorder": PACK_ORDER, "order": IDENTITY_ORDER}
CHANNEL_SCALE_SUFFIXES = ("weight_scale_2", "weight_scale1")  # Quark's name, the Grok-1 export's name
PACKED_HEADER_DTYPES = ("I32", "U32")


def packed_shape(info: TensorInfo) -> tuple | None:
    """Logical (N, K) of a 2-D INT4-packed weight's header entry, None when it is not one."""
    if info.dtype not in PACKED_HEADER_DTYPES or len(info.shape) != 2:
        return None
    return info.shape[0], info.shape[1] * 8


def packed_modules(header: dict[str, TensorInfo]) -> dict[str, tuple]:
    """module -> logical (N, K) for every '<module>.weight' stored INT4-packed in 32-bit words."""
    out = {}
    for key, info in header.items():
        shape = packed_shape(info) if key.endswith(".weight") else None
        if shape is not None:
            out[key[: -len(".weight")]] = shape
    return out


def unpack(raw: torch.Tensor, order=PACK_ORDER, key: str = "weight") -> torch.Tensor:
    """int32 / uint32 [N, K / 8] words -> float8_e4m3fn [N, K] holding the INT4 values exactly."""
    if raw.dtype not in (torch.int32, torch.uint32) or raw.dim() != 2:
        raise ValueError(f"checkpoint tensor {key!r} has dtype {raw.dtype} and shape {tuple(raw.shape)}; an INT4-FP8 "
                         "weight is stored as int32 [N, K / 8], eight INT4 values per word")
    words = raw.view(torch.int32).unsqueeze(-1)  # [N, K/8, 1]
    nibbles = (words >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF  # [N, K/8, 8], nibble i
    values = nibbles - 16 * (nibbles >= 8).to(torch.int32)  # two's complement: 8..15 -> -8..-1
    columns = torch.empty_like(values)
    columns[..., list(order)] = values  # column order[i] of each group of 8 <- nibble i
    return columns.reshape(raw.shape[0], raw.shape[1] * 8).to(torch.float32).to(E4M3)


def join_scales(tensor_scale: torch.Tensor, channel_scale: torch.Tensor, n: int, keys: tuple) -> torch.Tensor:
    """s_channel * s_tensor as float32 [N]: the per-channel scale of the e4m3 weight unpack returns."""
    if tensor_scale.numel() != 1:
        raise ValueError(f"checkpoint tensor {keys[0]!r} has shape {tuple(tensor_scale.shape)}; in an INT4-FP8 "
                         "layer it is the per-tensor FP8 scale, one value")
    if channel_scale.numel() != n:
        raise ValueError(f"checkpoint tensor {keys[1]!r} has shape {tuple(channel_scale.shape)}; in an INT4-FP8 "
                         f"layer it is the per-channel INT4 scale, {n} values (one per output row)")
    return channel_scale.float().reshape(n) * tensor_scale.float().reshape(())


class Int4Fp8Weights:
    """Mixin for a CheckpointFormat whose layers may store INT4-FP8 weights: a layer is INT4-FP8 when its
    '<module>.weight' is 32-bit words (the format checks that its config agrees). Sets the storage hooks; the
    format keeps its own for FP8 layers. pack_order: the nibble order, PACK_ORDER unless the format says otherwise."""

    pack_order = PACK_ORDER

    def is_int4_fp8(self, module: str) -> bool:
        info = self.header.get(f"{module}.weight")
        return info is not None and packed_shape(info) is not None

    def quantized_modules(self):
        return {**super().quantized_modules(), **packed_modules(self.header)}

    def weight(self, raw, module, key):
        return unpack(raw, self.pack_order, key) if self.is_int4_fp8(module) else super().weight(raw, module, key)

    def read_weight(self, f, key, module, rows=None, cols=None):
        if not self.is_int4_fp8(module) or cols is None:  # rows of a packed weight are rows of its words
            return super().read_weight(f, key, module, rows, cols)
        c0, c1 = cols  # the whole words holding the columns, unpacked, then cut to them
        w0 = c0 // 8
        words = f.get_slice(key)[:, w0:-(-c1 // 8)]
        return unpack(words, self.pack_order, key)[:, c0 - 8 * w0: c1 - 8 * w0]

    def weight_scale_keys(self, module):
        if not self.is_int4_fp8(module):
            return super().weight_scale_keys(module)
        channel = [f"{module}.{s}" for s in CHANNEL_SCALE_SUFFIXES]
        held = [k for k in channel if k in self.header]
        if len(held) > 1:
            raise ValueError(f"checkpoint holds two per-channel INT4 scales for {module}: {held}")
        return f"{module}.weight_scale", (held or channel)[0]

    def join_weight_scale(self, module, raws):
        if not self.is_int4_fp8(module):
            return super().join_weight_scale(module, raws)
        return join_scales(*raws, self.header[f"{module}.weight"].shape[0], self.weight_scale_keys(module))
