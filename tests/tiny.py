"""Tiny LLaVA models and processors built from configs (random weights, no download) for the tests."""

from __future__ import annotations

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE = 56
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
WORDS = [
    "USER",
    "ASSISTANT",
    ":",
    "what",
    "is",
    "in",
    "the",
    "image",
    "describe",
    "colors",
    "how",
    "many",
    "shapes",
    "are",
    "there",
    "?",
    ".",
    ",",
    "red",
    "green",
    "blue",
    "yes",
    "no",
    "left",
    "right",
    "top",
    "bottom",
    "circle",
    "square",
    "a",
    "an",
    "of",
    "picture",
    "objects",
    "where",
    "do",
    "you",
    "see",
    "and",
    "detail",
]
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
VOCAB = {token: index for index, token in enumerate((*SPECIALS, *dict.fromkeys(WORDS)))}
IMAGE_TOKEN_ID = VOCAB["<image>"]
PAD_TOKEN_ID = VOCAB["<pad>"]


def tiny_config(hidden: int = 64, layers: int = 2, vision_hidden: int = 32) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(VOCAB),
        max_position_embeddings=256,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(**kwargs)).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def gained_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    """A tiny LLaVA whose RMSNorm gains are not all 1 (random models start at 1, which would hide fusion bugs)."""
    model = tiny_llava(seed, **kwargs)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "language_model" in name and "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 + 0.1)
    return model


def word_tokenizer(single: str = "<s> $A", padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB; ``single`` is the template that adds its special tokens."""
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [(token, VOCAB[token]) for token in ("<s>", "</s>") if token in single]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
    )


def tiny_processor() -> LlavaProcessor:
    fast = word_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def save_tiny_clip(folder, vision_config: CLIPVisionConfig, seed: int = 0, text_positions: int = 32) -> CLIPModel:
    """Save a tiny CLIPModel whose vision tower has ``vision_config``'s shapes, with a word-level tokenizer that
    wraps text in <s> ... </s> (the text tower pools at </s>)."""
    torch.manual_seed(seed)
    text = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(VOCAB),
        max_position_embeddings=text_positions,
        projection_dim=24,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
    )
    vision = CLIPVisionConfig(**{**vision_config.to_dict(), "projection_dim": 24})
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)).eval()
    clip.save_pretrained(folder)
    word_tokenizer("<s> $A </s>", padding_side="right").save_pretrained(folder)
    return clip


def noise_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB noise image (PIL's effect_noise is not seeded)."""
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist()))


def save_tiny(folder, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> str:
    """Save a tiny LLaVA and its processor to ``folder`` (as a Hub repo would hold them)."""
    tiny_llava(seed, **kwargs).to(dtype).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return str(folder)
