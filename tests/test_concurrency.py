"""One pruning model served from several threads gives every call exactly its sequential result."""

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny
import torch
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, last_selection, pruning_disabled

PROMPTS = ("USER: <image>\nwhat is in the image ? ASSISTANT:", "USER: <image>\nhow many shapes are there ? ASSISTANT:",
           "USER: <image>\ndescribe the colors . ASSISTANT:")
THREADS = 4
REPEATS = 5


def requests(count: int = 24) -> list[tuple]:
    """Mixed images, prompts and per-call settings: pruning off, or another alpha, for some calls."""
    settings = [(False, None), (True, None), (False, 0.0), (False, 1.0)]
    return [(tiny.noise_image(index % 7), PROMPTS[index % 3], *settings[index % 4]) for index in range(count)]


def serve(model, processor, request) -> tuple[torch.Tensor, list | None]:
    image, prompt, off, alpha = request
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with pruning_disabled(model) if off else contextlib.nullcontext():
        model.qap_pruner.alpha_override = alpha  # per thread, as select_fusion sets it
        try:
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            kept = None if off else [s.kept.clone() for s in last_selection(model)]
        finally:
            model.qap_pruner.alpha_override = None
    return output, kept


@pytest.mark.parametrize("semantic", ["cls_attention", "cdpruner"])
def test_threads_get_their_own_tokens_selection_and_settings(tiny_repo, semantic):
    config = QAPrunerConfig(keep_tokens=4, alpha=0.5, semantic=semantic, w_group_size=32)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    processor = tiny.tiny_processor()
    work = requests()
    expected = [serve(model, processor, request) for request in work]
    assert len({tuple(k[0].tolist()) for _, k in expected if k}) > 1  # the settings really select differently
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(REPEATS):
            got = list(pool.map(lambda request: serve(model, processor, request), work))
            for (output, kept), (want_output, want_kept) in zip(got, expected, strict=True):
                assert torch.equal(output, want_output)
                assert (kept is None) == (want_kept is None)
                assert kept is None or all(torch.equal(a, b) for a, b in zip(kept, want_kept, strict=True))


def test_pruning_disabled_in_one_thread_leaves_the_others_pruning(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig(keep_tokens=4))
    processor = tiny.tiny_processor()
    inputs = processor(images=tiny.noise_image(1), text=PROMPTS[0], return_tensors="pt")
    with pruning_disabled(model):
        assert not model.qap_pruner.active
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lambda: model.qap_pruner.active).result()
            pool.submit(lambda: model(**inputs)).result()
    assert model.qap_pruner.active and last_selection(model) == []  # the selection went to the other thread


def test_calibration_beside_generation_changes_no_other_call(tiny_repo):
    # static ranges: generation in other threads keeps quantizing with the ranges it had until calibration ends
    from optimum_qap import builtin_calibration_samples, calibrate

    config = QAPrunerConfig(keep_tokens=4, a_granularity="static_per_channel", calibration="builtin",
                            num_calibration_samples=2, alpha=0.5)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    processor = tiny.tiny_processor()
    work = [r for r in requests(12) if r[3] is None]
    expected = [serve(model, processor, request) for request in work]
    samples = builtin_calibration_samples(2)  # the same samples: the ranges it writes equal the current ones
    with ThreadPoolExecutor(THREADS) as pool:
        calibration = pool.submit(calibrate, model, processor, samples * 4, False)
        got = list(pool.map(lambda request: serve(model, processor, request), work * 3))
        calibration.result()
    for (output, _), (want, _) in zip(got, expected * 3, strict=True):
        assert torch.equal(output, want)


def test_attach_pruner_beside_generation_changes_no_call_in_flight(tiny_repo):
    # each call runs wholly with the settings it started with: its tokens are those of one setting or the other
    from optimum_qap import attach_pruner

    settings = [QAPrunerConfig(keep_tokens=4, alpha=alpha, w_group_size=32) for alpha in (0.0, 1.0)]
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=settings[0])
    processor = tiny.tiny_processor()
    work = [r for r in requests(12) if not r[2] and r[3] is None]
    expected = []
    for config in settings:
        attach_pruner(model, config)
        expected.append([serve(model, processor, request)[0] for request in work])
    stop = []

    def toggle():
        index = 0
        while not stop:
            attach_pruner(model, settings[index % 2])
            index += 1
            time.sleep(0.002)  # let the serving threads run

    with ThreadPoolExecutor(THREADS) as pool:
        toggling = pool.submit(toggle)
        got = list(pool.map(lambda request: serve(model, processor, request)[0], work * 3))
        stop.append(True)
        toggling.result()
    for output, index in zip(got, [i for _ in range(3) for i in range(len(work))], strict=True):
        assert torch.equal(output, expected[0][index]) or torch.equal(output, expected[1][index])
