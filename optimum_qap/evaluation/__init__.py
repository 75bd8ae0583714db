"""Accuracy evaluation of compressed models: datasets, answer matching, the random baseline and Table 1 runs."""

from .datasets import (
    DATASETS,
    EvalDataset,
    EvalItem,
    load_eval_dataset,
    pope_correct,
    pope_normalize,
    pope_prompt,
    scienceqa_correct,
    scienceqa_prompt,
)
from .runner import (
    RandomTokenPruner,
    Result,
    attach_random_pruner,
    format_table,
    generate_answers,
    paired_difference,
    run_table,
    wilson_interval,
)

__all__ = [
    "DATASETS",
    "EvalDataset",
    "EvalItem",
    "RandomTokenPruner",
    "Result",
    "attach_random_pruner",
    "format_table",
    "generate_answers",
    "load_eval_dataset",
    "paired_difference",
    "pope_correct",
    "pope_normalize",
    "pope_prompt",
    "run_table",
    "scienceqa_correct",
    "scienceqa_prompt",
    "wilson_interval",
]
