import importlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoQuantizationConfig

import optimum_qap
from optimum_qap import QAPrunerConfig
from optimum_qap.config import FORMAT_VERSION


def test_defaults_are_the_papers_setting():
    config = QAPrunerConfig()
    assert (config.w_bits, config.a_bits, config.keep_ratio) == (4, 4, 0.125)
    assert config.w_group_size == 128 and config.prunes
    assert not config.needs_calibration  # works in from_pretrained with no other argument


def test_round_trip_is_exact_and_json_only():
    config = QAPrunerConfig(
        w_bits=3, w_group_size=None, w_symmetric=True, a_bits=8, a_granularity="static_per_tensor",
        modules_to_not_convert=["mlp.down_proj"], calibration=[{"image": "a.png", "text": "hi"}],
        keep_tokens=32, alpha=0.25, selection="dpp", calibration_summary={"samples": 4, "seconds": 1.5},
    )
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["format_version"] == FORMAT_VERSION and data["quant_method"] == "qap"
    assert QAPrunerConfig.from_dict(data).to_dict() == data
    assert AutoQuantizationConfig.from_dict(data) == config


def test_registration_is_idempotent():
    importlib.reload(optimum_qap)
    importlib.reload(optimum_qap)
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qap"].__name__ == "QAPrunerConfig"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("w_bits", 5), ("w_bits", True), ("w_bits", 4.0), ("w_group_size", 0), ("w_group_size", -128),
        ("w_symmetric", "yes"), ("a_bits", 1), ("a_granularity", "per_row"), ("a_group_size", None),
        ("a_symmetric", 1), ("quantize_projector", None), ("quantize_vision_tower", "no"),
        ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [""]), ("calibration", "coco"),
        ("calibration", [{"image": "a.png"}]), ("calibration", []), ("num_calibration_samples", 0),
        ("outlier_ratio", 1.0), ("outlier_ratio", float("nan")), ("keep_ratio", 0.0), ("keep_ratio", 1.5),
        ("keep_tokens", 0), ("alpha", -0.1), ("alpha", 1.01), ("semantic", "random"), ("selection", "greedy"),
        ("error_weight", 2), ("range_weight", -1), ("sensitivity_group_size", 0), ("sensitivity_bits", 16),
        ("base_model", 3), ("calibration_summary", {"t": float("inf")}),
        ("format_version", 0),
    ],
)
def test_invalid_values_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"QAPrunerConfig\.{field}=") as error:
        QAPrunerConfig(**{field: value})
    assert repr(value) in str(error.value)


def test_both_sensitivity_weights_zero_is_rejected():
    with pytest.raises(ValueError, match="cannot both be 0"):
        QAPrunerConfig(error_weight=0, range_weight=0)


def test_future_format_version_is_refused_with_upgrade_hint():
    data = QAPrunerConfig().to_dict() | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match="newer optimum-qap.*pip install -U optimum-qap"):
        QAPrunerConfig.from_dict(data)


def test_unknown_keys_and_foreign_method_are_refused():
    with pytest.raises(ValueError, match="unknown field"):
        QAPrunerConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="quant_method"):
        QAPrunerConfig.from_dict({"quant_method": "gptq"})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = st.sampled_from([*QAPrunerConfig().to_dict(), "junk"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS, JSON_VALUES | st.sampled_from([4, 8, 16, 128, None, 0.5, "per_group", "dpp"])))
def test_from_dict_on_random_junk_gives_valid_config_or_value_error(data):
    try:
        config = QAPrunerConfig.from_dict(data)
    except ValueError:
        return
    assert QAPrunerConfig.from_dict(config.to_dict()) == config


CANDIDATES = {
    "w_bits": [2, 3, 4, 8, 16, 5, "4", True],
    "w_group_size": [None, 16, 32, 33, 0, 10**400],
    "w_symmetric": [True, False, 1],
    "a_bits": [2, 4, 8, 16, 1],
    "a_granularity": ["per_token", "per_group", "static_per_channel", "static_per_tensor", "dynamic"],
    "a_group_size": [16, 7, 0],
    "a_symmetric": [True, False],
    "quantize_projector": [True, False],
    "quantize_vision_tower": [True, False],
    "modules_to_not_convert": [None, ["down_proj"], [""], "down_proj"],
    "calibration": [None, "builtin", "everything"],
    "num_calibration_samples": [1, 2, 0, 10**8],
    "outlier_ratio": [20.0, 1.0, 10**400],
    "rotation": [True, False, "yes"],
    "rotation_seed": [0, 3, -1],
    "weight_method": [None, "rtn", "gptq", "awq"],
    "gptq_damping": [0.01, 0.1, 0, 2],
    "gptq_act_order": [True, False],
    "gptq_block_size": [1, 16, 0],
    "keep_ratio": [1.0, 0.5, 0.125, 0, 10**400, float("nan")],
    "keep_tokens": [None, 1, 4, 16, 17, 0],
    "alpha": [None, 0.0, 0.5, 1.0, "auto", 2],
    "alpha_grid": [None, [0.5], [], [2]],
    "fusion": ["weighted", "outlier_slots", "best"],
    "outlier_slots": ["auto", 0, 2, 5, -1],
    "slot_grid": [None, [0, 1], [], [-1]],
    "auto_max_samples": [1, 2, 0],
    "auto_criterion": ["kl", "answer", "loss"],
    "semantic": ["cls_attention", "cdpruner", "clip"],
    "selection": ["topk", "dpp", "greedy"],
    "error_weight": [0.5, 0.0, 1.0, -1],
    "range_weight": [0.5, 0.0, 2],
    "sensitivity_group_size": [128, 7, 10**9, 0],
    "sensitivity_bits": [None, 2, 4, 8, 16],
    "sensitivity_space": ["projector", "quantizer", "input"],
}


FEW_FIELDS = st.lists(st.sampled_from(sorted(CANDIDATES)), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: st.sampled_from(CANDIDATES[name]) for name in names})
)


@settings(max_examples=40, deadline=None)
@given(FEW_FIELDS)
def test_any_field_values_give_a_value_error_or_a_model_that_round_trips_and_runs(tiny_repo, fields):
    import tiny
    from transformers import LlavaForConditionalGeneration

    from optimum_qap import UncalibratedError

    try:
        config = QAPrunerConfig(**fields)
    except ValueError:
        return
    assert QAPrunerConfig.from_dict(config.to_dict()) == config
    inputs = tiny.tiny_processor()(images=tiny.noise_image(0), text="USER: <image>\nwhat is in the image ?",
                                   return_tensors="pt")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
        logits = model(**inputs).logits
    except (ValueError, UncalibratedError):  # errors that name the field or the fix
        return
    assert torch.isfinite(logits).all()
