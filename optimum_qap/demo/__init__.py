"""Shapes-VQA demo: a synthetic, image-dependent VQA task and a small trained LLaVA for it.

* :mod:`optimum_qap.demo.data` - deterministic task generator (``make_example``, ``make_dataset``).
* :mod:`optimum_qap.demo.tokenizer` - word-level tokenizer + stock ``LlavaProcessor`` builders.
* :mod:`optimum_qap.demo.train` - from-scratch training (``python -m optimum_qap.demo.train``).
* :mod:`optimum_qap.demo.evaluate` - greedy-generation answer accuracy.
* :mod:`optimum_qap.demo.finetune` - LoRA fine-tuning of a qap demo model with `Trainer` (``lora_finetune``; PEFT).
* :mod:`optimum_qap.demo.outliers` - the outlier-faithful variant: LLM-style activation outlier channels at every
  decoder linear's input, same full-precision function (``build_outlier_demo``).
* :mod:`optimum_qap.demo.planted` - the planted variant: massive visual sink tokens (``build_planted_demo``).

The trained checkpoint lives in :data:`DEMO_MODEL_PATH` (``optimum_qap/demo/model``).
"""

from pathlib import Path

from .data import (
    ANSWERS,
    QUESTION_TYPES,
    Example,
    format_prompt,
    make_dataset,
    make_example,
    noise_image,
    object_patch_mask,
)

DEMO_MODEL_PATH = Path(__file__).resolve().parent / "model"

__all__ = [
    "ANSWERS",
    "DEMO_MODEL_PATH",
    "QUESTION_TYPES",
    "Example",
    "format_prompt",
    "make_dataset",
    "make_example",
    "noise_image",
    "object_patch_mask",
]
