"""The LoRA table of docs/results.md: accuracy of W4A4 + pruning to 12.5 % before and after a short LoRA run.

For each model (the shipped demo model; the outlier-faithful variant, built here in about a second) and backbone:
full precision dense and pruned, the qap model dense and pruned, then the same qap model after LoRA fine-tuning
(`optimum_qap.demo.finetune.lora_finetune`: adapters on every language-model QuantLinear, trained with the pruner
on, on the training split) dense and pruned. Same held-out questions for every row: 95 % Wilson intervals, and paired
differences (mean +- 1.96 SE of the per-question differences) against the same model without LoRA and against
full precision dense.

Run (9 minutes on one CPU thread): OMP_NUM_THREADS=1 python examples/lora_results.py --limit 500 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo import DEMO_MODEL_PATH
from optimum_qap.demo.finetune import LoraRun, lora_finetune
from optimum_qap.demo.outliers import build_outlier_demo
from optimum_qap.evaluation import load_eval_dataset, paired_difference
from optimum_qap.evaluation.runner import Result, generate_answers, score
from optimum_qap.pruning.patch import visual_tokens_per_image
from optimum_qap.pruning.selection import resolve_budget

KEEP = 0.125
BACKBONES = {
    "W4A4 rotation + RTN (default)": {"rotation": True},
    "W4A4 RTN, no rotation": {"rotation": False},
}


class Table:
    def __init__(self, processor, dataset, batch_size: int):
        self.processor, self.dataset, self.batch_size = processor, dataset, batch_size
        self.rows: list[dict] = []

    def row(self, model, name: str, tokens: int, pruned: bool, reference: dict | None = None) -> dict:
        """Evaluate ``model`` (all visual tokens unless ``pruned``); ``reference``: the row it is paired with."""
        result = Result(name, "qapruner" if pruned else "none", "W4A4" in name, tokens, KEEP if pruned else None)
        context = contextlib.nullcontext() if pruned else optimum_qap.pruning_disabled(model)
        with context:
            answers = generate_answers(model, self.processor, self.dataset.items, self.batch_size,
                                       self.dataset.max_new_tokens, name)
        score(result, self.dataset, answers)
        fp_dense = self.rows[0] if self.rows else None
        row = {**result.to_dict(), "predictions": None, "hits": "".join("01"[h] for h in result.hits),
               "vs_without_lora": _paired(result.hits, reference),
               "vs_fp_dense": _paired(result.hits, fp_dense)}
        self.rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "visual_tokens", "accuracy")}), flush=True)
        return row


def _paired(hits: list[bool], reference: dict | None) -> tuple[float, float, float] | None:
    return None if reference is None else paired_difference(hits, [h == "1" for h in reference["hits"]])


def evaluate_model(path, table: Table, backbones: list[str], run: LoraRun) -> dict:
    processor = table.processor
    fp = LlavaForConditionalGeneration.from_pretrained(path)
    n = visual_tokens_per_image(fp.config)
    k = resolve_budget(n, KEEP, None)
    table.row(fp, "FP", n, pruned=False)
    optimum_qap.attach_pruner(fp, optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, rotation=False, keep_ratio=KEEP))
    table.row(fp, "FP", k, pruned=True)
    del fp
    training = {}
    for backbone in backbones:
        config = optimum_qap.QAPrunerConfig(keep_ratio=KEEP, **BACKBONES[backbone])
        model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config)
        dense = table.row(model, backbone, n, pruned=False)
        pruned = table.row(model, backbone, k, pruned=True)
        start = time.perf_counter()
        peft_model, history = lora_finetune(model, processor, run)
        training[backbone] = {"seconds": round(time.perf_counter() - start, 1), "log": history}
        table.row(peft_model, f"{backbone} + LoRA", n, pruned=False, reference=dense)
        table.row(peft_model, f"{backbone} + LoRA", k, pruned=True, reference=pruned)
        del model, peft_model
    return training


def markdown(rows: list[dict]) -> str:
    lines = ["| model | visual tokens | accuracy % (95% CI) | vs same model without LoRA (paired 95% CI) "
             "| vs FP dense (paired 95% CI) |", "|---|---|---|---|---|"]

    def cell(paired):
        return "-" if paired is None else f"{100 * paired[0]:+.1f} ({100 * paired[1]:+.1f} to {100 * paired[2]:+.1f})"

    for row in rows:
        low, high = row["ci95"]
        lines.append(f"| {row['name']} | {row['visual_tokens']} | {100 * row['accuracy']:.1f} "
                     f"({100 * low:.1f}-{100 * high:.1f}) | {cell(row['vs_without_lora'])} "
                     f"| {cell(row['vs_fp_dense'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--models", default="demo,outlier", help="comma-separated: demo, outlier")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="docs/lora.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    run = LoraRun(steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr, rank=args.rank,
                  seed=args.seed)
    dataset = load_eval_dataset("demo", limit=args.limit)
    report = {"command": f"python examples/lora_results.py --limit {args.limit} --models {args.models} --steps "
                         f"{args.steps} --train-batch-size {args.train_batch_size} --lr {args.lr} --rank {args.rank} "
                         f"--seed {args.seed}",
              "threads": torch.get_num_threads(), "lora": vars(run) | {"target_modules": "all-linear"}}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"demo": (DEMO_MODEL_PATH, ["W4A4 rotation + RTN (default)"])}
        if "outlier" in args.models:
            report["outlier_model"] = build_outlier_demo(Path(folder) / "outlier")
            # plain RTN W4A4 collapses on this model: the W4A4 problem LoRA has to repair
            paths["outlier"] = (Path(folder) / "outlier", list(BACKBONES))
        for key in args.models.split(","):
            path, backbones = paths[key]
            table = Table(AutoProcessor.from_pretrained(path), dataset, args.batch_size)
            report[key] = {"training": evaluate_model(path, table, backbones, run), "rows": table.rows}
            print(f"\n## {key}\n\n{markdown(table.rows)}\n", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
