"""Cost of the rotated backbone at LLaVA-1.5-7B shapes: online rotations as a share of prefill, and GPTQ time.

The decoder is truncated (random weights; per-layer costs scale with the 32 real layers). Prefill is timed with the
online transforms (o_proj across heads, down_proj 11008 = DCT_43 ⊗ H_256) attached and with them detached, calls
timed in turn; the difference is their share. GPTQ runs inside `from_pretrained` on the built-in samples.
Run: python benchmarks/backbone.py --decoder-layers 2 --calib-samples 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, llava_7b_processor, machine, save_llava_7b_shaped  # noqa: E402
from prefill import prompt_ids  # noqa: E402

from optimum_qap.transforms.rotation import ONLINE_HOOK, attach_online_rotations, online_rotations  # noqa: E402


@contextlib.contextmanager
def online_rotations_detached(model):
    """Timing only: the model computes the wrong function without its online transforms."""
    for name in online_rotations(model):
        getattr(model.get_submodule(name), ONLINE_HOOK).remove()
    try:
        yield
    finally:
        attach_online_rotations(model)


def rotation_share(model, dtype: torch.dtype, repeats: int) -> dict:
    import optimum_qap

    device = model.device
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ids = prompt_ids(576).to(device)

    def prefill():
        with optimum_qap.pruning_disabled(model):
            return model(input_ids=ids, pixel_values=pixel_values, logits_to_keep=1)

    def prefill_without_online_rotations():
        with online_rotations_detached(model):
            return prefill()

    with torch.inference_mode():
        seconds = interleaved_medians({"with": prefill, "without": prefill_without_online_rotations}, repeats)
    return {
        "prefill_s": seconds["with"],
        "prefill_without_online_rotations_s": seconds["without"],
        "online_rotation_share": (seconds["with"] - seconds["without"]) / seconds["with"],
        "tokens": int(ids.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import LlavaForConditionalGeneration

    import optimum_qap

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    folder = save_llava_7b_shaped(os.path.join(args.workdir, f"bf16-{args.decoder_layers}L"), args.decoder_layers)
    llava_7b_processor().save_pretrained(folder)  # calibration="builtin" builds its inputs with it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = optimum_qap.QAPrunerConfig(keep_ratio=1.0, calibration="builtin",
                                        num_calibration_samples=args.calib_samples)
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device,
                                                          quantization_config=config)
    load_s = time.perf_counter() - start
    summary = model.config.quantization_config.calibration_summary
    gptq = summary["gptq"]
    layers = gptq.pop("layers")
    result = {
        **machine(),
        "dtype": args.dtype,
        "decoder_layers": args.decoder_layers,
        "load_rotate_gptq_calibrate_s": load_s,
        "gptq": gptq,
        "gptq_s_per_decoder_layer": gptq["seconds"] / args.decoder_layers,
        "gptq_error_reduction_vs_rtn": {name.split("layers.", 1)[1]: row["reduction"] for name, row in layers.items()},
        "activation_calibration_s": summary["seconds"],
        **rotation_share(model, dtype, args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
