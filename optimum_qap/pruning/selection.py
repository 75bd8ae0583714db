"""Which vision tokens to keep: budget, top-K and conditional-DPP selection.

Selections are returned as sorted (ascending) index tensors so the kept tokens stay in their
original spatial order. All functions are deterministic: ties go to the lower index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A DPP marginal gain below this fraction of the largest diagonal entry is float32 noise: the
# remaining tokens are (numerically) in the span of the selected ones.
_DPP_GAIN_FLOOR = 1e-6


def resolve_budget(num_tokens: int, keep_ratio: float | None, keep_tokens: int | None) -> int:
    """Number of tokens to keep, in [1, num_tokens].

    `keep_tokens` wins when given (clamped to [1, num_tokens]); otherwise
    `keep_ratio * num_tokens` rounded half up (so 0.5 * 5 keeps 3, unlike Python's `round`).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if keep_tokens is not None:
        if keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        budget = keep_tokens
    elif keep_ratio is not None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        budget = math.floor(keep_ratio * num_tokens + 0.5)
    else:
        raise ValueError("one of keep_ratio or keep_tokens is required")
    return max(1, min(budget, num_tokens))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest `scores` (`[..., N]`, one row per image), sorted ascending: `[..., k]`.

    `torch.topk` does not specify which of equal scores it returns, so a stable descending sort
    is used instead: among equal scores the lower index is kept.
    """
    num_tokens = scores.shape[-1]
    if k >= num_tokens:
        return torch.arange(num_tokens, device=scores.device).expand(scores.shape)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values


def dpp_kernel(features: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Conditional DPP kernel L = diag(q) . cos_sim(features) . diag(q), `[N, N]` float32."""
    unit = F.normalize(features.float(), dim=-1)
    quality = quality.float()
    return quality[:, None] * (unit @ unit.T) * quality[None, :]


def dpp_greedy_indices(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the conditional DPP (CDPruner), sorted ascending.

    Fast greedy MAP inference (Chen et al., NeurIPS 2018): each step adds the token with the
    largest marginal gain d_j^2 = det(L_{S+j}) / det(L_S), kept up to date with an incremental
    Cholesky update (one `[N]` row per step, O(N k) memory), ties to the lower index.

    Once the largest gain falls below a numerical floor (the remaining tokens are zero-quality or
    in the span of the selected ones) the gains are noise, so the rest of the budget is filled by
    `quality`, highest first, ties to the lower index. The loop never synchronises with the device.

    Args:
        features: `[N, D]` features whose cosine similarity measures redundancy.
        quality: `[N]` non-negative per-token quality (CDPruner: relevance; QAPruner: fused score).
        k: number of tokens to keep; `k >= N` keeps all.

    Returns:
        `[min(k, N)]` distinct int64 indices, sorted ascending.
    """
    num_tokens = features.shape[0]
    device = features.device
    if k >= num_tokens:
        return torch.arange(num_tokens, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)

    kernel = dpp_kernel(features, quality)
    quality = quality.float()
    gains = kernel.diagonal().clone()
    floor = _DPP_GAIN_FLOOR * gains.max().clamp_min(torch.finfo(torch.float32).tiny)
    cholesky_rows = kernel.new_zeros(k, num_tokens)
    selected = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    exhausted = torch.zeros((), dtype=torch.bool, device=device)
    picks = []
    for step in range(k):
        masked_gains = gains.masked_fill(selected, -math.inf)
        best = masked_gains.argmax()  # argmax returns the first maximum: lower index on ties
        exhausted = exhausted | (masked_gains[best] <= floor)
        by_quality = quality.masked_fill(selected, -math.inf).argmax()
        pick = torch.where(exhausted, by_quality, best)
        # After exhaustion these updates are meaningless but stay finite (denominator >= floor).
        residual = kernel[pick] - cholesky_rows[:step, pick] @ cholesky_rows[:step]
        row = residual / gains[pick].clamp_min(floor).sqrt()
        cholesky_rows[step] = row
        gains = gains - row.square()
        selected[pick] = True
        picks.append(pick)
    return torch.sort(torch.stack(picks)).values


def outlier_slot_indices(
    semantic: torch.Tensor, outlier_strength: torch.Tensor, outlier_ratio: float, k: int, slots: int
) -> torch.Tensor:
    """Reserve up to ``slots`` of ``k`` for genuine outliers, fill the rest by semantic score; sorted ascending.

    ``outlier_strength`` is each token's range or quantization error relative to the calibrated median (1 means
    typical); a token is an outlier above ``outlier_ratio``. Strongest outliers first; a model without outliers
    reserves nothing and this is plain semantic top-K.
    """
    strength = outlier_strength.float()
    is_outlier = strength > outlier_ratio
    reserved = min(slots, k, int(is_outlier.sum()))
    chosen = torch.sort(strength, descending=True, stable=True).indices[:reserved]
    remaining = semantic.float().clone()
    remaining[chosen] = float("-inf")
    fill = torch.sort(remaining, descending=True, stable=True).indices[: k - reserved]
    return torch.sort(torch.cat((chosen, fill))).values
