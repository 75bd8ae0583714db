"""Every long step shows a progress bar, and all of them follow transformers' progress-bar switch."""

import pytest
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from optimum_qap import QAPrunerConfig
from optimum_qap.progress import phase_seconds, progress_bar

BARS = ("Loading weights", "Rotating", "GPTQ", "Calibrating", "Choosing alpha")


@pytest.fixture
def bars_off():
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def load(repo):
    config = QAPrunerConfig(keep_ratio=0.25, calibration="builtin", num_calibration_samples=2)
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=config)


def test_loading_quantizing_calibrating_and_choosing_show_bars_with_an_eta(tiny_repo, capfd):
    model = load(tiny_repo)
    err = capfd.readouterr().err
    for name in BARS:
        assert f"{name}: 100%" in err, name
    assert "<00:00" in err  # tqdm's elapsed<remaining
    assert {"rotate", "gptq", "quantize", "calibrate", "choose"} <= set(phase_seconds(model))


def test_disabling_transformers_progress_bars_silences_ours(tiny_repo, capfd, bars_off):
    load(tiny_repo)
    err = capfd.readouterr().err
    assert not any(name in err for name in BARS), err
    assert list(progress_bar(range(3), "x")) == [0, 1, 2] and progress_bar(range(3), "x").disable
