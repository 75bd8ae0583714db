"""LoRA (QLoRA-style) fine-tuning of a qap model with PEFT: adapters in the model dtype beside frozen packed weights.

PEFT knows no `QuantLinear`; `install_peft_support` (run when a qap model loads and PEFT is installed) teaches its
LoRA tuner three things about a model that holds `QuantLinear`s:

* each targeted `QuantLinear` gets a `QuantLoraLinear` (PEFT's custom-module mapping, ``LoraConfig._custom_modules``):
  ``base(x) + scaling * B(A(dropout(x)))``, the base computing as before (packed weights, fake-quantized input, the
  online rotation hook) and its input gradient passing the activation rounding straight through;
* ``target_modules="all-linear"`` means the language model's linear layers (PEFT alone takes every ``nn.Linear``,
  which on a qap model is the vision tower and the projector, and none of the quantized layers);
* merging an adapter into packed weights is refused (`LoraMergeError`) before any layer is touched.

Nothing changes for models without `QuantLinear`s.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .quant.linear import QuantLinear
from .quantizer import model_parts

logger = logging.getLogger(__name__)
_INSTALLED = "_qap_lora_support"
ALL_LINEAR = "all-linear"
# the LoRA initialisations that need no float base weight (PiSSA, OLoRA, LoftQ, ... decompose it)
SUPPORTED_INITS = (True, False, "gaussian")


class LoraMergeError(ValueError):
    """A LoRA adapter cannot be merged into packed low-bit weights."""


def merge_error(name: str = "") -> LoraMergeError:
    where = f" ({name})" if name else ""
    return LoraMergeError(
        f"cannot merge a LoRA adapter into the packed low-bit weights of a QuantLinear{where}: W + BA is not on the "
        "quantization grid, so merging would mean requantizing it and losing the adapter's effect. Either keep the "
        "adapter unmerged (the PeftModel generates, saves with `save_pretrained` and reloads with "
        "`PeftModel.from_pretrained` as it is), or merge into a float model: reload the qap checkpoint, call "
        "`model.dequantize()`, then `PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()`."
    )


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA around a `QuantLinear`: the packed base computes as before, the adapter (A: in -> r, B: r -> out) adds
    ``scaling * B(A(dropout(x)))`` on the unquantized input, in the adapter dtype."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: QuantLinear) -> tuple[torch.device, torch.dtype]:
        # the scales hold the model dtype (the packed codes are uint8)
        reference = base_layer.weight_scale if base_layer.spec.packs_weight else base_layer.weight
        return reference.device, reference.dtype

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if config.init_lora_weights not in SUPPORTED_INITS:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} needs the float base weight, which a QuantLinear "
                f"does not hold; use one of {SUPPORTED_INITS}."
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise merge_error()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The float update ``scaling * B A`` (out x in) the adapter adds to the dequantized weight."""
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)  # aLoRA is a variant this layer refuses
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def language_model_linears(model: nn.Module) -> set[str]:
    """Names of the language model's linear layers (quantized or float, `lm_head` excluded: it is outside the
    language model), as PEFT targets them: an already adapted layer by its own name, nothing inside an adapter."""
    root = model_parts(model)["language_model"] + "."
    tuner_layers = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    names = set()
    for name, module in model.named_modules():
        if not name.startswith(root) or not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        name = name.removesuffix(".base_layer")
        if name in tuner_layers or not any(name.startswith(layer + ".") for layer in tuner_layers):
            names.add(name)
    return names


def holds_quant_linears(model: nn.Module) -> bool:
    return any(isinstance(module, QuantLinear) for module in model.modules())


def prepare_lora_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` (changed in place) ready for a model holding `QuantLinear`s: the custom-module mapping
    registered and ``"all-linear"`` resolved to the language model's linear layers."""
    if not holds_quant_linears(model):
        return config
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = language_model_linears(model)
        logger.info("target_modules='all-linear' on a qap model: the %d linear layers of the language model",
                    len(config.target_modules))
    return config


def install_peft_support() -> None:
    """Route PEFT's LoRA adapter preparation and merge check through this module (once per process)."""
    prepare, check_merge = LoraModel._prepare_adapter_config, LoraModel._check_merge_allowed
    if getattr(prepare, _INSTALLED, False):
        return

    def _prepare_adapter_config(self, peft_config, model_config):
        return prepare_lora_config(self.model, prepare(self, peft_config, model_config))

    def _check_merge_allowed(self):
        check_merge(self)
        adapted = [name for name, module in self.model.named_modules() if isinstance(module, QuantLoraLinear)]
        if adapted:
            raise merge_error(f"{len(adapted)} adapted QuantLinear layers, e.g. {adapted[0]}")

    setattr(_prepare_adapter_config, _INSTALLED, True)
    LoraModel._prepare_adapter_config = _prepare_adapter_config
    LoraModel._check_merge_allowed = _check_merge_allowed
