"""Quantize a tiny LLaVA built from a config (random weights, no download), save, reload, and print sizes.

Run: `make demo` (or `python examples/quantize_tiny_llava.py --output runs/tiny-qap`).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig


def tiny_llava_config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, image_seq_length=256)


def folder_megabytes(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="where to write the compressed model (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="optimum-qap-")
    base = os.path.join(work, "tiny-llava-bf16")
    output = args.output or os.path.join(work, "tiny-llava-qap")
    LlavaForConditionalGeneration(tiny_llava_config()).to(torch.bfloat16).save_pretrained(base)

    config = QAPrunerConfig()  # the paper's setting: W4A4, QAPruner at 12.5 % of the visual tokens
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16, quantization_config=config)
    model.save_pretrained(output)
    reloaded = LlavaForConditionalGeneration.from_pretrained(output)

    inputs = {
        "input_ids": torch.tensor([[1] + [999] * 256 + [5, 6, 7]]),
        "pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).bfloat16(),
    }
    with torch.no_grad():
        same = torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    kept = len(optimum_qap.last_selection(reloaded)[0].kept)
    storage = optimum_qap.weight_storage_bytes(reloaded)
    layers = len(optimum_qap.quantized_modules(reloaded))
    print(f"quantized {layers} linear layers of the language model to W{config.w_bits}A{config.a_bits}")
    print(f"checkpoint: bf16 {folder_megabytes(base):.1f} MiB -> compressed {folder_megabytes(output):.1f} MiB")
    print(f"quantized weight storage in memory: {storage['quantized_weights'] / 2**20:.1f} MiB")
    print(f"visual tokens reaching the language model: {kept} of 256")
    print(f"reloaded logits identical to the model before saving: {same}")
    print(f"compressed model written to {output}")


if __name__ == "__main__":
    main()
