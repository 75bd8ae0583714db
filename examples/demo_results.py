"""Every table of docs/results.md, on the shipped demo model: Table 1, alpha sweep, ablation, granularities, fusion.

The full-precision model and each quantized model are loaded once; pruning settings switch with `attach_pruner`.
Run: python examples/demo_results.py --limit 300 --output docs/results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo import DEMO_MODEL_PATH, make_dataset
from optimum_qap.evaluation import attach_random_pruner, load_eval_dataset
from optimum_qap.evaluation.runner import Result, format_table, generate_answers, score, with_settings
from optimum_qap.pruning.patch import visual_tokens_per_image
from optimum_qap.pruning.selection import resolve_budget

RATIOS = (0.5, 0.25, 0.125)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRANULARITIES = ("per_token", "per_group", "static_per_channel", "static_per_tensor")


def calibration_samples(count: int) -> list[dict]:
    """In-domain calibration: training-split images and questions of the demo task, with their answers."""
    return [{"image": e.image, "text": e.question, "answer": e.answer} for e in make_dataset(count, "train")]


class Evaluator:
    def __init__(self, processor, dataset, batch_size: int):
        self.processor, self.dataset, self.batch_size = processor, dataset, batch_size
        self.results: dict[str, list[Result]] = {}

    def row(self, table: str, model, result: Result) -> None:
        answers = generate_answers(model, self.processor, self.dataset.items, self.batch_size,
                                   self.dataset.max_new_tokens, f"{table}: {result.name}")
        self.results.setdefault(table, []).append(score(result, self.dataset, answers))
        print(format_table(self.results[table][-1:]).splitlines()[-1], flush=True)


def load_quantized(config: optimum_qap.QAPrunerConfig, processor, calib: int):
    model = LlavaForConditionalGeneration.from_pretrained(
        DEMO_MODEL_PATH, quantization_config=with_settings(config, keep_ratio=1.0, keep_tokens=None)
    )
    if config.needs_calibration:
        optimum_qap.calibrate(model, processor, calibration_samples(calib))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--no-rotation", action="store_true", help="plain RTN W4A4 (the backbone before rotation)")
    parser.add_argument("--output", default="docs/results.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_PATH)
    dataset = load_eval_dataset("demo", limit=args.limit)
    run = Evaluator(processor, dataset, args.batch_size)
    samples = calibration_samples(args.calib_samples)

    fp = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL_PATH)
    n = visual_tokens_per_image(fp.config)
    run.row("table1", fp, Result("FP dense", "none", False, n))
    attach_random_pruner(fp, optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=0.125), seed=0)
    run.row("table1", fp, Result("FP + random", "random", False, resolve_budget(n, 0.125, None), 0.125))
    optimum_qap.attach_pruner(fp, optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=0.125, alpha=1.0))
    run.row("table1", fp, Result("FP + semantic (alpha=1)", "semantic", False, resolve_budget(n, 0.125, None),
                                 0.125, 1.0))
    del fp

    outliers = {}
    for granularity in GRANULARITIES:
        base = optimum_qap.QAPrunerConfig(a_granularity=granularity, rotation=not args.no_rotation)
        model = load_quantized(base, processor, args.calib_samples)
        if granularity == "static_per_channel":
            report = optimum_qap.outlier_report(model)
            outliers = {"max_channel_ratio": max(r.max_ratio for r in report.values()),
                        "token_statistics": model.config.quantization_config.token_statistics}
        table = "table1" if granularity == "per_token" else f"granularity {granularity}"
        run.row(table, model, Result(f"W4A4 {granularity} dense", "none", True, n))
        ratios = RATIOS if granularity == "per_token" else (0.125,)
        for ratio in ratios:
            k = resolve_budget(n, ratio, None)
            pruned = with_settings(base, keep_ratio=ratio)
            if granularity == "per_token":
                attach_random_pruner(model, pruned, seed=0)
                run.row(table, model, Result("W4A4 + random", "random", True, k, ratio))
            optimum_qap.attach_pruner(model, with_settings(pruned, alpha=1.0))
            run.row(table, model, Result("W4A4 + semantic (alpha=1)", "semantic", True, k, ratio, 1.0))
            optimum_qap.attach_pruner(model, with_settings(pruned, alpha=0.5))
            run.row(table, model, Result("W4A4 + QAPruner (alpha=0.5)", "qapruner", True, k, ratio, 0.5))
            if granularity != "per_token":
                continue
            optimum_qap.attach_pruner(model, with_settings(pruned, alpha=0.5))
            record = optimum_qap.select_fusion(model, processor, samples)
            run.row(table, model, Result(f"W4A4 + QAPruner (alpha=auto -> {record['alpha']:g})", "auto", True, k,
                                         ratio, record["alpha"]))
            slots = with_settings(pruned, fusion="outlier_slots", outlier_slots=4,
                                  token_statistics=model.config.quantization_config.token_statistics
                                  or _token_statistics(model, processor, samples))
            optimum_qap.attach_pruner(model, slots)
            run.row(table, model, Result("W4A4 + outlier slots (m=4)", "slots", True, k, ratio))
            if ratio == 0.125:
                for alpha in ALPHAS[1:-1]:
                    if alpha != 0.5:
                        optimum_qap.attach_pruner(model, with_settings(pruned, alpha=alpha))
                        run.row("alpha sweep", model, Result(f"alpha={alpha:g}", "qapruner", True, k, ratio, alpha))
                optimum_qap.attach_pruner(model, with_settings(pruned, alpha=0.0))
                run.row("alpha sweep", model, Result("alpha=0 (S^Q only)", "qapruner", True, k, ratio, 0.0))
                for name, error_weight, range_weight in (("E only", 1.0, 0.0), ("R only", 0.0, 1.0)):
                    optimum_qap.attach_pruner(
                        model, with_settings(pruned, alpha=0.5, error_weight=error_weight, range_weight=range_weight)
                    )
                    run.row("ablation", model, Result(f"QAPruner alpha=0.5, {name}", "qapruner", True, k, ratio, 0.5))
        del model

    report = {
        "command": f"python examples/demo_results.py --limit {args.limit} --calib-samples {args.calib_samples}"
        + " --no-rotation" * args.no_rotation,
        "seconds": time.perf_counter() - start,
        "outliers": outliers,
        "tables": {name: [r.to_dict() | {"predictions": None} for r in rows] for name, rows in run.results.items()},
    }
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    for name, rows in run.results.items():
        print(f"\n## {name}\n\n{format_table(rows)}")


def _token_statistics(model, processor, samples):
    """Token statistics for a dynamic granularity, which was never calibrated (ranges unused, medians needed)."""
    optimum_qap.calibrate(model, processor, samples)
    return model.config.quantization_config.token_statistics


if __name__ == "__main__":
    main()
