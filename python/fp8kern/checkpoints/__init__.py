"""Load FP8 Hugging Face checkpoints into fp8kern Fp8Linear models.

    from fp8kern.checkpoints import from_pretrained, detect_format
    model = from_pretrained("path/to/Qwen3-8B-FP8", device="cuda")

Formats: compressed-tensors float-quantized ('compressed-tensors'), quant_method 'fp8' per tensor, per channel or
in 128x128 blocks ('fp8'), AMD Quark FP8 and INT4-FP8 ('quark'), Grok-2 FP8 ('grok2') and torchao Float8
('torchao'). Needs the optional packages safetensors and transformers
(tqdm for progress bars); fp8kern itself imports without them.
"""

from .common import CheckpointFormat, LayerSpec
from .loader import FORMATS, detect_format, from_pretrained, open_format

__all__ = ["from_pretrained", "detect_format", "open_format", "FORMATS", "CheckpointFormat", "LayerSpec"]
