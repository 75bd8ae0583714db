"""QAPruner on any-resolution LLaVA models (LLaVA-NeXT, LLaVA-OneVision): base tile, high-res tiles, newlines.

As for LLaVA-1.5 (test_pruning_integration.py), the pruned model must equal the unpruned model fed only the kept
image tokens, in batched, left-padded generate and forward."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny
import tiny_anyres
import torch
from test_concurrency import serve
from test_pruning_integration import assert_pruned_equals_hand_compacted, new_tokens, reference_generate
from transformers import AutoModelForImageTextToText
from transformers import pipeline as hf_pipeline

import optimum_qap
from optimum_qap import QAPrunerConfig, last_selection, pruning_disabled
from optimum_qap.pruning.selection import resolve_budget

PROMPTS = [
    "USER: <image>\nwhat is in the image ? ASSISTANT:",
    "USER: <image>\nhow many shapes are there in the picture and where do you see red objects ? ASSISTANT:",
    "USER: <image>\ndescribe colors . ASSISTANT:",
]
# (model, semantic score): SigLIP has no [CLS], so it scores instruction relevance; NeXT with CLIP scores [CLS]
VARIANTS = [("next", "cdpruner"), ("next-clip", "cls_attention"), ("onevision", "cdpruner")]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return {kind: tiny_anyres.save(tmp_path_factory.mktemp(kind), kind) for kind in ("next", "next-clip",
                                                                                     "onevision", "onevision-clip")}


def load(repo, **config):
    model = AutoModelForImageTextToText.from_pretrained(
        repo, quantization_config=QAPrunerConfig(**({"keep_ratio": 0.25, "semantic": "cdpruner"} | config))
    )
    return model, tiny_anyres.processor_for(model, repo)


def batch(processor, prompts=PROMPTS, image_list=None):
    image_list = tiny_anyres.images() if image_list is None else image_list
    return processor(images=image_list, text=prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize(("kind", "semantic"), VARIANTS)
def test_generate_and_forward_equal_unpruned_model_fed_kept_tokens(repos, kind, semantic):
    model, processor = load(repos[kind], semantic=semantic)
    assert_pruned_equals_hand_compacted(model, batch(processor))


@pytest.mark.parametrize(("kind", "semantic"), VARIANTS)
def test_budget_is_per_image_over_its_tiles_and_newlines_are_kept(repos, kind, semantic):
    model, processor = load(repos[kind], semantic=semantic, w_bits=16, a_bits=16)
    inputs = batch(processor)
    vision = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    with pruning_disabled(model):
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], **vision).pooler_output
    model(**inputs)
    selections = last_selection(model)
    newline = model.model.image_newline
    assert len({s.num_tokens for s in selections}) > 1  # the three image sizes give different token counts
    for features, selection in zip(packed, selections, strict=True):
        is_newline = (features == newline).all(-1)
        assert selection.num_tokens == len(features)
        assert torch.equal(is_newline.nonzero().flatten(), _complement(selection.content, len(features)))
        parts = selection.kept_by_part()
        content = len(selection.content)
        assert parts["base"] + parts["high_res"] == resolve_budget(content, 0.25, None)
        assert parts["newline"] == int(is_newline.sum()) > 0  # every newline kept
        assert selection.kept.tolist() == sorted(selection.kept.tolist())  # packed order
        assert selection.semantic.shape == selection.fused.shape == (content,)
        assert selection.base_tokens == tiny_anyres.TILE_TOKENS


def _complement(positions, size):
    mask = torch.ones(size, dtype=torch.bool)
    mask[positions] = False
    return mask.nonzero().flatten()


def test_cls_attention_is_gathered_from_the_tile_each_packed_token_comes_from(repos):
    """[CLS] attention is computed per tile; the pruner maps it through the model's own packing (unpadding and
    row reordering included). Checked against eager attention, matching each packed feature to its tile token."""
    model, processor = load(repos["next-clip"], semantic="cls_attention", alpha=1.0, w_bits=16, a_bits=16)
    inputs = batch(processor)
    with pruning_disabled(model):
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                image_sizes=inputs["image_sizes"]).pooler_output
    model(**inputs)
    tiles_per_image = [5, 5, 5]  # every image here takes a 2-tile grid or the 2x2 grid: base + up to 4 tiles
    tiles = torch.cat(list(inputs["pixel_values"]))
    model.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        vision = model.model.vision_tower(tiles, output_attentions=True, output_hidden_states=True)
        projected = model.model.multi_modal_projector(vision.hidden_states[-2][:, 1:]).flatten(0, 1)
    attention = vision.attentions[-2][:, :, 0, 1:].mean(1).flatten()  # [CLS] -> each patch, tile by tile
    offset = 0
    for features, selection, count in zip(packed, last_selection(model), tiles_per_image, strict=True):
        own = slice(offset, offset + count * tiny_anyres.TILE_TOKENS)
        offset += count * tiny_anyres.TILE_TOKENS
        source = torch.cdist(features[selection.content], projected[own]).argmin(1)
        expected = attention[own][source]
        expected = (expected - expected.min()) / (expected.max() - expected.min())  # one scale for all tiles
        torch.testing.assert_close(selection.semantic, expected, atol=1e-5, rtol=1e-4)
        assert len(set(source.tolist())) == len(source)  # a distinct tile token behind every packed position


def test_several_images_in_a_prompt_and_text_only_rows(repos):
    for kind in ("next", "onevision"):
        model, processor = load(repos[kind], keep_tokens=5, selection="dpp")
        prompts = ["USER: <image>\nwhat is in the image ? <image>\nwhat colors ? ASSISTANT:",
                   "USER: describe colors . ASSISTANT:",
                   "USER: <image>\ndescribe the image . ASSISTANT:"]
        image_list = tiny_anyres.images()
        if kind == "onevision":  # OneVision does not tile the images of a multi-image prompt
            image_list = [image_list[:2], [], image_list[2:]]
        inputs = batch(processor, prompts, image_list)
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        selections = last_selection(model)
        assert len(selections) == 3
        assert all(s.kept_by_part()["base"] + s.kept_by_part()["high_res"] == 5 for s in selections)
        expected = reference_generate(model, inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(new_tokens(generated, inputs), expected)


def test_beams_quantized_and_save_reload(repos, tmp_path):
    model, processor = load(repos["next"], alpha=0.5)
    inputs = batch(processor)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    expected = reference_generate(model, inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 6 and torch.equal(new_tokens(beams, inputs), expected)
    logits = model(**inputs).logits
    kept = [s.kept for s in last_selection(model)]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "LlavaNextForConditionalGeneration"
    assert torch.equal(reloaded(**inputs).logits, logits)
    assert all(torch.equal(a, s.kept) for a, s in zip(kept, last_selection(reloaded), strict=True))


def test_interpolated_grid_refuses_tile_scores_and_compact_processor_is_refused(repos):
    model, processor = load(repos["onevision-clip"], semantic="cls_attention")
    with pytest.raises(ValueError, match="interpolates the high-resolution grid.*semantic='cdpruner'"):
        model(**batch(processor))
    model, _ = load(repos["next"])
    with pytest.raises(ValueError, match="compact_processor\\(\\) needs a fixed number of visual tokens"):
        optimum_qap.compact_processor(tiny_anyres.next_processor(), model)


def test_siglip_tower_refuses_cls_attention(repos):
    with pytest.raises(ValueError, match=r"\[CLS\] token.*semantic='cdpruner'"):
        load(repos["next"], semantic="cls_attention")
    model, _ = load(repos["next"], semantic="cdpruner")
    assert last_selection(model) == [] and model.model.config.image_token_id == tiny.IMAGE_TOKEN_ID


def test_calibration_gptq_and_auto_alpha_then_pipeline(repos):
    """The calibrated path (static ranges, GPTQ, alpha chosen on the samples) works on NeXT, and so does the
    image-text-to-text pipeline, which then answers as the pruned model's own generate."""
    model, processor = load(repos["next"], a_granularity="static_per_channel", calibration="builtin",
                            num_calibration_samples=3)
    config = model.config.quantization_config
    assert config.weight_method == "gptq" and config.auto_selection["samples"] == 3
    assert set(config.auto_selection["alpha_curve"]) >= {"0.0", "1.0"}
    image, prompt = tiny_anyres.images()[0], PROMPTS[0]
    pipe = hf_pipeline("image-text-to-text", model=model, processor=processor)
    result = pipe(images=image, text=prompt, max_new_tokens=4, generate_kwargs={"do_sample": False},
                  return_full_text=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert len(last_selection(model)) == 1
    text = processor.batch_decode(new_tokens(expected, inputs), skip_special_tokens=True)[0]
    assert result[0]["generated_text"].strip() == text.strip() and text.strip()


def test_threads_get_their_own_layout_and_selection(repos):
    """The packing layout is recorded per thread: concurrent calls on images of different sizes (so different
    tile grids and token counts) give exactly their sequential tokens and selections."""
    model, processor = load(repos["next"], alpha=0.5)
    sizes = [(30, 60), (64, 40), (50, 50), (28, 28), (70, 35), (40, 75)]
    work = [(tiny_anyres.images([sizes[i % 6]], seed=i)[0], PROMPTS[i % 3], i % 4 == 1, None) for i in range(12)]
    expected = [serve(model, processor, request) for request in work]
    assert len({len(k[0]) for _, k in expected if k}) > 2  # different token counts per image
    with ThreadPoolExecutor(3) as pool:
        for _ in range(2):
            for (output, kept), (want_output, want_kept) in zip(
                pool.map(lambda request: serve(model, processor, request), work), expected, strict=True
            ):
                assert torch.equal(output, want_output)
                assert kept is None if want_kept is None else torch.equal(kept[0], want_kept[0])


def test_packed_layout_detects_blended_tokens():
    """An interpolated grid blends neighbouring tile tokens: even a blend whose index is a whole number (the mean of
    3 and 5) is caught by the squared channel, so tile scores are never gathered for it."""
    from optimum_qap.pruning.anyres import PackedImage

    def marker(i):
        return [1.0, i, i * i]

    newline = [0.0, -1.0, 1.0]
    exact = torch.tensor([marker(0), marker(1), marker(7), newline, marker(9), newline], dtype=torch.float64)
    image = PackedImage.from_markers(exact, tile_tokens=2, tiles=3)
    assert image.source.tolist() == [0, 1, 7, 9] and image.newlines.tolist() == [3, 5]
    assert image.content.tolist() == [0, 1, 2, 4] and image.num_tokens == 6 and image.base_tokens == 2
    blended = exact.clone()
    blended[2] = (torch.tensor(marker(3.0)) + torch.tensor(marker(5.0))) / 2  # index 4.0, square 17 != 16
    assert PackedImage.from_markers(blended, tile_tokens=2, tiles=3).source is None
    assert PackedImage.from_markers(exact[:3], tile_tokens=2, tiles=1).base_tokens == 3  # one tile is the base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("kind", "semantic"), VARIANTS)
def test_cuda_bf16_generate_matches_reference(repos, kind, semantic):
    model = AutoModelForImageTextToText.from_pretrained(
        repos[kind], dtype=torch.bfloat16, device_map="cuda",
        quantization_config=QAPrunerConfig(keep_ratio=0.25, semantic=semantic),
    )
    inputs = {k: v.cuda() for k, v in batch(tiny_anyres.processor_for(model, repos[kind])).items()}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = reference_generate(model, inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), expected)
