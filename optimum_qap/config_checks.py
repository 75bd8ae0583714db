"""Field checks of `QAPrunerConfig`: each raises `ValueError` naming the field, the value and what is allowed."""

from __future__ import annotations

import json
import math
from typing import Any

from .calibration_data import calibration_problem, is_dataset


def invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"QAPrunerConfig.{field}={value!r} is invalid: {allowed}.")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return False


def check_choice(field: str, value: Any, choices: tuple) -> None:
    # `value in choices` alone would accept True for 1 and 4.0 for 4
    if type(value) not in {type(c) for c in choices} or value not in choices:
        raise invalid(field, value, f"expected one of {list(choices)}")


def check_positive_int(field: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_int(value) or value <= 0:
        raise invalid(field, value, "expected a positive integer" + (" or None" if optional else ""))


def check_unit_interval(field: str, value: Any, low_open: bool = False) -> None:
    if not is_real(value) or value < 0 or value > 1 or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise invalid(field, value, f"expected a number in {interval}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid(field, value, "expected true or false")


def check_str_list(field: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise invalid(field, value, "expected a list of non-empty module names or None")


def check_calibration(field: str, value: Any) -> None:
    problem = calibration_problem(value)
    if problem is not None:
        # a list of images or a dataset would print whole; then its type and length say enough
        sized = isinstance(value, (list, tuple)) or is_dataset(value)
        long = sized and len(repr(value)) > 200
        shown = _Shown(f"<{type(value).__name__} of {len(value)} items>") if long else value
        raise invalid(
            field,
            shown,
            f'{problem}. Expected None, "builtin" (samples shipped with optimum-qap), a list of {{"image": <PIL image '
            'or path>, "text": <prompt>} dicts, of PIL images or of chat conversations, or a datasets.Dataset with '
            "image and text columns",
        )


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def is_json_object(value: Any) -> bool:
    try:
        return isinstance(value, dict) and json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False
