"""`TokenPruner`: scores an image's visual tokens (semantic relevance fused with quantization sensitivity) and keeps
the top K. What it needs from the model is the vision path; `patch.py` wires it into forward and generate."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoTokenizer

from . import call_state
from .clip_text import ClipTextRelevance
from .compaction import PlaceholderLayout
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

    @property
    def last_positions(self) -> torch.Tensor | None:
        """This thread's last pruned call: the caller's input position of each position the outputs cover."""
        return getattr(self._local, "positions", None)

    @last_positions.setter
    def last_positions(self, positions: torch.Tensor) -> None:
        self._local.positions = positions

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
                f'QAPrunerConfig.{name}="auto" has not been chosen yet: call optimum_qap.calibrate(model, processor, '
                "samples) or optimum_qap.select_fusion(model, processor, samples), or load with calibration samples."
            )
        return chosen

    def outlier_strength(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's range and group-quantization error over their calibrated medians (the larger of the two);
        ``tokens`` as `sensitivity_tokens` gives them (the space the statistics were calibrated in)."""
        stats = self.config.token_statistics
        if not stats:
            raise ValueError(
                'QAPrunerConfig.fusion="outlier_slots" needs calibrated token statistics: call '
                'optimum_qap.calibrate(model, processor, samples) (it also chooses "auto" values), or load with '
                "calibration samples."
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
        return self.instructions_of_rows(input_ids, attention_mask, rows)

    def instructions_of_rows(self, input_ids, attention_mask, rows: list[int]) -> list:
        """The instruction of each image, given the batch row it sits in."""
        text = input_ids != self.image_token_id
        if attention_mask is not None:
            text &= attention_mask.bool()
        ids = [input_ids[row][text[row]] for row in rows]
        if self.clip is not None:
            return [self.instruction_tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        embed = self.base.get_input_embeddings()
        return [embed(i) for i in ids]
