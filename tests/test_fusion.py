"""Calibrated fusion: alpha="auto" and outlier slots."""

import pytest
import tiny
import torch
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig, last_selection
from optimum_qap.hub import model_card
from optimum_qap.pruning.auto import choose
from optimum_qap.pruning.selection import outlier_slot_indices, topk_indices

PROMPT = "USER: <image>\nwhat is in the image ? ASSISTANT:"


def load(repo, **config):
    settings = {"keep_ratio": 0.25, "calibration": "builtin", "num_calibration_samples": 2} | config
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=QAPrunerConfig(**settings))


def inputs(seed=0):
    return tiny.tiny_processor()(images=tiny.noise_image(seed), text=PROMPT, return_tensors="pt")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alpha_grid": [0.5, 1.5], "calibration": "builtin"}, r"QAPrunerConfig\.alpha_grid=1\.5"),
        ({"alpha_grid": []}, r"QAPrunerConfig\.alpha_grid=\[\]"),
        ({"outlier_slots": 9, "keep_tokens": 8}, r"outlier_slots=9.*cannot exceed keep_tokens=8"),
        ({"outlier_slots": -1}, r"QAPrunerConfig\.outlier_slots=-1"),
        ({"slot_grid": [1, "2"]}, r"QAPrunerConfig\.slot_grid="),
        ({"fusion": "max"}, r"QAPrunerConfig\.fusion='max'"),
        ({"auto_max_samples": 0}, r"QAPrunerConfig\.auto_max_samples=0"),
    ],
)
def test_bad_fusion_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        QAPrunerConfig(**settings)


def test_outlier_slots_reserve_only_genuine_outliers():
    semantic = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.0])
    strength = torch.tensor([1.0, 50.0, 1.2, 0.9, 30.0, 25.0])
    # outliers above 20: tokens 1 (50), 4 (30), 5 (25); two slots take 1 and 4, then semantic fills 0
    assert outlier_slot_indices(semantic, strength, 20.0, k=3, slots=2).tolist() == [0, 1, 4]
    # no token above the ratio: plain semantic top-k
    assert outlier_slot_indices(semantic, strength, 60.0, k=3, slots=2).tolist() == [0, 2, 4]
    assert outlier_slot_indices(semantic, strength, 20.0, k=2, slots=5).tolist() == [1, 4]


def test_alpha_auto_chooses_the_least_divergent_value_and_survives_save(tiny_repo, tmp_path):
    model = load(tiny_repo, alpha="auto", alpha_grid=[0.3, 0.6], auto_max_samples=2)
    record = model.config.quantization_config.auto_selection
    assert set(record["alpha_curve"]) == {"0.0", "0.3", "0.6", "1.0"}
    chosen = record["alpha_curve"][str(record["alpha"])]
    assert record["alpha"] == 1.0 or chosen < record["alpha_curve"]["1.0"]  # baseline unless it beats it
    assert record["criterion"] == "KL to unpruned at the answer position" and record["samples"] == 2
    assert record["seconds_per_point_per_sample"] > 0
    model(**inputs())
    kept = [s.kept for s in last_selection(model)]
    assert "alpha chosen automatically on 2 calibration samples" in str(model_card(model.config.quantization_config))
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.auto_selection == record  # chosen once, not recalibrated
    reloaded(**inputs())
    assert all(torch.equal(a, s.kept) for a, s in zip(kept, last_selection(reloaded), strict=True))


def test_choose_keeps_the_baseline_unless_a_candidate_beats_it_beyond_noise():
    baseline = [1.0, 1.0, 1.0, 1.0]
    noisy = [0.2, 1.9, 0.1, 1.6]  # lower mean, but the paired gains vary too much
    clear = [0.8, 0.85, 0.8, 0.82]
    assert choose({"1.0": baseline, "0.5": noisy}, "1.0") == "1.0"
    assert choose({"1.0": baseline, "0.5": noisy, "0.25": clear}, "1.0") == "0.25"
    assert choose({"1.0": baseline, "0.0": [0.5, 0.5, 0.5, 0.5], "0.25": clear}, "1.0") == "0.0"


