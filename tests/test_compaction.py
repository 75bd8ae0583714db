"""Sequence compaction against a row-by-row reference, and the pruning path's freedom from host reads."""

import warnings

import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_qap import QAPrunerConfig, attach_pruner
from optimum_qap.pruning.compaction import PlaceholderLayout, compact, placeholder_keep_mask
from optimum_qap.pruning.patch import compact_inputs

IMAGE = 9


def reference_compact(keep, tensor, fill, left_padded):
    rows = [tensor[b][keep[b]] for b in range(keep.shape[0])]
    width = max(len(r) for r in rows)
    out = torch.full((keep.shape[0], width), fill, dtype=tensor.dtype)
    for b, row in enumerate(rows):
        if left_padded:
            out[b, width - len(row) :] = row
        else:
            out[b, : len(row)] = row
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.data())
def test_compact_equals_row_by_row_reference(batch, length, data):
    keep = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length),
                                           min_size=batch, max_size=batch)))
    keep[:, 0] = True  # every row keeps something, as every real row does
    values = torch.arange(batch * length).view(batch, length) + 1
    left = data.draw(st.booleans())
    new_length = int(keep.sum(1).max())
    result = compact(keep, {"ids": values, "none": None}, {"ids": -1}, left, new_length)
    assert torch.equal(result["ids"], reference_compact(keep, values, -1, left))
    assert torch.equal(result["padding"], result["ids"] == -1)
    assert result["none"] is None


def test_placeholder_keep_mask_matches_images_in_row_major_order():
    ids = torch.tensor([[0, IMAGE, IMAGE, 5, IMAGE, IMAGE], [IMAGE, IMAGE, 3, 4, 5, 6]])
    kept = torch.tensor([[True, False], [False, True], [True, True]])
    expected = torch.tensor([[True, True, False, True, False, True], [True, True, True, True, True, True]])
    assert torch.equal(placeholder_keep_mask(ids, IMAGE, kept), expected)


def test_layout_reads_counts_padding_side_and_rejects_mismatches():
    ids = torch.tensor([[IMAGE] * 4 + [1, 2], [0, 0, IMAGE, IMAGE, IMAGE, IMAGE]])
    left = PlaceholderLayout.read(ids, IMAGE, torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    assert left == PlaceholderLayout((4, 4), right_padded=False, attended=(6, 4))
    assert left.compacted_length([3, 0], 6) == 4  # the second row, untouched, is now the longest
    assert PlaceholderLayout((4, 4), right_padded=False).compacted_length([3, 0], 6) == 6
    assert PlaceholderLayout.read(ids, IMAGE, torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])).right_padded
    assert left.tokens_per_image(num_images=2, full=4, kept=1) == 4
    assert left.tokens_per_image(num_images=8, full=4, kept=1) == 1
    assert left.image_rows(2) == [0, 0, 1, 1]
    # images of different sizes (any-resolution models): 3 + 1 in the first row, 4 in the second
    assert left.tokens_per_image(num_images=3, full=[3, 1, 4], kept=[1, 1, 1]) == [3, 1, 4]
    assert left.image_rows([3, 1, 4]) == [0, 0, 1]
    with pytest.raises(ValueError, match="do not hold images"):
        left.image_rows([3, 2, 3])  # an image may not span two rows
    with pytest.raises(ValueError, match=r"3 image\(s\) need 12 placeholders \(or 3 after pruning\), the input has 8"):
        left.tokens_per_image(num_images=3, full=4, kept=1)


def test_scoring_selection_and_compaction_never_read_the_device():
    """On meta tensors any host read (`int(t)`, `.tolist()`, boolean-mask indexing) raises: the pruner's work
    after the placeholder layout is read stays on the device, so a GPU queue never stalls on it."""
    model = tiny.tiny_llava()
    pruner = attach_pruner(model, QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=0.25))
    model.to("meta")
    features = torch.empty(3, tiny.NUM_PATCHES, 64, device="meta")
    layer_input = torch.empty(3, tiny.NUM_PATCHES + 1, 32, device="meta")
    selections = pruner.select(features, {"input": layer_input}, None)
    assert [s.kept.shape for s in selections] == [torch.Size([4])] * 3
    ids = torch.empty(2, 40, dtype=torch.long, device="meta")
    layout = PlaceholderLayout((16, 32), right_padded=False)  # read on the host before the vision tower runs
    mask = torch.empty(2, 40, dtype=torch.long, device="meta")
    new_ids, new_mask, extra = compact_inputs(pruner, selections, layout, ids, mask, {"labels": ids})
    assert new_ids.shape == new_mask.shape == extra["labels"].shape == (2, 40 - 12)
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(ids.sum())  # the probe works: a host read of a meta tensor fails


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pruned_forward_adds_at_most_one_device_sync(tiny_repo):
    from transformers import LlavaForConditionalGeneration

    inputs = tiny.tiny_processor()(images=[tiny.noise_image(0), tiny.noise_image(1)],
                                   text=["USER: <image>\nwhat ? ASSISTANT:", "USER: <image>\nhow many shapes ?"],
                                   return_tensors="pt", padding=True).to("cuda")

    def syncs(model):
        model(**inputs)  # warm up
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    plain = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig(
        keep_ratio=1.0), device_map="cuda")
    pruned = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig(
        keep_ratio=0.25), device_map="cuda")
    assert syncs(pruned) <= syncs(plain) + 1
