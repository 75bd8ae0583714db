"""How the kept tokens of an any-resolution image split over the base tile, the high-res tiles and the newlines.

Tiny random LLaVA-NeXT (SigLIP + instruction relevance, CLIP + [CLS] attention) and LLaVA-OneVision models from
tests/tiny_anyres.py, on noise images of random sizes; the table of docs/pruning.md ("Any-resolution models").
Run: python examples/anyres_parts.py --images 24 --output docs/anyres-parts.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_anyres  # noqa: E402

from optimum_qap import QAPrunerConfig, last_selection  # noqa: E402

VARIANTS = {"LLaVA-NeXT, SigLIP, cdpruner": ("next", "cdpruner"),
            "LLaVA-NeXT, CLIP, cls_attention": ("next-clip", "cls_attention"),
            "LLaVA-OneVision, SigLIP, cdpruner": ("onevision", "cdpruner")}
PROMPT = "USER: <image>\nwhat is in the image ? ASSISTANT:"


def measure(repo: str, semantic: str, keep_ratio: float, sizes) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(
        repo, quantization_config=QAPrunerConfig(keep_ratio=keep_ratio, semantic=semantic)
    )
    processor = tiny_anyres.processor_for(model, repo)
    totals = {part: [0, 0] for part in ("base", "high_res", "newline")}  # [tokens, kept]
    for index, size in enumerate(sizes):
        with torch.no_grad():
            model(**processor(images=tiny_anyres.images([size], seed=index), text=[PROMPT], return_tensors="pt"))
        (selection,) = last_selection(model)
        content = len(selection.content)
        counts = {"base": selection.base_tokens, "high_res": content - selection.base_tokens,
                  "newline": selection.num_tokens - content}
        for part, kept in selection.kept_by_part().items():
            totals[part][0] += counts[part]
            totals[part][1] += kept
    tokens, kept = sum(t for t, _ in totals.values()), sum(k for _, k in totals.values())
    return {part: {"share_of_tokens": round(t / tokens, 3), "share_of_kept": round(k / kept, 3),
                   "kept_fraction": round(k / t, 3)} for part, (t, k) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--ratios", default="0.25,0.125")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rng = random.Random(0)
    sizes = [(rng.randint(20, 80), rng.randint(20, 80)) for _ in range(args.images)]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (kind, semantic) in VARIANTS.items():
            repo = tiny_anyres.save(Path(folder) / kind, kind)
            for ratio in map(float, args.ratios.split(",")):
                results[f"{name}, keep {ratio}"] = measure(repo, semantic, ratio, sizes)
    print("| model, score, keep_ratio | part | share of tokens | share of kept | kept fraction |")
    print("|---|---|---|---|---|")
    for name, parts in results.items():
        for part, row in parts.items():
            print(f"| {name} | {part} | {row['share_of_tokens']} | {row['share_of_kept']} | {row['kept_fraction']} |")
    if args.output:
        args.output.write_text(json.dumps({"images": args.images, "sizes": sizes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
