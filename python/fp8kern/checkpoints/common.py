"""What every checkpoint format shares: reading config.json and safetensors headers, the per-layer spec, the base
class that each format fills in, and the optional-dependency and progress helpers.

The one rule every format is converted to is fp8kern's: real value = fp8 value * weight_scale, with weight_scale
shaped per channel (N, 1), per tensor (1,) or per 128x128 block (ceil(N/128), ceil(K/128)). Each format's
`weight_scale` method is the only place that knows how its stored scale maps onto that rule; the loader and the
dequantize CLI both go through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._constants import BLOCK, E4M3, E8M0
from ..reference import dequantize

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"


def require(module: str, pip_name: str | None = None):
    """Import an optional dependency, or raise ImportError with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"fp8kern.checkpoints needs the optional package {pip_name or module!r}: "
                          f"pip install {pip_name or module}") from e


def progress(items, desc: str):
    """Iterate items with a tqdm bar when tqdm is installed, else print one line per item on stderr."""
    items = list(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items):
                print(f"{desc}: {i + 1}/{len(items)} {item}", file=sys.stderr, flush=True)
                yield item
        return plain()
    return tqdm(items, desc=desc, unit="shard")


def read_config(path: str) -> dict:
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"path={path!r} has no {CONFIG_NAME}; pass the directory of a Hugging Face checkpoint")
    with open(cfg) as f:
        return json.load(f)


def shard_files(path: str) -> list[str]:
    """Shard file names (relative to path): those the index lists, else every *.safetensors in the directory."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{INDEX_NAME} in {path!r} lists shard(s) that are not there: {missing}")
        return files
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"path={path!r} holds no *.safetensors files (only safetensors checkpoints are read)")
    return files


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's safetensors dtype string ('F8_E4M3', 'BF16', ...), shape and shard, read without loading it."""

    dtype: str
    shape: tuple
    shard: str


@contextlib.contextmanager
def open_shard(path: str, shard: str):
    """safetensors' safe_open on one shard of checkpoint directory path, on the CPU. A shard safetensors cannot read
    (truncated by an interrupted download, or not a safetensors file) is a ValueError naming the file; safetensors
    checks at open that the header is whole and that every tensor's bytes lie inside the file."""
    safetensors = require("safetensors")
    file = os.path.join(path, shard)
    try:
        handle = safetensors.safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not exported under a stable name across safetensors releases
        raise ValueError(f"checkpoint shard {file!r} cannot be read ({e}); it is truncated or corrupt: download it "
                         "again") from e
    with handle as f:
        yield f


class Header(dict):
    """tensor name -> TensorInfo, and .metadata: shard -> the shard's safetensors metadata (str -> str)."""

    metadata: dict[str, dict]


def read_header(path: str) -> Header:
    """Every tensor of the checkpoint by name, from the safetensors headers only (no tensor data is read)."""
    header = Header()
    header.metadata = {}
    for shard in shard_files(path):
        with open_shard(path, shard) as f:
            header.metadata[shard] = f.metadata() or {}
            for key in f.keys():
                sl = f.get_slice(key)
                header[key] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()), shard)
    return header


@dataclass(frozen=True)
class LayerSpec:
    """How one quantized Linear is held by fp8kern: the Fp8Linear arguments."""

    scheme: str
    weight_granularity: str  # 'channel' | 'tensor' | 'block'
    scale_format: str = "fp32"  # 'fp32' | 'ue8m0'

    def fp8linear_kwargs(self) -> dict:
        return {"scheme": self.scheme, "weight_granularity": self.weight_granularity, "scale_format": self.scale_format}


def scale_shape(granularity: str, n: int, k: int) -> tuple:
    return {"channel": (n, 1), "tensor": (1,), "block": (math.ceil(n / BLOCK), math.ceil(k / BLOCK))}[granularity]


def reshape_scale(raw: torch.Tensor, granularity: str, n: int, k: int, key: str) -> torch.Tensor:
    """raw reshaped to Fp8Linear's weight_scale shape; any stored shape holding the same numbers in the same order is
    accepted ((N,) or (N, 1) per channel, () or (1,) per tensor), anything else is an error naming the tensor."""
    want = scale_shape(granularity, n, k)
    fits = (raw.numel() == math.prod(want) and (granularity != "block" or tuple(raw.shape) == want))
    if not fits:
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(raw.shape)}, expected {want} for a "
                         f"{granularity} scale of a [{n}, {k}] weight")
    return raw.reshape(want)


