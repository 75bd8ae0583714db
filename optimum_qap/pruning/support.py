"""Which multimodal models QAPruner can prune, and which `TokenPruner` each one gets.

Token pruning hooks the image path of a model: where its image features are made, how its placeholders are laid
out, and which positions the language model gets. That is known for LLaVA (one fixed grid of tokens per image) and
the any-resolution LLaVA models (anyres.py). Other image-text models (Qwen2-VL's multimodal RoPE, Gemma3's
bidirectional image attention, Mistral3's patch merger, PaliGemma's prefix, Idefics3's pixel shuffle) lay out
their tokens differently; they are refused with one clear error before their weights load, and can still be
quantized with pruning off.
"""

from __future__ import annotations

from torch import nn
from transformers import LlavaModel, LlavaNextModel, LlavaOnevisionModel

from .anyres import AnyResPruner
from .pruner import TokenPruner

PRUNERS: dict[type, type[TokenPruner]] = {
    LlavaModel: TokenPruner,
    LlavaNextModel: AnyResPruner,
    LlavaOnevisionModel: AnyResPruner,
}


def pruner_class(model: nn.Module) -> type[TokenPruner]:
    """The `TokenPruner` for ``model`` (a `*ForConditionalGeneration`); a clear error for models it cannot prune."""
    inner = getattr(model, "model", None)
    for base, pruner in PRUNERS.items():
        if isinstance(inner, base):
            return pruner
    supported = ", ".join(base.__name__.replace("Model", "ForConditionalGeneration") for base in PRUNERS)
    raise ValueError(
        f"QAPruner token pruning is not supported for {type(model).__name__} (supported: {supported}). "
        "Load it with QAPrunerConfig(keep_ratio=1.0) to quantize it without pruning."
    )
