"""Hostile or absurd inputs get a ValueError that names the problem, without hanging or exhausting memory."""

import os

import pytest
import tiny
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig
from optimum_qap.calibration import model_inputs
from optimum_qap.cli import main
from optimum_qap.pruning.scoring import group_quant_error

FLOAT_FIELDS = ("keep_ratio", "alpha", "outlier_ratio", "error_weight", "range_weight", "gptq_damping")


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [10**400, -(10**400), float("inf"), float("nan")])
def test_huge_or_non_finite_numbers_are_value_errors(field, value):
    with pytest.raises(ValueError, match=f"QAPrunerConfig.{field}="):
        QAPrunerConfig(**{field: value})


def test_calibration_sample_count_is_bounded():
    with pytest.raises(ValueError, match="num_calibration_samples.*at most 4096"):
        QAPrunerConfig(num_calibration_samples=10**8)


def test_a_sensitivity_group_wider_than_the_token_is_the_whole_token():
    tokens = torch.randn(3, 5, 64)
    assert torch.equal(group_quant_error(tokens, 10**9, 4), group_quant_error(tokens, 64, 4))


@pytest.fixture(scope="module")
def model(tiny_repo):
    return LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig(keep_tokens=4))


def test_a_fifo_calibration_path_fails_instead_of_hanging(model, tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        model_inputs(model, tiny.tiny_processor(), str(fifo), "describe the image")
    assert main(["visualize", str(fifo), "--prompt", "what is in the image ?"]) == 2


def test_a_decompression_bomb_is_a_value_error(model, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64 x 64 image is then > 2x the limit: PIL refuses it
    with pytest.raises(ValueError, match="cannot be read"):
        model_inputs(model, tiny.tiny_processor(), str(path), "describe the image")
    assert main(["visualize", str(path), "--prompt", "what is in the image ?"]) == 2


def test_empty_input_ids_with_an_image_is_a_value_error(model):
    pixels = torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="placeholders"):
        model(input_ids=empty, pixel_values=pixels)
    with pytest.raises(ValueError, match="placeholders"):
        model.generate(input_ids=empty, pixel_values=pixels, max_new_tokens=2)


def test_the_cli_reports_a_huge_keep_ratio_in_one_line(tiny_repo, tmp_path, capsys):
    assert main(["compress", tiny_repo, "--output", str(tmp_path / "o"), "--keep-ratio", "1" + "0" * 400]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert optimum_qap.QAPrunerConfig(keep_ratio=0.5).keep_ratio == 0.5
