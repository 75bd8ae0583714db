"""Evidence on a model with planted massive activations: does quantization-aware pruning keep the tokens it needs?

The shipped shapes-VQA demo model has no activation outliers, so QAPruner's premise cannot show on it. This script
plants them (`optimum_qap.demo.planted`: four background-corner visual tokens carry ~400x the median projector output
in two LLM channels, and every decoder layer uses them as attention sinks), then compares, for each keep ratio and
under W4A4 with dynamic per-token and calibrated static per-tensor activations, the token selections:
semantic only (alpha=1), fixed alpha 0.3 / 0.5 / 0.7, alpha="auto" and outlier slots (m="auto"), both chosen by
`optimum_qap.select_fusion` on in-domain training samples, and uniformly random tokens. The un-planted demo model is
the control. Metrics, on the demo test split:

* KL divergence of the next-token distribution at the answer position from the full-precision, unpruned model
  (the planted model for the planted rows), mean over questions with a 95 % interval (mean +- 1.96 SE);
* answer accuracy (greedy generation, first word) with a 95 % Wilson interval;
* the paired difference of both from the semantic-only row (mean +- 1.96 SE of the per-question differences).

KL and accuracy come from the same generation pass (the answer-position distribution is read at prefill).

Run: python examples/planted_outliers.py --limit 100 --output runs/planted_outliers.json  (about 20 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.config import AUTO_CRITERIA, SEMANTIC_SCORES
from optimum_qap.demo import DEMO_MODEL_PATH, make_dataset
from optimum_qap.demo.planted import PLANTED_CONFIG_KEY, build_planted_demo, grid_corners, weights_sha256
from optimum_qap.evaluation import attach_random_pruner, load_eval_dataset, wilson_interval
from optimum_qap.evaluation.runner import generate_answers
from optimum_qap.pruning.patch import TokenPruner, visual_tokens_per_image
from optimum_qap.pruning.selection import resolve_budget

Z = 1.96
ALPHAS = (0.3, 0.5, 0.7)


@dataclass
class Row:
    method: str
    keep_ratio: float | None
    tokens: int
    hits: list[bool]
    kl: list[float] | None
    corners_kept: float | None = None
    choice: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.hits) / len(self.hits)

    def to_dict(self, semantic: Row | None) -> dict:
        low, high = wilson_interval(sum(self.hits), len(self.hits))
        out = {
            "method": self.method,
            "keep_ratio": self.keep_ratio,
            "visual_tokens": self.tokens,
            "n": len(self.hits),
            "accuracy": self.accuracy,
            "accuracy_ci95": [low, high],
            "kl": mean_ci(self.kl) if self.kl is not None else None,
            "corners_kept": self.corners_kept,
            "choice": self.choice,
            "seconds": round(self.seconds, 1),
        }
        if semantic is not None and semantic is not self:
            out["delta_kl_vs_semantic"] = mean_ci([a - b for a, b in zip(self.kl, semantic.kl, strict=True)])
            out["delta_accuracy_vs_semantic"] = mean_ci(
                [float(a) - float(b) for a, b in zip(self.hits, semantic.hits, strict=True)]
            )
        return out


def mean_ci(values: list[float]) -> dict:
    """Mean and a 95 % normal interval (mean +- 1.96 standard errors)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half]}


class AnswerPosition:
    """Records, for every question of a generation pass, the next-token log-probabilities at the answer position
    (read from the prefill step) and how many of the ``watched`` visual tokens the pruner kept."""

    def __init__(self, model, watched: set[int]):
        self.model, self.watched = model, watched
        self.log_probs: list[torch.Tensor] = []
        self.kept: list[int] = []
        self.handle = model.model.language_model.register_forward_hook(self._hook)

    def _hook(self, _module, _args, output) -> None:
        hidden = output.last_hidden_state
        if hidden.shape[1] == 1:  # a decoding step
            return
        self.log_probs.append(torch.log_softmax(self.model.lm_head(hidden[:, -1]).float(), dim=-1).cpu())
        pruner = getattr(self.model, "qap_pruner", None)
        if pruner is not None and pruner.active:
            self.kept += [len(self.watched & set(s.kept.tolist())) for s in pruner.last]

    def remove(self) -> None:
        self.handle.remove()


