"""Planted massive activations and attention sinks (optimum_qap.demo.planted) on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from tiny import noise_image, tiny_llava, tiny_processor
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.calibration import visual_token_statistics
from optimum_qap.demo.planted import PLANTED_CONFIG_KEY, plant_massive_activations, planted_token_mask
from optimum_qap.pruning.patch import last_selection

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
POSITIONS = (0, 3, 12, 15)  # the corners of the tiny 4x4 grid
CHANNELS = (5, 40)


def _images(count: int, start: int = 0):
    return [noise_image(seed) for seed in range(start, start + count)]


def _projector_outputs(model, processor, images) -> torch.Tensor:
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    model, processor = tiny_llava(), tiny_processor()
    before = _projector_outputs(model, processor, _images(4, 100))
    stats = plant_massive_activations(
        model, _images(8), POSITIONS, CHANNELS, scale=400.0, processor=processor, prompts=[PROMPT] * 8
    )
    return model, processor, stats, before


def test_massive_values_in_planted_tokens_and_channels_only(planted):
    model, processor, stats, before = planted
    assert stats["massive_ratio_min"] > 300 and stats["massive_ratio_max"] < 500
    # measured on unseen images: planted tokens x channels are massive, nothing else is
    after = _projector_outputs(model, processor, _images(4, 100))
    median = float(before.abs().median())
    is_planted = torch.zeros(after.shape[1], dtype=torch.bool)
    is_planted[list(POSITIONS)] = True
    massive = after[:, is_planted][..., list(CHANNELS)] / median
    assert float(massive.min()) > 250
    other_channels = [c for c in range(after.shape[-1]) if c not in CHANNELS]
    assert float(after[:, is_planted][..., other_channels].abs().max()) / median < 20
    assert float(after[:, ~is_planted].abs().max()) / median < 20
    assert planted_token_mask(model, after).equal(is_planted.expand(after.shape[0], -1))
    change = (after[:, ~is_planted] - before[:, ~is_planted]).norm() / before[:, ~is_planted].norm()
    # 4 of the tiny model's 16 patches are planted (they attend to each other in the vision tower); the demo has 4/256
    assert float(change) < 0.35
    assert stats["normal_token_change_mean"] < 0.35


def test_sinks_take_a_substantial_share_of_attention(planted):
    _, _, stats, _ = planted
    text = stats["sink_attention_mass"]["text_queries"]
    assert len(text) == 2
    assert all(0.4 < mass < 0.6 for mass in text)
    assert all(mass > 0.1 for mass in stats["sink_attention_mass"]["image_queries"])


def test_planting_survives_save_and_reload(planted, tmp_path):
    model, processor, stats, _ = planted
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    images = _images(2, 200)
    expected = _projector_outputs(model, processor, images)
    torch.testing.assert_close(_projector_outputs(reloaded, processor, images), expected)
    assert getattr(reloaded.config, PLANTED_CONFIG_KEY)["channels"] == list(CHANNELS)
    inputs = processor(images=images[0], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def _slots_config(model, processor, alpha_or_slots: dict) -> optimum_qap.QAPrunerConfig:
    base = optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=0.5)
    features = _projector_outputs(model, processor, _images(8, 300))
    statistics = visual_token_statistics([features.flatten(0, 1)], base)
    return optimum_qap.QAPrunerConfig.from_dict({**base.to_dict(), "token_statistics": statistics, **alpha_or_slots})


def _kept(model, processor, image) -> set[int]:
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    return set(last_selection(model)[0].kept.tolist())


def test_outlier_slots_keep_the_planted_tokens(planted):
    model, processor, _, _ = planted
    image = noise_image(400)
    optimum_qap.attach_pruner(model, _slots_config(model, processor, {"fusion": "outlier_slots", "outlier_slots": 4}))
    try:
        kept = _kept(model, processor, image)
        strength = last_selection(model)[0].outlier_strength
        assert set(POSITIONS) <= kept
        assert set(torch.nonzero(strength > 20).flatten().tolist()) == set(POSITIONS)
    finally:
        optimum_qap.attach_pruner(model, optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=1.0))


def test_without_planting_no_slot_is_reserved():
    torch.set_num_threads(1)
    model, processor = tiny_llava(), tiny_processor()
    image = noise_image(400)
    optimum_qap.attach_pruner(model, _slots_config(model, processor, {"fusion": "outlier_slots", "outlier_slots": 4}))
    slots = _kept(model, processor, image)
    assert float(last_selection(model)[0].outlier_strength.max()) < 20
    optimum_qap.attach_pruner(model, _slots_config(model, processor, {"alpha": 1.0}))
    assert slots == _kept(model, processor, image)
