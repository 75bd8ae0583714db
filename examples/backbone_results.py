"""The W4A4 backbone table of docs/results.md: RTN vs rotation+RTN vs rotation+GPTQ, dense and pruned to 12.5 %.

Runs on the outlier-faithful demo model (`optimum_qap.demo.outliers`, built here in seconds) and on the shipped demo
model, on the same held-out questions. Each row gives accuracy with a 95 % Wilson interval and its paired difference
from full precision with the same pruning (mean +- 1.96 SE of the per-question differences).

Run: python examples/backbone_results.py --limit 500 --calib-samples 32 --output docs/backbone.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo import DEMO_MODEL_PATH, make_dataset
from optimum_qap.demo.outliers import build_outlier_demo
from optimum_qap.evaluation import load_eval_dataset, paired_difference
from optimum_qap.evaluation.runner import Result, generate_answers, score, with_settings
from optimum_qap.pruning.patch import visual_tokens_per_image
from optimum_qap.pruning.selection import resolve_budget

KEEP = 0.125


def backbones(calibration: list[dict]) -> dict[str, optimum_qap.QAPrunerConfig | None]:
    dense = {"keep_ratio": 1.0}
    return {
        "FP": None,
        "W4A4 RTN, no rotation (previous default)": optimum_qap.QAPrunerConfig(rotation=False, **dense),
        "W4A4 rotation + RTN": optimum_qap.QAPrunerConfig(rotation=True, **dense),
        "W4A4 rotation + GPTQ": optimum_qap.QAPrunerConfig(rotation=True, calibration=calibration, **dense),
        # the layout the CPU integer GEMM serves (docs/performance.md)
        "W4A4 rotation + GPTQ, per-channel weights": optimum_qap.QAPrunerConfig(
            rotation=True, calibration=calibration, w_group_size=None, **dense),
    }


def pruning_rows(space: bool) -> list[tuple[str, dict]]:
    rows = [("semantic (alpha=1)", {"alpha": 1.0}), ("QAPruner alpha=0.5", {"alpha": 0.5}),
            ("QAPruner alpha=auto", {"alpha": "auto"})]
    if space:  # S^Q on what the first quantizer sees instead of the projector outputs
        rows += [(f"{name}, S^Q on quantizer input", {**changes, "sensitivity_space": "quantizer"})
                 for name, changes in rows[1:]]
    return rows


def saved_calibration(folder: Path, count: int) -> tuple[list[dict], list[dict]]:
    """Training-split images written as files (the config names samples by path) and the same in memory."""
    examples = make_dataset(count, "train")
    paths = []
    for index, example in enumerate(examples):
        path = folder / f"calib-{index}.png"
        example.image.save(path)
        paths.append({"image": str(path), "text": example.question})
    return paths, [{"image": e.image, "text": e.question, "answer": e.answer} for e in examples]


def evaluate_model(path, processor, dataset, calibration, samples, batch_size, log, dense_only=False,
                   only: set[str] | None = None) -> list[dict]:
    rows, fp_hits, previous_hits = [], {}, {}
    for backbone, config in backbones(calibration).items():
        if only is not None and backbone not in only and backbone != "FP" and not backbone.startswith("W4A4 RTN"):
            continue  # FP and the previous default stay: the paired references of every other row
        start = time.perf_counter()
        if config is None:
            model = LlavaForConditionalGeneration.from_pretrained(path)
            base = optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, rotation=False, keep_ratio=1.0)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config)
            base = model.config.quantization_config
        load_seconds = time.perf_counter() - start
        n = visual_tokens_per_image(model.config)
        pruning = [] if dense_only else pruning_rows(space=config is not None and config.rotation)
        settings = [("dense", None), *pruning]
        for name, changes in settings:
            if changes is not None:
                auto = changes["alpha"] == "auto"
                pruned = with_settings(base, keep_ratio=KEEP, **{**changes, "alpha": 0.5 if auto else changes["alpha"]})
                optimum_qap.attach_pruner(model, pruned)
                if auto:
                    chosen = optimum_qap.select_fusion(model, processor, samples, progress=False)["alpha"]
                    name = f"{name} -> {chosen:g}"
            result = Result(f"{backbone} | {name}", "none" if changes is None else "qapruner", config is not None,
                            n if changes is None else resolve_budget(n, KEEP, None), None if changes is None else KEEP)
            answers = generate_answers(model, processor, dataset.items, batch_size, dataset.max_new_tokens,
                                       result.name, progress=False)
            score(result, dataset, answers)
            key = name.split(" -> ")[0].replace(", S^Q on quantizer input", "")
            # FP and the previous default come first: their rows are the paired references of the same pruning
            fp_hits.setdefault(key, result.hits)
            if backbone.startswith("W4A4 RTN"):
                previous_hits[key] = result.hits
            hits = "".join("1" if h else "0" for h in result.hits)
            rows.append({**result.to_dict(), "predictions": None, "hits": hits,
                         "vs_fp_same_pruning": paired_difference(result.hits, fp_hits[key]),
                         "vs_previous_default": paired_difference(result.hits, previous_hits.get(key, result.hits)),
                         "load_seconds": round(load_seconds, 2)})
            log(rows[-1])
        if config is not None and config.weight_method == "gptq":
            rows[-1]["gptq"] = {k: v for k, v in model.config.quantization_config.calibration_summary["gptq"].items()
                                if k != "layers"}
        del model
    return rows


@torch.no_grad()
def held_out_logit_error(path, calibration: list[dict], count: int = 64) -> dict[str, float]:
    """Relative L2 error of the logits against full precision on test-split prompts GPTQ never saw."""
    processor = AutoProcessor.from_pretrained(path)
    examples = make_dataset(count, "test")
    prompts = [processor(images=e.image, text=e.prompt, return_tensors="pt") for e in examples]
    fp = LlavaForConditionalGeneration.from_pretrained(path)
    reference = [fp(**p).logits for p in prompts]
    errors = {}
    for name in ("W4A4 rotation + RTN", "W4A4 rotation + GPTQ"):
        model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=backbones(calibration)[name])
        errors[name] = sum(float((model(**p).logits - r).norm() / r.norm())
                           for p, r in zip(prompts, reference, strict=True)) / count
    return errors


def gptq_layer_table(path, calibration: list[dict]) -> str:
    """Per decoder linear: output error of RTN and GPTQ weights on the calibration inputs (rotated backbone)."""
    config = backbones(calibration)["W4A4 rotation + GPTQ"]
    model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config)
    gptq = model.config.quantization_config.calibration_summary["gptq"]
    lines = [f"GPTQ: {gptq['seconds']:.1f} s on {gptq['samples']} samples", "",
             "| layer | RTN error | GPTQ error | reduction |", "|---|---|---|---|"]
    for name, row in gptq["layers"].items():
        lines.append(f"| {name.split('layers.', 1)[1]} | {row['rtn']:.4g} | {row['gptq']:.4g} | "
                     f"{100 * row['reduction']:.1f} % |")
    held_out = held_out_logit_error(path, calibration)
    lines += ["", "Held-out logits, relative L2 error against full precision (64 test-split prompts): "
              + ", ".join(f"{name} {value:.4f}" for name, value in held_out.items())]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| backbone | visual tokens | pruning | accuracy % (95% CI) | vs FP, same pruning (paired 95% CI) "
             "| vs previous default (paired 95% CI) |", "|---|---|---|---|---|---|"]
    for row in rows:
        backbone, pruning = row["name"].split(" | ")
        low, high = row["ci95"]
        cells = [f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})" if not backbone.startswith("FP") else "-"
                 for d, lo, hi in (row["vs_fp_same_pruning"], row["vs_previous_default"])]
        lines.append(f"| {backbone} | {row['visual_tokens']} | {pruning} | {100 * row['accuracy']:.1f} "
                     f"({100 * low:.1f}-{100 * high:.1f}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--models", default="outlier,demo", help="comma-separated: outlier, demo")
    parser.add_argument("--dense-only", action="store_true", help="only the unpruned row of each backbone")
    parser.add_argument("--gptq-layers", action="store_true", help="only print GPTQ's per-layer error reduction")
    parser.add_argument("--backbones", type=lambda text: set(text.split(";")), default=None,
                        help="';'-separated backbone names to evaluate (FP and the previous default always run)")
    parser.add_argument("--output", default="docs/backbone.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    dataset = load_eval_dataset("demo", limit=args.limit)
    report = {"command": (f"python examples/backbone_results.py --limit {args.limit} --calib-samples "
                          f"{args.calib_samples} --models {args.models}" + " --dense-only" * args.dense_only
                          + (f" --backbones '{';'.join(sorted(args.backbones))}'" if args.backbones else "")),
              "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        calibration, samples = saved_calibration(folder, args.calib_samples)
        paths = {"demo": DEMO_MODEL_PATH}
        if "outlier" in args.models:
            report["outlier_model"] = build_outlier_demo(folder / "outlier")
            paths["outlier"] = folder / "outlier"
        if args.gptq_layers:
            for key in args.models.split(","):
                print(f"\n## {key}\n\n{gptq_layer_table(paths[key], calibration)}")
            return
        for key in args.models.split(","):
            processor = AutoProcessor.from_pretrained(paths[key])
            rows = evaluate_model(paths[key], processor, dataset, calibration, samples, args.batch_size,
                                  lambda row: print(json.dumps({k: row[k] for k in ("name", "accuracy")}), flush=True),
                                  args.dense_only, args.backbones)
            report[key] = rows
            print(f"\n## {key}\n\n{markdown(rows)}\n", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