class Evaluator:
    def __init__(self, processor, dataset, batch_size: int, corners: set[int]):
        self.processor, self.dataset, self.batch_size, self.corners = processor, dataset, batch_size, corners

    def run(self, model, method: str, keep_ratio: float | None, tokens: int, reference: torch.Tensor | None):
        start = time.perf_counter()
        probe = AnswerPosition(model, self.corners)
        try:
            answers = generate_answers(
                model, self.processor, self.dataset.items, self.batch_size, self.dataset.max_new_tokens, progress=False
            )
        finally:
            probe.remove()
        log_probs = torch.cat(probe.log_probs)
        hits = [self.dataset.is_correct(a, i.answer) for a, i in zip(answers, self.dataset.items, strict=True)]
        kl = None
        if reference is not None:
            kl = (reference.exp() * (reference - log_probs)).sum(-1).clamp_min(0).tolist()
        corners = sum(probe.kept) / len(probe.kept) if probe.kept else (len(self.corners) if keep_ratio else None)
        row = Row(method, keep_ratio, tokens, hits, kl, corners, seconds=time.perf_counter() - start)
        return row, log_probs


class DropTokens(TokenPruner):
    """Keeps every visual token except ``dropped``: removes the planted sinks alone (or as many other tokens)."""

    def __init__(self, model, config, dropped: set[int]):
        super().__init__(model, config)
        self.dropped = dropped

    def select(self, features, vision_states, instructions):
        selections = super().select(features, vision_states, instructions)
        keep = torch.ones(features.shape[1], dtype=torch.bool)
        keep[sorted(self.dropped)] = False
        for selection in selections:
            selection.kept = keep.nonzero().flatten().to(selection.kept.device)
        return selections


def edge_midpoints(n: int) -> set[int]:
    """Patches in the middle of each image edge: background like the corners, but not planted."""
    side = math.isqrt(n)
    middle = side // 2 - 1
    return {middle, middle * side, middle * side + side - 1, (side - 1) * side + middle}


def sink_ablation(model, run: Evaluator, n: int, corners: set[int], reference) -> list[Row]:
    """The full-precision model without only the corner tokens, and without as many other background tokens."""
    rows = []
    ablations = (("drop the 4 corner tokens only", corners), ("drop 4 edge-midpoint tokens", edge_midpoints(n)))
    for label, dropped in ablations:
        config = optimum_qap.QAPrunerConfig(w_bits=16, a_bits=16, keep_tokens=n - len(dropped))
        optimum_qap.attach_pruner(model, config)
        model.qap_pruner = DropTokens(model, config, dropped)
        row, _ = run.run(model, label, (n - len(dropped)) / n, n - len(dropped), reference)
        rows.append(row)
    model.qap_pruner.enabled = False
    return rows


def calibration_samples(count: int, start: int = 10_000) -> list[dict]:
    """In-domain samples: training-split images and questions with their answers (disjoint from the planting ones)."""
    return [
        {"image": e.image, "text": e.question, "answer": e.answer} for e in make_dataset(count, "train", start=start)
    ]


def with_settings(config, **changes):
    return optimum_qap.QAPrunerConfig.from_dict({**config.to_dict(), **changes})


def outlier_profile(model, processor, dataset, corners: set[int]) -> dict:
    """Projector-output outlier statistics on the evaluation images: largest |value| / median, where it sits."""
    ratios, corner_hits = [], []
    image_processor = processor.image_processor
    for start in range(0, len(dataset.items), 50):
        images = [item.image for item in dataset.items[start : start + 50]]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(model.dtype)
        with torch.no_grad():
            features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output)).float()
        median = features.abs().median()
        token_max = features.abs().amax(-1) / median  # [B, N]
        ratios.append(token_max)
        top = token_max.topk(len(corners), dim=-1).indices
        corner_hits += [set(t.tolist()) == corners for t in top]
    ratios = torch.cat(ratios)
    return {
        "max_over_median": float(ratios.max()),
        "p99_token_max_over_median": float(ratios.flatten().quantile(0.99)),
        "median_token_max_over_median": float(ratios.median()),
        "images_whose_top_tokens_are_the_corners": sum(corner_hits) / len(corner_hits),
    }


