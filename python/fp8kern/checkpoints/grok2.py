"""Grok-2-FP8 style checkpoints: '<module>.weight' e4m3 [N, K] beside '<module>.weight.scale' [N], with the
INVERSE convention real = fp8 / scale. Recognised by the '.weight.scale' tensor names, whatever config.json says.

The scale is inverted once at load (weight_scale = 1 / scale, per channel), and the layers are weight-only, so they
load as scheme 'dynamic_per_token' (fp8kern quantizes the activations dynamically at run time).
"""

from __future__ import annotations

import torch

from .common import CheckpointFormat, LayerSpec, reshape_scale


class Grok2(CheckpointFormat):
    name = "grok2"
    suffixes = {"weight": "weight", "weight.scale": "weight_scale"}

    @classmethod
    def matches(cls, config, header) -> bool:
        return any(k.endswith(".weight.scale") for k in header)

    def layer_spec(self, module, class_names=("Linear",)):
        return LayerSpec("dynamic_per_token", "channel")

    def weight_scale(self, raw, spec, n, k, key):
        return torch.reciprocal(reshape_scale(raw, "channel", n, k, key).float())
