"""Calibration: per-channel activation ranges of every `QuantLinear`, and the outlier statistics they imply."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from .calibration_data import CALIBRATION_PROMPTS, IN_MEMORY, is_serializable, to_samples
from .progress import progress_bar, timed_phase
from .quant.linear import QuantLinear, observing_inputs


@dataclass
class LayerOutliers:
    """Calibrated input statistics of one quantized layer."""

    absmax: torch.Tensor  # per input channel, float32
    median: float
    outlier_channels: list[int]  # channels whose absmax exceeds outlier_ratio x median

    @property
    def max_ratio(self) -> float:
        """Largest channel absmax over the median channel: a few x without outliers (the demo model: 2-4 at most
        inputs, up to ~90 at down_proj, whose inputs have near-dead channels), 20-1000 with LLM-style outliers."""
        return float(self.absmax.max()) / max(self.median, 1e-12)


def builtin_calibration_samples(num_samples: int, seed: int = 0) -> list[dict]:
    """Deterministic synthetic image + prompt pairs shipped with the package (no download needed).

    Real data calibrates better: pass your own samples to `calibrate` when you have them.
    """
    rng = random.Random(seed)
    samples = []
    for index in range(num_samples):
        background = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (336, 336), background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(0, 260), rng.randrange(0, 260)
            box = (x0, y0, x0 + rng.randint(30, 76), y0 + rng.randint(30, 76))
            color = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        samples.append({"image": image, "text": CALIBRATION_PROMPTS[index % len(CALIBRATION_PROMPTS)]})
    return samples


def format_prompt(processor, text: str) -> str:
    """The prompt with the processor's image placeholder, via its chat template when it has one."""
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in text:
        return text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{image_token}\n{text}"


def _load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():  # a FIFO or device would block
        reason = "not a regular file" if Path(image).exists() else "no such file"
        raise ValueError(f"calibration image {image!r} cannot be read: {reason}")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"calibration image {image!r} cannot be read: {error}") from error


def to_model(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """Processor outputs on the model's device, floating-point ones (pixel values) in its dtype."""
    device, dtype = model.device, model.dtype
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}


def model_inputs(model: nn.Module, processor, image, text: str) -> dict[str, torch.Tensor]:
    """Processor outputs for one image + prompt, ready for ``model``."""
    inputs = processor(images=_load_image(image), text=format_prompt(processor, text), return_tensors="pt")
    return to_model(model, inputs)


def calibrate(model: nn.Module, processor, samples, progress: bool = True):
    """Record per-channel input ranges of every quantized layer over image + prompt ``samples``, then choose the
    config's "auto" values (`select_fusion`) on the same samples when they have not been chosen yet.

    ``samples`` takes every form `QAPrunerConfig.calibration` does (`optimum_qap.calibration_data`): dicts
    ``{"image": PIL image or path, "text": prompt}``, PIL images, chat conversations, or a `datasets.Dataset`
    (its first ``num_calibration_samples`` rows). Runs one sample at a time (no padding tokens pollute the
    ranges), with quantized weights and unquantized activations, and without token pruning. Also records the
    medians of the visual tokens' range and group-quantization error (the reference for `fusion="outlier_slots"`).
    Replaces earlier calibration. So a model loaded without `calibration` (e.g. from a checkpoint without processor
    files) is finished by this one call. Returns `outlier_report(model)` (empty for a model that prunes without
    quantizing).

    Example:
        >>> report = optimum_qap.calibrate(model, processor, optimum_qap.builtin_calibration_samples(8))
    """
    with timed_phase(model, "calibrate"):
        samples, report = _record_ranges(model, processor, samples, progress)
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "needs_auto_selection", False) and hasattr(model, "qap_pruner"):
        from .pruning.auto import select_fusion

        with timed_phase(model, "choose"):
            select_fusion(model, processor, samples, progress=progress)
    return report