def pruning_methods(model, processor, samples, pruned, seed: int):
    """Attach each compared selection to ``model`` in turn; yields its label and the "auto" record, if any."""
    optimum_qap.attach_pruner(model, with_settings(pruned, alpha=1.0))
    yield "semantic only (alpha=1)", {}
    for alpha in ALPHAS:
        optimum_qap.attach_pruner(model, with_settings(pruned, alpha=alpha))
        yield f"alpha={alpha:g}", {}
    optimum_qap.attach_pruner(model, with_settings(pruned, alpha=1.0))
    record = optimum_qap.select_fusion(model, processor, samples, progress=False)
    yield f"alpha=auto (-> {record['alpha']:g})", record
    optimum_qap.attach_pruner(model, with_settings(pruned, fusion="outlier_slots", outlier_slots=0))
    record = optimum_qap.select_fusion(model, processor, samples, progress=False)
    yield f"outlier slots (m=auto -> {record['outlier_slots']})", record
    attach_random_pruner(model, pruned, seed=seed)
    yield "random", {}


def evaluate_model(name, path, args, processor, dataset, samples, corners) -> dict:
    run = Evaluator(processor, dataset, args.batch_size, corners)
    fp = LlavaForConditionalGeneration.from_pretrained(path).eval()
    n = visual_tokens_per_image(fp.config)
    fp_row, reference = run.run(fp, "FP dense", None, n, None)
    fp_row.kl = [0.0] * len(fp_row.hits)
    report = {
        "path": str(path),
        "planted": getattr(fp.config, PLANTED_CONFIG_KEY, None),
        "outliers_on_eval_images": outlier_profile(fp, processor, dataset, corners),
        "fp_dense": fp_row.to_dict(None),
        "granularities": {},
    }
    print(f"[{name}] FP dense: accuracy {fp_row.accuracy:.3f}", flush=True)
    ablation = [fp_row, *sink_ablation(fp, run, n, corners, reference)]
    report["fp_sink_ablation"] = [r.to_dict(fp_row) for r in ablation]
    for row in ablation[1:]:
        print(f"[{name}] FP {row.method}: KL {mean_ci(row.kl)['mean']:.4f} acc {row.accuracy:.3f}", flush=True)
    del fp
    gc.collect()
    for granularity in args.granularities:
        config = optimum_qap.QAPrunerConfig(
            a_granularity=granularity,
            keep_ratio=1.0,
            semantic=args.semantic,
            auto_max_samples=args.auto_samples,
            auto_criterion=args.auto_criterion,
        )
        model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config).eval()
        optimum_qap.cache_dequantized_weights(model)
        optimum_qap.calibrate(model, processor, samples, progress=False)  # ranges (static) and token statistics
        base = with_settings(model.config.quantization_config)
        channel_ratio = max(r.max_ratio for r in optimum_qap.outlier_report(model).values())
        dense, _ = run.run(model, "W4A4 dense", None, n, reference)
        rows = [dense]
        print(f"[{name}/{granularity}] dense: KL {mean_ci(dense.kl)['mean']:.4f} acc {dense.accuracy:.3f}", flush=True)
        for ratio in args.ratios:
            k = resolve_budget(n, ratio, None)
            pruned = with_settings(base, keep_ratio=ratio)
            for method, choice in pruning_methods(model, processor, samples, pruned, args.seed):
                row, _ = run.run(model, method, ratio, k, reference)
                row.choice = choice
                rows.append(row)
                print(
                    f"[{name}/{granularity}/{ratio:g}] {method}: KL {mean_ci(row.kl)['mean']:.4f} "
                    f"acc {row.accuracy:.3f} corners kept {row.corners_kept} ({row.seconds:.0f}s)",
                    flush=True,
                )
        semantic = {r.keep_ratio: r for r in rows if r.method.startswith("semantic")}
        report["granularities"][granularity] = {
            "max_calibrated_channel_ratio": channel_ratio,
            "token_statistics": base.token_statistics,
            "rows": [r.to_dict(semantic.get(r.keep_ratio)) for r in rows],
        }
        del model
        gc.collect()
    return report


