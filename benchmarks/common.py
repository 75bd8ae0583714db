"""Shared pieces of the benchmarks: LLaVA-1.5-7B-shaped models with a truncated decoder, timing, memory."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 32000


def llava_7b_config(decoder_layers: int) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf shapes (CLIP ViT-L/14-336, Vicuna-7B), the decoder cut to ``decoder_layers``."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=decoder_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def save_llava_7b_shaped(folder: str, decoder_layers: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the random-weight model once; later runs reuse the folder."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(llava_7b_config(decoder_layers), dtype=dtype)
        model.save_pretrained(folder)
    return folder


def folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder) if name.endswith(".safetensors")
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across fork/exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> dict[str, int]:
    """This process's resident set now, split into anonymous memory (including copy-on-write pages of a
    memory-mapped checkpoint that were written) and file pages (pages of the checkpoint that were only read)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon:", "RssFile:")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}


def tensor_bytes_by_part(folder: str) -> dict[str, int]:
    """Bytes in the folder's safetensors of decoder layers vs everything else."""
    from safetensors import safe_open

    parts = {"decoder_layers": 0, "rest": 0}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as checkpoint:
                for key in checkpoint.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = checkpoint.get_slice(key)
                    size = torch.empty(0, dtype=_DTYPES[tensor.get_dtype()]).element_size()
                    count = 1
                    for dim in tensor.get_shape():
                        count *= dim
                    part = "decoder_layers" if ".layers." in key and "language_model" in key else "rest"
                    parts[part] += count * size
    return parts


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I64": torch.int64}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn``; CUDA work is synchronised so kernels are timed, not just launched."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timed in turn within every repeat so that drift over the run (allocator
    growth, clocks, other processes) falls on all of them alike instead of on whichever runs first."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def machine() -> dict:
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def llava_7b_processor():
    """A LlavaProcessor for the 7B-shaped model: CLIP 336 px image processing, a word-level tokenizer with the
    model's vocabulary size and `<image>` at id 32000 (prompt words map to `<unk>`: only lengths matter here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = {0: "<unk>", 1: "<s>", 2: "</s>", IMAGE_TOKEN_ID: "<image>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(32064)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def layer_benchmark_parser(doc: str, tokens: str) -> argparse.ArgumentParser:
    """The options the linear-layer benchmarks share: dtype, token counts per call, repeats."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", default=tokens)
    parser.add_argument("--repeats", type=int, default=5)
    return parser
