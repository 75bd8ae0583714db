"""Run every benchmark, write the results as JSON and as the tables of docs/performance.md.

Each benchmark runs in its own process (clean memory peaks). Numbers are ratios measured side by side in one run.
Run: python benchmarks/run_all.py            (about 20 minutes on 2 CPU cores; run it on an idle machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(script: str, *args: str) -> dict:
    """Run a benchmark script and return the JSON object it prints last."""
    command = [sys.executable, os.path.join(HERE, script), *args]
    print("$", " ".join(command[1:]), flush=True)
    completed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    output = completed.stdout
    # the last line that opens a top-level JSON object (linear.py prints one row per line before its summary)
    return json.loads(output[output.rfind("\n{") + 1 :])


def threads(result: dict) -> str:
    """Where a section was measured: results of different runs may differ in threads (set OMP_NUM_THREADS)."""
    return result["cuda"] or f"{result['cpu_threads']} CPU thread{'s' if result['cpu_threads'] > 1 else ''}"


def fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def markdown(results: dict, commands: dict[str, str]) -> str:
    machine = results["memory"]
    device = machine["cuda"] or f"CPU ({machine['machine']}, {machine['cpu_threads']} threads)"
    lines = [
        "# Performance",
        "",
        f"Measured by `python benchmarks/run_all.py` on {device} (each section names its own threads), "
        f"torch {machine['torch']}, transformers "
        f"{machine['transformers']}, {results['date']}. Models are LLaVA-1.5-7B-shaped (CLIP ViT-L/14-336 + "
        "Vicuna-7B shapes) with random weights and the decoder truncated; every ratio is measured side by side in "
        "one run. On a CUDA machine the same command measures the GPU; figures measured on lent GPUs are in "
        "[performance-cuda.md](performance-cuda.md).",
        "",
        "## Prefill: pruned vs unpruned vs ideal (the same model fed only K image tokens)",
        "",
        f"`{commands['prefill']}` (and `--dtype bfloat16 --keep-ratios 1.0,0.125`; "
        f"{threads(next(iter(results['prefill'].values())))})",
        "",
        "The scoring share is (pruned - ideal) / pruned: the cost of scoring, selection, compaction. Values near 0",
        "or below it are timing noise between two runs of nearly the same work (median of 5 runs each, the five timed "
        "calls taken in turn within every repeat). The last",
        "column times the pruner's own work (layout read, scoring, selection, compaction) alone on captured vision",
        "outputs, which is not subject to that noise.",
        "",
    ]
    rows = []
    for dtype, block in results["prefill"].items():
        for row in block["rows"]:
            scoring = (row["pruned_s"] - row["ideal_s"]) / row["pruned_s"]
            rows.append(
                [
                    dtype,
                    row["keep_ratio"],
                    row["kept_tokens"],
                    row["pruned_s"],
                    row["unpruned_s"],
                    row["ideal_s"],
                    row["pruned_over_ideal"],
                    row["pruned_over_unpruned"],
                    scoring,
                    row.get("pruner_alone_over_ideal", "-"),
                ]
            )
    lines += table(
        [
            "dtype",
            "keep",
            "K",
            "pruned s",
            "unpruned s",
            "ideal s",
            "pruned/ideal",
            "pruned/unpruned",
            "scoring share of prefill",
            "pruner alone / ideal",
        ],
        rows,
    )
    decode = results["generation"]
    lines += [
        "",
        "## Prefill, decode and calibration against the plain model",
        "",
        f"`{commands['generation']}` ({threads(decode)}). Plain: the same checkpoint loaded without quantization,",
        "in the same dtype.",
        "Simulated: the compressed model forced onto the simulated path (`set_kernels(model, \"simulated\")`), what",
        "every call ran before the fused kernels.",
        "",
        *table(
            ["measure", "default (group 128)", "per-channel weights"],
            [
                ["prefill s, plain bf16", decode["prefill_s_plain"], "-"],
                ["prefill s, pruned", decode["prefill_s_pruned"], "-"],
                ["prefill pruned / plain", decode["prefill_pruned_over_plain"],
                 decode["prefill_pruned_per_channel_over_plain"]],
                [f"prefill unpruned / plain ({decode['prompt_tokens']} tokens)",
                 decode["prefill_unpruned_over_plain"], decode["prefill_unpruned_per_channel_over_plain"]],
                ["decode tok/s, plain bf16", decode["decode_tokens_per_s_plain"], "-"],
                ["decode tok/s, pruned", decode["decode_tokens_per_s_pruned"],
                 decode["decode_tokens_per_s_pruned_per_channel"]],
                ["decode tok/s, unpruned", decode["decode_tokens_per_s_unpruned"], "-"],
                ["decode tok/s, pruned, simulated path", decode["decode_tokens_per_s_pruned_simulated"], "-"],
                ["decode pruned / plain", decode["decode_pruned_over_plain"],
                 decode["decode_pruned_per_channel_over_plain"]],
                ["calibration s/sample", decode["calibration_s_per_sample"], "-"],
            ],
        ),
        "",
        "## Quantized linear layer vs the bf16 `nn.Linear` it replaces (time ratio, lower is better)",
        "",
        f"`{commands['linear']}` ({threads(results['linear'])})",
        "",
    ]
    linear_rows = results["linear"]["rows"]
    methods = [k for k in linear_rows[0] if k not in ("shape", "tokens", "linear_ms", "qap paths")]
    lines += table(
        ["shape", "tokens", "nn.Linear ms", "qap per_token path", *methods],
        [[r["shape"], r["tokens"], r["linear_ms"], r["qap paths"]["qap per_token"], *(r[m] for m in methods)]
         for r in linear_rows],
    )
    memory = results["memory"]
    lines += [
        "",
        "## Size and memory",
        "",
        f"`{commands['memory']}` ({threads(memory)})",
        "",
        *table(
            ["what", "value"],
            [
                [
                    "checkpoint, compressed / bf16 (whole model, this many decoder layers)",
                    f"{memory['checkpoint_ratio']:.3f} ({memory['decoder_layers']} layers)",
                ],
                ["one decoder layer, compressed / bf16", memory["decoder_layer_ratio"]],
                [
                    "full 32-layer model, compressed / bf16 (arithmetic on the measured parts)",
                    memory["extrapolated_32_layer_ratio"],
                ],
                [
                    "checkpoint, optimum-qap W4 / optimum-quanto int4 (same layers)",
                    memory["qap_checkpoint_over_quanto_int4"],
                ],
                ["peak RSS of from_pretrained + QAPrunerConfig (GiB)", memory["qap_load_peak_rss_gib"]],
                ["peak RSS of plain bf16 from_pretrained (GiB)", memory["plain_load_peak_rss_gib"]],
                ["peak RSS, quantized load / bf16 checkpoint size", memory["qap_peak_rss_over_bf16_checkpoint"]],
                *([[f"peak RSS, GPTQ load on {memory['gptq_samples']} samples / bf16 checkpoint size",
                    memory["gptq_peak_rss_over_bf16_checkpoint"]]] if "gptq_samples" in memory else []),
            ],
        ),
        "",
        *crossover_section(results, commands),
        *fused_section(results, commands),
        *backbone_section(results, commands),
        *WHAT_LIMITS_SPEED,
    ]
    return "\n".join(lines)


WHAT_LIMITS_SPEED = [
    "## Which path a quantized layer takes, and where it still loses to `nn.Linear`",
    "",
    "`qap per_token path` is the path `QuantLinear` chose for that row (`kernels=\"auto\"`, see",
    "[quantization.md](quantization.md#kernels-which-path-a-call-takes-kernels-optimum_qapset_kernels)); every other",
    "qap column with 4-bit per-token activations takes the same path. `qap per_token simulated` is the reference",
    "path (dequantize, fake-quantize, dense matmul). Timings of short calls are taken over 64 // tokens calls in a",
    "row. On CPU the activation rounding, the int8 codes, the integer GEMM's scaling and the dequantization run as",
    "fused compiled passes, equal to the eager PyTorch code bit for bit.",
    "",
    "- Decode-sized calls (1 to 3 tokens) run PyTorch's fused int4 weight-only kernel on the packed weight (a",
    "  quarter of the bf16 bytes) after rounding the input in one fused pass, which puts them level with or ahead",
    "  of torchao's int4 weight-only layer (the same kernel, without activation quantization).",
    "- From 4 tokens on, CPUs with AMX tiles (Sapphire Rapids and later) run W4A4 as an integer GEMM",
    "  (`csrc/amx_cpu.cpp`): int8 activation codes times the weight codes centred from the stored nibbles, each",
    "  weight group's sums exact in int32 and scaled in float32, group-wise and per-channel layouts alike. Its cost",
    "  is nearly flat up to ~16 tokens (it centres every weight once per call), so batched decode of a few",
    "  sequences runs faster than bf16 too. At 600 tokens the group-wise layout still stores each 16x16 block of",
    "  int32 sums once per group of 128 channels and scales it on the vector units; that epilogue, not the",
    "  tile products, is most of its time, which is why per-channel weights (one epilogue per block) run faster",
    "  still.",
    "- CPUs without AMX keep the previous paths: int4 up to `INT4_MAX_TOKENS`, the integer GEMM",
    "  (`torch._int_mm`) for per-channel layouts from `INT8_MIN_TOKENS`, the simulated path otherwise (dequantized",
    "  in blocks of 2**21 weights that the GEMM reads from cache).",
    "- Layouts outside the AMX GEMM's rules (static activation ranges, 8-bit activations with zero points, weight",
    "  or activation groups narrower than 64 channels, outputs not a multiple of 32) stay on the simulated path past",
    "  the int4 kernel's token range, as does everything under autograd and `torch.compile`; per-group activations",
    "  take the AMX GEMM (the `qap per_group` column).",
    "- `cache_dequantized_weights(model)` trades the float weight's memory for the plain float matmul.",
    "",
    "The peers: optimum-quanto's int4 layers (with and without int8 activations) dequantize on CPU; torchao's",
    "int8-dynamic-activation / int4-weight layer is timed at the same shapes.",
    "",
]


MEASUREMENTS = ("memory", "prefill", "generation", "linear", "crossover", "fused", "backbone")


def crossover_section(results: dict, commands: dict[str, str]) -> list[str]:
    """One decoder layer's seven linears on every path, forced, per token count: where the thresholds come from."""
    crossover = results.get("crossover")
    if crossover is None:
        return []
    paths = ["linear", "group 128 int4_weight_only", "group 128 amx_int8_gemm", "group 128 simulated",
             "per-channel int4_weight_only", "per-channel int8_gemm", "per-channel amx_int8_gemm",
             "per-channel simulated"]
    thresholds = crossover["thresholds"]
    return [
        "## Path thresholds: one decoder layer on every path",
        "",
        f"`{commands['crossover']}` ({threads(crossover)}). Milliseconds for one decoder layer's seven linears (four",
        "4096x4096, two 4096x11008, one 11008x4096) with every call forced onto one path; `linear` is bf16",
        "`nn.Linear`. The automatic choice takes the AMX integer GEMM from `AMX_MIN_TOKENS` "
        f"({thresholds.get('AMX_MIN_TOKENS', {}).get('cpu', '-')} on CPU, where the CPU has AMX tiles); without it,",
        f"int4 up to `INT4_MAX_TOKENS` ({thresholds['INT4_MAX_TOKENS']['cpu']}) and, for per-channel layouts, the",
        f"integer GEMM from `INT8_MIN_TOKENS` ({thresholds['INT8_MIN_TOKENS']['cpu']}).",
        "",
        *table(["tokens", *paths], [[row["tokens"], *(row.get(p, "-") for p in paths)]
                                    for row in crossover["decoder_layer_ms"]]),
        "",
    ]


