"""Progress bars and phase timings of the long steps (rotate, quantize, GPTQ, calibrate, choose alpha, evaluate).

Every bar optimum-qap shows is made by `progress_bar`, so all of them follow transformers' switch:
`transformers.utils.logging.disable_progress_bar()` silences them together with transformers' own (loading
weights), `enable_progress_bar()` brings them back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

PHASES_ATTRIBUTE = "qap_phase_seconds"


def progress_bar(iterable: Iterable | None = None, desc: str = "", enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar (with rate and ETA) over ``iterable``, shown when ``enabled`` and transformers' bars are on."""
    return tqdm(iterable, desc=desc, disable=not (enabled and hf_logging.is_progress_bar_enabled()), **kwargs)


@contextlib.contextmanager
def timed_phase(model: nn.Module, phase: str) -> Iterator[None]:
    """Add the seconds spent inside the block to ``model.qap_phase_seconds[phase]`` (what `optimum-qap compress`
    reports per phase), less those of the phases timed inside it (each layer's rotation inside GPTQ's layer
    loop), so that the phases add up to the time they took."""
    phases = model.__dict__.setdefault(PHASES_ATTRIBUTE, {})
    start, nested_before = time.perf_counter(), sum(phases.values())
    try:
        yield
    finally:
        nested = sum(phases.values()) - nested_before
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start - nested


def phase_seconds(model: nn.Module) -> dict[str, float]:
    """Seconds per phase that `from_pretrained` and calibration spent on ``model`` (empty when none was timed)."""
    return dict(model.__dict__.get(PHASES_ATTRIBUTE, {}))