def _record_ranges(model: nn.Module, processor, samples, progress: bool) -> tuple[list[dict], dict]:
    from .pruning.patch import pruning_disabled

    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    config = getattr(model.config, "quantization_config", None)
    if not modules and not hasattr(model, "qap_pruner"):
        raise ValueError(
            "calibrate() needs a model loaded with QAPrunerConfig; this one has no QuantLinear layer and no pruner."
        )
    limit = getattr(config, "num_calibration_samples", 32)
    samples = to_samples(samples, limit)
    if not samples:
        raise ValueError("calibrate() got no samples; pass at least one {'image': ..., 'text': ...} dict.")
    start = time.perf_counter()
    token_stats = []
    recording = recording_visual_tokens(model, token_stats)
    with torch.no_grad(), observing_inputs(modules), pruning_disabled(model), recording:
        for sample in progress_bar(samples, "Calibrating", progress, unit="sample"):
            model(**model_inputs(model, processor, sample["image"], sample["text"]))
    seconds = time.perf_counter() - start
    if config is not None and not isinstance(config, dict):
        source = config.calibration if isinstance(config.calibration, str) else "user samples"
        source = IN_MEMORY if not is_serializable(config.calibration) else source
        # GPTQ's record (made before activation calibration, on the same samples) stays with the weights it describes
        gptq = {"gptq": config.calibration_summary["gptq"]} if "gptq" in (config.calibration_summary or {}) else {}
        config.calibration_summary = {"samples": len(samples), "source": source, "seconds": round(seconds, 2), **gptq}
        config.token_statistics = visual_token_statistics(token_stats, config, model)
    return samples, outlier_report(model) if modules else {}


@contextlib.contextmanager
def recording_visual_tokens(model: nn.Module, store: list) -> Iterator[None]:
    """Collect the projector outputs (the visual tokens the language model sees) of every forward."""
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    if projector is None:
        yield
        return
    handle = projector.register_forward_hook(lambda _m, _i, output: store.append(output.detach().flatten(0, -2)))
    try:
        yield
    finally:
        handle.remove()


def visual_token_statistics(
    token_batches: list[torch.Tensor], config, model: nn.Module | None = None
) -> dict[str, float] | None:
    """Median and max of the visual tokens' channel range and group-quantization error, in the space S^Q uses on
    ``model`` (without a model: the tokens as given)."""
    from .pruning.scoring import channel_range, group_quant_error
    from .pruning.space import sensitivity_tokens

    if not token_batches:
        return None
    tokens = torch.cat(token_batches)
    tokens = (tokens if model is None else sensitivity_tokens(model.model, config, tokens)).float()
    value_range = channel_range(tokens)
    error = group_quant_error(tokens, config.sensitivity_group_size, config.scoring_bits)
    return {
        "tokens": tokens.shape[0],
        "range_median": float(value_range.median()),
        "range_max": float(value_range.max()),
        "error_median": float(error.median()),
        "error_max": float(error.max()),
    }


def config_samples(model: nn.Module) -> tuple[object, list[dict]]:
    """The model's processor and the calibration samples its config names."""
    from transformers import AutoProcessor

    config = model.config.quantization_config
    if config.processor is not None:
        return config.processor, named_samples(config)
    try:
        processor = AutoProcessor.from_pretrained(model.config.name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"QAPrunerConfig.calibration needs the processor of {model.config.name_or_path!r} to build inputs, "
            f"but it could not be loaded ({error}); pass it as QAPrunerConfig(..., processor=processor), or load the "
            "model without `calibration` and call `optimum_qap.calibrate(model, processor, samples)`."
        ) from error
    return processor, named_samples(config)


def named_samples(config) -> list[dict]:
    """The calibration samples a QAPrunerConfig names: the built-in ones, or its own list."""
    if config.calibration == "builtin":
        return builtin_calibration_samples(config.num_calibration_samples)
    return to_samples(config.calibration or [], config.num_calibration_samples)


def outlier_report(model: nn.Module, outlier_ratio: float | None = None) -> dict[str, LayerOutliers]:
    """Per quantized layer: calibrated per-channel absolute maxima and the channels that are outliers.

    A channel is an outlier when its absmax exceeds ``outlier_ratio`` (default: the config's) times the layer's
    median channel absmax. Raises `ValueError` when the model has not been calibrated.
    """
    if outlier_ratio is None:
        config = getattr(model.config, "quantization_config", None)
        outlier_ratio = getattr(config, "outlier_ratio", 20.0)
    report = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or torch.isnan(module.input_min).any():
            continue
        absmax = torch.maximum(module.input_min.abs(), module.input_max.abs()).float().cpu()
        median = float(absmax.median())
        channels = torch.nonzero(absmax > outlier_ratio * median).flatten().tolist()
        report[name] = LayerOutliers(absmax=absmax, median=median, outlier_channels=channels)
    if not report:
        raise ValueError("outlier_report() found no calibrated layer; run optimum_qap.calibrate(...) first.")
    return report
