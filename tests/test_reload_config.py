"""A QAPrunerConfig passed when reloading a qap checkpoint: pruning fields apply, quantization fields must match."""

import warnings

import pytest
import tiny
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, last_selection


@pytest.fixture(scope="module")
def saved(tiny_repo, tmp_path_factory):
    """A checkpoint keeping 4 of 16 visual tokens (keep_tokens=4), W4A4 with rotation, groups of 32."""
    folder = tmp_path_factory.mktemp("saved")
    config = QAPrunerConfig(w_group_size=32, keep_tokens=4)
    LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config).save_pretrained(folder)
    return folder


def kept_tokens(model) -> int:
    inputs = tiny.tiny_processor()(images=tiny.noise_image(0), text="USER: <image>\nwhat ?", return_tensors="pt")
    model(**inputs)
    return len(last_selection(model)[0].kept)


@pytest.mark.parametrize(("passed", "kept"), [({"keep_ratio": 0.5}, 8), ({"keep_tokens": 6}, 6),
                                              ({"keep_ratio": 0.5, "w_group_size": 32, "alpha": 1.0}, 8)])
def test_pruning_fields_passed_at_reload_apply(saved, tmp_path, passed, kept):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not transformers' "the quantization_config from the model will be used"
        model = LlavaForConditionalGeneration.from_pretrained(saved, quantization_config=QAPrunerConfig(**passed))
    assert kept_tokens(model) == kept
    config = model.config.quantization_config
    assert config.w_group_size == 32 and config.rotation and all(getattr(config, k) == v for k, v in passed.items())
    model.save_pretrained(tmp_path)
    assert kept_tokens(LlavaForConditionalGeneration.from_pretrained(tmp_path)) == kept


def test_reload_without_a_config_keeps_the_saved_pruning(saved):
    assert kept_tokens(LlavaForConditionalGeneration.from_pretrained(saved)) == 4


@pytest.mark.parametrize(
    ("field", "value", "saved_value"),
    [("w_bits", 8, 4), ("w_group_size", 128, 32), ("rotation", False, True), ("weight_method", "gptq", "rtn"),
     ("a_granularity", "per_group", "per_token"), ("modules_to_not_convert", ["o_proj"], None)],
)
def test_conflicting_quantization_field_names_field_and_both_values(saved, field, value, saved_value):
    extra = {"calibration": "builtin"} if field == "weight_method" else {}
    with pytest.raises(ValueError, match=f"{field}: checkpoint {saved_value!r}, passed {value!r}".replace("[", r"\[")):
        LlavaForConditionalGeneration.from_pretrained(
            saved, quantization_config=QAPrunerConfig(keep_ratio=0.5, **{field: value}, **extra)
        )


def test_calibration_at_reload_points_to_calibrate(saved):
    with pytest.raises(ValueError, match=r"calibration: checkpoint None, passed 'builtin'.*optimum_qap.calibrate"):
        LlavaForConditionalGeneration.from_pretrained(saved, quantization_config=QAPrunerConfig(calibration="builtin"))


def test_explicit_fields_are_what_the_caller_passed():
    assert QAPrunerConfig(keep_ratio=0.5, w_bits=4).explicit_fields == {"keep_ratio", "w_bits"}
    assert QAPrunerConfig(keep_ratio=0.5, w_bits=4).get_loading_attributes() == {"keep_ratio": 0.5}
    assert QAPrunerConfig.from_dict(QAPrunerConfig().to_dict()).explicit_fields == set(QAPrunerConfig().to_dict()) - {
        "quant_method"}
