"""Calibration samples in the forms users hold them, turned into ``{"image": ..., "text": ..., "answer": ...}``.

`QAPrunerConfig(calibration=...)` accepts, besides ``"builtin"``:

- a list of sample dicts: an image (PIL image, file path, or the ``{"bytes": ...}`` dict of a `datasets` Image
  column) and a prompt under ``"text"`` (or ``"question"``, ``"prompt"``, ``"caption"``), optionally an ``"answer"``;
- a list of PIL images (prompted with the built-in calibration prompts);
- a list of conversations in the transformers chat format: each a list of messages whose ``"content"`` holds a
  ``{"type": "image", "image": PIL or path}`` item and ``{"type": "text", "text": ...}`` items (an assistant
  message, if any, becomes the answer);
- a `datasets.Dataset` (anything with ``column_names`` that yields row dicts) with an image column and a text column;
  its first ``num_calibration_samples`` rows are used.

Images stay in memory (no temporary files). Only what can be written to config.json is saved: a list of
``{"image": path, "text": ...}`` dicts as given; anything holding in-memory images is saved as `IN_MEMORY`, which
records where calibration came from and is never needed to reload the model.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable
from typing import Any

from PIL import Image

IN_MEMORY = "in_memory"
TEXT_KEYS = ("text", "question", "prompt", "caption")
IMAGE_KEYS = ("image", "url", "path")  # chat-format image items name their source with one of these
CALIBRATION_PROMPTS = (
    "Describe the image in detail.",
    "What objects are in this picture and where are they?",
    "What colors do you see?",
    "How many shapes are there in the image?",
)


def _is_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike)) or (isinstance(value, dict) and "bytes" in value)


def _text_key(row: dict) -> str | None:
    return next((key for key in TEXT_KEYS if isinstance(row.get(key), str)), None)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def is_dataset(value: Any) -> bool:
    """A `datasets.Dataset`-like table of rows (checked by its columns, so `datasets` need not be imported)."""
    return hasattr(value, "column_names") and hasattr(value, "__iter__")


def item_problem(item: Any) -> str | None:
    """Why ``item`` cannot be a calibration sample, or None when it can."""
    if isinstance(item, Image.Image) or _is_conversation(item):
        return None
    if not isinstance(item, dict):
        return f"got a {type(item).__name__}"
    if not _is_image(item.get("image")):
        return f"sample {sorted(item, key=str)} has no image (PIL image, path or {{'bytes': ...}})"
    if _text_key(item) is None:
        return f"sample {sorted(item, key=str)} has no prompt under one of {list(TEXT_KEYS)}"
    return None


def calibration_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid `QAPrunerConfig.calibration`, or None."""
    if value is None or value in ("builtin", IN_MEMORY):
        return None
    if is_dataset(value):
        columns = list(value.column_names)
        if "image" not in columns or not any(key in columns for key in TEXT_KEYS):
            return f"a dataset needs an 'image' column and a text column ({' or '.join(TEXT_KEYS)}); it has {columns}"
        return None
    if not isinstance(value, list) or not value:
        return "expected a non-empty list"
    return next((problem for problem in map(item_problem, value) if problem is not None), None)


def is_serializable(value: Any) -> bool:
    """True for the values config.json can hold as they are: None, markers, and lists of path samples."""
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(item, dict) and all(isinstance(v, str) for v in item.values()) for item in value
    )


def saved_form(value: Any) -> Any:
    """What config.json records for ``value``: itself when serializable, else `IN_MEMORY`."""
    return value if is_serializable(value) else IN_MEMORY


def _image(value: Any) -> Any:
    if isinstance(value, dict):  # a `datasets` Image column that was not decoded
        return Image.open(io.BytesIO(value["bytes"]))
    return value


def _from_conversation(messages: list[dict]) -> dict:
    image, texts, answers = None, [], []
    for message in messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            if item.get("type") == "image" and image is None:
                image = next((item[key] for key in IMAGE_KEYS if item.get(key) is not None), None)
            elif item.get("type") == "text":
                (answers if message.get("role") == "assistant" else texts).append(item["text"])
    if image is None:
        raise ValueError("a calibration conversation has no {'type': 'image', 'image': ...} content item")
    return {"image": image, "text": " ".join(texts), **({"answer": " ".join(answers)} if answers else {})}


def _from_item(item: Any, index: int) -> dict:
    if isinstance(item, Image.Image):
        return {"image": item, "text": CALIBRATION_PROMPTS[index % len(CALIBRATION_PROMPTS)]}
    if _is_conversation(item):
        return _from_conversation(item)
    sample = {"image": _image(item["image"]), "text": item[_text_key(item)]}
    return sample | ({"answer": item["answer"]} if isinstance(item.get("answer"), str) else {})


def to_samples(value: Any, limit: int) -> list[dict]:
    """``value`` as ``{"image", "text"[, "answer"]}`` dicts; a dataset contributes its first ``limit`` rows."""
    if value == IN_MEMORY:
        raise ValueError(
            f'QAPrunerConfig.calibration="{IN_MEMORY}" records that this model was calibrated on in-memory samples, '
            "which are not saved; pass the samples again (calibration=[...]) to quantize a model with this config."
        )
    rows: Iterable = itertools.islice(value, limit) if is_dataset(value) else value
    return [_from_item(item, index) for index, item in enumerate(rows)]
