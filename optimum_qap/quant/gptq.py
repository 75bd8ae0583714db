"""GPTQ weight quantization (Frantar et al. 2022, arXiv 2210.17323) into our `WeightCodes` format.

GPTQ quantizes the input channels (columns) of a linear weight one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``||X W^T - X Q^T||^2`` (H = 2/n X^T X). It follows the reference code (IST-DASLab/gptq) with these choices:

- Scales / zero points use exactly the conventions of `functional.quantize_weight`, so `dequantize_weight` of the
  returned codes is the weight GPTQ quantized to; with a diagonal Hessian (no error to spread) GPTQ equals RTN.
- Per-channel: one range per row, from the whole (original) row, as the reference does.
- Groups without ``act_order``: a group's range is taken when its first column is reached, from the weights as
  updated so far. The reference reads them from a copy refreshed only once per block, so a group starting inside a
  block misses that block's updates; we align blocks to groups instead, which makes the result independent of
  ``block_size`` (it equals the reference whenever every group starts a reference block, e.g. g128 with 128).
- Groups with ``act_order``: "static groups" (the reference's ``static_groups=True``): every contiguous group's range
  comes up front from the original weight, then columns are quantized in decreasing-H_ii order with those fixed
  ranges. Groups thus stay contiguous in the stored format (no ``g_idx`` permutation for kernels to handle).
- Dead input channels (H_ii == 0: the input is always zero) get weight 0 before ranges are taken, since their weight
  never reaches the output; the reference includes them in the per-channel range (only that case differs).
- A Hessian that is not positive definite after damping is retried with 10x the damping, up to 3 times (with a
  warning), then raises `torch.linalg.LinAlgError`; a non-finite Hessian raises `ValueError` at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .functional import WeightCodes, asymmetric_params, split_groups, symmetric_scale

DAMPING_RETRIES = 3


class HessianAccumulator:
    """Running GPTQ Hessian H = 2/n sum x x^T over the n input rows (tokens) seen so far, in float32.

    A running mean rather than a sum keeps the entries O(x^2) however many tokens are seen. The reference divides
    by the number of sequences instead of tokens; that only rescales H, which changes nothing in GPTQ.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.num_samples = 0
        self._hessian: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate the layer inputs ``inputs`` of shape [..., in_features]; H lives on their device."""
        x = inputs.detach().reshape(-1, self.in_features)
        if self._hessian is None:
            self._hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        total = self.num_samples + x.shape[0]
        if total == self.num_samples:
            return
        self._hessian.mul_(self.num_samples / total)
        x = x.to(self._hessian.device, torch.float32) * math.sqrt(2 / total)
        self._hessian.addmm_(x.T, x)
        self.num_samples = total

    @property
    def hessian(self) -> torch.Tensor:
        if self._hessian is None or self.num_samples == 0:
            raise RuntimeError("HessianAccumulator has seen no inputs")
        return self._hessian


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ codes and the float32 weight GPTQ quantized to (equal to dequantizing ``codes``)."""

    codes: WeightCodes
    dequantized: torch.Tensor


def run_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damping: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GPTQResult:
    """GPTQ of a [out, in] weight, computed in float32 on the weight's device.

    ``damping`` is the fraction of mean(diag H) added to the diagonal; ``act_order`` quantizes columns in decreasing
    H_ii order; ``block_size`` columns are updated lazily at once (speed only: the result does not depend on it).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight shape {tuple(weight.shape)}")
    if not (2 if symmetric else 1) <= bits <= 8:
        raise ValueError(f"unsupported bits={bits}")
    if group_size is not None and group_size >= in_features:
        group_size = None  # one group per row, as `split_groups` does
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(w.device, torch.float32, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    # ranges fixed up front (per-channel, static groups); otherwise filled in as each group starts
    scale, zero = _range_params(split_groups(w, group_size), bits, symmetric)
    dynamic_groups = group_size is not None and not act_order
    if dynamic_groups:
        block_size = max(1, block_size // group_size) * group_size  # whole groups per block, see module docstring
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(in_features)
    perm = perm.to(w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, damping)
    del h  # Hessian-sized (in² float32: 485 MB for a 7B down_proj) and not needed by the column loop
    group_of = (perm // group_size).tolist() if group_size is not None else [0] * in_features
    codes, quantized = torch.empty_like(w), torch.empty_like(w)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        block, errors, hinv_block = w[:, i1:i2].clone(), torch.empty_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if dynamic_groups and (i1 + i) % group_size == 0:
                s, z = _range_params(block[:, i : i + group_size], bits, symmetric)
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            column = block[:, i]
            codes[:, i1 + i], quantized[:, i1 + i] = _quantize_column(
                column, scale[:, g], zero[:, g] if zero is not None else None, bits
            )
            errors[:, i] = (column - quantized[:, i1 + i]) / hinv_block[i, i]
            # OBS update of the block's remaining columns (row i of the upper Cholesky factor of H^-1)
            block[:, i:] -= errors[:, i : i + 1] * hinv_block[i, i:]
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]  # lazy update of the columns after the block
    inverse = torch.argsort(perm)
    zero = zero.to(torch.uint8) if zero is not None else None
    return GPTQResult(WeightCodes(codes[:, inverse].to(torch.uint8), scale, zero), quantized[:, inverse])


def layer_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T): with H = 2/n X^T X this is 2/n ||X W^T - X Q^T||^2 (compare GPTQ with RTN)."""
    delta = weight.float() - quantized.to(weight.device, torch.float32)
    return float(((delta @ hessian.to(delta.device, torch.float32)) * delta).sum())


def _range_params(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (float, None if symmetric) of each range over the last dim, as `quantize_weight`."""
    if symmetric:
        return symmetric_scale(groups.abs().amax(-1), bits), None
    return asymmetric_params(groups.amin(-1), groups.amax(-1), bits)


def _quantize_column(
    column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes (as float) and dequantized values, with the exact operations of quantize/dequantize_weight."""
    if zero is None:
        offset = 2 ** (bits - 1)
        codes = torch.round(column / scale).clamp(-offset, offset - 1) + offset
        return codes, (codes - offset) * scale
    codes = (torch.round(column / scale) + zero).clamp(0, 2**bits - 1)
    return codes, (codes - zero) * scale


def _inverse_hessian_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, the GPTQ update rows."""
    if not torch.isfinite(h).all():
        raise ValueError("GPTQ Hessian has non-finite entries (inf/NaN layer inputs?)")
    mean_diagonal = torch.diag(h).mean()  # a contiguous copy sums in the reference's order: bitwise-equal results
    for attempt in range(DAMPING_RETRIES + 1):
        damped = h.clone()
        damped.diagonal().add_(damping * 10**attempt * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped  # each Hessian-sized temporary goes as soon as the next one exists: two fewer at the peak
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                if attempt:
                    warnings.warn(f"GPTQ Hessian needed damping {damping * 10**attempt:g}", stacklevel=3)
                return upper
    raise torch.linalg.LinAlgError(
        f"GPTQ Hessian is not positive definite even with damping {damping * 10**DAMPING_RETRIES:g}"
    )
