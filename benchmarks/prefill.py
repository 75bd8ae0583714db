"""Prefill time of QAPruner vs the unpruned model vs the ideal (the same model fed only K image tokens).

LLaVA-1.5-7B shapes with the decoder truncated (random weights); the model is loaded with QAPrunerConfig
(W4A4 per-token by default) so all three rows share the same quantized language model.
Run: python benchmarks/prefill.py --decoder-layers 2 --keep-ratios 0.125 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import IMAGE_TOKEN_ID, interleaved_medians, machine, save_llava_7b_shaped  # noqa: E402

from optimum_qap.pruning.compaction import PlaceholderLayout  # noqa: E402
from optimum_qap.pruning.patch import compact_inputs  # noqa: E402


def prompt_ids(num_image_tokens: int, text_tokens: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, 32000, (text_tokens,), generator=generator)
    return torch.cat([text[:5], torch.full((num_image_tokens,), IMAGE_TOKEN_ID), text[5:]]).unsqueeze(0)


def time_prefill(model, keep_ratio: float, repeats: int, dtype: torch.dtype) -> dict:
    import optimum_qap

    config = model.config.quantization_config
    config.keep_ratio = keep_ratio
    optimum_qap.attach_pruner(model, config)
    device = model.device
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    full_ids = prompt_ids(576).to(device)
    keep = model.qap_pruner.budget(576)
    kept_ids = prompt_ids(keep).to(device)
    original_features = model._qap_original["get_image_features"]
    original_forward = model._qap_original["forward"]

    def pruned():
        return model(input_ids=full_ids, pixel_values=pixel_values, logits_to_keep=1)

    def unpruned():
        with optimum_qap.pruning_disabled(model):
            return model(input_ids=full_ids, pixel_values=pixel_values, logits_to_keep=1)

    def ideal():
        outputs = original_features(pixel_values=pixel_values, return_dict=True)
        outputs.pooler_output = [features[:keep] for features in outputs.pooler_output]
        return original_forward(input_ids=kept_ids, mm_encoder_outputs={"image": outputs}, logits_to_keep=1)

    def vision_only():
        return original_features(pixel_values=pixel_values, return_dict=True)

    pruner = model.qap_pruner
    with torch.inference_mode():
        _, features, vision_states = pruner.run_vision(original_features, pixel_values)

    def pruner_alone():
        """What pruning adds to the ideal prefill: the layout read, scoring, selection and compaction."""
        layout = PlaceholderLayout.read(full_ids, pruner.image_token_id, None)
        selections = pruner.select(features, vision_states, None)
        return compact_inputs(pruner, selections, layout, full_ids, None, {})

    with torch.inference_mode():
        fns = {"pruned": pruned, "unpruned": unpruned, "ideal": ideal, "vision_only": vision_only}
        seconds = interleaved_medians(fns | {"pruner_alone": pruner_alone}, repeats)
    return {
        "keep_ratio": keep_ratio,
        "kept_tokens": keep,
        **{f"{k}_s": v for k, v in seconds.items()},
        "pruned_over_ideal": seconds["pruned"] / seconds["ideal"],
        "pruned_over_unpruned": seconds["pruned"] / seconds["unpruned"],
        "pruner_alone_over_ideal": seconds["pruner_alone"] / seconds["ideal"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--workdir", default="runs/llava7b-shaped")
    parser.add_argument("--keep-ratios", default="0.125")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import LlavaForConditionalGeneration

    import optimum_qap

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    folder = save_llava_7b_shaped(os.path.join(args.workdir, f"bf16-{args.decoder_layers}L"), args.decoder_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device_map=device, quantization_config=optimum_qap.QAPrunerConfig()
    )
    rows = [time_prefill(model, float(r), args.repeats, dtype) for r in args.keep_ratios.split(",")]
    print(json.dumps({**machine(), "dtype": args.dtype, "decoder_layers": args.decoder_layers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
