"""transformers glue: the `HfQuantizer` that `from_pretrained(..., quantization_config=QAPrunerConfig())` runs."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from .checkpoint import LAYOUT_KEY, check_layout, check_tensors, layout, model_keys, read_headers
from .config import QAPrunerConfig
from .guard import add_guard, expect_guard, restore_guarded
from .mapped_pages import released_when_dropped
from .progress import progress_bar, timed_phase
from .pruning.patch import attach_pruner
from .pruning.support import pruner_class
from .quant import fused
from .quant.kernels import KERNEL_MODES
from .quant.linear import QuantLinear, QuantSpec
from .transforms.rotation import attach_online_rotations, rotate_outside_layers


def model_parts(model: nn.Module) -> dict[str, str]:
    """Qualified names of the language model, vision tower and projector of a LLaVA-style model."""
    names = {}
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("language_model", "vision_tower", "multi_modal_projector") and leaf not in names:
            names[leaf] = name
    if "language_model" not in names:
        raise ValueError(
            f"QAPrunerConfig quantization is not supported for {type(model).__name__}: it quantizes the "
            "`language_model` submodule of an image-text model, and this one has none. The supported models are "
            "listed in the README (Supported models)."
        )
    return names


def linear_names_to_quantize(model: nn.Module, config: QAPrunerConfig) -> list[str]:
    """Every `nn.Linear` under the selected parts, minus `modules_to_not_convert` (names or name suffixes)."""
    parts = model_parts(model)
    roots = [parts["language_model"]]
    if config.quantize_projector and "multi_modal_projector" in parts:
        roots.append(parts["multi_modal_projector"])
    if config.quantize_vision_tower and "vision_tower" in parts:
        roots.append(parts["vision_tower"])
    skip = ["lm_head", *(config.modules_to_not_convert or [])]
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(name.startswith(root + ".") for root in roots):
            continue
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip):
            continue
        selected.append(name)
    return selected


def _swap_linears(
    model: nn.Module, names: list[str], make: Callable[[str, nn.Linear], nn.Module], progress: bool = False
) -> None:
    """Replace each named linear by ``make(name, linear)``, one at a time: the old module is released each time,
    and with it its weight's pages where they lie in the memory-mapped checkpoint (mapped_pages.py)."""
    for name in progress_bar(names, "Quantizing", progress and bool(names), unit="linear"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with released_when_dropped(getattr(parent, child).parameters()):
            setattr(parent, child, make(name, getattr(parent, child)))


def replace_linears(model: nn.Module, config: QAPrunerConfig, awaiting_weight: bool) -> list[str]:
    """Swap the selected `nn.Linear` modules for empty `QuantLinear`s of the same shape, dtype and device."""
    if not (config.quantizes_weights or config.quantizes_activations):
        return []  # a plain token pruner
    spec = QuantSpec.from_config(config)
    names = linear_names_to_quantize(model, config)

    def empty(_name: str, linear: nn.Linear) -> QuantLinear:
        return QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, spec,
                           dtype=linear.weight.dtype, device=linear.weight.device, awaiting_weight=awaiting_weight)

    _swap_linears(model, names, empty)
    return names