ZERO_POINT = "zero_point"  # the buffer name a format's split gives to stored zero points of symmetric quantizers


def check_zero_point(value: torch.Tensor, key: str, shard: str) -> None:
    """A stored zero point of a layer fp8kern loads: symmetric quantization stores zeros, which carry nothing and
    are dropped; any other value means asymmetric quantization, which fp8kern does not run."""
    if bool((value.float() != 0).any()):  # NaN included
        raise ValueError(f"checkpoint tensor {key!r} in {shard} holds non-zero zero points: asymmetric quantization "
                         "is not supported (fp8kern runs symmetric FP8 and INT4-FP8 weights)")


SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, E8M0)


def check_scale(value: torch.Tensor, key: str, shard: str) -> torch.Tensor:
    """A scale tensor as stored, checked once at load: a floating-point dtype a scale is stored in, and every value
    finite and > 0 (a NaN, infinite, zero or negative scale poisons or flips the layer's output). The error names
    the tensor and its file. Returns value."""
    if value.dtype not in SCALE_DTYPES:
        raise ValueError(f"checkpoint tensor {key!r} in {shard} has dtype {value.dtype}; a scale must be stored as "
                         f"one of {[str(d).replace('torch.', '') for d in SCALE_DTYPES]}")
    v = value.float().reshape(-1)
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"checkpoint tensor {key!r} in {shard} holds {int(bad.sum())} of {v.numel()} scale value(s) "
                         f"that are not finite and > 0 (first at flat index {i}: {float(v[i])}); the checkpoint is "
                         "damaged or was written by a broken quantizer")
    return value


def as_e8m0(scale: torch.Tensor, key: str) -> torch.Tensor:
    """scale as float8_e8m0fnu, which holds only powers of two: an error names the tensor when one is not."""
    if scale.dtype == E8M0:
        return scale
    e = scale.float().to(E8M0)
    if not torch.equal(e.float(), scale.float()):
        raise ValueError(f"checkpoint tensor {key!r} should hold UE8M0 scales (scale_fmt 'ue8m0') but has values "
                         "that are not powers of two")
    return e


