"""Prefill time and decode speed of the compressed model against the plain model it replaces, and calibration cost.

LLaVA-1.5-7B shapes, decoder truncated, random weights, QAPrunerConfig defaults (rotated W4A4 per token, keep
12.5 %), against the same checkpoint loaded plainly in the same dtype. The compressed model is timed pruned and
unpruned, on its automatic kernels and forced to the simulated path (what every call ran before the kernels), and
with per-channel weights (`w_group_size=None`, the layout the integer GEMM serves).
Run: python benchmarks/generation.py --decoder-layers 2 --new-tokens 16 --calib-samples 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    interleaved_medians,
    llava_7b_processor,
    machine,
    median_seconds,
    save_llava_7b_shaped,
)


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
    plain = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device)
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device_map=device, quantization_config=optimum_qap.QAPrunerConfig()
    )
    # per-channel weights: the layout the integer GEMM serves
    per_channel = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device_map=device, quantization_config=optimum_qap.QAPrunerConfig(w_group_size=None)
    )
    for each in (plain, model, per_channel):
        each.generation_config.pad_token_id = 0
    processor = llava_7b_processor()
    sample = optimum_qap.builtin_calibration_samples(1)[0]
    inputs = optimum_qap.calibration.model_inputs(model, processor, sample["image"], "USER: <image>\n" + " w5" * 40)
    with torch.inference_mode():
        prefill = interleaved_medians({"plain": lambda: plain(**inputs), "pruned": lambda: model(**inputs),
                                       "pruned_per_channel": lambda: per_channel(**inputs)}, repeats)
        with optimum_qap.pruning_disabled(model), optimum_qap.pruning_disabled(per_channel):
            unpruned = interleaved_medians({"plain": lambda: plain(**inputs), "unpruned": lambda: model(**inputs),
                                            "unpruned_per_channel": lambda: per_channel(**inputs)}, repeats)
        decode = {"plain": decode_tokens_per_second(plain, inputs, new_tokens, repeats),
                  "pruned": decode_tokens_per_second(model, inputs, new_tokens, repeats),
                  "pruned_per_channel": decode_tokens_per_second(per_channel, inputs, new_tokens, repeats)}
        with optimum_qap.pruning_disabled(model):
            decode["unpruned"] = decode_tokens_per_second(model, inputs, new_tokens, repeats)
        optimum_qap.set_kernels(model, "simulated")
        decode["pruned_simulated"] = decode_tokens_per_second(model, inputs, new_tokens, repeats)
        optimum_qap.set_kernels(model, "auto")
    start = time.perf_counter()
    optimum_qap.calibrate(model, processor, optimum_qap.builtin_calibration_samples(calib_samples), progress=False)
    per_sample = (time.perf_counter() - start) / calib_samples
    return {
        "prompt_tokens": int(inputs["input_ids"].shape[-1]),
        "prefill_s_plain": prefill["plain"],
        "prefill_s_pruned": prefill["pruned"],
        "prefill_pruned_over_plain": prefill["pruned"] / prefill["plain"],
        "prefill_pruned_per_channel_over_plain": prefill["pruned_per_channel"] / prefill["plain"],
        "prefill_unpruned_over_plain": unpruned["unpruned"] / unpruned["plain"],
        "prefill_unpruned_per_channel_over_plain": unpruned["unpruned_per_channel"] / unpruned["plain"],
        **{f"decode_tokens_per_s_{name}": value for name, value in decode.items()},
        "decode_pruned_over_plain": decode["pruned"] / decode["plain"],
        "decode_pruned_per_channel_over_plain": decode["pruned_per_channel"] / decode["plain"],
        "decode_speedup": decode["pruned"] / decode["unpruned"],
        "decode_kernels_over_simulated": decode["pruned"] / decode["pruned_simulated"],
        "calibration_s_per_sample": per_sample,
        "calibration_s_default_16_samples": 16 * per_sample,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
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