def _interval(stats: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if stats is None:
        return "-"
    low, high = stats["ci95"]
    return f"{scale * stats['mean']:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| keep | method | KL to FP (95% CI) | ΔKL vs semantic (paired CI) | accuracy % (Wilson CI) "
        "| Δacc pts vs semantic (paired CI) | corners kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep = "all" if r["keep_ratio"] is None else f"{r['visual_tokens']} ({r['keep_ratio']:.1%})"
        low, high = r["accuracy_ci95"]
        corners = "-" if r["corners_kept"] is None else f"{r['corners_kept']:.2f}"
        lines.append(
            f"| {keep} | {r['method']} | {_interval(r['kl'], digits=4)} | "
            f"{_interval(r.get('delta_kl_vs_semantic'), digits=4)} | "
            f"{100 * r['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{_interval(r.get('delta_accuracy_vs_semantic'), 100, 1)} | {corners} |"
        )
    return "\n".join(lines)


def _delta(row: dict) -> str:
    stats = row["delta_kl_vs_semantic"]
    if stats["ci95"] == [0.0, 0.0]:
        return "0 (same tokens)"
    low, high = stats["ci95"]
    return f"{stats['mean']:+.2f} ({low:+.2f}, {high:+.2f})"


def summary_table(report: dict) -> str:
    """One line per model, granularity and keep ratio: semantic-only KL to the full-precision unpruned model, and
    every other selection's paired KL difference to it (negative = closer to the unpruned model)."""
    methods = ["alpha=0.3", "alpha=0.5", "alpha=0.7", "alpha=auto", "outlier slots", "random"]
    lines = [
        "| model | W4A4 | keep | semantic: KL, acc % | " + " | ".join(methods) + " |",
        "|" + "---|" * (4 + len(methods)),
    ]
    for model_name, model_report in report["models"].items():
        for granularity, table in model_report["granularities"].items():
            rows = [r for r in table["rows"] if r["keep_ratio"] is not None]
            for ratio in dict.fromkeys(r["keep_ratio"] for r in rows):
                at = {r["method"].split(" (")[0]: r for r in rows if r["keep_ratio"] == ratio}
                semantic = at["semantic only"]
                cells = []
                for method in methods:
                    row = at[method]
                    chosen = row["method"].split("-> ")[1].rstrip(")") if "-> " in row["method"] else None
                    cells.append((f"-> {chosen}: " if chosen else "") + _delta(row))
                lines.append(
                    f"| {model_name.split(' ')[0]} | {granularity} | {ratio:.1%} | {semantic['kl']['mean']:.2f}, "
                    f"{100 * semantic['accuracy']:.0f} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """Per model, granularity and keep ratio: are auto / outlier slots worse or better than semantic beyond noise?"""
    lines = []
    for model_name, model_report in report["models"].items():
        for granularity, table in model_report["granularities"].items():
            for r in table["rows"]:
                if not r["method"].startswith(("alpha=auto", "outlier slots")):
                    continue
                dkl, dacc = r["delta_kl_vs_semantic"], r["delta_accuracy_vs_semantic"]
                worse = dkl["ci95"][0] > 0 or dacc["ci95"][1] < 0
                better = dkl["ci95"][1] < 0 or dacc["ci95"][0] > 0
                verdict = {(True, False): "WORSE", (False, True): "better", (True, True): "mixed"}.get(
                    (worse, better), "tie (within noise)"
                )
                lines.append(f"- {model_name} / {granularity} / keep {r['keep_ratio']:g} / {r['method']}: {verdict}")
    return lines


def is_current(planted_dir: Path, source: str) -> bool:
    """Whether ``planted_dir`` holds a planted copy of the current weights of ``source``."""
    stats_file = planted_dir / "planted_stats.json"
    if not (planted_dir / "model.safetensors").exists() or not stats_file.exists():
        return False
    recorded = json.loads(stats_file.read_text()).get("source", {}).get("sha256")
    return recorded == weights_sha256(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="test questions")
    parser.add_argument("--calib-samples", type=int, default=32, help="training samples for calibration and auto")
    parser.add_argument("--auto-samples", type=int, default=32, help="of those, used by the alpha/slot choice")
    parser.add_argument(
        "--auto-criterion",
        default="kl",
        choices=AUTO_CRITERIA,
        help="QAPrunerConfig.auto_criterion: KL to the unpruned model at the answer position, or answer cross-entropy",
    )
    parser.add_argument("--semantic", default="cls_attention", choices=SEMANTIC_SCORES, help="S^P of every pruner")
    parser.add_argument("--plant-images", type=int, default=32, help="training images the planting is measured on")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.25, 0.125])
    parser.add_argument("--granularities", type=lambda s: s.split(","), default=["per_token", "static_per_tensor"])
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH), help="the un-planted model (control)")
    parser.add_argument("--planted-dir", default="runs/planted-demo", help="where the planted model is (re)built")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the planted model even when it exists")
    parser.add_argument("--no-control", action="store_true", help="skip the un-planted control model")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/planted_outliers.json")
    parser.add_argument("--summary", metavar="JSON", help="only print the summary table of an earlier run's JSON")
    args = parser.parse_args()
    if args.summary:
        print(summary_table(json.loads(Path(args.summary).read_text())))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join(["python", "examples/planted_outliers.py", *sys.argv[1:]])
    print(command, flush=True)
    start = time.perf_counter()

    planted_dir = Path(args.planted_dir)
    if args.rebuild or not is_current(planted_dir, args.model):
        stats = build_planted_demo(planted_dir, num_images=args.plant_images, model_path=args.model)
        print(
            f"planted model -> {planted_dir}: massive ratio {stats['massive_ratio']:.0f}, normal-token change "
            f"{stats['normal_token_change_mean']:.3f}, sink mass {stats['sink_attention_mass']}",
            flush=True,
        )
    processor = AutoProcessor.from_pretrained(planted_dir)
    dataset = load_eval_dataset("demo", limit=args.limit)
    samples = calibration_samples(args.calib_samples)
    planted_config = json.loads((planted_dir / "config.json").read_text())
    corners = set(planted_config.get(PLANTED_CONFIG_KEY, {}).get("positions", []))
    if not corners:
        corners = set(grid_corners(LlavaForConditionalGeneration.from_pretrained(planted_dir)))

    report = {
        "command": command,
        "limit": args.limit,
        "semantic": args.semantic,
        "calibration_samples": args.calib_samples,
        "auto_samples": args.auto_samples,
        "auto_criterion": args.auto_criterion,
        "models": {},
    }
    models = [("planted", planted_dir)] + ([] if args.no_control else [("control (un-planted)", Path(args.model))])
    for name, path in models:
        report["models"][name] = evaluate_model(name, path, args, processor, dataset, samples, corners)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["verdicts"] = verdicts(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")

    for name, model_report in report["models"].items():
        fp = model_report["fp_dense"]
        print(
            f"\n# {name}: FP dense accuracy {100 * fp['accuracy']:.1f} % "
            f"[{100 * fp['accuracy_ci95'][0]:.1f}, {100 * fp['accuracy_ci95'][1]:.1f}], n={fp['n']}"
        )
        print(f"outliers on the evaluation images: {model_report['outliers_on_eval_images']}")
        print(f"\n## {name}, full precision: do the corner tokens matter?\n")
        print(format_table(model_report["fp_sink_ablation"]).replace("vs semantic", "vs FP dense"))
        for granularity, table in model_report["granularities"].items():
            print(
                f"\n## {name}, W4A4 {granularity} (max calibrated channel ratio "
                f"{table['max_calibrated_channel_ratio']:.1f})\n"
            )
            print(format_table(table["rows"]))
    print("\n## Summary: KL to the full-precision unpruned model, difference to semantic only\n")
    print(summary_table(report))
    print("\n## auto / outlier slots vs semantic only\n")
    print("\n".join(report["verdicts"]))
    print(f"\n{report['seconds']:.0f} s; JSON: {output}\ncommand: {command}")


if __name__ == "__main__":
    main()
