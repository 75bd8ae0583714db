"""Every long step shows a progress bar, and all of them follow transformers' progress-bar switch."""

import time

import pytest
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from optimum_qap import QAPrunerConfig
from optimum_qap.progress import phase_seconds, progress_bar, timed_phase

BARS = ("Loading weights", "GPTQ", "Calibrating", "Choosing alpha")  # GPTQ rotates each layer first


@pytest.fixture
def bars_off():
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def load(repo):
    config = QAPrunerConfig(keep_ratio=0.25, calibration="builtin", num_calibration_samples=2)
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=config)


def test_loading_quantizing_calibrating_and_choosing_show_bars_with_an_eta(tiny_repo, capfd):
    start = time.perf_counter()
    model = load(tiny_repo)
    seconds = time.perf_counter() - start
    err = capfd.readouterr().err
    for name in BARS:
        assert f"{name}: 100%" in err, name
    assert "<00:00" in err  # tqdm's elapsed<remaining
    phases = phase_seconds(model)
    assert {"rotate", "gptq", "quantize", "calibrate", "choose"} <= set(phases)
    assert sum(phases.values()) <= seconds  # rotation inside GPTQ's layer loop is not counted twice


def test_rtn_load_rotates_and_quantizes_with_one_bar_per_layer(tiny_repo, capfd):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig())
    assert "Quantizing: 100%|██████████| 2/2" in capfd.readouterr().err  # the tiny model's two decoder layers
    assert {"rotate", "quantize"} <= set(phase_seconds(model))


def test_a_phase_timed_inside_another_is_left_out_of_the_outer_one():
    model = nn.Module()
    start = time.perf_counter()
    with timed_phase(model, "outer"):
        with timed_phase(model, "inner"):
            time.sleep(0.05)
        with timed_phase(model, "outer"):  # the same phase nested counts once
            time.sleep(0.01)
    total = time.perf_counter() - start
    phases = phase_seconds(model)
    assert phases["inner"] >= 0.05 and phases["outer"] >= 0.01
    assert phases["inner"] + phases["outer"] == pytest.approx(total, abs=0.01)


def test_disabling_transformers_progress_bars_silences_ours(tiny_repo, capfd, bars_off):
    load(tiny_repo)
    err = capfd.readouterr().err
    assert not any(name in err for name in BARS), err
    assert list(progress_bar(range(3), "x")) == [0, 1, 2] and progress_bar(range(3), "x").disable
