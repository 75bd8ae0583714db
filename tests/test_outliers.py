"""Planted outlier channels (optimum_qap.demo.outliers) on the shipped shapes-VQA demo model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo import DEMO_MODEL_PATH, make_dataset
from optimum_qap.demo.outliers import (
    OUTLIER_CONFIG_KEY,
    build_outlier_demo,
    calibration_inputs,
    fold_norm_gains,
    linear_input_absmax,
    plant_outlier_channels,
)

NUM_SAMPLES = 8
PREFIX = "model.language_model.layers."
TINY_PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
RTN = {"rotation": False, "weight_method": "rtn"}  # plain round-to-nearest: what the planted outliers must break


def _load(path, quant: dict | None = None):
    config = None if quant is None else optimum_qap.QAPrunerConfig(keep_ratio=1.0, **RTN, **quant)
    return LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config).eval()


@torch.no_grad()
def _logits(model, processor, examples) -> list[torch.Tensor]:
    return [model(**processor(images=e.image, text=e.prompt, return_tensors="pt")).logits[0] for e in examples]


def _max_rel_diff(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    scale = max(float(a.abs().max()) for a in reference)
    return max(float((a - b).abs().max()) for a, b in zip(reference, other, strict=True)) / scale


def _rel_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return sum(float((a - b).norm() / a.norm()) for a, b in zip(reference, other, strict=True)) / len(reference)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls gain little from more, and extra threads stall when the cores are busy
    directory = tmp_path_factory.mktemp("outlier-demo")
    stats = build_outlier_demo(directory, num_samples=NUM_SAMPLES)
    processor = AutoProcessor.from_pretrained(directory)
    yield directory, processor, stats
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe():
    return make_dataset(3, "test")


def test_full_precision_function_is_unchanged(built, probe):
    directory, processor, _ = built
    original = _logits(_load(DEMO_MODEL_PATH), processor, probe)
    derived = _logits(_load(directory), processor, probe)
    assert _max_rel_diff(original, derived) < 1e-4


def test_every_linear_input_has_planted_outliers(built):
    directory, processor, stats = built
    model = _load(directory, {"calibration": "builtin", "num_calibration_samples": NUM_SAMPLES})
    report = optimum_qap.outlier_report(model)  # calibrated on the built-in samples, not the planting samples
    assert len(report) == 3 * 7
    for name, layer in report.items():
        short = name.removeprefix(PREFIX)
        entry = stats["linear_inputs"][short]
        assert 20 <= layer.max_ratio <= 100, (short, layer.max_ratio)
        ratios = layer.absmax[entry["channels"]] / layer.median
        assert bool(((ratios >= 20) & (ratios <= 100)).all()), (short, ratios)
        assert set(entry["channels"]) <= set(layer.outlier_channels)
        if not short.endswith("down_proj"):  # the demo's down_proj inputs have natural ~50-85x channels already
            assert entry["before"]["max_ratio"] < 5
            assert set(layer.outlier_channels) == set(entry["channels"])


def test_round_to_nearest_w4a4_breaks_the_derived_model_only(built, probe):
    directory, processor, _ = built
    errors = {}
    for name, path in (("original", DEMO_MODEL_PATH), ("derived", directory)):
        reference = _logits(_load(path), processor, probe)
        errors[name] = _rel_error(reference, _logits(_load(path, {}), processor, probe))
    assert errors["original"] < 0.1
    assert errors["derived"] > 0.3 and errors["derived"] > 4 * errors["original"], errors


@pytest.mark.parametrize("backbone", [{}, {"calibration": "builtin", "num_calibration_samples": NUM_SAMPLES}])
def test_the_rotated_backbone_repairs_w4a4_on_the_derived_model(built, probe, backbone):
    # the default QAPrunerConfig (rotation + RTN) and rotation + GPTQ, against the plain RTN that the outliers break
    directory, processor, _ = built
    reference = _logits(_load(directory), processor, probe)
    broken = _rel_error(reference, _logits(_load(directory, {}), processor, probe))
    config = optimum_qap.QAPrunerConfig(keep_ratio=1.0, **backbone)
    model = LlavaForConditionalGeneration.from_pretrained(directory, quantization_config=config).eval()
    assert model.config.quantization_config.weight_method == ("gptq" if backbone else "rtn")
    repaired = _rel_error(reference, _logits(model, processor, probe))
    assert repaired < 0.15 and repaired < broken / 4, (repaired, broken)


def test_same_seed_same_weights_and_reload_as_plain_llava(built, tmp_path):
    directory, processor, stats = built
    reloaded = _load(directory)
    assert not hasattr(reloaded.config, "quantization_config")
    assert getattr(reloaded.config, OUTLIER_CONFIG_KEY)["channels"] == stats["channels"]
    again = build_outlier_demo(tmp_path, num_samples=NUM_SAMPLES)
    assert again["scales"] == stats["scales"]
    rebuilt = _load(tmp_path).state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, rebuilt[key]), key
    other = plant_outlier_channels(_load(DEMO_MODEL_PATH), processor, _samples(2), seed=1)
    assert other["channels"] != stats["channels"]


def _samples(count: int) -> list[dict]:
    return [{"image": e.image, "text": e.prompt} for e in make_dataset(count, "train")]


def test_gain_folding_removes_norm_fed_outliers_and_residual_rotation_survives_it(built):
    directory, processor, stats = built
    inputs = calibration_inputs(_load(directory), processor, _samples(4))
    folded = _load(directory)
    fold_norm_gains(folded)
    ratios = {name: float(x.max() / x.median()) for name, x in linear_input_absmax(folded, inputs).items()}
    for name, ratio in ratios.items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert ratio < 5, (name, ratio)  # lived in the gains: gone
        else:
            assert ratio > 20, (name, ratio)  # o_proj / down_proj planting does not touch the gains

    model = _load(DEMO_MODEL_PATH)
    reference = copy.deepcopy(model)
    record = plant_outlier_channels(model, processor, _samples(4), residual="top")
    probe = make_dataset(2, "test")
    assert _max_rel_diff(_logits(reference, processor, probe), _logits(model, processor, probe)) < 1e-4
    for name, entry in record["linear_inputs"].items():
        assert 20 <= entry["after"]["max_ratio"] <= 100
        if "gain_folded" in entry:  # part of the ratio is now in the normalised residual stream itself
            assert min(entry["gain_folded"]["channel_ratios"]) > 4, (name, entry["gain_folded"])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="residual"):
        plant_outlier_channels(None, None, [], residual="hadamard")
    with pytest.raises(ValueError, match="ratio"):
        plant_outlier_channels(None, None, [], ratio=1.0)


def test_grouped_query_attention_and_principal_basis_on_a_tiny_llava():
    from tiny import noise_image, tiny_llava, tiny_processor

    model, processor = tiny_llava(), tiny_processor()  # 4 query heads share 2 kv heads
    samples = [{"image": noise_image(seed), "text": TINY_PROMPT} for seed in range(4)]
    inputs = calibration_inputs(model, processor, samples)
    with torch.no_grad():
        reference = [model(**i).logits[0] for i in inputs]
    record = plant_outlier_channels(model, processor, samples, channels_per_input=2, residual="pca")
    with torch.no_grad():
        assert _max_rel_diff(reference, [model(**i).logits[0] for i in inputs]) < 1e-4
    for name, entry in record["linear_inputs"].items():
        if name.endswith("o_proj"):  # each planted v row feeds the o_proj columns of both heads of its group
            assert len(entry["channels"]) == 4
        assert min(entry["after"]["channel_ratios"]) >= 19.9, (name, entry["after"])
