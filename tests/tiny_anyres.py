"""Tiny LLaVA-NeXT and LLaVA-OneVision models (any-resolution tiles plus `image_newline`) and their processors,
built from configs with random weights, over tests/tiny.py's vocabulary."""

from __future__ import annotations

import re

import tiny
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    SiglipVisionConfig,
)

import optimum_qap

TILE = 28
PATCH = 7
TILE_TOKENS = (TILE // PATCH) ** 2  # 16 per tile
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
# (height, width): wide, tall and square images give different grids, unpadding and token counts
IMAGE_SIZES = [(30, 60), (64, 40), (50, 50)]


def _vision(tower: str):
    shapes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=TILE, patch_size=PATCH)
    return SiglipVisionConfig(**shapes) if tower == "siglip" else CLIPVisionConfig(**shapes, projection_dim=32)


def _text():
    return tiny.tiny_config().text_config


def next_config(tower: str = "siglip") -> LlavaNextConfig:
    # SigLIP has no [CLS]: every patch is a feature ("full"); CLIP drops its [CLS] ("default"), as llava-v1.6 does
    return LlavaNextConfig(
        vision_config=_vision(tower),
        text_config=_text(),
        image_token_id=tiny.IMAGE_TOKEN_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
        image_seq_length=TILE_TOKENS,
    )


def onevision_config(tower: str = "siglip") -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=_vision(tower),
        text_config=_text(),
        image_token_id=tiny.IMAGE_TOKEN_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
        # a 2x2 grid (64 high-res tokens) exceeds 1.1 x 2 tiles: OneVision interpolates it down, as anyres_max_9
        # does with large images
        vision_aspect_ratio="anyres_max_2",
    )


def _image_processor(cls):
    return cls(size={"height": TILE, "width": TILE}, crop_size={"height": TILE, "width": TILE},
               image_grid_pinpoints=PINPOINTS, do_center_crop=False)


def next_processor(tower: str = "siglip") -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=_image_processor(LlavaNextImageProcessorPil),
        tokenizer=tiny.word_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy=next_config(tower).vision_feature_select_strategy,
        num_additional_image_tokens=0 if tower == "siglip" else 1,
    )


class OnevisionImageTextProcessor:
    """Images and text for the tiny OneVision model. `LlavaOnevisionProcessor` cannot be built here (its video
    processor needs torchvision), so each image's placeholders are expanded to the number of features the model
    itself packs for it."""

    def __init__(self, model: LlavaOnevisionForConditionalGeneration):
        self.model = model
        self.image_processor = _image_processor(LlavaOnevisionImageProcessorPil)
        self.tokenizer = tiny.word_tokenizer()

    def __call__(self, images, text, return_tensors="pt", padding=True):
        pixels = self.image_processor(images, return_tensors="pt")
        with torch.no_grad(), optimum_qap.pruning_disabled(self.model):
            device = self.model.device
            features = self.model.model.get_image_features(
                pixels["pixel_values"].to(device, self.model.dtype), pixels["image_sizes"].to(device),
                batch_num_images=pixels.get("batch_num_images"),
            )
        counts = iter(len(f) for f in features.pooler_output)
        expanded = [re.sub("<image>", lambda _: " <image>" * next(counts) + " ", prompt) for prompt in text]
        tokens = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        return {**tokens, **pixels}


def save(folder, kind: str = "next", seed: int = 0) -> str:
    """Save a tiny LLaVA-NeXT ("next": SigLIP, "next-clip": CLIP, with processor) or OneVision ("onevision";
    "onevision-clip" has a CLIP tower)."""
    torch.manual_seed(seed)
    if kind.startswith("onevision"):
        model = LlavaOnevisionForConditionalGeneration(onevision_config("clip" if kind.endswith("clip") else "siglip"))
    else:
        tower = "clip" if kind == "next-clip" else "siglip"
        model = LlavaNextForConditionalGeneration(next_config(tower))
        next_processor(tower).save_pretrained(folder)
    model.generation_config.pad_token_id = tiny.PAD_TOKEN_ID
    model.save_pretrained(folder)
    return str(folder)


def processor_for(model, folder):
    """The processor of a model `save` wrote."""
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return OnevisionImageTextProcessor(model)
    return LlavaNextProcessor.from_pretrained(folder)


def images(sizes=IMAGE_SIZES, seed: int = 0):
    return [tiny.noise_image(seed + i, max(h, w)).crop((0, 0, w, h)) for i, (h, w) in enumerate(sizes)]
