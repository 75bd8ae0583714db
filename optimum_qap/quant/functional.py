"""Integer quantization math: group-wise weight codes and activation fake quantization.

Asymmetric ranges are widened to contain zero so that the zero point is an exact integer code (as integer
kernels need, and as GPTQ/AWQ do); an all-zero group then has a zero range and gets scale 1.
All math runs in float32 whatever the input dtype; results are cast back to the caller's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightCodes:
    """Unpacked weight codes of shape [out, in] and per-group scales / zero points of shape [out, groups]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def split_groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View the last dim as [groups, group_size]; a ragged tail is padded by repeating its last value.

    Repeating a value of the same group leaves its min, max and absolute max unchanged.
    """
    length = x.shape[-1]
    if group_size is None or group_size >= length:
        return x.unsqueeze(-2)
    pad = (-length) % group_size
    if pad:
        x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
    return x.unflatten(-1, (-1, group_size))


def merge_groups(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`split_groups`."""
    return x.flatten(-2)[..., :length]


# At decode every operation on the [tokens, 1] ranges costs more than its arithmetic (a dispatch of ~2 us, and the
# fused int4 kernel that follows slows down after each), so the range math below is written in few operations.


def float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, without dispatching a no-op cast when it already is."""
    return x if x.dtype == torch.float32 else x.float()


def unit_scale_where_empty(scale: torch.Tensor) -> torch.Tensor:
    """An empty range (scale 0) gets scale 1, so that its codes are 0 rather than NaN; NaN ranges stay NaN."""
    return scale.masked_fill_(scale == 0, 1.0)


def asymmetric_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [min(low, 0), max(high, 0)] with 2**bits codes.

    ``round(-low / scale)`` lies in ``[0, 2**bits - 1]`` without a clamp, since
    ``|min(low, 0)| <= max(high, 0) - min(low, 0)``.
    """
    low = float32(low).clamp(max=0)
    scale = unit_scale_where_empty(float32(high).clamp(min=0).sub_(low).div_(2**bits - 1))
    return scale, torch.div(low, scale).neg_().round_()


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale mapping [-absmax, absmax] onto the signed codes [-(2**(bits-1) - 1), 2**(bits-1) - 1]."""
    return unit_scale_where_empty(float32(absmax) / (2 ** (bits - 1) - 1))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> WeightCodes:
    """Round-to-nearest group-wise quantization of a [out, in] weight to unsigned codes in [0, 2**bits)."""
    groups = split_groups(weight.float(), group_size)
    if symmetric:
        scale = symmetric_scale(groups.abs().amax(-1), bits)
        offset = 2 ** (bits - 1)
        codes = torch.round(groups / scale.unsqueeze(-1)).clamp(-offset, offset - 1) + offset
        zero = None
    else:
        scale, zero = asymmetric_params(groups.amin(-1), groups.amax(-1), bits)
        codes = (torch.round(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
        zero = zero.to(torch.uint8)
    codes = merge_groups(codes, weight.shape[-1]).to(torch.uint8)
    return WeightCodes(codes=codes, scale=scale, zero=zero)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype,
    offset: int | None = None,
) -> torch.Tensor:
    """Weight in ``dtype`` from unsigned codes [out, in] and per-group scale / zero point [out, groups].

    ``offset``: ``codes`` is instead a fresh float tensor of ``scale.dtype`` holding ``code + offset``
    (`packing.unpack_codes_as_float`), which the dequantization overwrites.
    """
    groups = split_groups(codes, group_size)
    if offset is None:
        groups, offset = groups.to(scale.dtype), 0  # a fresh copy: the caller's codes stay integers
    center = (zero.to(scale.dtype).unsqueeze(-1) if zero is not None else 2 ** (bits - 1)) + offset
    # subtract first: (code + offset) - (zero + offset) is exact in any float dtype (small integers), so the
    # product rounds once. In place, because each out-of-place pass would allocate (and page-fault) another
    # weight-sized buffer: 3x slower on CPU.
    weight = groups.sub_(center).mul_(scale.unsqueeze(-1))
    return merge_groups(weight, codes.shape[-1]).to(dtype)


def float_copy(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``x`` that the code functions below round in place: an activation-sized buffer per
    elementwise step would cost more than the matmul it feeds, and PyTorch's CPU kernels that mix dtypes are
    slower than a cast followed by float32 kernels."""
    return x.to(torch.float32, copy=True)


def asymmetric_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, copied: bool = False):
    """Centred codes ``q - z`` (float32, exact integers) and scale of ``x`` over the asymmetric range [low, high];
    ``copied``: ``x`` is a float32 copy the rounding may overwrite."""
    scale, zero = asymmetric_params(low, high, bits)
    # add, clamp, subtract rather than one clamp to tensor bounds [-z, qmax - z]: equal, and 1.6x faster on CPU
    codes = (x if copied else float_copy(x)).div_(scale).round_().add_(zero).clamp_(0, 2**bits - 1)
    return codes.sub_(zero), scale


def symmetric_codes(x: torch.Tensor, absmax: torch.Tensor, bits: int, copied: bool = False):
    """Signed codes (float32, exact integers) and scale of ``x`` over the symmetric range [-absmax, absmax]."""
    scale = symmetric_scale(absmax, bits)
    limit = 2 ** (bits - 1) - 1
    return (x if copied else float_copy(x)).div_(scale).round_().clamp_(-limit - 1, limit), scale


def range_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool,
                copied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scale of ``x`` over the range [low, high] (broadcast against ``x``), symmetric or asymmetric."""
    if symmetric:
        return symmetric_codes(x, torch.maximum(low.abs(), high.abs()), bits, copied)
    return asymmetric_codes(x, low, high, bits, copied)


def fake_quant_range(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool):
    """Fake quantization of ``x`` over the range [low, high], symmetric or asymmetric."""
    codes, scale = range_codes(x, low, high, bits, symmetric)
    return codes.mul_(scale).to(x.dtype)


def per_token_codes(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic centred codes and scales with one range per vector along the last dim (a token's channels, or a
    group of them): what `fake_quant_per_token` and `fake_quant_per_group` round to."""
    x = float_copy(x)
    # two reductions, not `aminmax`: PyTorch's CPU aminmax over the last dim is 5x slower than amin plus amax
    return range_codes(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, symmetric, copied=True)


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic quantization with one range per token (last dim = channels)."""
    codes, scale = per_token_codes(x, bits, symmetric)
    return codes.mul_(scale).to(x.dtype)


def fake_quant_per_group(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Dynamic quantization with one range per token and per group of ``group_size`` channels."""
    codes, scale = per_token_codes(split_groups(x, group_size), bits, symmetric)
    return merge_groups(codes.mul_(scale).to(x.dtype), x.shape[-1])
