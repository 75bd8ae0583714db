"""Wire QAPruner into a LLaVA model: a `TokenPruner` (pruner.py) selects visual tokens, the LLM gets a shorter sequence.

`attach_pruner` wraps three things on the model instance (the class is untouched, so `save_pretrained` and the
Auto classes see an ordinary LLaVA model):

- `get_image_features` of the inner `LlavaModel` returns only the kept tokens of each image (K, in spatial order);
- `forward` drops the placeholders of pruned tokens from `input_ids`, `attention_mask`, `labels` and
  `position_ids` (re-padding rows that lost a different number of tokens), so outputs cover the shorter sequence;
- `generate` compacts the prompt once before generation, generates with the kept features, and returns the
  caller's own prompt followed by the new tokens, so slicing off the prompt works as usual; `max_length` and
  `min_length` count the caller's prompt, as on the unpruned model (lengths.py).

Inputs that already hold K placeholders per image (a processor saved with `compact_processor`) pass unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from . import call_state
from .anyres import AnyResPruner, AnyResSelection
from .compaction import PlaceholderLayout, compact, placeholder_keep_mask, positions_from_mask
from .lengths import lengths_for_compacted_prompt
from .pruner import ImageSelection, TokenPruner
from .support import pruner_class

__all__ = [
    "ImageSelection",
    "TokenPruner",
    "aligned_to_input",
    "attach_pruner",
    "compact_inputs",
    "compact_processor",
    "last_positions",
    "last_selection",
    "pruning_disabled",
    "visual_tokens_per_image",
]


def image_token_counts(selections: list[ImageSelection]) -> tuple[list[int], list[int]]:
    """N and K of each image: all its visual tokens (an any-resolution image's newlines included) and the kept."""
    full = [s.num_tokens if isinstance(s, AnyResSelection) else len(s.semantic) for s in selections]
    return full, [len(s.kept) for s in selections]


def compact_inputs(pruner: TokenPruner, selections, layout: PlaceholderLayout, input_ids, attention_mask, extra):
    """Drop pruned placeholders when the input holds all N per image; a no-op when it holds K already."""
    full, budgets = image_token_counts(selections)
    if layout.tokens_per_image(len(selections), full, budgets) is budgets:
        pruner.last_positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return input_ids, attention_mask, extra
    device = input_ids.device
    kept = torch.cat([
        torch.zeros(count, dtype=torch.bool, device=device).index_fill_(0, s.kept.to(device), True)
        for count, s in zip(full, selections, strict=True)
    ])
    keep = placeholder_keep_mask(input_ids, pruner.image_token_id, kept)
    if attention_mask is not None:  # padding goes too: rows are re-padded to the longest compacted row
        keep &= attention_mask.bool()
    removed = [0] * input_ids.shape[0]
    for row, count, budget in zip(layout.image_rows(full), full, budgets, strict=True):
        removed[row] += count - budget
    pad_id = pruner.base.config.text_config.pad_token_id
    fills = {"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0, "labels": -100, "positions": -1}
    # where each kept position sits in the caller's input_ids (`last_positions`)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions, **extra}
    new_length = layout.compacted_length(removed, input_ids.shape[1])
    result = compact(keep, tensors, fills, not layout.right_padded, new_length)
    pruner.last_positions = result.pop("positions")
    padding = result.pop("padding")
    if result["attention_mask"] is None and len(set(removed)) > 1:  # rows now differ in length
        result["attention_mask"] = (~padding).long()
    return result.pop("input_ids"), result.pop("attention_mask"), result


def _encode_and_compact(model, pruner: TokenPruner, pixel_values, input_ids, attention_mask, extra, vision_kwargs):
    # ``pruner`` is the one the call started with: a concurrent attach_pruner does not change a call in flight
    if input_ids is None:
        raise ValueError("QAPruner token pruning needs input_ids to locate the image placeholders.")
    # read before the vision tower is queued: afterwards nothing waits on the device until the language model runs
    layout = PlaceholderLayout.read(input_ids, pruner.image_token_id, attention_mask)
    outputs, selections = pruner.encode(
        model._qap_original["get_image_features"], pixel_values, input_ids, attention_mask, layout, **vision_kwargs
    )
    input_ids, attention_mask, extra = compact_inputs(pruner, selections, layout, input_ids, attention_mask, extra)
    return outputs, input_ids, attention_mask, extra


_VISION_KWARGS = (
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_sizes",
    "vision_aspect_ratio",  # OneVision
    "batch_num_images",  # OneVision: several images in a prompt are not tiled
)


def pruned_forward(model, *args, **kwargs):
    pruner: TokenPruner = model.qap_pruner
    original = model._qap_original["forward"]
    if len(args) == 1 and "input_ids" not in kwargs:
        kwargs["input_ids"], args = args[0], ()
    if args or not pruner.active or kwargs.get("pixel_values") is None:
        return original(*args, **kwargs)
    pixel_values = kwargs.pop("pixel_values")
    input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
    had_positions = kwargs.get("position_ids") is not None
    extra = {"labels": kwargs.pop("labels", None)}
    vision_kwargs = {k: kwargs[k] for k in _VISION_KWARGS if kwargs.get(k) is not None}
    outputs, input_ids, attention_mask, extra = _encode_and_compact(
        model, pruner, pixel_values, input_ids, attention_mask, extra, vision_kwargs
    )
    if had_positions:
        # positions stay contiguous over the shorter sequence, as when LLaVA is fed fewer image tokens
        kwargs["position_ids"] = (
            positions_from_mask(attention_mask)
            if attention_mask is not None
            else torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        )
    return original(
        input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs={"image": outputs}, **extra, **kwargs
    )


def pruned_generate(model, inputs=None, **kwargs):
    pruner: TokenPruner = model.qap_pruner
    original = model._qap_original["generate"]
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if not pruner.active or kwargs.get("pixel_values") is None or input_ids is None:
        return original(inputs, **kwargs)
    kwargs.pop("input_ids", None)
    pixel_values = kwargs.pop("pixel_values")
    attention_mask = kwargs.pop("attention_mask", None)
    vision_kwargs = {k: kwargs.pop(k) for k in _VISION_KWARGS if kwargs.get(k) is not None}
    outputs, compact_ids, compact_mask, _ = _encode_and_compact(
        model, pruner, pixel_values, input_ids, attention_mask, {}, vision_kwargs
    )
    kwargs = lengths_for_compacted_prompt(model, kwargs, input_ids.shape[1] - compact_ids.shape[1])
    result = original(
        input_ids=compact_ids, attention_mask=compact_mask, mm_encoder_outputs={"image": outputs}, **kwargs
    )
    return _restore_prompt(result, input_ids, compact_ids.shape[1])


def _restore_prompt(result, prompt: torch.Tensor, compact_length: int):
    """Put the caller's prompt back in front of the generated tokens."""
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    repeats = sequences.shape[0] // prompt.shape[0]
    restored = torch.cat((prompt.repeat_interleave(repeats, dim=0), sequences[:, compact_length:]), dim=1)
    if isinstance(result, torch.Tensor):
        return restored
    result.sequences = restored
    return result


def pruned_image_features(model, pixel_values, *args, **kwargs):
    """`get_image_features` returning only the kept tokens of each image."""
    pruner: TokenPruner = model.qap_pruner
    original = model._qap_original["get_image_features"]
    if not pruner.active:
        return original(pixel_values, *args, **kwargs)
    if args:  # e.g. LLaVA-NeXT's image_sizes
        kwargs = inspect.signature(original).bind_partial(pixel_values, *args, **kwargs).arguments
        kwargs = {**kwargs.pop("kwargs", {}), **kwargs}
        pixel_values = kwargs.pop("pixel_values")
    # encode always asks for the output object; honour the caller's return_dict as transformers' can_return_tuple does
    return_dict = kwargs.pop("return_dict", None)
    outputs, _ = pruner.encode(original, pixel_values, None, None, **kwargs)
    return outputs if (pruner.base.config.return_dict if return_dict is None else return_dict) else outputs.to_tuple()


def _wrapper(function, model: nn.Module, original) -> functools.partial:
    """``function`` bound to ``model``, showing the signature of the method it wraps.

    transformers inspects `forward`'s signature (e.g. to validate generate's model kwargs), so the wrapper must not
    look like a bare ``(*args, **kwargs)``.
    """
    wrapper = functools.partial(function, model)
    wrapper.__signature__ = inspect.signature(original)
    wrapper.__doc__ = original.__doc__
    return wrapper


QUANTIZATION_FIELDS = (
    "w_bits",
    "w_group_size",
    "w_symmetric",
    "a_bits",
    "a_granularity",
    "a_group_size",
    "a_symmetric",
    "quantize_projector",
    "quantize_vision_tower",
    "modules_to_not_convert",
    "rotation",
    "rotation_seed",
)
# how the weights were made: they describe the loaded model, whatever a pruning config passed later says
WEIGHT_FIELDS = ("weight_method", "gptq_damping", "gptq_act_order", "gptq_block_size")
PROVENANCE_FIELDS = ("base_model", "calibration_summary", "token_statistics")


def _adopt_config(model: nn.Module, config) -> None:
    """Make ``config`` the model's saved config, when the model is quantized with QAPrunerConfig.

    Pruning settings may change; quantization settings are baked into the weights and may not. Provenance the new
    config lacks (calibration, token statistics) carries over.
    """
    current = getattr(model.config, "quantization_config", None)
    if current is None or current is config or getattr(current, "quant_method", None) != config.quant_method:
        return
    changed = [name for name in QUANTIZATION_FIELDS if getattr(current, name) != getattr(config, name)]
    if changed:
        raise ValueError(
            f"attach_pruner() can change pruning settings only; {changed} differ from the loaded model's "
            "quantization. Reload the model with the new QAPrunerConfig instead."
        )
    for name in PROVENANCE_FIELDS:
        if getattr(config, name) is None:
            setattr(config, name, getattr(current, name))
    for name in WEIGHT_FIELDS:
        setattr(config, name, getattr(current, name))
    model.config.quantization_config = config


def attach_pruner(model: nn.Module, config) -> TokenPruner:
    """Make ``model`` prune visual tokens per ``config`` (idempotent: a second call replaces the settings).

    On a model loaded with QAPrunerConfig, ``config`` also becomes the config that `save_pretrained` writes.
    """
    pruner_type = pruner_class(model)
    _adopt_config(model, config)
    pruner = pruner_type(model, config)
    if not hasattr(model, "_qap_original"):
        model._qap_original = {
            "forward": model.forward,
            "generate": model.generate,
            "get_image_features": model.model.get_image_features,
        }
        model.forward = _wrapper(pruned_forward, model, model.forward)
        model.generate = _wrapper(pruned_generate, model, model.generate)
        model.model.get_image_features = _wrapper(pruned_image_features, model, model.model.get_image_features)
    model.qap_pruner = pruner
    return pruner


def detach_pruner(model: nn.Module) -> None:
    """Undo `attach_pruner`: the model runs on all visual tokens again (a no-op for a model that does not prune)."""
    originals = model.__dict__.pop("_qap_original", None)
    if originals is None:
        return
    for owner, name in ((model, "forward"), (model, "generate"), (model.model, "get_image_features")):
        original = originals[name]
        if getattr(original, "__func__", None) is getattr(type(owner), name):
            del owner.__dict__[name]  # the class's own method again
        else:
            setattr(owner, name, original)  # a wrapper that was there before (e.g. accelerate's hooks)
    del model.qap_pruner


def last_selection(model: nn.Module) -> list[ImageSelection]:
    """Kept indices and S^P, S^Q, E', R', S of every image in the model's last pruned call."""
    pruner = getattr(model, "qap_pruner", None)
    if pruner is None:
        raise ValueError("This model does not prune visual tokens; load it with QAPrunerConfig(keep_ratio<1).")
    return pruner.last


def last_positions(model: nn.Module) -> torch.Tensor:
    """[B, L'] for this thread's last pruned call: the index in the caller's ``input_ids`` [B, L] of each position
    of the shortened sequence the outputs cover (-1 where a row was re-padded). ``logits[b, j]`` belongs to
    ``input_ids[b, last_positions(model)[b, j]]``; `aligned_to_input` puts outputs back on the input's positions.
    """
    pruner = getattr(model, "qap_pruner", None)
    if pruner is None:
        raise ValueError("This model does not prune visual tokens; load it with QAPrunerConfig(keep_ratio<1).")
    if pruner.last_positions is None:
        raise ValueError("last_positions() needs a pruned call (with pixel_values) in this thread first.")
    return pruner.last_positions


def aligned_to_input(values: torch.Tensor, positions: torch.Tensor, input_length: int, fill: float = float("nan")):
    """``values`` [B, L', ...] of a pruned call (e.g. its logits) on the caller's [B, input_length] positions, with
    ``fill`` at the positions of pruned image tokens (and of padding the pruned call added)."""
    batch, rest = values.shape[0], values.shape[2:]
    out = values.new_full((batch, input_length + 1, *rest), fill)
    index = torch.where(positions >= 0, positions, input_length)  # re-padding goes to a column that is cut off
    index = index.view(*index.shape, *(1,) * len(rest)).expand_as(values)
    return out.scatter(1, index, values)[:, :input_length]


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` on all visual tokens inside this block, in the calling thread only (other threads keep
    pruning; a no-op for models that do not prune)."""
    pruner = getattr(model, "qap_pruner", None)
    if pruner is None:
        yield
        return
    with call_state.disabled(pruner.key):
        yield


def visual_tokens_per_image(config) -> int:
    """N: visual tokens per image that LLaVA feeds its language model (patches, plus [CLS] when it is kept)."""
    vision = config.vision_config
    keeps_cls = config.vision_feature_select_strategy == "full" and vision.model_type == "clip_vision_model"
    return (vision.image_size // vision.patch_size) ** 2 + keeps_cls


def compact_processor(processor, model: nn.Module):
    """A copy of ``processor`` that emits K placeholders per image instead of N (save it beside the model)."""
    import copy

    pruner: TokenPruner = model.qap_pruner
    if isinstance(pruner, AnyResPruner):
        raise ValueError(
            f"compact_processor() needs a fixed number of visual tokens per image; {type(model).__name__} gives "
            "each image as many as its size needs. Pass the base processor's inputs: the model prunes them."
        )
    num_tokens = visual_tokens_per_image(model.config)
    compact_copy = copy.deepcopy(processor)
    # LlavaProcessor emits (H/p)*(W/p) + num_additional_image_tokens (- 1 for the "default" strategy) placeholders;
    # shift that count from N to K
    compact_copy.num_additional_image_tokens += pruner.budget(num_tokens) - num_tokens
    return compact_copy