def test_select_fusion_scores_answers_by_cross_entropy(tiny_repo):
    model = load(tiny_repo, calibration=None, auto_criterion="answer")
    samples = [{"image": tiny.noise_image(i), "text": "what colors ?", "answer": "red"} for i in range(2)]
    with pytest.raises(ValueError, match=r'auto_criterion="answer" scores each sample\'s "answer", and sample 1 has'):
        optimum_qap.select_fusion(model, tiny.tiny_processor(), [samples[0], {**samples[1], "answer": ""}])
    record = optimum_qap.select_fusion(model, tiny.tiny_processor(), samples, progress=False)
    assert record["criterion"] == "answer cross-entropy"
    assert model.config.quantization_config.alpha == "auto"
    assert model.qap_pruner.alpha == record["alpha"]
    assert all(value > 0 for value in record["alpha_curve"].values())


def test_kl_criterion_compares_the_answer_position_with_the_unpruned_model(tiny_repo):
    model = load(tiny_repo, calibration=None, alpha_grid=[0.5])
    sample = {"image": tiny.noise_image(3), "text": "how many shapes are there ?"}
    record = optimum_qap.select_fusion(model, tiny.tiny_processor(), [sample], progress=False)
    inputs = optimum_qap.calibration.model_inputs(model, tiny.tiny_processor(), sample["image"], sample["text"])
    with torch.no_grad(), optimum_qap.pruning_disabled(model):
        reference = torch.log_softmax(model(**inputs).logits[0, -1], -1)
    for alpha in (0.0, 0.5, 1.0):
        model.qap_pruner.alpha_override = alpha
        with torch.no_grad():
            pruned = torch.log_softmax(model(**inputs).logits[0, -1], -1)
        expected = float((reference.exp() * (reference - pruned)).sum())
        assert record["alpha_curve"][str(alpha)] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    model.qap_pruner.alpha_override = None


def test_kl_against_itself_is_zero_without_pruning(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=QAPrunerConfig(keep_tokens=16, calibration=None)
    )
    record = optimum_qap.select_fusion(model, tiny.tiny_processor(), [{"image": tiny.noise_image(0), "text": "x"}],
                                       progress=False)
    assert max(record["alpha_curve"].values()) < 1e-6  # keeping all 16 tokens changes nothing


