"""Reloading a qap checkpoint with a `QAPrunerConfig`: the pruning fields the caller sets apply, the rest must match.

transformers keeps the checkpoint's quantization config and ignores a passed one, except for the "loading attributes"
of a few built-in methods (`AutoHfQuantizer.merge_quantization_configs`). For qap, the pruning settings are such
loading attributes: they change which visual tokens reach the language model, not the saved tensors. The quantization
settings (bits, groups, rotation, weight method, ...) describe the saved weights: a passed value that differs from
the checkpoint's is refused, naming the field and both values. Only fields the caller passed count, so
`QAPrunerConfig(keep_ratio=0.5)` changes the budget of any checkpoint, whatever its quantization.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable

PRUNING_FIELDS = (
    "keep_ratio", "keep_tokens", "alpha", "alpha_grid", "fusion", "outlier_slots", "slot_grid", "auto_max_samples",
    "auto_criterion", "semantic", "clip_text_model", "selection", "error_weight", "range_weight",
    "sensitivity_group_size", "sensitivity_bits", "sensitivity_space", "outlier_ratio",
)
# fields that apply at reload: the pruning settings and the kernel choice, none of which shapes the saved tensors
LOADING_FIELDS = (*PRUNING_FIELDS, "kernels")
CALIBRATION_FIELDS = ("calibration", "num_calibration_samples")
_MERGE_MARK = "_qap_merge"


def records_explicit_fields(init: Callable) -> Callable:
    """Wrap a config's ``__init__`` so that the config knows which fields its caller passed."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        self._explicit_fields = frozenset(signature.bind(self, *args, **kwargs).arguments) - {"self"}
        init(self, *args, **kwargs)

    return wrapper


def _conflict(name: str, saved, passed) -> str:
    return f"{name}: checkpoint {getattr(saved, name)!r}, passed {getattr(passed, name)!r}"


def merge_with_checkpoint(saved, passed):
    """A copy of the checkpoint's config ``saved`` with the pruning fields set on ``passed``.

    Raises `ValueError` when ``passed`` sets a quantization (or calibration) field to another value than the
    checkpoint's.
    """
    differing = sorted(name for name in passed.explicit_fields - set(LOADING_FIELDS)
                       if getattr(saved, name) != getattr(passed, name))
    calibration = [name for name in differing if name in CALIBRATION_FIELDS]
    quantization = [name for name in differing if name not in CALIBRATION_FIELDS]
    if quantization:
        raise ValueError(
            "the QAPrunerConfig passed to from_pretrained conflicts with the quantization this checkpoint was saved "
            f"with ({'; '.join(_conflict(name, saved, passed) for name in quantization)}). Those fields describe "
            "the saved weights: leave them out (at reload only the pruning fields and kernels apply: "
            f"{', '.join(LOADING_FIELDS)}), or quantize the original model again."
        )
    if calibration:
        raise ValueError(
            f"the QAPrunerConfig passed to from_pretrained sets {' and '.join(calibration)} "
            f"({'; '.join(_conflict(name, saved, passed) for name in calibration)}), but calibration runs when a model "
            "is quantized, not when a checkpoint reloads: call optimum_qap.calibrate(model, processor, samples) "
            "(and optimum_qap.select_fusion) after loading instead."
        )
    merged = copy.deepcopy(saved)
    for name, value in passed.get_loading_attributes().items():
        setattr(merged, name, value)
    if "keep_ratio" in passed.explicit_fields and "keep_tokens" not in passed.explicit_fields:
        merged.keep_tokens = None  # the checkpoint's keep_tokens would override the ratio the caller asked for
    merged.post_init()
    merged._explicit_fields = frozenset()
    return merged


def install_merge() -> None:
    """Route transformers' config merge through `merge_with_checkpoint` when a QAPrunerConfig is passed (once)."""
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    from .config import QAPrunerConfig

    original = AutoHfQuantizer.merge_quantization_configs.__func__
    if getattr(original, _MERGE_MARK, False):
        return

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, QAPrunerConfig):
            saved = quantization_config
            if isinstance(saved, dict):
                saved = AutoQuantizationConfig.from_dict(saved)
            if isinstance(saved, QAPrunerConfig):
                return merge_with_checkpoint(saved, quantization_config_from_args)
        return original(cls, quantization_config, quantization_config_from_args)

    setattr(merge_quantization_configs, _MERGE_MARK, True)
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)