def quantize_linears(
    model: nn.Module,
    config: QAPrunerConfig,
    codes: dict | None = None,
    names: list[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Replace the selected (or the given ``names``), still float `nn.Linear`s of a loaded model by `QuantLinear`s.

    ``codes`` maps names to precomputed weight codes (GPTQ); the others are rounded to nearest. Each float weight
    is released as soon as its replacement exists, so memory never holds two copies of the model.
    """
    if not (config.quantizes_weights or config.quantizes_activations):
        return []
    spec = QuantSpec.from_config(config)
    names = linear_names_to_quantize(model, config) if names is None else names
    codes = codes or {}
    _swap_linears(model, names, lambda name, linear: QuantLinear.from_linear(linear, spec, codes.get(name)), progress)
    return names


class PrepareQuantLinear(ConversionOps):
    """Loading op: turn the float `weight` of a `QuantLinear` into its serialized tensors, one layer at a time."""

    def __init__(self, hf_quantizer: QAPrunerHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, missing_keys=None, **kwargs) -> dict[str, Any]:
        (key, value), = input_dict.items()
        weight = value[0] if isinstance(value, list) else value
        prefix = key.rpartition(".")[0]
        module: QuantLinear = model.get_submodule(prefix)
        state = module.quantized_state(weight)
        if module.spec.packs_weight:
            # The float placeholder only existed to receive this tensor; dropping it keeps it out of memory.
            del module.weight
            if missing_keys is not None:
                missing_keys.discard(key)
        return {f"{prefix}.{name}": tensor for name, tensor in state.items()}


class QAPrunerHfQuantizer(HfQuantizer):
    """Quantizes the language model's linear layers while weights load and attaches QAPruner token pruning."""

    requires_calibration = False
    quantization_config: QAPrunerConfig

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "QAPrunerConfig cannot quantize layers offloaded to disk; use a device_map without 'disk'."
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def get_quantize_ops(self) -> ConversionOps:
        return PrepareQuantLinear(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        model_parts(model)  # a model we cannot handle fails before its weights load
        config = self.quantization_config
        if config.prunes:
            pruner_class(model)
        if not self.pre_quantized:
            config.check_can_quantize()
        headers = read_headers(checkpoint_files or []) if self.pre_quantized else None
        if headers is not None:
            check_layout(config, headers[1])
        if self.pre_quantized or not config.quantizes_after_loading:
            replace_linears(model, config, awaiting_weight=not self.pre_quantized)
        if headers is not None and headers[0]:
            expect_guard(model, config.rotation, model_keys(model, headers[0], dict.fromkeys(model.state_dict())))
            check_tensors(model, headers[0])
        return model

    def get_state_dict_and_metadata(self, model):
        state = add_guard(model, model.state_dict(), model.config.quantization_config.rotation)  # guard.py
        # the layout the tensors are saved in, so that a later edit of config.json cannot reinterpret them
        return state, {LAYOUT_KEY: layout(model.config.quantization_config)}

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .calibration import calibrate, config_samples
        from .hub import hub_model_id, push_to_hub, save_pretrained

        config = self.quantization_config
        restore_guarded(model)
        # only a Hub id: a local path must not reach a config that may be published (older checkpoints held one)
        source = None if self.pre_quantized else model.config.name_or_path
        config.base_model = hub_model_id(config.base_model or source)
        for name, method in (("push_to_hub", push_to_hub), ("save_pretrained", save_pretrained),
                             ("num_parameters", num_parameters)):
            setattr(model, name, functools.partial(method, model))
        calibrating = not self.pre_quantized and config.calibration is not None
        processor, samples = config_samples(model) if calibrating else (None, None)
        if not self.pre_quantized and config.quantizes_after_loading:
            quantize_after_loading(model, config, processor, samples)
        elif config.rotation:
            attach_online_rotations(model)
        if config.prunes:
            attach_pruner(model, config)
        if calibrating:
            calibrate(model, processor, samples)
            if isinstance(config.calibration, list):
                config.calibration = None  # local file paths stay out of the saved config; calibration_summary stays
        set_kernels(model, config.kernels)
        if any(p.device.type == "cpu" for p in model.parameters()):
            fused.ops()  # built here at their first use on a machine (seconds), not inside the first generate
        if importlib.util.find_spec("peft") is not None:
            from .lora import install_peft_support

            install_peft_support()  # LoRA on QuantLinear, "all-linear" = the language model's linears
        return model

    def _dequantize(self, model, dtype=None):
        from .dequantize import dequantize_model

        return dequantize_model(model, dtype)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        # `QuantLinear` traces without graph breaks on every path (tests/test_kernels.py), so generate may compile
        # the decode step; the pruner only runs in the prefill, which generate keeps eager
        return True

    @property
    def is_trainable(self) -> bool:
        # adapters train on top (PEFT LoRA, optimum_qap.lora): the packed weights are frozen buffers and input
        # gradients pass the activation rounding straight through (QuantLinear.quantize_input)
        return True


def quantize_after_loading(model: nn.Module, config: QAPrunerConfig, processor, samples) -> None:
    """Rotate (if asked) and quantize the float linears, one decoder layer at a time: GPTQ on the calibration
    samples, or RTN. Each layer is rotated just before it is quantized and its float weights are released as it
    is, so the rotated copies (written pages of the memory-mapped checkpoint) of one layer exist at a time."""
    prepare_layer = prepare_rotation(model, config)
    if config.weight_method == "gptq" and config.quantizes_weights:
        from .transforms.gptq_model import gptq_quantize_model

        with timed_phase(model, "gptq"):
            gptq_quantize_model(model, processor, samples, config, prepare_layer)  # the decoder layers
    else:
        with timed_phase(model, "quantize"):
            for layer, names in progress_bar(decoder_layer_linears(model, config), "Quantizing", unit="layer"):
                prepare_layer(layer)
                quantize_linears(model, config, names=names)
    with timed_phase(model, "quantize"):
        # what is left outside the decoder layers (a quantized projector or vision tower): round to nearest
        quantize_linears(model, config, progress=True)
    if config.rotation:
        attach_online_rotations(model)  # the hooks belong to the modules that were just replaced


def prepare_rotation(model: nn.Module, config: QAPrunerConfig) -> Callable[[nn.Module], None]:
    """With ``config.rotation``: rotate what lies outside the decoder layers now and attach the online transforms;
    returns the function that makes one decoder layer ready to quantize (rotates it, timed as "rotate")."""
    if not config.rotation:
        return lambda _layer: None
    with timed_phase(model, "rotate"):
        rotate_layer = rotate_outside_layers(model, config.rotation_seed)
        attach_online_rotations(model)

    def rotate(layer: nn.Module) -> None:
        with timed_phase(model, "rotate"):
            rotate_layer(layer)

    return rotate


def decoder_layer_linears(model: nn.Module, config: QAPrunerConfig) -> list[tuple[nn.Module, list[str]]]:
    """Each decoder layer of the language model, with the names of its linears that ``config`` quantizes."""
    selected = linear_names_to_quantize(model, config)
    decoder = model.model.language_model
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    return [(layer, [name for name in selected if name.startswith(f"{prefix}.layers.{index}.")])
            for index, layer in enumerate(decoder.layers)]


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> `QuantLinear` for every quantized layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def num_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' count, with each packed weight counted at its logical size (out x in), as for bitsandbytes
    4-bit; packed weights are buffers and not trainable, so ``only_trainable`` leaves them out."""
    total = type(model).num_parameters(model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable:
        return total
    packed = [m for m in quantized_modules(model).values() if m.spec.packs_weight]
    return total + sum(m.in_features * m.out_features for m in packed)


def cache_dequantized_weights(model: nn.Module, enabled: bool = True) -> None:
    """Trade memory for speed: every `QuantLinear` keeps its dequantized weight between calls (not saved)."""
    for module in quantized_modules(model).values():
        module.cache_dequantized_weight(enabled)


def set_kernels(model: nn.Module, mode: str) -> None:
    """Run every `QuantLinear` of ``model`` on its fastest exact path ("auto") or on the simulated reference
    ("simulated"); the config's ``kernels`` field records the choice, so it survives save and reload."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not one of {KERNEL_MODES}")
    for module in quantized_modules(model).values():
        module.kernels = mode
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, QAPrunerConfig):
        config.kernels = mode


def weight_storage_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by quantized weights (their saved form), by the kernel-format copies repacked from them at first
    use, and by all other parameters and buffers of ``model``."""
    quantized = quantized_modules(model)
    quantized_tensors = {id(t) for m in quantized.values() for t in (*m.parameters(), *m.buffers())}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    rest = sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in quantized_tensors)
    return {"quantized_weights": sum(m.weight_storage_bytes() for m in quantized.values()),
            "kernel_tensors": sum(m.kernel_tensor_bytes() for m in quantized.values()), "other": rest}

