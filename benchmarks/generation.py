"""Decode speed with and without pruning (smaller KV cache), and calibration cost per sample.

LLaVA-1.5-7B shapes, decoder truncated, random weights, QAPrunerConfig defaults (W4A4 per token, keep 12.5 %).
Run: python benchmarks/generation.py --decoder-layers 2 --new-tokens 16 --calib-samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import llava_7b_processor, machine, median_seconds, save_llava_7b_shaped  # noqa: E402


def decode_tokens_per_second(model, inputs: dict, new_tokens: int, repeats: int) -> float:
    """New tokens per second after prefill: (time for N tokens - time for 1 token) / (N - 1)."""

    def generate(count: int):
        return model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    full = median_seconds(lambda: generate(new_tokens), repeats)
    first = median_seconds(lambda: generate(1), repeats)
    return (new_tokens - 1) / max(full - first, 1e-9)


def run(decoder_layers: int, workdir: str, dtype: torch.dtype, new_tokens: int, calib_samples: int, repeats: int):
    from transformers import LlavaForConditionalGeneration

    import optimum_qap

    folder = save_llava_7b_shaped(os.path.join(workdir, f"bf16-{decoder_layers}L"), decoder_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device_map=device, quantization_config=optimum_qap.QAPrunerConfig()
    )
    model.generation_config.pad_token_id = 0
    processor = llava_7b_processor()
    sample = optimum_qap.builtin_calibration_samples(1)[0]
    inputs = optimum_qap.calibration.model_inputs(model, processor, sample["image"], "USER: <image>\n" + " w5" * 40)
    with torch.inference_mode():
        pruned = decode_tokens_per_second(model, inputs, new_tokens, repeats)
        with optimum_qap.pruning_disabled(model):
            dense = decode_tokens_per_second(model, inputs, new_tokens, repeats)
    start = time.perf_counter()
    optimum_qap.calibrate(model, processor, optimum_qap.builtin_calibration_samples(calib_samples), progress=False)
    per_sample = (time.perf_counter() - start) / calib_samples
    return {
        "decode_tokens_per_s_pruned": pruned,
        "decode_tokens_per_s_unpruned": dense,
        "decode_speedup": pruned / dense,
        "calibration_s_per_sample": per_sample,
        "calibration_s_default_16_samples": 16 * per_sample,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(
        args.decoder_layers, args.workdir, getattr(torch, args.dtype), args.new_tokens, args.calib_samples, args.repeats
    )
    print(json.dumps({**machine(), "dtype": args.dtype, "decoder_layers": args.decoder_layers, **result}, indent=2))


if __name__ == "__main__":
    main()
