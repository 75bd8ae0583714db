"""Wire QAPruner into a LLaVA model: score and select visual tokens, then feed the LLM a shorter sequence.

`attach_pruner` wraps three things on the model instance (the class is untouched, so `save_pretrained` and the
Auto classes see an ordinary LLaVA model):

- `get_image_features` of the inner `LlavaModel` returns only the kept tokens of each image (K, in spatial order);
- `forward` drops the placeholders of pruned tokens from `input_ids`, `attention_mask`, `labels` and
  `position_ids` (re-padding rows that lost a different number of tokens), so outputs cover the shorter sequence;
- `generate` compacts the prompt once before generation, generates with the kept features, and returns the
  caller's own prompt followed by the new tokens, so slicing off the prompt works as usual.

Inputs that already hold K placeholders per image (a processor saved with `compact_processor`) pass unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer

from . import call_state
from .clip_text import ClipTextRelevance
from .compaction import PlaceholderLayout, compact, placeholder_keep_mask, positions_from_mask
from .scoring import (
    channel_range,
    cls_attention_scores,
    encoder_layer_index,
    fuse_scores,
    group_quant_error,
    instruction_relevance,
    quantization_sensitivity,
)
from .selection import dpp_greedy_indices, outlier_slot_indices, resolve_budget, topk_indices
from .space import sensitivity_tokens


@dataclass
class ImageSelection:
    """Scores of one image's N visual tokens and the K kept (indices into the N, ascending)."""

    kept: torch.Tensor
    semantic: torch.Tensor
    sensitivity: torch.Tensor
    error: torch.Tensor
    range: torch.Tensor
    fused: torch.Tensor
    outlier_strength: torch.Tensor | None = None  # outlier_slots fusion: range or error / calibrated median


def _vision_encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    return getattr(vision_tower, "vision_model", vision_tower).encoder.layers


def _has_cls_token(vision_tower: nn.Module) -> bool:
    return hasattr(getattr(vision_tower, "vision_model", vision_tower).embeddings, "class_embedding")


def _clip_text_tower(model: nn.Module, config) -> tuple[ClipTextRelevance, object]:
    """CLIP's text tower and image projection for ``config.clip_text_model``, and the LLaVA tokenizer that turns the
    prompt back into text for it. Reused from the model's previous pruner when the id is unchanged."""
    previous = getattr(model, "qap_pruner", None)
    if previous is not None and previous.clip is not None and previous.config.clip_text_model == config.clip_text_model:
        return previous.clip, previous.instruction_tokenizer
    tower = model.model.vision_tower
    if tower.config.model_type != "clip_vision_model":
        raise ValueError(
            f"QAPrunerConfig.clip_text_model needs a CLIP vision tower; this model's is {type(tower).__name__}. "
            "Leave clip_text_model=None to score with the LLM's embeddings."
        )
    try:
        clip = ClipTextRelevance.from_pretrained(config.clip_text_model, dtype=tower.dtype)
    except OSError as error:
        message = f"QAPrunerConfig.clip_text_model={config.clip_text_model!r} could not be loaded: {error}"
        raise ValueError(message) from error
    if clip.vision_hidden_size != tower.config.hidden_size:
        raise ValueError(
            f"QAPrunerConfig.clip_text_model={config.clip_text_model!r} projects {clip.vision_hidden_size}-wide "
            f"vision features, but this model's vision tower is {tower.config.hidden_size} wide: use the CLIP "
            "checkpoint the vision tower comes from."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            "QAPrunerConfig.clip_text_model reads the instruction back as text with the LLaVA tokenizer, looked up "
            f"where the model was loaded from ({model.name_or_path!r}), and found none: load the model with "
            "from_pretrained from a folder or repo that holds its tokenizer."
        ) from error
    return clip.to(tower.device), tokenizer


