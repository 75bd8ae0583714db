"""Per-token scores for vision-token pruning.

Quantization sensitivity (QAPruner, arXiv 2604.02816), semantic relevance ([CLS] attention as in
FasterVLM/VisionZip, instruction relevance as in CDPruner, arXiv 2506.10967) and their fusion.

Every function accepts fp32/fp16/bf16 inputs on any device, computes in float32 and returns float32
scores on the input's device. The token axis is the last axis of the returned scores, so leading
batch axes are allowed wherever the docstring says `...`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Keeps an all-zero group from dividing by zero; the scale stays exactly 0 so its error is 0.
_SCALE_EPS = 1e-8


class SensitivityScores(NamedTuple):
    """Quantization sensitivity of each token, every field min-max normalised over the tokens."""

    error: torch.Tensor
    """E'_i: normalised L2 error of simulated group-wise quantization."""
    range: torch.Tensor
    """R'_i: normalised channel range (outlier intensity)."""
    sensitivity: torch.Tensor
    """S^Q_i = error_weight * E'_i + range_weight * R'_i."""


def minmax_normalize(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rescale `scores` to [0, 1] along `dim`: (x - min) / (max - min).

    A slice whose values are all equal carries no ranking information, so it maps to zeros rather
    than NaN (an epsilon in the denominator, as in CDPruner, would also shrink every real range).
    """
    scores = scores.float()
    low = scores.amin(dim=dim, keepdim=True)
    spread = scores.amax(dim=dim, keepdim=True) - low
    normalized = (scores - low) / spread.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(spread > 0, normalized, torch.zeros_like(normalized))


def group_quant_error(tokens: torch.Tensor, group_size: int = 128, bits: int = 4) -> torch.Tensor:
    """E_i = ||v_i - Q(v_i)||_2 under symmetric group-wise fake quantization.

    Per group of `group_size` channels: s = max|v_g| / (2^(bits-1) - 1),
    Q(v_g) = round(v_g / (s + eps)) * s (round half to even, as `torch.round`).

    Args:
        tokens: `[..., N, D]` token embeddings (the paper scores the projector outputs).
        group_size: channels per quantization group. When D is not a multiple, the last group is
            shorter; it is zero-padded, which changes neither its max-abs nor its error.
        bits: simulated bit width, at least 2.

    Returns:
        `[..., N]` float32 errors (not normalised).
    """
    if bits < 2:
        raise ValueError(f"bits must be >= 2 for a symmetric quantizer, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    tokens = tokens.float()
    # a group wider than the token is the whole token (zero padding changes neither absmax nor error): no blow-up
    group_size = min(group_size, tokens.shape[-1])
    padding = -tokens.shape[-1] % group_size
    if padding:
        tokens = F.pad(tokens, (0, padding))
    groups = tokens.unflatten(-1, (-1, group_size))
    scale = groups.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    dequantized = torch.round(groups / (scale + _SCALE_EPS)) * scale
    return (groups - dequantized).flatten(-2).norm(dim=-1)


def channel_range(tokens: torch.Tensor) -> torch.Tensor:
    """R_i = max_j v_ij - min_j v_ij over the D channels of each token: `[..., N, D]` -> `[..., N]`."""
    tokens = tokens.float()
    return tokens.amax(dim=-1) - tokens.amin(dim=-1)


def quantization_sensitivity(
    tokens: torch.Tensor,
    group_size: int = 128,
    bits: int = 4,
    error_weight: float = 0.5,
    range_weight: float = 0.5,
) -> SensitivityScores:
    """Hybrid quantization sensitivity S^Q of each token (QAPruner).

    E and R are min-max normalised over the N tokens of each image before being mixed, so both
    terms live on the same [0, 1] scale whatever the embedding magnitude.

    Args:
        tokens: `[..., N, D]` tokens of one image (or a batch of images along the leading axes).
        group_size, bits: the simulated quantizer, see `group_quant_error`.
        error_weight, range_weight: mixing weights of E' and R' (the paper uses 0.5 / 0.5).
    """
    error = minmax_normalize(group_quant_error(tokens, group_size=group_size, bits=bits))
    value_range = minmax_normalize(channel_range(tokens))
    return SensitivityScores(
        error=error,
        range=value_range,
        sensitivity=error_weight * error + range_weight * value_range,
    )


def fuse_scores(semantic: torch.Tensor, sensitivity: torch.Tensor, alpha: float) -> torch.Tensor:
    """S = alpha * S^P + (1 - alpha) * S^Q; alpha = 1 is the plain semantic pruner."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * semantic.float() + (1.0 - alpha) * sensitivity.float()


def encoder_layer_index(vision_feature_layer: int, num_hidden_layers: int) -> int:
    """Index into `encoder.layers` of the CLIP layer whose output is `hidden_states[vision_feature_layer]`.

    `CLIPVisionModel` records `num_hidden_layers + 1` hidden states: `hidden_states[0]` is the input
    of `layers[0]` (after `pre_layrnorm`) and `hidden_states[i]` is the output of `layers[i - 1]`,
    i.e. the input of `layers[i]`. So LLaVA's default feature layer -2 is produced by `layers[-2]`,
    whose input is `hidden_states[-3]`; that layer's [CLS] attention is the FasterVLM/VisionZip
    score (`attentions[-2]`).
    """
    num_states = num_hidden_layers + 1
    if not -num_states <= vision_feature_layer < num_states:
        raise IndexError(f"vision_feature_layer {vision_feature_layer} out of range for {num_states} states")
    state = vision_feature_layer % num_states
    if state == 0:
        raise ValueError("hidden_states[0] is the embedding output; no encoder layer produces it")
    return state - 1


def cls_attention_row(
    layer_input: torch.Tensor, encoder_layer: nn.Module, num_heads: int | None = None
) -> torch.Tensor:
    """Head-averaged [CLS] -> patch attention of one CLIP encoder layer, not normalised.

    Only the [CLS] query row is recomputed from the layer's own `layer_norm1`, `q_proj` and
    `k_proj`, so the tower can run SDPA/flash attention (which never materialise the weights) and
    the cost is one extra key projection instead of eager attention for the whole tower.

    Args:
        layer_input: `[B, 1 + N, C]` hidden state entering `encoder_layer` ([CLS] first), e.g.
            `hidden_states[-3]` for `layers[-2]`, see `encoder_layer_index`.
        encoder_layer: a `CLIPEncoderLayer` (anything with `layer_norm1` and a `self_attn` holding
            `q_proj`, `k_proj`, `num_heads` and `scale`).
        num_heads: overrides `encoder_layer.self_attn.num_heads`.

    Returns:
        `[B, N]` float32 softmax probabilities (softmax over all 1 + N keys, [CLS] column dropped,
        mean over heads): equal to eager `attentions[layer][:, :, 0, 1:].mean(1)`.
    """
    attention = encoder_layer.self_attn
    num_heads = num_heads or attention.num_heads
    hidden = encoder_layer.layer_norm1(layer_input)
    batch, seq_len, _ = hidden.shape
    # [B, H, 1, d] and [B, H, S, d]; float32 before the dot product so fp16 logits cannot overflow
    query = attention.q_proj(hidden[:, :1]).float().view(batch, 1, num_heads, -1).transpose(1, 2)
    key = attention.k_proj(hidden).float().view(batch, seq_len, num_heads, -1).transpose(1, 2)
    scale = getattr(attention, "scale", query.shape[-1] ** -0.5)
    probs = torch.softmax((query @ key.transpose(-1, -2)) * scale, dim=-1)
    return probs[:, :, 0, 1:].mean(dim=1)


def cls_attention_scores(
    layer_input: torch.Tensor, encoder_layer: nn.Module, num_heads: int | None = None
) -> torch.Tensor:
    """Semantic score S^P from [CLS] attention: `cls_attention_row` min-max normalised per image, `[B, N]`."""
    return minmax_normalize(cls_attention_row(layer_input, encoder_layer, num_heads=num_heads))


def instruction_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """CDPruner instruction relevance: mean cosine similarity to the instruction tokens, min-max normalised.

    Args:
        image_embeds: `[..., N, D]` visual tokens.
        text_embeds: `[T, D]` instruction tokens in the same space.
        negate: use the negated similarity before normalising. CDPruner's released LLaVA code does
            this (`(-relevance).mean(-1)`, see Theia-4869/CDPruner issues #9, #14, #22), reporting
            it works better for LLaVA's CLIP; the paper's formula is the un-negated one (default).

    Returns:
        `[..., N]` float32 relevance in [0, 1].
    """
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    relevance = (image @ text.transpose(-1, -2)).mean(dim=-1)
    return minmax_normalize(-relevance if negate else relevance)
