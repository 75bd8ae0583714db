"""Accuracy of dense, quantized and pruned settings on one evaluation set, in the shape of the paper's Table 1.

Rows: the full-precision model without pruning, the quantized model without pruning, then per keep ratio the
quantized model with random selection (seeded), the semantic-only pruner (alpha = 1) and QAPruner (each alpha).
The full-precision model and the quantized model are each loaded once; `attach_pruner` switches the pruning
settings in between.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import format_prompt, named_samples, to_model
from ..config import QAPrunerConfig
from ..progress import progress_bar
from ..pruning.auto import select_fusion
from ..pruning.patch import ImageSelection, TokenPruner, attach_pruner, visual_tokens_per_image
from ..pruning.selection import resolve_budget, topk_indices
from .datasets import EvalDataset, EvalItem

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / total`` (``(0, 1)`` when ``total`` is 0)."""
    if total <= 0:
        return 0.0, 1.0
    p, z2 = correct / total, z * z
    denominator = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denominator
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))  # clamp rounding at p = 0 or 1


def paired_difference(hits: Sequence[bool], reference: Sequence[bool], z: float = Z_95) -> tuple[float, float, float]:
    """Accuracy of ``hits`` minus ``reference`` on the same questions: (difference, low, high), a normal interval
    on the per-question differences (mean +- z standard errors)."""
    if len(hits) != len(reference) or not hits:
        raise ValueError(f"paired_difference needs two equal, non-empty lists; got {len(hits)} and {len(reference)}")
    differences = torch.tensor([float(a) - float(b) for a, b in zip(hits, reference, strict=True)], dtype=torch.float64)
    mean = float(differences.mean())
    error = float(differences.std()) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
    return mean, mean - z * error, mean + z * error


class RandomTokenPruner(TokenPruner):
    """The random-selection baseline: keeps K tokens per image drawn uniformly at random from a seeded generator.

    Scores are computed as usual (so `last_selection` still reports S^P and S^Q); ``fused`` holds the random
    permutation that chose the kept tokens.
    """

    def __init__(self, model: nn.Module, config: QAPrunerConfig, seed: int = 0):
        super().__init__(model, config)
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, features: torch.Tensor, vision_states, instructions) -> list[ImageSelection]:
        selections = super().select(features, vision_states, instructions)
        for selection in selections:
            n = len(selection.fused)
            order = torch.randperm(n, generator=self.generator).float() / max(n - 1, 1)
            selection.fused = order.to(selection.fused.device)
            selection.kept = topk_indices(selection.fused, len(selection.kept))
        return selections


