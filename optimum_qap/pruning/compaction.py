"""Sequence compaction: drop pruned image placeholders from a padded batch and re-pad it.

Only `PlaceholderLayout.read` copies anything to the host, once per call and before the vision tower is launched,
when the device queue is nearly empty. Everything after it computes shapes from that layout, so scoring, selection
and compaction never stall the queue on a GPU (boolean-mask indexing or `int(tensor)` would each wait for the
vision tower to finish before the language model's kernels could be queued).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlaceholderLayout:
    """How many image placeholders each row of a batch holds, and whether the batch is padded on the right."""

    per_row: tuple[int, ...]
    right_padded: bool

    @classmethod
    def read(cls, input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None):
        """One host read of `input_ids` (and the mask's last column; generation always pads left)."""
        values = (input_ids == image_token_id).sum(1)
        if attention_mask is not None:
            values = torch.cat((values, (attention_mask[:, -1] == 0).any().long().view(1)))
        values = values.tolist()
        return cls(tuple(values[: input_ids.shape[0]]), bool(values[input_ids.shape[0] :] == [1]))

    @property
    def total(self) -> int:
        return sum(self.per_row)

    def tokens_per_image(self, num_images: int, full: int, kept: int) -> int:
        """N when the input holds all of each image's placeholders, K when it holds the kept ones already."""
        for per_image in (full, kept):
            if self.total == num_images * per_image and all(count % per_image == 0 for count in self.per_row):
                return per_image
        raise ValueError(
            f"Image features and image tokens do not match: {num_images} image(s) need {num_images * full} "
            f"placeholders (or {num_images * kept} after pruning), the input has {self.total}."
        )

    def image_rows(self, per_image: int) -> list[int]:
        """The batch row of each image, in the order LLaVA fills placeholders (row-major)."""
        return [row for row, count in enumerate(self.per_row) for _ in range(count // per_image)]


def placeholder_keep_mask(input_ids: torch.Tensor, image_token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """[B, L] mask that is False exactly at the placeholders of pruned image tokens.

    ``kept`` is a bool [num_images, N] mask over each image's N tokens; placeholders are matched to images in
    row-major order, as LLaVA's `masked_scatter` does. The input must hold num_images * N placeholders.
    """
    is_placeholder = input_ids == image_token_id
    ordinal = (is_placeholder.flatten().cumsum(0) - 1).clamp_min(0).view_as(input_ids)
    return ~is_placeholder | kept.flatten().to(input_ids.device)[ordinal]


def compact(
    keep: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    fill: dict[str, float | int],
    left_padded: bool,
    new_length: int,
) -> dict[str, torch.Tensor | None]:
    """Keep the positions where ``keep`` [B, L] is True in every [B, L, ...] tensor, re-padding shorter rows.

    ``new_length`` is the largest number of kept positions in a row (known from the layout, so no host read is
    needed). Rows keep their order of tokens; rows that lost more tokens than others are padded with
    ``fill[name]`` on the padding side. Returns the compacted tensors and ``"padding"``: a [B, L'] bool mask of
    the new pad positions.
    """
    lengths = keep.sum(1, keepdim=True)
    rank = keep.long().cumsum(1) - 1
    if left_padded:
        rank = rank + (new_length - lengths)
    # dropped positions all go to one extra column that is cut off afterwards
    target = torch.where(keep, rank, new_length)
    batch = keep.shape[0]
    padding = torch.ones(batch, new_length + 1, dtype=torch.bool, device=keep.device)
    result: dict[str, torch.Tensor | None] = {"padding": padding.scatter(1, target, False)[:, :new_length]}
    for name, tensor in tensors.items():
        if tensor is None:
            result[name] = None
            continue
        index = target.view(*target.shape, *(1,) * (tensor.dim() - 2)).expand_as(tensor)
        out = tensor.new_full((batch, new_length + 1, *tensor.shape[2:]), fill[name])
        result[name] = out.scatter(1, index, tensor)[:, :new_length]
    return result


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions of the attended tokens, as `generate` derives them from the attention mask."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
