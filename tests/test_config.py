import importlib
import json

import pytest
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