class TokenPruner:
    """Scores visual tokens (semantic relevance fused with quantization sensitivity) and keeps the top K."""

    def __init__(self, model: nn.Module, config):
        self.config = config
        self.base = model.model
        self.enabled = True  # for every thread; `pruning_disabled` switches it off for one
        self._local = threading.local()  # this thread's last selection
        llava_config = model.config
        if config.semantic == "cls_attention":
            if not _has_cls_token(self.base.vision_tower):
                raise ValueError(
                    f"QAPrunerConfig.semantic='cls_attention' needs a vision tower with a [CLS] token; "
                    f"{type(self.base.vision_tower).__name__} has none (e.g. SigLIP). Use semantic='cdpruner'."
                )
            if llava_config.vision_feature_select_strategy != "default":
                raise ValueError(
                    "QAPrunerConfig.semantic='cls_attention' needs vision_feature_select_strategy='default' (the "
                    f"[CLS] token dropped from the features); this model uses "
                    f"'{llava_config.vision_feature_select_strategy}'. Use semantic='cdpruner'."
                )
        self.image_token_id = llava_config.image_token_id
        self.clip, self.instruction_tokenizer = (None, None)
        if config.clip_text_model is not None:
            self.clip, self.instruction_tokenizer = _clip_text_tower(model, config)

    @property
    def key(self) -> int:
        """Identifies the model (not this pruner) in the per-thread state: `attach_pruner` may swap the pruner."""
        return id(self.base)

    @property
    def active(self) -> bool:
        """Pruning on for the calling thread."""
        return self.enabled and not call_state.is_disabled(self.key)

    @property
    def last(self) -> list[ImageSelection]:
        """The selections of this thread's last pruned call."""
        return getattr(self._local, "last", [])

    @last.setter
    def last(self, selections: list[ImageSelection]) -> None:
        self._local.last = selections

    # set while "auto" values are being chosen (optimum_qap.select_fusion); per thread
    alpha_override = call_state.PerThreadOverride("alpha")
    slots_override = call_state.PerThreadOverride("outlier_slots")

    def budget(self, num_tokens: int) -> int:
        return resolve_budget(num_tokens, self.config.keep_ratio, self.config.keep_tokens)

    @property
    def alpha(self) -> float:
        return self._resolved("alpha", self.alpha_override)

    @property
    def slots(self) -> int:
        return self._resolved("outlier_slots", self.slots_override)

    def _resolved(self, name: str, override):
        """The value in use: an override set by select_fusion, the "auto" choice, or the config's own value."""
        if override is not None:
            return override
        value = getattr(self.config, name)
        if value != "auto":
            return value
        chosen = (self.config.auto_selection or {}).get(name)
        if chosen is None:
            raise ValueError(
                f'QAPrunerConfig.{name}="auto" has not been chosen yet: call optimum_qap.select_fusion(model, '
                "processor, samples), or load with calibration samples."
            )
        return chosen

    def outlier_strength(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's range and group-quantization error over their calibrated medians (the larger of the two);
        ``tokens`` as `sensitivity_tokens` gives them (the space the statistics were calibrated in)."""
        stats = self.config.token_statistics
        if not stats:
            raise ValueError(
                'QAPrunerConfig.fusion="outlier_slots" needs calibrated token statistics: run optimum_qap.calibrate.'
            )
        cfg = self.config
        error = group_quant_error(tokens, cfg.sensitivity_group_size, cfg.scoring_bits)
        return torch.maximum(channel_range(tokens) / stats["range_median"], error / max(stats["error_median"], 1e-12))

    def semantic_scores(self, features: torch.Tensor, vision_states: dict, instructions: list) -> torch.Tensor:
        """S^P of each image's N tokens, `[num_images, N]`.

        ``vision_states`` holds the feature layer's ``"input"`` (for [CLS] attention) and ``"output"`` (for CLIP's
        image projection); ``instructions`` holds each image's instruction as LLM embeddings, or as text when a
        CLIP text tower is configured.
        """
        if self.config.semantic == "cls_attention":
            return cls_attention_scores(vision_states["input"], self._feature_encoder_layer())
        if self.clip is None:
            return torch.stack([instruction_relevance(f, t) for f, t in zip(features, instructions, strict=True)])
        patches = vision_states["output"][:, -features.shape[1] :]  # without [CLS] unless the strategy keeps it
        if self.clip.visual_projection.weight.device != patches.device:  # the model was moved after loading
            self.clip.to(patches.device)
        return torch.stack([self.clip.relevance(p, text) for p, text in zip(patches, instructions, strict=True)])

    def _feature_layer_index(self) -> int:
        layer = self.base.config.vision_feature_layer
        layer = max(layer) if isinstance(layer, (list, tuple)) else layer
        layers = _vision_encoder_layers(self.base.vision_tower)
        return encoder_layer_index(layer, len(layers))

    def _feature_encoder_layer(self) -> nn.Module:
        return _vision_encoder_layers(self.base.vision_tower)[self._feature_layer_index()]

    def select(self, features: torch.Tensor, vision_states: dict, instructions: list) -> list[ImageSelection]:
        """Score [num_images, N, D] projector outputs and choose K tokens per image (see `semantic_scores`)."""
        cfg = self.config
        semantic = self.semantic_scores(features, vision_states, instructions)
        tokens = sensitivity_tokens(self.base, cfg, features)  # what S^Q looks at (one un-rotation for both uses)
        sens = quantization_sensitivity(
            tokens,
            cfg.sensitivity_group_size,
            cfg.scoring_bits,
            cfg.error_weight,
            cfg.range_weight,
        )
        slots = cfg.fusion == "outlier_slots"
        fused = semantic if slots else fuse_scores(semantic, sens.sensitivity, self.alpha)
        strength = self.outlier_strength(tokens) if slots else None
        k = self.budget(features.shape[1])
        if slots and self.slots > k:
            raise ValueError(f"QAPrunerConfig.outlier_slots={self.slots} exceeds the {k} kept tokens per image.")
        top = topk_indices(fused, k) if not slots and cfg.selection == "topk" else None  # one batched sort
        selections = []
        for index in range(features.shape[0]):
            if slots:
                kept = outlier_slot_indices(semantic[index], strength[index], cfg.outlier_ratio, k, self.slots)
            elif top is None:
                kept = dpp_greedy_indices(features[index], fused[index], k)
            else:
                kept = top[index]
            selections.append(
                ImageSelection(
                    kept,
                    semantic[index],
                    sens.sensitivity[index],
                    sens.error[index],
                    sens.range[index],
                    fused[index],
                    None if strength is None else strength[index],
                )
            )
        return selections

    def encode(self, get_image_features, pixel_values, input_ids, attention_mask, layout=None, **kwargs):
        """Run the vision path once; return image outputs holding only the kept features, and the selections.

        ``layout`` is the input's `PlaceholderLayout` when the caller has read it already.
        """
        outputs, features, vision_states = self.run_vision(get_image_features, pixel_values, **kwargs)
        instructions = self._instructions(input_ids, attention_mask, layout, features.shape[0], features.shape[1])
        selections = self.select(features, vision_states, instructions)
        outputs.pooler_output = [f[s.kept] for f, s in zip(features, selections, strict=True)]
        self.last = selections
        return outputs, selections

    def run_vision(self, get_image_features, pixel_values, **kwargs) -> tuple[object, torch.Tensor, dict]:
        """Run the vision path once: its outputs, the stacked [num_images, N, D] features, and the feature layer's
        input and output that the semantic score needs (see `semantic_scores`), captured for this thread only."""
        call_state.ensure_capture_hooks(self._feature_encoder_layer())
        with call_state.capturing() as vision_states:
            outputs = get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
        return outputs, torch.stack(list(outputs.pooler_output)), vision_states

    def _instructions(self, input_ids, attention_mask, layout, num_images: int, num_tokens: int) -> list | None:
        """Each image's instruction (the text tokens of its prompt): LLM input embeddings, or decoded text for CLIP."""
        if self.config.semantic != "cdpruner":
            return None
        if input_ids is None:
            raise ValueError("QAPrunerConfig.semantic='cdpruner' needs input_ids to read the instruction.")
        layout = layout or PlaceholderLayout.read(input_ids, self.image_token_id, attention_mask)
        rows = layout.image_rows(layout.tokens_per_image(num_images, num_tokens, self.budget(num_tokens)))
        text = input_ids != self.image_token_id
        if attention_mask is not None:
            text &= attention_mask.bool()
        ids = [input_ids[row][text[row]] for row in rows]
        if self.clip is not None:
            return [self.instruction_tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        embed = self.base.get_input_embeddings()
        return [embed(i) for i in ids]


def compact_inputs(
    pruner: TokenPruner, selections, num_tokens: int, layout: PlaceholderLayout, input_ids, attention_mask, extra
):
    """Drop pruned placeholders when the input holds all N per image; a no-op when it holds K already."""
    num_images, budget = len(selections), len(selections[0].kept)
    if layout.tokens_per_image(num_images, num_tokens, budget) == budget:
        return input_ids, attention_mask, extra
    kept = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=input_ids.device)
    kept.scatter_(1, torch.stack([s.kept for s in selections]).to(input_ids.device), True)
    keep = placeholder_keep_mask(input_ids, pruner.image_token_id, kept)
    removed = [count // num_tokens * (num_tokens - budget) for count in layout.per_row]
    pad_id = pruner.base.config.text_config.pad_token_id
    fills = {"input_ids": 0 if pad_id is None else pad_id, "attention_mask": 0, "labels": -100}
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    new_length = input_ids.shape[1] - min(removed)
    result = compact(keep, tensors, fills, not layout.right_padded, new_length)
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
    num_tokens = len(selections[0].semantic)
    input_ids, attention_mask, extra = compact_inputs(
        pruner, selections, num_tokens, layout, input_ids, attention_mask, extra
    )
    return outputs, input_ids, attention_mask, extra


_VISION_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


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


def pruned_image_features(model, pixel_values, **kwargs):
    """`get_image_features` returning only the kept tokens of each image."""
    pruner: TokenPruner = model.qap_pruner
    original = model._qap_original["get_image_features"]
    if not pruner.active:
        return original(pixel_values=pixel_values, **kwargs)
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
    if not hasattr(model, "model") or not hasattr(model.model, "get_image_features"):
        raise ValueError(f"QAPruner token pruning needs a LLaVA model; got {type(model).__name__}.")
    _adopt_config(model, config)
    pruner = TokenPruner(model, config)
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


def last_selection(model: nn.Module) -> list[ImageSelection]:
    """Kept indices and S^P, S^Q, E', R', S of every image in the model's last pruned call."""
    pruner = getattr(model, "qap_pruner", None)
    if pruner is None:
        raise ValueError("This model does not prune visual tokens; load it with QAPrunerConfig(keep_ratio<1).")
    return pruner.last


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
    num_tokens = visual_tokens_per_image(model.config)
    compact_copy = copy.deepcopy(processor)
    # LlavaProcessor emits (H/p)*(W/p) + num_additional_image_tokens (- 1 for the "default" strategy) placeholders;
    # shift that count from N to K
    compact_copy.num_additional_image_tokens += pruner.budget(num_tokens) - num_tokens
    return compact_copy
