"""Checkpoint size and peak RSS of from_pretrained: bf16 plain vs QAPrunerConfig, on a LLaVA-1.5-7B-shaped model.

Each load runs in its own process so that peak RSS is that load's alone.
Run: python benchmarks/load_memory.py --decoder-layers 4 --workdir runs/llava7b-shaped
``--gptq-samples 8`` adds a GPTQ load (the default config calibrated on 8 built-in samples) and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    folder_bytes,
    llava_7b_processor,
    machine,
    peak_rss_bytes,
    resident_bytes,
    save_llava_7b_shaped,
    tensor_bytes_by_part,
)


def measure(mode: str, folder: str, output: str | None, gptq_samples: int = 0) -> dict:
    from transformers import LlavaForConditionalGeneration

    import optimum_qap

    kwargs = {"dtype": torch.bfloat16}
    if mode == "qap":
        kwargs["quantization_config"] = optimum_qap.QAPrunerConfig()
    if mode == "gptq":
        kwargs["quantization_config"] = optimum_qap.QAPrunerConfig(
            calibration="builtin", num_calibration_samples=gptq_samples, processor=llava_7b_processor())
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    # weights load lazily from the memory-mapped file: touch every tensor so both rows count a resident model
    checksum = sum(float(t.sum()) for t in (*model.parameters(), *model.buffers()) if t.numel())
    seconds = time.perf_counter() - start
    result = {"mode": mode, "peak_rss": peak_rss_bytes(), "resident": resident_bytes(), "load_seconds": seconds,
              "checksum": checksum}
    if output:
        model.save_pretrained(output)
        result["checkpoint_bytes"] = folder_bytes(output)
    return result


def quanto_checkpoint_bytes(folder: str, output: str) -> int:
    """optimum-quanto int4 weights (group 128) on the same language-model linears, saved as safetensors."""
    from optimum.quanto import freeze, qint4, quantize
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    quantize(model.model.language_model, weights=qint4)
    freeze(model.model.language_model)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def run_child(mode: str, folder: str, output: str | None, gptq_samples: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--workdir", folder, "--gptq-samples", str(gptq_samples)]
    command += ["--output", output] if output else []
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--output", default=None)
    parser.add_argument("--gptq-samples", type=int, default=0, help="also measure a GPTQ load on N samples")
    parser.add_argument("--child", choices=["plain", "qap", "gptq", "quanto"], default=None)
    args = parser.parse_args()
    if args.child == "quanto":
        print(json.dumps({"checkpoint_bytes": quanto_checkpoint_bytes(args.workdir, args.output)}))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.workdir, args.output, args.gptq_samples)))
        return
    folder = save_llava_7b_shaped(os.path.join(args.workdir, f"bf16-{args.decoder_layers}L"), args.decoder_layers)
    compressed = os.path.join(args.workdir, f"qap-{args.decoder_layers}L")
    plain = run_child("plain", folder, None)
    qap = run_child("qap", folder, compressed)
    try:
        quanto = run_child("quanto", folder, os.path.join(args.workdir, f"quanto-{args.decoder_layers}L"))
        quanto_ratio = qap["checkpoint_bytes"] / quanto["checkpoint_bytes"]
    except subprocess.CalledProcessError as error:  # optimum-quanto is only in the bench extra
        quanto_ratio = f"unavailable: {error.stderr.strip().splitlines()[-1][:160]}"
    bf16_bytes = folder_bytes(folder)
    gptq = {}
    if args.gptq_samples:
        peak = run_child("gptq", folder, None, args.gptq_samples)["peak_rss"]
        gptq = {"gptq_samples": args.gptq_samples, "gptq_load_peak_rss_gib": peak / 2**30,
                "gptq_peak_rss_over_bf16_checkpoint": peak / bf16_bytes}
    bf16_parts, qap_parts = tensor_bytes_by_part(folder), tensor_bytes_by_part(compressed)
    per_layer_bf16 = bf16_parts["decoder_layers"] / args.decoder_layers
    per_layer_qap = qap_parts["decoder_layers"] / args.decoder_layers
    report = {
        **machine(),
        "decoder_layers": args.decoder_layers,
        "bf16_checkpoint_gib": bf16_bytes / 2**30,
        "qap_checkpoint_gib": qap["checkpoint_bytes"] / 2**30,
        "checkpoint_ratio": qap["checkpoint_bytes"] / bf16_bytes,
        "decoder_layer_ratio": per_layer_qap / per_layer_bf16,
        "qap_checkpoint_over_quanto_int4": quanto_ratio,
        # arithmetic on the measured parts, not a measurement: the same model with all 32 decoder layers
        "extrapolated_32_layer_ratio": (qap_parts["rest"] + 32 * per_layer_qap)
        / (bf16_parts["rest"] + 32 * per_layer_bf16),
        "plain_load_peak_rss_gib": plain["peak_rss"] / 2**30,
        "qap_load_peak_rss_gib": qap["peak_rss"] / 2**30,
        "qap_peak_rss_over_bf16_checkpoint": qap["peak_rss"] / bf16_bytes,
        "qap_peak_rss_over_plain_load": qap["peak_rss"] / plain["peak_rss"],
        **gptq,
        # after the load, every tensor touched: the checkpoint pages a quantized load still keeps show up here
        **{f"{mode}_resident_after_load_gib": {name: value / 2**30 for name, value in row["resident"].items()}
           for mode, row in (("plain", plain), ("qap", qap))},
        "plain_load_seconds": plain["load_seconds"],
        "qap_load_seconds": qap["load_seconds"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
