"""Answer accuracy of a LLaVA model on the shapes-VQA demo task (greedy generation).

python -m optimum_qap.demo.evaluate --model optimum_qap/demo/model --n 500 --threads 1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from PIL import Image

from .data import QUESTION_TYPES, Example, make_dataset, noise_image


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0] if words else ""


def predict_answers(
    model,
    processor,
    examples: Sequence[Example],
    batch_size: int = 32,
    images: Sequence[Image.Image] | None = None,
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy-generate an answer for each example; returns the first generated word of each.

    ``images`` replaces the examples' images (e.g. noise images for the image-dependence control).
    """
    from ..evaluation.datasets import EvalItem
    from ..evaluation.runner import generate_answers

    if images is not None and len(images) != len(examples):
        raise ValueError("images must match examples in length")
    images = [e.image for e in examples] if images is None else images
    items = [EvalItem(image, e.question, e.answer, e.qtype) for image, e in zip(images, examples, strict=True)]
    answers = generate_answers(model, processor, items, batch_size, max_new_tokens, progress=False)
    return [first_word(answer) for answer in answers]


def answer_accuracy(
    model,
    processor,
    examples: Sequence[Example],
    batch_size: int = 32,
    images: Sequence[Image.Image] | None = None,
) -> float:
    """Exact-match accuracy of the first generated word against ``example.answer``."""
    return accuracy_report(model, processor, examples, batch_size, images)["overall"]


def accuracy_report(
    model,
    processor,
    examples: Sequence[Example],
    batch_size: int = 32,
    images: Sequence[Image.Image] | None = None,
) -> dict:
    """{"overall": acc, "n": n, "per_type": {qtype: acc}, "per_type_n": {qtype: n}}."""
    preds = predict_answers(model, processor, examples, batch_size, images)
    hits = [p == e.answer for p, e in zip(preds, examples, strict=True)]
    per, per_n = {}, {}
    for qt in QUESTION_TYPES:
        h = [x for x, e in zip(hits, examples, strict=True) if e.qtype == qt]
        per_n[qt] = len(h)
        per[qt] = sum(h) / len(h) if h else float("nan")
    return {"overall": sum(hits) / max(1, len(hits)), "n": len(hits), "per_type": per, "per_type_n": per_n}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="optimum_qap/demo/model")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-noise", action="store_true", help="skip the noise-image control")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    examples = make_dataset(args.n, args.split)
    res = {"real": accuracy_report(model, processor, examples, args.batch_size)}
    if not args.no_noise:
        noise = [noise_image(e.seed) for e in examples]
        res["noise"] = accuracy_report(model, processor, examples, args.batch_size, images=noise)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