def fused_section(results: dict, commands: dict[str, str]) -> list[str]:
    """The fused CPU ops against the eager code they replace."""
    fused = results.get("fused")
    if fused is None:
        return []
    return [
        "## Fused CPU ops against the eager PyTorch code",
        "",
        f"`{commands['fused']}` ({threads(fused)}, {fused['dtype']}). Microseconds per call; both compute the same",
        "values bit for bit (`tests/test_fused.py`).",
        "",
        *table(["op", "eager us", "fused us", "fused / eager"],
               [[row["op"], row["eager_us"], row["fused_us"], row["fused_over_eager"]] for row in fused["rows"]]),
        "",
    ]


def backbone_section(results: dict, commands: dict[str, str]) -> list[str]:
    """Online rotations as a share of prefill, and GPTQ time, at LLaVA-1.5-7B shapes."""
    backbone = results.get("backbone")
    if backbone is None:
        return []
    layers = backbone["decoder_layers"]
    reductions = list(backbone["gptq_error_reduction_vs_rtn"].values())
    return [
        "## Rotated backbone: online rotations and GPTQ",
        "",
        f"`{commands['backbone']}` ({backbone['dtype']}, {backbone['cpu_threads']} threads"
        + (f", {backbone['cuda']}" if backbone["cuda"] else "")
        + f"; {layers} decoder layers, prefill of {backbone['tokens']} tokens, not pruned)",
        "",
        *table(
            ["measure", "value"],
            [
                ["prefill with the online rotations (s)", backbone["prefill_s"]],
                ["prefill with them detached (s; timing only)", backbone["prefill_without_online_rotations_s"]],
                ["online rotations, share of prefill", backbone["online_rotation_share"]],
                [f"GPTQ, {backbone['gptq']['samples']} samples (s)", backbone["gptq"]["seconds"]],
                ["GPTQ s per sample", backbone["gptq"]["seconds_per_sample"]],
                ["GPTQ s per decoder layer (x 32 for the full 7B)", backbone["gptq_s_per_decoder_layer"]],
                ["GPTQ output error below RTN, min-max over layers", f"{min(reductions):.2f}-{max(reductions):.2f}"],
            ],
        ),
        "",
        "GPTQ's time is mostly per layer (Hessian inversion and the column sweep), not per sample: the per-sample",
        "figure divides the whole GPTQ time by the sample count. Random weights make the error reductions a",
        "plumbing check, not an accuracy figure (those are in [results.md](results.md)).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results.json"))
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "performance.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from an existing --json")
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=set(MEASUREMENTS),
        help=f"comma list of {','.join(MEASUREMENTS)} to re-measure; the rest is kept from --json",
    )
    args = parser.parse_args()
    commands = {
        "prefill": "python benchmarks/prefill.py --decoder-layers 2 --keep-ratios 1.0,0.5,0.25,0.125 --dtype float32"
        " --repeats 5",
        "generation": "python benchmarks/generation.py --decoder-layers 2 --new-tokens 16 --calib-samples 4"
        " --dtype bfloat16",
        "linear": "python benchmarks/linear.py --dtype bfloat16 --tokens 1,16,64,600 --peers --repeats 7",
        "crossover": "python benchmarks/crossover.py --dtype bfloat16 --tokens 1,2,4,8,16,20,24,32,64,128 --repeats 5",
        "fused": "python benchmarks/fused_ops.py --repeats 7",
        "memory": "python benchmarks/load_memory.py --decoder-layers 4 --gptq-samples 8",
        "backbone": "python benchmarks/backbone.py --decoder-layers 2 --calib-samples 4 --dtype bfloat16 --repeats 5",
    }
    if args.render_only:
        with open(args.json) as handle:
            results = json.load(handle)
        with open(args.markdown, "w") as handle:
            handle.write(markdown(results, commands))
        return
    workdir = ["--workdir", args.workdir]
    results = {}
    if args.only != set(MEASUREMENTS):
        with open(args.json) as handle:
            results = json.load(handle)
    results["date"] = time.strftime("%Y-%m-%d")

    def keep(name: str, value: dict) -> None:
        """Record a result and write what exists so far: a later failure loses nothing."""
        results[name] = value
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)

    if "memory" in args.only:
        keep("memory", run("load_memory.py", *commands["memory"].split()[2:], *workdir))
    if "prefill" in args.only:
        prefill = {}
        for dtype, ratios in (("float32", "1.0,0.5,0.25,0.125"), ("bfloat16", "1.0,0.125")):
            prefill[dtype] = run(
                "prefill.py",
                "--decoder-layers",
                "2",
                "--keep-ratios",
                ratios,
                "--dtype",
                dtype,
                "--repeats",
                "5",
                *workdir,
            )
            keep("prefill", prefill)
    if "generation" in args.only:
        keep(
            "generation",
            run("generation.py", *commands["generation"].split()[2:], *workdir),
        )
    if "linear" in args.only:
        keep("linear", run("linear.py", *commands["linear"].split()[2:]))
    if "crossover" in args.only:
        keep("crossover", run("crossover.py", *commands["crossover"].split()[2:]))
    if "fused" in args.only:
        keep("fused", run("fused_ops.py", *commands["fused"].split()[2:]))
    if "backbone" in args.only:
        keep("backbone", run("backbone.py", *commands["backbone"].split()[2:], *workdir))
    with open(args.markdown, "w") as handle:
        handle.write(markdown(results, commands))
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
