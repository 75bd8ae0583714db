"""Calibrated fusion: let the model being compressed choose alpha (or the number of outlier slots).

For each candidate value, the pruned model runs on the calibration samples and is compared with a reference
(`QAPrunerConfig.auto_criterion`): by default the KL divergence of its next-token distribution at the answer
position (the prompt's last position, where generation starts) from that of the unpruned model (the same
compressed model with pruning off, or ``reference_model``, e.g. the uncompressed one); or the cross-entropy of each
sample's ``"answer"``. The answer position alone, not every text position after the image, because the question
tokens are predicted mostly from text: on the planted-outlier demo model their KL ranked the selections the
opposite way to the answer's (docs/results.md). Semantic-only pruning
(alpha 1.0, or no outlier slot) is the baseline; another value is chosen only when its per-sample improvement over
the baseline exceeds 1.96 standard errors, so a small or noisy calibration set cannot pick a worse setting by chance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import model_inputs
from ..calibration_data import to_samples
from ..progress import progress_bar
from .patch import TokenPruner, pruning_disabled, visual_tokens_per_image

CRITERIA = {"kl": "KL to unpruned at the answer position", "answer": "answer cross-entropy"}


@dataclass
class PreparedSample:
    inputs: dict[str, torch.Tensor]
    tail: int  # positions compared (the last `tail` positions of the sequence)
    answer_ids: torch.Tensor | None  # [tail] tokens scored by cross-entropy, or None for KL


def prepare_samples(model: nn.Module, processor, samples: Iterable[dict], criterion: str) -> list[PreparedSample]:
    """Model inputs of each sample. For ``"kl"`` the prompt's last position is compared; for ``"answer"`` the
    sample's ``"answer"`` is appended to the prompt and scored token by token."""
    prepared = []
    for index, sample in enumerate(samples):
        inputs = model_inputs(model, processor, sample["image"], sample["text"])
        if criterion == "kl":
            prepared.append(PreparedSample(inputs, 1, None))
            continue
        if not sample.get("answer"):
            raise ValueError(
                f'QAPrunerConfig.auto_criterion="answer" scores each sample\'s "answer", and sample {index} has none: '
                'add answers, or use auto_criterion="kl" (needs none).'
            )
        ids = inputs["input_ids"]
        answer = processor.tokenizer(" " + sample["answer"], add_special_tokens=False, return_tensors="pt")
        answer_ids = answer["input_ids"].to(ids.device)
        inputs["input_ids"] = torch.cat((ids, answer_ids), dim=1)
        if "attention_mask" in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        prepared.append(PreparedSample(inputs, answer_ids.shape[1], answer_ids[0]))
    return prepared


def _tail_log_probs(model: nn.Module, sample: PreparedSample) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**sample.inputs).logits[0]
    # an answer token is predicted by the position before it; KL compares the prompt's last position
    end = logits.shape[0] - 1 if sample.answer_ids is not None else logits.shape[0]
    return torch.log_softmax(logits[end - sample.tail : end].float(), dim=-1)


def divergence(log_probs: torch.Tensor, sample: PreparedSample, reference: torch.Tensor | None) -> float:
    """Answer cross-entropy, or KL(reference || pruned) averaged over the compared positions."""
    if sample.answer_ids is not None:
        return float(-log_probs.gather(-1, sample.answer_ids.unsqueeze(-1)).mean())
    return float((reference.exp() * (reference - log_probs)).sum(-1).mean())


# a candidate replaces the semantic-only baseline only when its paired improvement exceeds this many standard errors
SIGNIFICANCE_Z = 1.96


class SlotEquivalence:
    """Which outlier-slot values give the same selection on a sample: m slots reserve min(m, outliers) tokens, so on
    an image with q outlier tokens every m >= q keeps what m = q keeps (with none, every m is semantic top-K)."""

    def __init__(self, pruner: TokenPruner):
        self.pruner = pruner
        self.outliers: dict[int, tuple[int, ...]] = {}  # per sample, per image; known once the sample has run

    def key(self, value: int, index: int) -> tuple[int, ...] | None:
        """The slots each image of sample ``index`` really reserves at ``value`` (None until it has run once)."""
        counts = self.outliers.get(index)
        return None if counts is None else tuple(min(value, count) for count in counts)

    def observe(self, index: int) -> None:
        """Record the outlier tokens of sample ``index`` from the run that just ended in this thread."""
        ratio = self.pruner.config.outlier_ratio
        self.outliers[index] = tuple(int((s.outlier_strength > ratio).sum()) for s in self.pruner.last)


