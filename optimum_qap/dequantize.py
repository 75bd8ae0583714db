"""`model.dequantize()`: a plain float LLaVA holding the weights a qap model computes with.

Every `QuantLinear` becomes an `nn.Linear` whose weight is its dequantized weight in the model dtype. The rotation is
kept (it is baked into every weight); its two online input transforms (o_proj, down_proj) are folded into those
layers' weights, so the float model computes the same function with no hook, saves as an ordinary LLaVA and reloads
without optimum-qap. The pruner is detached (the model sees every visual token) and activations are no longer
quantized, so with activation quantization off the dequantized model equals the qap model with pruning disabled,
up to the rounding of the folded rotations (exactly equal without rotation).
"""

from __future__ import annotations

import torch
from torch import nn

from .pruning.patch import detach_pruner
from .quant.linear import QuantLinear
from .transforms.rotation import fold_online_rotations, hooked_layers

# what the quantizer attached to the model instance (quantizer.py)
INSTANCE_METHODS = ("push_to_hub", "save_pretrained", "num_parameters")


def float_linear(module: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` holding ``module``'s dequantized weight (and bias) in ``dtype``, on its device."""
    weight = module.dequantized_weight()
    linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device=weight.device,
                       dtype=dtype)
    linear.weight.data = weight.detach().to(dtype)
    if module.bias is not None:
        linear.bias.data = module.bias.detach().to(dtype)
    return linear


def _resolve_dtype(model: nn.Module, dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else model.dtype


def dequantize_model(model: nn.Module, dtype=None) -> nn.Module:
    """Turn a qap model into a float one in place (see the module docstring) and return it."""
    dtype = _resolve_dtype(model, dtype)
    rotated = hooked_layers(model)  # read before the layers (and their hooks) are replaced
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, float_linear(module, dtype))
    if rotated:
        fold_online_rotations(model, rotated)
    detach_pruner(model)
    for name in INSTANCE_METHODS:
        model.__dict__.pop(name, None)
    return model