class CheckpointFormat:
    """One FP8 checkpoint format. A subclass sets `name`, `suffixes` and either `quant_method` (the
    quantization_config value that identifies it) or its own `matches`; it implements `layer_spec` and, where
    it stores things otherwise than e4m3 '<module>.weight' with one scale tensor whose values multiply, the hooks
    that say how: `quantized_modules` (which modules, their logical shape), `weight` (stored weight -> e4m3),
    `weight_scale_keys` / `join_weight_scale` (a scale stored in parts) and `weight_scale` (the convention).

    suffixes: checkpoint tensor name after '<module>.' -> Fp8Linear buffer ('weight', 'weight_scale',
    'input_scale') for the modules whose weight is stored quantized.
    """

    name: ClassVar[str]
    quant_method: ClassVar[str | None] = None
    suffixes: ClassVar[dict[str, str]] = {"weight": "weight", "weight_scale": "weight_scale",
                                          "input_scale": "input_scale"}

    def __init__(self, config: dict, header: dict[str, TensorInfo]):
        self.config = config
        self.qconfig = config.get("quantization_config") or {}
        self.header = header

    @classmethod
    def matches(cls, config: dict, header: dict[str, TensorInfo]) -> bool:
        if cls.quant_method is None:
            raise NotImplementedError(f"{cls.__name__} sets neither quant_method nor matches")
        return (config.get("quantization_config") or {}).get("quant_method") == cls.quant_method

    def layer_spec(self, module: str, class_names=("Linear",)) -> LayerSpec | None:
        """The spec of module (whose weight the checkpoint stores in FP8), or None where the config excludes it.
        class_names: the module's class and base class names, for formats whose config targets classes."""
        raise NotImplementedError

    def kv_cache_scale(self, key: str) -> bool:
        """Whether key is a KV-cache (attention output) scale the config declares: fp8kern keeps the KV cache in
        high precision, so these are skipped with a warning rather than rejected as unexpected."""
        return False

    def quantized_modules(self) -> dict[str, tuple]:
        """module name -> logical (N, K) of every module whose weight this format stores quantized: by default the
        2-D '<module>.weight' tensors stored as float8_e4m3fn."""
        return fp8_modules(self.header)

    def split(self, key: str) -> tuple[str, str] | None:
        """'<module>.<suffix>' -> (module, Fp8Linear buffer) for a suffix of this format, longest suffix first."""
        for suffix in sorted(self.suffixes, key=len, reverse=True):
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], self.suffixes[suffix]
        return None

    def checkpoint_key(self, module: str, buffer: str) -> str:
        """The checkpoint tensor name that fills module's Fp8Linear buffer."""
        suffix = next((s for s, b in self.suffixes.items() if b == buffer), buffer)  # e.g. bias: stored as named
        return f"{module}.{suffix}"

    def weight_scale_keys(self, module: str) -> tuple[str, ...]:
        """The checkpoint tensors whose values make module's weight scale: one, unless the format stores the
        scale in parts (join_weight_scale combines them). Where the format knows several names for it, the one the
        checkpoint holds; two of them for one module is an error (which one wins must not hang on order)."""
        names = [f"{module}.{s}" for s, b in self.suffixes.items() if b == "weight_scale"]
        held = [k for k in names if k in self.header]
        if len(held) > 1:
            raise ValueError(f"checkpoint holds two tensors for the weight scale of {module}: {held}")
        return (held[0] if held else names[0],)

    def join_weight_scale(self, module: str, raws: tuple) -> torch.Tensor:
        """The stored parts of module's weight scale (in weight_scale_keys' order) as one stored scale."""
        return raws[0]

    def weight(self, raw: torch.Tensor, module: str, key: str) -> torch.Tensor:
        """Stored weight -> Fp8Linear.weight, float8_e4m3fn [N, K]."""
        if raw.dtype != E4M3:
            raise ValueError(f"checkpoint tensor {key!r} has dtype {raw.dtype}, expected torch.float8_e4m3fn")
        return raw

    def read_weight(self, f, key: str, module: str, rows=None, cols=None) -> torch.Tensor:
        """Module's weight from the open shard f, as weight() converts it: whole, or only the logical rows
        [r0, r1) or columns [c0, c1) (a tensor-parallel shard reads nothing else of the file)."""
        if rows is not None:
            raw = f.get_slice(key)[rows[0]:rows[1]]
        elif cols is not None:
            raw = f.get_slice(key)[:, cols[0]:cols[1]]
        else:
            raw = f.get_tensor(key)
        return self.weight(raw, module, key)

    def weight_scale(self, raw: torch.Tensor, spec: LayerSpec, n: int, k: int, key: str) -> torch.Tensor:
        """Stored scale -> Fp8Linear.weight_scale (real = fp8 * scale; float32, or float8_e8m0fnu for 'ue8m0')."""
        s = reshape_scale(raw, spec.weight_granularity, n, k, key)
        return as_e8m0(s, key) if spec.scale_format == "ue8m0" else s.float()

    def checked_weight_scale(self, module: str, raw: torch.Tensor, spec: LayerSpec, n: int, k: int) -> torch.Tensor:
        """weight_scale of module's stored scale (parts joined), its values checked again after the conversion
        (e.g. an inverse scale so small that its reciprocal overflows)."""
        keys = self.weight_scale_keys(module)
        value = self.weight_scale(raw, spec, n, k, keys[0])
        return check_scale(value, " * ".join(keys) if len(keys) > 1 else keys[0], "its converted form")

    def input_scale(self, raw: torch.Tensor, key: str) -> torch.Tensor:
        """Stored static activation scale -> Fp8Linear.input_scale, float32 of shape (1,)."""
        if raw.numel() != 1:
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(raw.shape)}, expected one value (a static "
                             "per-tensor activation scale)")
        return raw.float().reshape(1)

    def dequantize_weight(self, module: str, raw_weight: torch.Tensor, raw_scale: torch.Tensor) -> torch.Tensor:
        """fp32 value of module's stored weight with its stored scale (as join_weight_scale returns it)."""
        q = self.weight(raw_weight, module, f"{module}.weight")
        n, k = q.shape
        spec = self.layer_spec(module)
        if spec is None:
            raise ValueError(f"{module}.weight is stored quantized but quantization_config excludes {module}")
        ws = self.checked_weight_scale(module, raw_scale, spec, n, k)
        return dequantize(q, ws, block_size=(BLOCK, BLOCK) if spec.weight_granularity == "block" else None)


