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
    """How many image placeholders each row of a batch holds, whether the batch is padded on the right, and how
    many tokens each row attends to (None without an attention mask)."""

    per_row: tuple[int, ...]
    right_padded: bool
    attended: tuple[int, ...] | None = None

    @classmethod
    def read(cls, input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None):
        """One host read of `input_ids` (and of the mask's row sums and last column; generation pads left)."""
        batch = input_ids.shape[0]
        values = (input_ids == image_token_id).sum(1)
        if attention_mask is not None:
            padded_right = (attention_mask[:, -1] == 0).any().long().view(1)
            values = torch.cat((values, attention_mask.long().sum(1), padded_right))
        values = values.tolist()
        attended = tuple(values[batch : 2 * batch]) if attention_mask is not None else None
        return cls(tuple(values[:batch]), bool(values[2 * batch :] == [1]), attended)

    def compacted_length(self, removed: list[int], length: int) -> int:
        """Length of the batch after each row loses ``removed`` tokens: the longest row, re-padded."""
        if self.attended is None:
            return length - min(removed)
        return max(kept - lost for kept, lost in zip(self.attended, removed, strict=True))

    @property
    def total(self) -> int:
        return sum(self.per_row)

    def tokens_per_image(self, num_images: int, full: int | list[int], kept: int | list[int]) -> int | list[int]:
        """N when the input holds all of each image's placeholders, K when it holds the kept ones already.

        ``full`` and ``kept`` are one count for every image, or one per image (any-resolution models).
        """
        for per_image in (full, kept):
            if self._rows_of(_counts(per_image, num_images)) is not None:
                return per_image
        raise ValueError(
            f"Image features and image tokens do not match: {num_images} image(s) need "
            f"{sum(_counts(full, num_images))} placeholders (or {sum(_counts(kept, num_images))} after pruning), "
            f"the input has {self.total}."
        )

    def image_rows(self, per_image: int | list[int]) -> list[int]:
        """The batch row of each image, in the order LLaVA fills placeholders (row-major)."""
        counts = _counts(per_image, self.total // per_image if isinstance(per_image, int) else len(per_image))
        rows = self._rows_of(counts)
        if rows is None:
            raise ValueError(f"{self.total} image placeholders in rows {self.per_row} do not hold images of {counts}.")
        return rows

    def _rows_of(self, counts: list[int]) -> list[int] | None:
        """The row of each image when images of ``counts`` placeholders fill the rows in order; None if they do not."""
        left, rows, row = list(self.per_row), [], 0
        for count in counts:
            while row < len(left) and left[row] == 0:
                row += 1
            if row == len(left) or left[row] < count:
                return None
            left[row] -= count
            rows.append(row)
        return None if any(left) else rows


def _counts(per_image: int | list[int], num_images: int) -> list[int]:
    return [per_image] * num_images if isinstance(per_image, int) else list(per_image)


def placeholder_keep_mask(input_ids: torch.Tensor, image_token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """[B, L] mask that is False exactly at the placeholders of pruned image tokens.

    ``kept`` is a bool [num_images, N] mask over each image's N tokens, or those masks concatenated (images of
    different N); placeholders are matched to images in row-major order, as LLaVA's `masked_scatter` does. The
    input must hold exactly that many placeholders.
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
