"""QAPruner inside LLaVA: the pruned model must equal the unpruned model fed only the kept image tokens."""

import pytest
import tiny
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    pipeline,
)

import optimum_qap
from optimum_qap import QAPrunerConfig, last_selection, pruning_disabled
from optimum_qap.pruning.patch import image_token_counts
from optimum_qap.pruning.scoring import fuse_scores
from optimum_qap.pruning.selection import topk_indices

PROMPTS = [
    "USER: <image>\nwhat is in the image ? ASSISTANT:",
    "USER: <image>\nhow many shapes are there in the picture and where do you see red objects ? ASSISTANT:",
    "USER: <image>\ndescribe colors . ASSISTANT:",
]


def images(count, seed=0):
    return [tiny.noise_image(seed + i) for i in range(count)]


def load(repo, **config):
    return LlavaForConditionalGeneration.from_pretrained(
        repo, quantization_config=QAPrunerConfig(**({"keep_ratio": 0.25} | config))
    )


def batch(prompts=PROMPTS, image_list=None, processor=None):
    processor = processor or tiny.tiny_processor()
    image_list = images(len(prompts)) if image_list is None else image_list
    return processor(images=image_list or None, text=prompts, return_tensors="pt", padding=True)


def hand_compacted(model, inputs):
    """Embeddings of the batch with only the kept image tokens, built token by token, re-padded on the left."""
    selections = last_selection(model)
    counts = iter(image_token_counts(selections)[0])  # N of each image (any-resolution images differ)
    vision = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    with pruning_disabled(model):
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **vision).pooler_output
    kept = iter(f[s.kept] for f, s in zip(features, selections, strict=True))
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        tokens, pieces, position = [], [], 0
        ids = ids[mask.bool()].tolist()
        while position < len(ids):
            if ids[position] == tiny.IMAGE_TOKEN_ID:
                image = next(kept)
                pieces.append(("image", image))
                tokens += [tiny.IMAGE_TOKEN_ID] * len(image)
                position += next(counts)
            else:
                tokens.append(ids[position])
                position += 1
        rows.append((tokens, [p for _, p in pieces]))
    length = max(len(t) for t, _ in rows)
    embed = model.get_input_embeddings()
    embeds, masks = [], []
    for tokens, image_pieces in rows:
        ids = torch.tensor([tiny.PAD_TOKEN_ID] * (length - len(tokens)) + tokens, device=embed.weight.device)
        row = embed(ids).clone()
        slots = (ids == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
        if image_pieces:
            row[slots] = torch.cat(image_pieces).to(row.dtype)
        embeds.append(row)
        masks.append(torch.tensor([0] * (length - len(tokens)) + [1] * len(tokens), device=embed.weight.device))
    return torch.stack(embeds), torch.stack(masks)


def reference_generate(model, inputs, **generate_kwargs):
    """What the plain model generates when fed by hand only the image tokens the last pruned call kept."""
    embeds, mask = hand_compacted(model, inputs)
    with pruning_disabled(model):
        return model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)


def new_tokens(output, inputs):
    return output[:, inputs["input_ids"].shape[1] :]


GRANULARITIES = [
    {"a_granularity": "per_token"},
    {"a_granularity": "per_group", "a_group_size": 32, "w_group_size": 32},
    {"a_granularity": "static_per_channel", "calibration": "builtin", "num_calibration_samples": 2},
    {"a_granularity": "static_per_tensor", "calibration": "builtin", "num_calibration_samples": 2, "w_bits": 8},
    {"w_bits": 16, "a_bits": 16},
]


@pytest.mark.parametrize("quantization", GRANULARITIES, ids=lambda q: f"{q.get('a_granularity', 'fp')}")
def test_generate_and_forward_equal_unpruned_model_fed_kept_tokens(tiny_repo, quantization):
    assert_pruned_equals_hand_compacted(load(tiny_repo, **quantization), batch())


def assert_pruned_equals_hand_compacted(model, inputs) -> None:
    """Batched, left-padded generate and forward of ``model`` equal the unpruned model fed the kept tokens."""
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # left padding of three lengths
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    embeds, mask = hand_compacted(model, inputs)
    with pruning_disabled(model):
        reference = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), reference)

    logits = model(**inputs).logits
    with pruning_disabled(model):
        expected = model(inputs_embeds=embeds, attention_mask=mask).logits
    text = mask.bool()
    assert logits.shape == expected.shape
    assert torch.equal(logits[text], expected[text])


