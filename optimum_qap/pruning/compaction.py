"""Sequence compaction: drop pruned image placeholders from a padded batch and re-pad it."""

from __future__ import annotations

import torch


def placeholder_keep_mask(input_ids: torch.Tensor, image_token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """[B, L] mask that is False exactly at the placeholders of pruned image tokens.

    ``kept`` is a bool [num_images, N] mask over each image's N tokens; placeholders are matched to images in
    row-major order, as LLaVA's `masked_scatter` does.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[input_ids == image_token_id] = kept.flatten().to(input_ids.device)
    return keep


def is_left_padded(attention_mask: torch.Tensor | None) -> bool:
    """Left padding unless some row ends in padding (generation always pads left)."""
    if attention_mask is None:
        return True
    return not bool((attention_mask[:, -1] == 0).any())


def compact(
    keep: torch.Tensor, tensors: dict[str, torch.Tensor | None], fill: dict[str, float | int], left_padded: bool
) -> dict[str, torch.Tensor | None]:
    """Keep the positions where ``keep`` [B, L] is True in every [B, L, ...] tensor, re-padding shorter rows.

    Rows keep their order of tokens; rows that lost more tokens than others are padded with ``fill[name]`` on the
    padding side. Returns the compacted tensors and ``"padding"``: a [B, L'] bool mask of the new pad positions.
    """
    lengths = keep.sum(1)
    new_length = int(lengths.max())
    rank = keep.long().cumsum(1) - 1
    if left_padded:
        rank = rank + (new_length - lengths).unsqueeze(1)
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)
    target_rows, target_cols = rows[keep], rank[keep]
    padding = torch.ones(keep.shape[0], new_length, dtype=torch.bool, device=keep.device)
    padding[target_rows, target_cols] = False
    result: dict[str, torch.Tensor | None] = {"padding": padding}
    for name, tensor in tensors.items():
        if tensor is None:
            result[name] = None
            continue
        out = tensor.new_full((keep.shape[0], new_length, *tensor.shape[2:]), fill[name])
        out[target_rows, target_cols] = tensor[keep]
        result[name] = out
    return result


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions of the attended tokens, as `generate` derives them from the attention mask."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
