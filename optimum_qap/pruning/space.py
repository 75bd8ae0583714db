"""Which view of the visual tokens the quantization-sensitivity score S^Q is computed on.

The paper scores the projector outputs. On a rotated backbone those outputs enter the residual stream already
rotated (x Q), and the first quantizer sees them after an RMSNorm, so two views are offered: "projector" undoes the
rotation (the paper's features, whatever the backbone) and "quantizer" applies the first decoder layer's input norm
(what its 4-bit activation quantizer rounds).
"""

from __future__ import annotations

import torch
from torch import nn

from ..transforms.hadamard import KroneckerRotation


def is_rotated(llava_model: nn.Module) -> bool:
    """Whether `rotate_language_model` rotated this model (its online transforms are attached)."""
    from ..transforms.rotation import ONLINE_HOOK

    down_proj = llava_model.language_model.layers[0].mlp.down_proj
    # under a PEFT adapter the hook stays on the wrapped layer (down_proj.base_layer)
    return any(getattr(module, ONLINE_HOOK, None) is not None for module in down_proj.modules())


def sensitivity_tokens(llava_model: nn.Module, config, features: torch.Tensor) -> torch.Tensor:
    """The visual tokens [..., D] as the configured `sensitivity_space` sees them (``llava_model``: the inner
    `LlavaModel`)."""
    if config.sensitivity_space == "quantizer":
        return llava_model.language_model.layers[0].input_layernorm(features)
    if config.rotation and is_rotated(llava_model):
        # in float32, as the scores are computed: also faster than a bf16 matmul on CPUs without bf16 units
        rotation = KroneckerRotation.hadamard(features.shape[-1], config.rotation_seed)  # the one rotation.py applied
        return rotation.apply(features.float(), transpose=True)
    return features
