"""Token pruning for any-resolution LLaVA models (LLaVA-NeXT, LLaVA-OneVision): a base tile, high-resolution tiles
and `image_newline` tokens per image.

These models encode each image as a base tile (the whole image at tile resolution) plus a grid of high-resolution
tiles, then `pack_image_features` reorders the grid's tokens row by row over the whole image, crops the padding
(`unpad_image`), may shrink the grid (OneVision's `anyres_max_*`, bilinear), and ends every row with the learned
`image_newline` vector. So an image has N_i = base + high-res + rows tokens, different for each image size.

How they are pruned (docs/pruning.md, "Any-resolution models"):

- The budget is per image over its content tokens (base tile + high-res tiles, ranked together by the fused score
  S): K_i = `resolve_budget(content_i)`. The score decides how much of the base tile survives.
- Newline tokens are always kept, on top of K_i, and never scored: they are one constant vector (every score would
  be equal, and a DPP would see them as duplicates), and they carry the row layout the language model was trained
  on. A row whose content is all pruned keeps its newline, so the layout of the surviving tokens stays readable.
- Which packed position holds which tile token is not recomputed here: `pack_image_features` itself packs a marker
  tensor alongside the features (`record_packing`), so the layout is exactly the model's, whatever its version.
- Kept tokens stay in packed order, and compaction gives the shorter sequence contiguous positions, exactly as if
  the model had been given only those placeholders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from . import call_state
from .compaction import PlaceholderLayout
from .pruner import ImageSelection, TokenPruner
from .scoring import cls_attention_row, minmax_normalize

_PACKING_WRAPPED = "_qap_records_packing"


@dataclass(kw_only=True)
class AnyResSelection(ImageSelection):
    """`ImageSelection` of an any-resolution image: ``kept`` indexes its N packed tokens (newlines included);
    the scores cover its content tokens only, at the packed positions ``content``."""

    content: torch.Tensor
    num_tokens: int
    base_tokens: int  # content[:base_tokens] is the base tile

    def kept_by_part(self) -> dict[str, int]:
        """How many kept tokens are base tile, high-resolution and newline tokens."""
        kept = torch.zeros(self.num_tokens, dtype=torch.bool)
        kept[self.kept.cpu()] = True
        content = self.content.cpu()
        base = int(kept[content[: self.base_tokens]].sum())
        high_res = int(kept[content[self.base_tokens :]].sum())
        return {"base": base, "high_res": high_res, "newline": len(self.kept) - base - high_res}


@dataclass
class PackedImage:
    """Where an image's tokens went in its packed sequence (host tensors: they come from a small marker pack)."""

    content: torch.Tensor  # packed positions of tile tokens, ascending
    newlines: torch.Tensor  # packed positions of `image_newline`
    source: torch.Tensor | None  # flat (tile, token) index of each content position; None when interpolated
    base_tokens: int
    num_tokens: int = field(init=False)

    def __post_init__(self):
        self.num_tokens = len(self.content) + len(self.newlines)

    @classmethod
    def from_markers(cls, markers: torch.Tensor, tile_tokens: int, tiles: int) -> PackedImage:
        """``markers`` [N, 3] float64: (1, i, i^2) at tile token i, (0, -1, 1) at a newline.

        A blend of tokens (an interpolated grid) has a non-integer index or an index whose square is not its third
        channel (the mean of squares exceeds the square of the mean), so `source` is None exactly then.
        """
        is_content = markers[:, 0] > 0.5
        content = is_content.nonzero().flatten()
        index, square = markers[content, 1], markers[content, 2]
        exact = bool(((index == index.round()) & (square == index * index)).all())
        base = tile_tokens if tiles > 1 else len(content)  # a single tile is the base tile
        return cls(content, (~is_content).nonzero().flatten(), index.long() if exact else None, base)


def _markers(image_features) -> list[torch.Tensor]:
    """Per image a [tiles, tokens, 3] float64 tensor of (1, i, i^2), i the flat tile-token index in the vision
    tower's tile order (float64 keeps i^2 exact)."""
    markers, offset = [], 0
    for tiles in image_features:
        count = tiles.shape[0] * tiles.shape[1]
        index = torch.arange(offset, offset + count, dtype=torch.float64).view(*tiles.shape[:2], 1)
        markers.append(torch.cat((torch.ones_like(index), index, index * index), dim=-1))
        offset += count
    return markers


