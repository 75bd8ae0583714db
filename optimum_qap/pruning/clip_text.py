"""CDPruner's original instruction relevance: CLIP's text tower and image projection, which LLaVA does not ship.

LLaVA keeps only CLIP's vision tower. CDPruner compares the instruction, encoded by CLIP's text tower, with the
vision tower's feature-layer patches mapped into the joint space by CLIP's `post_layernorm` and
`visual_projection`. `ClipTextRelevance` loads just those parts from a CLIP checkpoint: the text tower and a vision
model with no encoder layers (embeddings, the two layer norms and the projection; the layer weights are skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from .scoring import instruction_relevance


@contextlib.contextmanager
def _quiet_load_reports() -> Iterator[None]:
    # loading parts of a CLIPModel checkpoint reports every weight of the other parts as unexpected
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


class ClipTextRelevance(nn.Module):
    """Instruction relevance of visual tokens in CLIP's joint image-text space (CDPruner, arXiv 2506.10967).

    Example:
        >>> clip = ClipTextRelevance.from_pretrained("openai/clip-vit-large-patch14-336", dtype=torch.bfloat16)
        >>> clip.relevance(patches, "What is on the table?")   # patches: [N, 1024] feature-layer outputs
    """

    def __init__(self, tokenizer, text_model: nn.Module, post_layernorm: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_model = text_model
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection

    @classmethod
    def from_pretrained(cls, repo: str, dtype: torch.dtype | None = None, **hub_kwargs) -> ClipTextRelevance:
        with _quiet_load_reports():
            tokenizer = AutoTokenizer.from_pretrained(repo, **hub_kwargs)
            text = CLIPTextModelWithProjection.from_pretrained(repo, dtype=dtype, **hub_kwargs)
            vision = CLIPVisionModelWithProjection.from_pretrained(repo, dtype=dtype, num_hidden_layers=0, **hub_kwargs)
        return cls(tokenizer, text.eval(), vision.vision_model.post_layernorm, vision.visual_projection).eval()

    @property
    def vision_hidden_size(self) -> int:
        return self.post_layernorm.normalized_shape[0]

    @torch.no_grad()
    def image_embeds(self, patches: torch.Tensor) -> torch.Tensor:
        """`[..., N, C]` vision-tower patches -> `[..., N, P]` embeddings in the joint space."""
        weight = self.visual_projection.weight
        return self.visual_projection(self.post_layernorm(patches.to(weight.device, weight.dtype)))

    @torch.no_grad()
    def text_embeds(self, text: str) -> torch.Tensor:
        """`[S, P]`: one embedding per window of the text tower's context (77 tokens for CLIP), so long
        instructions are read whole rather than truncated."""
        inputs = self.tokenizer(
            text,
            truncation=True,
            max_length=self.text_model.config.max_position_embeddings,
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
        )
        device = self.visual_projection.weight.device
        return self.text_model(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        ).text_embeds

    def relevance(self, patches: torch.Tensor, text: str) -> torch.Tensor:
        """`[N]` float32 relevance of one image's patches to ``text``, min-max normalised, on the patches' device."""
        relevance = instruction_relevance(self.image_embeds(patches), self.text_embeds(text))
        return relevance.to(patches.device)
