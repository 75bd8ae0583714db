"""The guard that makes a qap checkpoint fail to load without optimum-qap, instead of loading wrong weights.

Without `import optimum_qap` (or with a mistyped `quant_method`), transformers only warns about the unknown
quantization method and builds a plain LLaVA: its packed layers would be randomly initialised, and a rotated model
would lack its online transforms. So `save_pretrained` writes one empty tensor where a plain LLaVA expects a full one,
and transformers refuses a checkpoint whose shapes mismatch the model (a RuntimeError, not a warning):

- with packed weights: under the `weight` name of the first packed layer (which has no float weight to store);
- else, with rotation (say a pruning-only model on a rotated backbone): in place of the final RMSNorm's gain, which
  rotation fused into lm_head and set to exactly 1, so the qap load restores it bit-exactly.

A checkpoint with neither holds the float weights of a plain LLaVA and loads as one (unpruned, unquantized
activations). The qap load ignores the packed-layer guard and receives the norm guard into an empty parameter.
Checkpoints saved before the guard existed load as before.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .quant.linear import QuantLinear


def guard_key(model: nn.Module, rotation: bool) -> str | None:
    """The state-dict key that holds the guard, or None when the checkpoint is a plain float LLaVA's."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.spec.packs_weight:
            return f"{name}.weight"
    if rotation:
        return next((f"{name}.weight" for name, _ in model.named_modules() if name.endswith("language_model.norm")),
                    None)
    return None


def add_guard(model: nn.Module, state: dict[str, torch.Tensor], rotation: bool) -> dict[str, torch.Tensor]:
    """``state`` (the model's state dict) with the guard in place."""
    key = guard_key(model, rotation)
    if key is not None:
        state[key] = state.get(key, torch.zeros(0)).new_zeros(0)
    return state


def expect_guard(model: nn.Module, rotation: bool, tensors: dict[str, tuple]) -> None:
    """Before the weights load: make the skeleton accept the guard that ``tensors`` (the checkpoint's tensors under
    the model's names, name -> (dtype, shape)) holds."""
    key = guard_key(model, rotation)
    if key is None or tensors.get(key, (None, None))[1] != (0,):
        return  # no guard (a checkpoint written before it existed)
    module = model.get_submodule(key.rpartition(".")[0])
    if isinstance(module, QuantLinear):  # a packed layer has no `weight`: the guard is an unexpected key
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | {f"^{re.escape(key)}$"}
    else:  # the fused final norm: its gain arrives empty and is restored by `restore_guarded`
        module.weight = nn.Parameter(module.weight.new_empty(0))
        module._qap_guarded_size = model.config.get_text_config().hidden_size


def restore_guarded(model: nn.Module) -> None:
    """After the weights loaded: the final norm's gain, which rotation had set to exactly 1."""
    for module in model.modules():
        size = module.__dict__.pop("_qap_guarded_size", None)
        if size is not None:
            module.weight = nn.Parameter(torch.ones(size, dtype=module.weight.dtype, device=module.weight.device))
