"""Pack unsigned integer codes of 2-8 bits densely into uint8 storage, and back.

Codes are packed along the last dimension. 4-bit codes take the fast nibble path; other widths pack eight
codes into ``bits`` bytes through a 64-bit word, which keeps 3-bit weights at 3/8 byte per element.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


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
    if bits == 4:
        # stacked rather than written through strided `out=` views, which torch.compile cannot trace
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
        return codes.flatten(-2)[..., :length]
    chunks = packed.unflatten(-1, (-1, bits)).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (chunks << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.flatten(-2)[..., :length]
