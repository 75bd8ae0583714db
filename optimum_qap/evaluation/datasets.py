"""Evaluation sets as (image, user text, reference answer) items, with the answer matching of the reference code.

- ``demo``: the shapes-VQA test split (`optimum_qap.demo.make_dataset`); correct when the first generated word is
  the answer.
- ``scienceqa``: `lmms-lab/ScienceQA`, config ``ScienceQA-IMG``, split ``test``; LLaVA's prompt (optional
  ``Context: {hint}``, the question, lettered choices, "Answer with the option's letter ..."); correct when the
  first character of the prediction is the answer's letter.
- ``pope``: `lmms-lab/POPE`, split ``test``; correct when the prediction, normalised to yes/no as LLaVA's
  ``eval_pope.py`` does, is the answer.

Hub sets load with `datasets.load_dataset` (``pip install 'optimum-qap[eval]'``); ``data_file`` reads a local
parquet or JSON-lines file in the same schema instead (images as the `datasets` Image feature, or paths relative
to the file).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

DATASETS = ("demo", "scienceqa", "pope")
HUB_DATASETS = {"scienceqa": ("lmms-lab/ScienceQA", "ScienceQA-IMG"), "pope": ("lmms-lab/POPE", None)}
REQUIRED_COLUMNS = {"scienceqa": ("image", "question", "choices", "answer"), "pope": ("image", "question", "answer")}
SCIENCEQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
POPE_INSTRUCTION = "Answer the question using a single word or phrase."
DEMO_DEFAULT_LIMIT = 200


@dataclass
class EvalItem:
    """One question: the image, the user text without the image placeholder, and the reference answer."""

    image: Image.Image
    text: str
    answer: str  # a letter (ScienceQA), "yes"/"no" (POPE), a word (demo)
    category: str = ""


@dataclass
class EvalDataset:
    name: str
    items: list[EvalItem]
    is_correct: Callable[[str, str], bool]  # (prediction, reference answer) -> hit
    max_new_tokens: int


def scienceqa_prompt(question: str, choices: Iterable[str], hint: str | None = None) -> str:
    """LLaVA's ScienceQA prompt: ``Context: {hint}`` (when there is one), question, ``A. ...`` lines, instruction."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{chr(ord('A') + index)}. {choice}" for index, choice in enumerate(choices))
    return f"{context}{question}\n{options}\n{SCIENCEQA_INSTRUCTION}"


def scienceqa_correct(prediction: str, letter: str) -> bool:
    """The first character of the (stripped) prediction is the answer's letter."""
    return prediction.strip()[:1] == letter


def pope_prompt(question: str) -> str:
    return f"{question}\n{POPE_INSTRUCTION}"


def pope_normalize(prediction: str) -> str:
    """LLaVA's eval_pope: in the first sentence, without commas, any word "No", "no" or "not" means no."""
    words = prediction.split(".")[0].replace(",", "").split()
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_correct(prediction: str, answer: str) -> bool:
    return pope_normalize(prediction) == answer.strip().lower()


def demo_correct(prediction: str, answer: str) -> bool:
    """The first generated word is the answer (as `optimum_qap.demo.evaluate`)."""
    from ..demo.evaluate import first_word

    return bool(answer) and first_word(prediction) == answer


def load_eval_dataset(name: str, limit: int | None = None, data_file: str | None = None) -> EvalDataset:
    """The first ``limit`` questions (all by default; 200 for ``demo``) of ``name``, from the Hub or ``data_file``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    if name == "demo":
        if data_file is not None:
            raise ValueError("--data-file is for scienceqa and pope; the demo questions are generated")
        from ..demo import make_dataset

        examples = make_dataset(limit or DEMO_DEFAULT_LIMIT, "test")
        items = [EvalItem(e.image, e.question, e.answer, e.qtype) for e in examples]
        return EvalDataset(name, items, demo_correct, max_new_tokens=3)
    rows, base = _rows(name, data_file)
    items = []
    for row in rows:
        if row.get("image") is None:  # ScienceQA-IMG rows all have one; skip text-only rows of other dumps
            continue
        items.append(_scienceqa_item(row, base) if name == "scienceqa" else _pope_item(row, base))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{data_file or HUB_DATASETS[name][0]} holds no question with an image")
    correct = scienceqa_correct if name == "scienceqa" else pope_correct
    return EvalDataset(name, items, correct, max_new_tokens=8)


def _scienceqa_item(row: dict[str, Any], base: Path) -> EvalItem:
    letter = chr(ord("A") + int(row["answer"]))
    text = scienceqa_prompt(row["question"], row["choices"], row.get("hint"))
    return EvalItem(_image(row["image"], base), text, letter, str(row.get("subject") or ""))


def _pope_item(row: dict[str, Any], base: Path) -> EvalItem:
    answer = str(row["answer"]).strip().lower()
    return EvalItem(_image(row["image"], base), pope_prompt(row["question"]), answer, str(row.get("category") or ""))


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"--dataset {name} needs the `datasets` package: pip install 'optimum-qap[eval]'") from error
    return datasets


def _rows(name: str, data_file: str | None) -> tuple[Iterable[dict[str, Any]], Path]:
    if data_file is None:
        repo, config = HUB_DATASETS[name]
        return _import_datasets(name).load_dataset(repo, config, split="test"), Path.cwd()
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json"):
        raise ValueError(f"data file {path} must be .parquet, .jsonl or .json")
    dataset_class = _import_datasets(name).Dataset
    read = dataset_class.from_parquet if suffix == ".parquet" else dataset_class.from_json
    table = read(str(path), keep_in_memory=True)
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.column_names]
    if missing:
        raise ValueError(f"data file {path} lacks column(s) {missing} of the {name} schema")
    return table, path.parent


def _image(value: Any, base: Path) -> Image.Image:
    """A PIL image from a decoded `datasets` Image, an encoded ``{"bytes", "path"}`` dict or a path."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if isinstance(value, str):
        value = base / value
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    with Image.open(value) as image:
        return image.convert("RGB")