def test_beam_search_and_seeded_sampling_match_reference(tiny_repo):
    model = load(tiny_repo)
    inputs = batch()
    beams = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    expected = reference_generate(model, inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 6 and torch.equal(new_tokens(beams, inputs), expected)
    torch.manual_seed(7)
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=5)
    torch.manual_seed(7)
    expected = reference_generate(model, inputs, max_new_tokens=5, do_sample=True, top_k=5)
    assert torch.equal(new_tokens(sampled, inputs), expected)


def test_several_images_in_one_prompt_and_text_only_rows(tiny_repo):
    model = load(tiny_repo)
    prompts = [
        "USER: <image>\nwhat is in the image ? <image>\nwhat colors ? ASSISTANT:",
        "USER: describe colors . ASSISTANT:",
        "USER: <image>\ndescribe the image . ASSISTANT:",
    ]
    inputs = batch(prompts, images(3))
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert len(last_selection(model)) == 3
    expected = reference_generate(model, inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), expected)


def test_text_only_prompt_alone_is_untouched(tiny_repo):
    model = load(tiny_repo)
    inputs = tiny.tiny_processor()(text=["USER: describe colors . ASSISTANT:"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with pruning_disabled(model):
        assert torch.equal(generated, model.generate(**inputs, max_new_tokens=5, do_sample=False))


def test_base_processor_and_compact_processor_give_identical_results(tiny_repo, tmp_path):
    model = load(tiny_repo)
    processor = tiny.tiny_processor()
    full = batch(processor=processor)
    compact = optimum_qap.compact_processor(processor, model)
    compact.save_pretrained(tmp_path)
    from transformers import AutoProcessor

    compact = AutoProcessor.from_pretrained(tmp_path)
    short = batch(processor=compact)
    placeholders = (short["input_ids"] == tiny.IMAGE_TOKEN_ID).sum(1)
    assert placeholders.tolist() == [4, 4, 4]  # 25 % of 16 patches
    out_full = model.generate(**full, max_new_tokens=6, do_sample=False)
    out_short = model.generate(**short, max_new_tokens=6, do_sample=False)
    assert torch.equal(new_tokens(out_full, full), new_tokens(out_short, short))
    assert torch.equal(model(**full).logits, model(**short).logits)


def test_pipeline_image_text_to_text(tiny_repo):
    model = load(tiny_repo)
    processor = tiny.tiny_processor()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = images(1)[0]
    result = pipe(images=image, text=PROMPTS[0], max_new_tokens=4, generate_kwargs={"do_sample": False},
                  return_full_text=False)
    inputs = processor(images=image, text=PROMPTS[0], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = processor.batch_decode(new_tokens(expected, inputs), skip_special_tokens=True)[0]
    assert result[0]["generated_text"].strip() == text.strip() and text.strip()


def test_diagnostics_describe_the_selection_without_changing_outputs(tiny_repo):
    model = load(tiny_repo, alpha=0.3)
    inputs = batch()
    first = model(**inputs).logits
    selections = last_selection(model)
    assert len(selections) == 3
    for selection in selections:
        assert selection.kept.tolist() == sorted(selection.kept.tolist()) and len(selection.kept) == 4
        for score in (selection.semantic, selection.sensitivity, selection.error, selection.range):
            assert score.shape == (16,) and score.min() >= 0 and score.max() <= 1
        fused = fuse_scores(selection.semantic, selection.sensitivity, 0.3)
        assert torch.equal(selection.fused, fused) and torch.equal(selection.kept, topk_indices(fused, 4))
    assert torch.equal(model(**inputs).logits, first)


@pytest.mark.parametrize("settings", [{"selection": "dpp"}, {"semantic": "cdpruner"}, {"keep_tokens": 3},
                                      {"alpha": 0.0}, {"alpha": 1.0}])
def test_selection_variants_match_reference(tiny_repo, settings):
    model = load(tiny_repo, **settings)
    inputs = batch()
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert {len(s.kept) for s in last_selection(model)} == {settings.get("keep_tokens", 4)}
    expected = reference_generate(model, inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), expected)


def test_save_reload_prunes_identically(tiny_repo, tmp_path):
    model = load(tiny_repo, alpha=0.7, selection="dpp")
    inputs = batch()
    expected = model(**inputs).logits
    kept = [s.kept for s in last_selection(model)]
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded(**inputs).logits, expected)
    assert all(torch.equal(a, s.kept) for a, s in zip(kept, last_selection(reloaded), strict=True))
    assert reloaded.config.quantization_config.selection == "dpp"


def test_labels_are_compacted_with_the_sequence(tiny_repo):
    model = load(tiny_repo)
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == tiny.IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)