def record_packing(base: nn.Module) -> None:
    """Wrap ``base.pack_image_features`` (once) so that, inside `call_state.capturing`, it also packs a marker
    tensor the same way and records each image's `PackedImage` in the capture (``"packing"``). Outside a capture
    it only calls the original."""
    if getattr(base, _PACKING_WRAPPED, False):
        return
    original = base.pack_image_features

    @functools.wraps(original)
    def pack_image_features(image_features, image_sizes, *args, **kwargs):
        packed = original(image_features, image_sizes, *args, **kwargs)
        store = call_state.capture_store()
        if store is not None:
            newline = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)
            markers, _ = original(_markers(image_features), image_sizes.cpu(), *args, **{**kwargs,
                                                                                        "image_newline": newline})
            store["packing"] = [
                PackedImage.from_markers(m, image_features[0].shape[1], len(tiles))
                for m, tiles in zip(markers, image_features, strict=True)
            ]
        return packed

    base.pack_image_features = pack_image_features
    setattr(base, _PACKING_WRAPPED, True)


class AnyResPruner(TokenPruner):
    """`TokenPruner` for models whose images are a base tile, high-res tiles and newline tokens (module doc)."""

    def __init__(self, model: nn.Module, config):
        super().__init__(model, config)
        record_packing(self.base)

    def encode(self, get_image_features, pixel_values, input_ids, attention_mask, layout=None, **kwargs):
        """Run the vision path once; return image outputs holding each image's kept tokens, and the selections."""
        call_state.ensure_capture_hooks(self._feature_encoder_layer())
        with call_state.capturing() as states:
            outputs = get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
        images, features = states["packing"], list(outputs.pooler_output)
        per_tile = self._tile_scores(states)
        instructions = self._image_instructions(input_ids, attention_mask, layout, images)
        selections = [
            self._select_image(f, image, per_tile, instruction)
            for f, image, instruction in zip(features, images, instructions, strict=True)
        ]
        outputs.pooler_output = [f[s.kept] for f, s in zip(features, selections, strict=True)]
        self.last = selections
        return outputs, selections

    def _tile_scores(self, states: dict) -> torch.Tensor | None:
        """Per tile token, flattened over tiles: raw [CLS] attention, or the feature layer's patches for CLIP's
        projection; None when the score needs only the packed features (LLM-space instruction relevance)."""
        if self.config.semantic == "cls_attention":
            return cls_attention_row(states["input"], self._feature_encoder_layer()).flatten()
        if self.clip is not None:
            patches = states["output"]
            if self.base.config.vision_feature_select_strategy == "default":
                patches = patches[:, 1:]
            return patches.flatten(0, 1)
        return None

    def semantic_scores(self, features: torch.Tensor, vision_states: dict, instructions: list) -> torch.Tensor:
        """[CLS] attention gathered from the tiles (``vision_states["semantic"]``), or the parent's scores."""
        if self.config.semantic == "cls_attention":
            return vision_states["semantic"]
        return super().semantic_scores(features, vision_states, instructions)

    def _select_image(self, features, image: PackedImage, per_tile, instruction) -> AnyResSelection:
        content = image.content.to(features.device)
        states = {}
        if per_tile is not None:
            if image.source is None:
                raise ValueError(
                    f"QAPrunerConfig.semantic={self.config.semantic!r} scores tile tokens, but this model "
                    "interpolates the high-resolution grid (vision_aspect_ratio), so packed tokens are no longer "
                    "tile tokens. Use semantic='cdpruner' without clip_text_model."
                )
            gathered = per_tile[image.source.to(per_tile.device)]
            if self.config.semantic == "cls_attention":
                states["semantic"] = minmax_normalize(gathered)[None]  # base and high-res tiles on one scale
            else:
                states["output"] = gathered[None]
        scored = self.select(features[content][None], states, [instruction])[0]
        kept = torch.cat((content[scored.kept], image.newlines.to(features.device))).sort().values
        values = {f.name: getattr(scored, f.name) for f in fields(ImageSelection)}
        return AnyResSelection(**{**values, "kept": kept}, content=content, num_tokens=image.num_tokens,
                               base_tokens=image.base_tokens)

    def _image_instructions(self, input_ids, attention_mask, layout, images: list[PackedImage]) -> list:
        if self.config.semantic != "cdpruner":
            return [None] * len(images)
        if input_ids is None:
            raise ValueError("QAPrunerConfig.semantic='cdpruner' needs input_ids to read the instruction.")
        layout = layout or PlaceholderLayout.read(input_ids, self.image_token_id, attention_mask)
        full = [image.num_tokens for image in images]
        kept = [self.budget(len(image.content)) + len(image.newlines) for image in images]
        rows = layout.image_rows(layout.tokens_per_image(len(images), full, kept))
        return self.instructions_of_rows(input_ids, attention_mask, rows)
