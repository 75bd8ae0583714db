"""Pack unsigned integer codes of 2-8 bits densely into uint8 storage, and back.

Codes are packed along the last dimension. 4-bit codes take the fast nibble path; other widths pack eight
codes into ``bits`` bytes through a 64-bit word, which keeps 3-bit weights at 3/8 byte per element.
"""

from __future__ import annotations

import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# Bit pattern of 2**m for the 16-bit float dtypes with m explicit mantissa bits: OR-ing a code c < 2**m into it
# gives the float 2**m + c, so integer ops build float codes without a (slow, on CPU) int -> float conversion.
FLOAT_CODE_BASES = {torch.bfloat16: (0x4300, 2**7), torch.float16: (0x6400, 2**10)}


def packed_length(length: int, bits: int) -> int:
    """Number of uint8 bytes that hold ``length`` codes of ``bits`` bits (last dim padded to whole words)."""
    if bits == 8:
        return length
    if bits == 4:
        return (length + 1) // 2
    return (length + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any integer dtype) along the last dim into uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; supported widths are {SUPPORTED_BITS}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    length = codes.shape[-1]
    if bits == 4:
        if length % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        pairs = codes.unflatten(-1, (-1, 2))
        return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    pad = (-length) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    octets = codes.unflatten(-1, (-1, 8)).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (octets << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of the original last-dim ``length``."""
    if bits == 8:
        return packed
    if bits == 4 and sys.byteorder == "little":
        # each byte widened to 16 bits with its high nibble moved up a byte: read as bytes, the codes in order.
        # Integer ops on whole tensors, not a strided interleave (slow) or `out=` views (torch.compile cannot).
        wide = packed.to(torch.int16)
        return (wide << 4).bitwise_or_(wide).bitwise_and_(0x0F0F).view(torch.uint8)[..., :length]
    if bits == 4:
        return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :length]
    chunks = packed.unflatten(-1, (-1, bits)).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (chunks << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.flatten(-2)[..., :length]


def unpack_codes_as_float(packed: torch.Tensor, bits: int, length: int, dtype: torch.dtype):
    """Unpacked codes as a fresh float tensor of ``dtype`` holding ``code + offset``, and ``offset``.

    For 4-bit codes in bf16 / fp16 every byte becomes two 16-bit lanes ``base | code`` (see `FLOAT_CODE_BASES`):
    the float tensor is assembled by integer ops in its own storage, 2-3x faster on CPU than unpacking and then
    converting. Other widths and dtypes unpack and convert (offset 0).
    """
    if bits != 4 or dtype not in FLOAT_CODE_BASES or length % 2 or sys.byteorder != "little":
        return unpack_codes(packed, bits, length).to(dtype), 0
    base, offset = FLOAT_CODE_BASES[dtype]
    # byte b = high << 4 | low -> 32-bit word (high << 16 | low) | base pattern in both halves; b * 4097 equals
    # b | b << 12 since the two copies do not overlap
    lanes = packed.to(torch.int32).mul_(4097).bitwise_and_(0x000F000F).bitwise_or_(base << 16 | base)
    return lanes.view(dtype)[..., :length], offset
