"""Build the outlier-faithful demo model and measure it against the shipped demo model.

`optimum_qap.demo.outliers.build_outlier_demo` rescales a few input channels of every decoder linear of the shapes-VQA
demo model to ~50x the median channel (function-preserving). This script reports, for the original and the derived
model:

* the full-precision logits difference on test prompts with images (they must agree to float rounding);
* `optimum_qap.outlier_report` per quantized linear, calibrated on the built-in samples and on demo test examples;
* the relative logits error and next-token KL of round-to-nearest W4A4 on a few test prompts;
* greedy answer accuracy of FP, W4A4, W4A16 and W16A4 (RTN, no rotation), W4A4 with the QuaRot-style rotation
  backbone (`QAPrunerConfig(rotation=True)`), and RTN W4A4 after only folding the RMSNorm gains.

Run: python examples/outlier_model.py --n 200 --output runs/outlier_model.json  (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo import DEMO_MODEL_PATH, make_dataset
from optimum_qap.demo.evaluate import answer_accuracy
from optimum_qap.demo.outliers import build_outlier_demo, fold_norm_gains

# round-to-nearest without the rotation backbone unless stated: the settings an outlier-faithful model must break
RTN = {"rotation": False, "weight_method": "rtn"}
SETTINGS = {
    "W4A4": RTN,
    "W4A16": {**RTN, "a_bits": 16},
    "W16A4": {**RTN, "w_bits": 16},
    "W4A4 + rotation": {"rotation": True, "weight_method": "rtn"},
}


def load(path: str | Path, quant: dict | None = None, calibration: bool = False):
    config = None
    if quant is not None:
        extra = {"calibration": "builtin", "num_calibration_samples": 8} if calibration else {}
        config = optimum_qap.QAPrunerConfig(keep_ratio=1.0, **quant, **extra)
    model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config).eval()
    if quant is not None:
        optimum_qap.cache_dequantized_weights(model)
    return model


@torch.no_grad()
def logits(model, processor, examples) -> list[torch.Tensor]:
    return [model(**processor(images=e.image, text=e.prompt, return_tensors="pt")).logits[0] for e in examples]


def logits_gap(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Max abs difference, the same relative to max |logit|, relative L2 error and next-token KL (last position)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, other, strict=True))
    scale = max(float(a.abs().max()) for a in reference)
    rel = [float((a - b).norm() / a.norm()) for a, b in zip(reference, other, strict=True)]
    kl = [
        float((a[-1].softmax(-1) * (a[-1].log_softmax(-1) - b[-1].log_softmax(-1))).sum())
        for a, b in zip(reference, other, strict=True)
    ]
    return {"max_abs": diff, "max_abs_rel": diff / scale, "rel_l2": sum(rel) / len(rel), "kl_last": sum(kl) / len(kl)}


def report_table(model, processor=None, samples=None) -> dict[str, dict]:
    if samples:
        report = optimum_qap.calibrate(model, processor, samples, progress=False)
    else:
        report = optimum_qap.outlier_report(model)
    prefix = "model.language_model.layers."
    return {
        name.removeprefix(prefix): {"max_ratio": round(r.max_ratio, 2), "outliers": len(r.outlier_channels)}
        for name, r in report.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="test examples for answer accuracy")
    parser.add_argument("--residual", default="none", choices=("none", "top", "pca"))
    parser.add_argument("--ratio", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", default=None, help="where to save the derived model (default: a temp dir)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.model_dir or tempfile.mkdtemp(prefix="outlier-demo-"))
    start = time.perf_counter()
    stats = build_outlier_demo(work, residual=args.residual, ratio=args.ratio, seed=args.seed)
    results: dict = {"build_seconds": round(time.perf_counter() - start, 2), "model_dir": str(work), "planted": stats}
    processor = AutoProcessor.from_pretrained(work)
    paths = {"original": DEMO_MODEL_PATH, "derived": work}

    probe = make_dataset(8, "test", start=10_000)
    fp = {name: logits(load(path), processor, probe) for name, path in paths.items()}
    results["fp_logits_gap"] = logits_gap(fp["original"], fp["derived"])
    results["w4a4_logits_error"] = {
        name: logits_gap(fp[name], logits(load(path, RTN), processor, probe)) for name, path in paths.items()
    }

    held_out = [{"image": e.image, "text": e.prompt} for e in make_dataset(16, "test", start=20_000)]
    results["outliers"] = {}
    for name, path in paths.items():
        model = load(path, RTN, calibration=True)
        builtin = report_table(model)  # before calibrate() below replaces the built-in calibration
        results["outliers"][name] = {"builtin": builtin, "demo_test": report_table(model, processor, held_out)}
    rotated = load(work, SETTINGS["W4A4 + rotation"], calibration=True)  # what the rotated quantizers see
    results["outliers"]["derived, rotation"] = {"builtin": report_table(rotated)}

    folded = copy.deepcopy(load(work))
    fold_norm_gains(folded)
    folded.save_pretrained(work / "gain_folded")
    processor.save_pretrained(work / "gain_folded")
    examples = make_dataset(args.n, "test")
    accuracy = {}
    for name, path in paths.items():
        accuracy[f"{name} FP"] = answer_accuracy(load(path), processor, examples)
        for setting, quant in SETTINGS.items():
            accuracy[f"{name} {setting}"] = answer_accuracy(load(path, quant), processor, examples)
    accuracy["derived, gains folded, W4A4"] = answer_accuracy(load(work / "gain_folded", RTN), processor, examples)
    results["accuracy"] = accuracy
    results["accuracy_n"] = args.n

    print(json.dumps({k: v for k, v in results.items() if k not in ("planted", "outliers")}, indent=2))
    columns = [("original", "builtin"), ("derived", "builtin"), ("original", "demo_test"), ("derived", "demo_test"),
               ("derived, rotation", "builtin")]
    print("| linear input | " + " | ".join(f"{name} {source}" for name, source in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for layer in results["outliers"]["original"]["builtin"]:
        cells = ["{max_ratio:.1f}x ({outliers})".format(**results["outliers"][n][s][layer]) for n, s in columns]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