def plant_outliers(model, tokens=(3, 7), channel=5, scale=400.0):
    """Massive activations on a few visual tokens, as large LLMs show on sink tokens."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[:, list(tokens), channel] = scale * output.abs().median()
        return output

    return model.model.multi_modal_projector.register_forward_hook(hook)


def test_outlier_slots_keep_planted_massive_tokens_and_nothing_special_otherwise(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=QAPrunerConfig(keep_ratio=0.25, fusion="outlier_slots", outlier_slots=2,
                                                      calibration="builtin", num_calibration_samples=2,
                                                      rotation=False)  # the hook plants in the unrotated basis
    )
    stats = model.config.quantization_config.token_statistics
    assert stats["tokens"] == 2 * 16 and stats["range_median"] > 0
    model(**inputs())
    plain = last_selection(model)[0]
    assert plain.outlier_strength.max() < 20  # no outliers in the random tiny model: reserves none
    assert torch.equal(plain.kept, topk_indices(plain.semantic, 4))
    handle = plant_outliers(model)
    model(**inputs())
    planted = last_selection(model)[0]
    handle.remove()
    assert {3, 7} <= set(planted.kept.tolist())
    assert planted.outlier_strength[[3, 7]].min() > 20


def test_outlier_slots_auto_picks_from_the_grid(tiny_repo):
    model = load(tiny_repo, fusion="outlier_slots", slot_grid=[0, 1, 2, 8], auto_max_samples=1)
    record = model.config.quantization_config.auto_selection
    assert set(record["slot_curve"]) == {"0", "1", "2"}  # 8 exceeds K = 4 and is skipped
    assert record["outlier_slots"] in (0, 1, 2) and model.qap_pruner.slots == record["outlier_slots"]


def test_alpha_defaults_to_auto_when_calibration_samples_are_given(tiny_repo):
    assert QAPrunerConfig().alpha == 0.7  # nothing to decide with: the paper's hybrid score
    assert QAPrunerConfig(calibration="builtin").alpha == "auto"
    assert QAPrunerConfig(calibration="builtin", alpha=0.5).alpha == 0.5
    saved = QAPrunerConfig(calibration="builtin").to_dict()
    assert QAPrunerConfig.from_dict(saved | {"calibration": None, "auto_selection": {"alpha": 1.0}}).alpha == "auto"
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=QAPrunerConfig(keep_ratio=0.25, calibration="builtin", num_calibration_samples=2)
    )
    record = model.config.quantization_config.auto_selection
    assert record["samples"] == 2 and model.qap_pruner.alpha == record["alpha"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alpha": "auto"}, r'alpha="auto" has not been chosen yet: call optimum_qap.calibrate\(model, processor'),
        ({"fusion": "outlier_slots", "outlier_slots": 2}, r"needs calibrated token statistics: call optimum_qap.cal"),
        ({"fusion": "outlier_slots"}, r"needs calibrated token statistics"),
    ],
)
def test_settings_that_need_calibration_load_without_it_and_one_calibrate_call_finishes_them(
    tiny_repo, settings, message
):
    model = load(tiny_repo, calibration=None, **settings)
    with pytest.raises(ValueError, match=message):
        model(**inputs())
    optimum_qap.calibrate(model, tiny.tiny_processor(), [tiny.noise_image(i) for i in range(2)], progress=False)
    config = model.config.quantization_config
    assert config.token_statistics["tokens"] == 2 * 16 and config.calibration_summary["samples"] == 2
    assert (config.auto_selection is not None) == ("auto" in (config.alpha, config.outlier_slots))
    model(**inputs())
    assert len(last_selection(model)[0].kept) == 4


def count_runs(monkeypatch):
    runs = []
    original = optimum_qap.pruning.auto._tail_log_probs
    monkeypatch.setattr(optimum_qap.pruning.auto, "_tail_log_probs", lambda m, s: runs.append(1) or original(m, s))
    return runs


@pytest.mark.parametrize(("planted", "computed_values"), [(False, 1), (True, 3)])
def test_slot_sweep_skips_values_that_cannot_change_the_selection(tiny_repo, monkeypatch, planted, computed_values):
    # without outliers every m keeps semantic top-K: only m=0 runs; with 2 outliers per image, m=4 keeps what m=2 does
    model = load(tiny_repo, fusion="outlier_slots", slot_grid=[0, 1, 2, 4], rotation=False)
    samples = [{"image": tiny.noise_image(i), "text": "what colors ?"} for i in range(2)]
    handle = plant_outliers(model) if planted else None
    runs = count_runs(monkeypatch)
    skipping = optimum_qap.select_fusion(model, tiny.tiny_processor(), samples, progress=False)
    assert len(runs) == 2 + 2 * computed_values  # the unpruned references, then the values that can differ
    monkeypatch.setattr(optimum_qap.pruning.auto.SlotEquivalence, "key", lambda self, value, index: None)
    runs.clear()
    full = optimum_qap.select_fusion(model, tiny.tiny_processor(), samples, progress=False)
    assert len(runs) == 2 + 2 * 4
    if handle is not None:
        handle.remove()
    assert skipping["slot_curve"] == full["slot_curve"] and skipping["outlier_slots"] == full["outlier_slots"]
