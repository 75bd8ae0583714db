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


@torch.no_grad()
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
    Batches are left-padded.
    """
    if images is not None and len(images) != len(examples):
        raise ValueError("images must match examples in length")
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    preds: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            imgs = [e.image for e in batch] if images is None else list(images[i : i + batch_size])
            inputs = processor(images=imgs, text=[e.prompt for e in batch], return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            preds += [first_word(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return preds


def answer_accuracy(
    model,
    processor,
    examples: Sequence[Example],
    batch_size: int = 32,
    images: Sequence[Image.Image] | None = None,
) -> float:
    """Exact-match accuracy of the first generated word against ``example.answer``."""
    preds = predict_answers(model, processor, examples, batch_size, images)
    return sum(p == e.answer for p, e in zip(preds, examples, strict=True)) / max(1, len(examples))


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