def test_vision_tower_without_cls_token_is_refused(tmp_path):
    config = tiny.tiny_config()
    config.vision_config = SiglipVisionConfig(**{k: getattr(config.vision_config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
    config.vision_feature_select_strategy = "full"
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\[CLS\] token.*semantic='cdpruner'"):
        load(tmp_path)
    assert last_selection(load(tmp_path, semantic="cdpruner")) == []
    assert isinstance(config.vision_config, SiglipVisionConfig) and not isinstance(config.vision_config,
                                                                                     CLIPVisionConfig)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generate_matches_reference(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, dtype=torch.bfloat16, device_map="cuda", quantization_config=QAPrunerConfig(keep_ratio=0.25)
    )
    inputs = {k: v.cuda() for k, v in batch().items()}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = reference_generate(model, inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), expected)


def test_generate_with_pruning_disabled_runs_the_plain_model(tiny_repo):
    model = load(tiny_repo)
    inputs = batch()
    with pruning_disabled(model):
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig(keep_ratio=1.0))
    assert torch.equal(generated, plain.generate(**inputs, max_new_tokens=3, do_sample=False))


def test_attach_pruner_changes_what_is_saved_but_not_the_quantization(tiny_repo, tmp_path):
    model = load(tiny_repo, keep_ratio=1.0, a_granularity="static_per_tensor", calibration="builtin",
                 num_calibration_samples=1)
    summary = model.config.quantization_config.calibration_summary
    optimum_qap.attach_pruner(model, QAPrunerConfig(keep_ratio=0.25, a_granularity="static_per_tensor",
                                                    alpha=0.3))
    saved = model.config.quantization_config
    assert saved.keep_ratio == 0.25 and saved.alpha == 0.3 and saved.calibration_summary == summary
    model.save_pretrained(tmp_path)
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path).qap_pruner.config.alpha == 0.3
    with pytest.raises(ValueError, match=r"pruning settings only; \['w_bits'\]"):
        optimum_qap.attach_pruner(model, QAPrunerConfig(w_bits=8, a_granularity="static_per_tensor"))


def test_get_image_features_returns_the_kept_tokens_in_every_calling_convention(tiny_repo):
    model = load(tiny_repo)
    pixel_values = batch()["pixel_values"]
    with pruning_disabled(model):
        full = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    for kwargs in ({}, {"return_dict": True}):
        kept = model.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
        assert [k.shape[0] for k in kept] == [4, 4, 4]
        for features, image, selection in zip(kept, full, last_selection(model), strict=True):
            assert torch.equal(features, image[selection.kept])
    as_tuple = model.model.get_image_features(pixel_values=pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and any(isinstance(x, list) and len(x) == 3 for x in as_tuple)


def test_last_positions_map_pruned_outputs_back_to_the_callers_input_ids(tiny_repo):
    model = load(tiny_repo, w_bits=16, a_bits=16)
    prompts = ["USER: <image>\nwhat is in the image ? <image>\nwhat colors ? ASSISTANT:",
               "USER: describe colors . ASSISTANT:",
               "USER: <image>\ndescribe the image . ASSISTANT:"]
    inputs = batch(prompts, images(3))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        logits = model(**inputs).logits
    hook.remove()
    positions = optimum_qap.last_positions(model)
    assert positions.shape == logits.shape[:2] and (positions[:, -1] == ids.shape[1] - 1).all()
    real = positions >= 0  # -1: padding added for rows that lost fewer tokens
    assert torch.equal(ids.gather(1, positions.clamp(min=0))[real], seen[0][real])  # the token each output came from
    # the kept placeholders are exactly the kept tokens of each image, in order
    selections = iter(last_selection(model))
    for row in (0, 2):
        placeholders = (ids[row] == tiny.IMAGE_TOKEN_ID).nonzero().flatten()
        kept = [p for p in positions[row].tolist() if p >= 0 and ids[row, p] == tiny.IMAGE_TOKEN_ID]
        ordinals = [placeholders.tolist().index(p) for p in kept]
        images_in_row = len(placeholders) // tiny.NUM_PATCHES
        expected = [i * tiny.NUM_PATCHES + k for i in range(images_in_row) for k in next(selections).kept.tolist()]
        assert ordinals == expected
    with torch.no_grad(), pruning_disabled(model):
        full = model(**inputs).logits
    aligned = optimum_qap.aligned_to_input(logits, positions, ids.shape[1])
    assert aligned.shape == full.shape
    # among the caller's tokens, exactly the pruned placeholders have no output (left padding may go too: rows are
    # re-padded to the longest compacted row)
    assert int(torch.isnan(aligned[..., 0])[mask.bool()].sum()) == 3 * (tiny.NUM_PATCHES - 4)
    text_only = mask[1].bool()  # a row without images loses nothing: the unpruned model's logits, position by position
    torch.testing.assert_close(aligned[1][text_only], full[1][text_only], atol=1e-5, rtol=1e-4)