def read_weight_scales(path: str, fmt: CheckpointFormat, modules) -> dict[str, torch.Tensor]:
    """module -> its stored weight scale (parts joined by the format), for every module in modules, each part
    checked by check_scale. Scales are small, so they are read up front: a module's weight and its scale may sit in
    different shards. A missing scale is a ValueError naming the tensors."""
    wanted = {m: fmt.weight_scale_keys(m) for m in modules}
    missing = sorted(k for keys in wanted.values() for k in keys if k not in fmt.header)
    if missing:
        raise ValueError(f"checkpoint {path!r} has quantized weights without their scale tensor(s): {missing}")
    by_shard: dict[str, list] = {}
    for keys in wanted.values():
        for k in keys:
            by_shard.setdefault(fmt.header[k].shard, []).append(k)
    raw = {}
    for shard, keys in sorted(by_shard.items()):
        with open_shard(path, shard) as f:
            for k in keys:
                raw[k] = check_scale(f.get_tensor(k), k, shard)
    return {m: fmt.join_weight_scale(m, tuple(raw[k] for k in keys)) for m, keys in wanted.items()}


FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")


def fp8_modules(header: dict[str, TensorInfo]) -> dict[str, tuple]:
    """module name -> (N, K) for every 2-D '<module>.weight' stored in FP8 (e5m2 included, so that the loader
    names its dtype as wrong rather than the module as unexpected)."""
    return {key[: -len(".weight")]: info.shape for key, info in header.items()
            if key.endswith(".weight") and info.dtype in FP8_HEADER_DTYPES and len(info.shape) == 2}


def check_scaled_weights_quantized(path: str, fmt: "CheckpointFormat") -> None:
    """A module whose checkpoint holds a weight scale must store its weight quantized (the format's quantized_modules):
    a weight of another dtype beside a scale (an int8 weight in an FP8 checkpoint, say: a damaged or mislabelled file)
    is a ValueError naming the tensor, its file, the dtype found and the one expected, raised before anything is read.
    Loading it as a plain weight would hand torch an integer parameter, and dequantizing would copy it unscaled."""
    quantized = fmt.quantized_modules()
    for key in sorted(fmt.header):
        hit = fmt.split(key)
        if hit is None or hit[1] != "weight_scale" or hit[0] in quantized:
            continue
        weight = fmt.header.get(f"{hit[0]}.weight")
        if weight is not None:
            raise ValueError(f"checkpoint {path!r}: tensor '{hit[0]}.weight' in {weight.shard} has dtype "
                             f"{weight.dtype} (safetensors), expected F8_E4M3 (float8_e4m3fn), since the checkpoint "
                             f"holds its weight scale {key!r}; the file is damaged or not an FP8 checkpoint of the "
                             f"{fmt.name} format")


def unsupported(what: str, found, fix: str = "") -> ValueError:
    return ValueError(f"unsupported FP8 checkpoint: {what} is {found!r}{'; ' + fix if fix else ''}")


def choose_scheme(weight_granularity: str, act_granularity: str | None, dynamic: bool, where: str) -> str:
    """The Fp8Linear scheme for a weight layout and an activation layout (None: weight-only checkpoint, whose
    activations fp8kern then quantizes dynamically, per token, or per 1x128 group for block weights)."""
    if weight_granularity == "block":
        if act_granularity is None or dynamic:
            return "block128"
        raise unsupported(f"{where}: static activations with 128x128 block weights", act_granularity,
                          "block-scaled checkpoints need dynamic activations")
    if act_granularity is None:
        return "dynamic_per_token"
    if dynamic and act_granularity in ("token", "tensor"):
        return "dynamic_per_token" if act_granularity == "token" else "dynamic_per_tensor"
    if not dynamic and act_granularity == "tensor":
        return "static_per_tensor"
    raise unsupported(f"{where}: {'dynamic' if dynamic else 'static'} activation granularity", act_granularity,
                      "fp8kern supports dynamic per-token or per-tensor, or static per-tensor activations with "
                      "per-channel or per-tensor weights")