def _sweep(
    model, prepared, references, values, apply, progress: bool, label: str, equivalence: SlotEquivalence | None
) -> dict[str, list[float]]:
    """Per-sample divergence of every candidate value; a (value, sample) pair that ``equivalence`` says selects what
    an earlier one did reuses that divergence instead of running the model again."""
    scores, done = {}, {}
    bar = progress_bar(total=len(values) * len(prepared), desc=f"Choosing {label.replace('_', ' ')}",
                       enabled=progress, unit="run")
    with bar:
        for value in values:
            apply(value)
            row = []
            for index, (sample, reference) in enumerate(zip(prepared, references, strict=True)):
                key = None if equivalence is None else equivalence.key(value, index)
                if key is not None and (index, key) in done:
                    score = done[(index, key)]
                else:
                    score = divergence(_tail_log_probs(model, sample), sample, reference)
                    if equivalence is not None:
                        equivalence.observe(index)
                        done[(index, equivalence.key(value, index))] = score
                row.append(score)
                bar.update()
            scores[str(value)] = row
    return scores


def _paired_improvement(candidate: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-sample reduction of divergence against the baseline."""
    gains = torch.tensor(baseline, dtype=torch.float64) - torch.tensor(candidate, dtype=torch.float64)
    spread = float(gains.std()) if len(gains) > 1 else 0.0
    return float(gains.mean()), spread / len(gains) ** 0.5


def choose(scores: dict[str, list[float]], baseline: str) -> str:
    """The baseline (semantic-only pruning), unless a candidate beats it beyond noise on the calibration samples.

    Among candidates whose paired improvement exceeds `SIGNIFICANCE_Z` standard errors, the largest improvement
    wins. So with few or noisy samples `auto` stays the semantic pruner instead of following chance.
    """
    best, best_gain = baseline, 0.0
    for key, values in scores.items():
        gain, error = _paired_improvement(values, scores[baseline])
        if gain > SIGNIFICANCE_Z * error and gain > best_gain:
            best, best_gain = key, gain
    return best


def select_fusion(
    model: nn.Module,
    processor,
    samples,
    reference_model: nn.Module | None = None,
    progress: bool = True,
) -> dict:
    """Choose alpha (``fusion="weighted"``) or the outlier slot count (``fusion="outlier_slots"``) on ``samples``.

    Uses at most ``config.auto_max_samples`` samples. Stores the choice and the whole curve in
    ``config.auto_selection`` (saved with the model and shown in its card) and sets the config's value to
    ``"auto"``. Returns that record.

    Example:
        >>> record = optimum_qap.select_fusion(model, processor, optimum_qap.builtin_calibration_samples(8))
        >>> record["alpha"], record["alpha_curve"]
    """
    pruner: TokenPruner | None = getattr(model, "qap_pruner", None)
    if pruner is None:
        raise ValueError("select_fusion() needs a model that prunes: load it with QAPrunerConfig(keep_ratio<1).")
    config = pruner.config
    samples = to_samples(samples, config.auto_max_samples)[: config.auto_max_samples]  # any calibration form
    prepared = prepare_samples(model, processor, samples, config.auto_criterion)
    if not prepared:
        raise ValueError("select_fusion() got no samples; pass at least one {'image': ..., 'text': ...} dict.")
    reference = reference_model if reference_model is not None else model
    with pruning_disabled(model):
        references = [None if s.answer_ids is not None else _tail_log_probs(reference, s) for s in prepared]
    slots = config.fusion == "outlier_slots"
    if slots:
        k = pruner.budget(visual_tokens_per_image(model.config))
        name, override, curve_key, values = (
            "outlier_slots",
            "slots_override",
            "slot_curve",
            sorted({m for m in (*config.slot_grid, 0) if m <= k}),
        )
    else:
        name, override, curve_key, values = (
            "alpha",
            "alpha_override",
            "alpha_curve",
            sorted({*map(float, config.alpha_grid), 0.0, 1.0}),
        )
    start = time.perf_counter()
    try:
        apply = lambda v: setattr(pruner, override, v)  # noqa: E731
        equivalence = SlotEquivalence(pruner) if slots else None
        scores = _sweep(model, prepared, references, values, apply, progress, name, equivalence)
    finally:
        setattr(pruner, override, None)
    chosen = choose(scores, baseline=str(0 if slots else 1.0))  # alpha 1.0, or no reserved slots
    curve = {key: sum(values) / len(values) for key, values in scores.items()}
    record = {name: int(chosen) if slots else float(chosen), curve_key: curve}
    seconds = time.perf_counter() - start
    record |= {
        "criterion": CRITERIA[config.auto_criterion],
        "samples": len(prepared),
        "seconds_per_point_per_sample": round(seconds / (len(values) * len(prepared)), 4),
    }
    # the choice first, then "auto": a call in another thread never sees "auto" without a chosen value
    config.auto_selection = record
    setattr(config, name, "auto")
    return record