def attach_random_pruner(model: nn.Module, config: QAPrunerConfig, seed: int = 0) -> RandomTokenPruner:
    """Make ``model`` keep ``config``'s budget of visual tokens chosen at random; the same seed gives the same picks."""
    attach_pruner(model, config)  # installs the forward/generate wrappers, which read `model.qap_pruner`
    model.qap_pruner = pruner = RandomTokenPruner(model, config, seed)
    return pruner


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor,
    items: Sequence[EvalItem],
    batch_size: int = 8,
    max_new_tokens: int = 8,
    desc: str = "",
    progress: bool = True,
) -> list[str]:
    """Greedy answers (decoded, stripped) to ``items``, in left-padded batches, with a progress bar over questions."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        with progress_bar(total=len(items), desc=desc, enabled=progress, unit="q") as bar:
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                texts = [format_prompt(processor, item.text) for item in batch]
                inputs = to_model(
                    model, processor(images=[i.image for i in batch], text=texts, return_tensors="pt", padding=True)
                )
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
                new_tokens = out[:, inputs["input_ids"].shape[1] :]
                answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
                bar.update(len(batch))
    finally:
        tokenizer.padding_side = side
    return answers


@dataclass
class Result:
    """Accuracy of one setting (a row of the table)."""

    name: str
    selection: str  # "none", "random", "semantic" or "qapruner"
    quantized: bool
    visual_tokens: int
    keep_ratio: float | None = None
    alpha: float | None = None
    hits: list[bool] = field(default_factory=list, repr=False)
    predictions: list[str] = field(default_factory=list, repr=False)
    per_category: dict[str, list[int]] = field(default_factory=dict)  # category -> [correct, total]

    @property
    def correct(self) -> int:
        return sum(self.hits)

    @property
    def total(self) -> int:
        return len(self.hits)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "selection": self.selection,
            "quantized": self.quantized,
            "visual_tokens": self.visual_tokens,
            "keep_ratio": self.keep_ratio,
            "alpha": self.alpha,
            "correct": self.correct,
            "n": self.total,
            "accuracy": self.accuracy,
            "ci95": list(self.ci95),
            "per_category": self.per_category,
            "predictions": self.predictions,
        }


def score(result: Result, dataset: EvalDataset, predictions: list[str]) -> Result:
    result.predictions = predictions
    result.hits = [dataset.is_correct(p, i.answer) for p, i in zip(predictions, dataset.items, strict=True)]
    for item, hit in zip(dataset.items, result.hits, strict=True):
        if item.category:
            counts = result.per_category.setdefault(item.category, [0, 0])
            counts[0] += hit
            counts[1] += 1
    return result


def with_settings(config: QAPrunerConfig, **changes) -> QAPrunerConfig:
    return QAPrunerConfig.from_dict({**config.to_dict(), **changes})


def run_table(
    load_model: Callable[[QAPrunerConfig | None], nn.Module],
    processor,
    dataset: EvalDataset,
    config: QAPrunerConfig,
    keep_ratios: Sequence[float] = (0.5, 0.25, 0.125),
    alphas: Sequence[float | str] = (0.5,),
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[Result]:
    """Evaluate every row; ``load_model(None)`` loads the full-precision model, ``load_model(config)`` quantizes.

    Each model is loaded once (the full-precision one is released before the quantized one loads). An alpha of
    ``"auto"`` is chosen per keep ratio by `select_fusion` on the calibration samples ``config`` names.
    """
    results: list[Result] = []

    def run(model: nn.Module, result: Result) -> None:
        answers = generate_answers(
            model, processor, dataset.items, batch_size, dataset.max_new_tokens, result.name, progress
        )
        results.append(score(result, dataset, answers))

    model = load_model(None)
    n = visual_tokens_per_image(model.config)
    run(model, Result("FP dense", "none", False, n))
    del model
    gc.collect()

    label = f"W{config.w_bits}A{config.a_bits}"
    # loaded without pruning (keep_ratio=1 attaches no pruner); the pruned rows attach one below
    model = load_model(with_settings(config, keep_ratio=1.0, keep_tokens=None))
    run(model, Result(f"{label} dense", "none", True, n))
    samples = named_samples(config) if "auto" in alphas else None  # what select_fusion chooses alpha on
    for ratio in keep_ratios:
        k = resolve_budget(n, ratio, None)
        pruned = with_settings(config, keep_ratio=ratio, keep_tokens=None, alpha=1.0)  # each row sets its alpha
        attach_random_pruner(model, pruned, seed)
        run(model, Result(f"{label} + random", "random", True, k, ratio))
        attach_pruner(model, with_settings(pruned, alpha=1.0))
        run(model, Result(f"{label} + semantic (alpha=1)", "semantic", True, k, ratio, 1.0))
        for alpha in alphas:
            attach_pruner(model, with_settings(pruned, alpha=alpha))
            auto = alpha == "auto"
            if auto:
                alpha = select_fusion(model, processor, samples, progress=progress)["alpha"]
            name = f"{label} + QAPruner (alpha={'auto -> ' if auto else ''}{alpha:g})"
            run(model, Result(name, "qapruner", True, k, ratio, alpha))
    return results


def format_table(results: Sequence[Result]) -> str:
    """A markdown table: method, visual tokens kept, accuracy %, questions, 95 % Wilson interval."""
    lines = ["| method | visual tokens | accuracy (%) | n | 95% CI (%) |", "|---|---|---|---|---|"]
    for r in results:
        tokens = f"{r.visual_tokens}" if r.keep_ratio is None else f"{r.visual_tokens} ({r.keep_ratio:.1%})"
        low, high = r.ci95
        lines.append(f"| {r.name} | {tokens} | {100 * r.accuracy:.2f} | {r.total} | {100 * low:.1f}-{100 * high:.1f} |")
    return "\n".join(lines)
