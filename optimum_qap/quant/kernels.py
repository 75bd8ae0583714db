"""Fast matmul paths for `QuantLinear`, each numerically tied to the simulated W4A4 reference.

- ``int4_weight_only``: PyTorch's fused int4 weight-only kernels (tinygemm on CUDA, its CPU port), fed the
  fake-quantized input. They read the packed weight directly, so weight-bound calls (decode) move a quarter of
  the bf16 bytes. The kernels dequantize as ``(q - 8) * scale + zero_float``; our integer zero point ``z`` maps
  to ``zero_float = (8 - z) * scale``, exact in float32 and rounded once to the activation dtype otherwise.
- ``int8_gemm``: a true integer GEMM (`torch._int_mm`, int8 tensor cores / AMX / VNNI) for per-channel weights
  with dynamic per-token activations. Integer accumulation is exact; only the final scaling rounds.
- ``amx_int8_gemm``: the same integer GEMM on CPU AMX tiles for group-wise and per-channel 4-bit weights with
  dynamic per-token or per-group activations (``csrc/amx_cpu.cpp``): the sums over each run of channels inside
  one weight group and one activation group exact in int32, scaled by the groups' scales in float32. It reads the
  packed codes the layer stores; the only kernel-format tensor is a float32 copy of the scales.

- ``simulated`` (the reference): dequantize, fake-quantize, dense matmul; outside autograd the weight is
  dequantized in cache-sized row blocks, one GEMM each (`matmul_in_row_blocks`).

On CPU the element-wise steps around these (activation codes, the integer GEMM's scaling, dequantization) run as
fused compiled passes that equal the eager code bit for bit (`optimum_qap.quant.fused`).

Kernel-format tensors are derived from the saved buffers at first use on a device (a one-time repack) and
never saved, so the on-disk format does not depend on the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import fused

KERNEL_MODES = ("auto", "simulated")
INT4_KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# Tokens per call from which the integer GEMM serves per-channel layouts (`torch._int_mm` on CUDA needs more
# than 16 rows), and up to which the int4 weight-only kernel beats dequantize + dense matmul; its cost grows
# linearly with the tokens. CPU values are measured at LLaVA-7B shapes, bf16, 1 thread, by
# benchmarks/crossover.py (docs/performance.md, "Path thresholds"): the integer GEMM overtakes the int4 kernel at
# about 4 tokens, and a decoder layer's seven linears take the same time on the int4 and simulated paths (blocked
# dequantization, fused CPU ops) at 21-22 (int4 5 % ahead at 20, simulated 7 % ahead at 24). The CUDA values are
# not measured yet (docs/performance-cuda.md).
INT8_MIN_TOKENS = {"cpu": 4, "cuda": 17}
# tokens per call from which the AMX integer GEMM serves its layouts (CPU only) where the int4 kernel could serve
# the call: over a decoder layer's seven linears (benchmarks/crossover.py, bf16, 1 thread) it costs about the same
# from 1 to 16 tokens (it centres every weight once per call; 15.6 ms) while int4 grows linearly (9.6 ms at 1
# token, 12.2 at 2, 17.0 at 4); it beats torch._int_mm on per-channel layouts at every measured size
AMX_MIN_TOKENS = {"cpu": 4}
# activation dtypes the AMX GEMM writes (it reads int8 codes, so any float model is served)
AMX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_MAX_TOKENS = {"cpu": 20, "cuda": 16}
# activation dtypes the int4 kernels serve: tinygemm on CUDA takes bf16 only; the CPU kernel takes fp32 and fp16
# too but runs them tens of times slower than bf16, far behind the simulated path, so those stay there
INT4_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.bfloat16,)}
# weight elements dequantized at once on the simulated path: 4 MB in bf16, which the GEMM reading the block finds
# in cache; a whole 4096x4096 weight at once costs as much again as the GEMM (written out, page-faulted, re-read)
DEQUANTIZE_BLOCK_ELEMENTS = 2**21
# where the simulated path dequantizes in blocks: on a GPU a whole-weight dequantization is cheap next to the
# kernel launches of a dozen blocks (not measured there: the blocks were built for CPU caches)
ROW_BLOCK_DEVICES = ("cpu",)


def int4_kernel_group_size(in_features: int, group_size: int | None, out_features: int) -> int | None:
    """Group size the int4 kernels can run this layer with (per-channel scales are repeated per group), or None."""
    if out_features % 16:
        return None
    if group_size is not None:
        return group_size if group_size in INT4_KERNEL_GROUP_SIZES and in_features % group_size == 0 else None
    return next((size for size in INT4_KERNEL_GROUP_SIZES if in_features % size == 0), None)


def int4_scale_and_zero(
    scale: torch.Tensor, zero: torch.Tensor | None, bits: int, repeat: int, dtype: torch.dtype
) -> torch.Tensor:
    """The kernels' [groups, out, 2] (scale, float zero) table from per-group ``scale`` and integer ``zero``.

    Codes are unsigned; a symmetric layer's implicit zero point is ``2**(bits-1)`` = 8, which gives zero 0.
    """
    scale = scale.float()
    center = zero.float() if zero is not None else torch.full_like(scale, 2 ** (bits - 1))
    table = torch.stack((scale, (8 - center) * scale), dim=-1).repeat_interleave(repeat, dim=1)
    return table.transpose(0, 1).contiguous().to(dtype)


def pack_int4_for_kernel(codes: torch.Tensor) -> torch.Tensor:
    """Repack unsigned 4-bit codes [out, in] into the layout of the int4 kernel of ``codes.device``."""
    if codes.device.type == "cuda":
        # tinygemm takes bytes holding (even k) << 4 | (odd k), then tiles them
        pairs = codes.unflatten(-1, (-1, 2))
        nibbles = (pairs[..., 0] << 4 | pairs[..., 1]).contiguous()
        inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[-1] % (t * 16) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def int4_weight_only_matmul(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor
) -> torch.Tensor:
    """``x [..., in] @ W.T`` with the kernel-packed int4 weight; ``x`` is already (fake-)quantized."""
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(rows, packed, group_size, scale_and_zero)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group_size, scale_and_zero)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def matmul_in_row_blocks(rows: torch.Tensor, weight_rows: Callable[[slice], torch.Tensor], out_features: int,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """``rows [n, in] @ W.T + bias`` where ``weight_rows(block)`` dequantizes a block of W's rows: one GEMM per
    block of output columns, each `nn.functional.linear`'s addmm (the bias added inside it), written in place.
    A layer of up to `DEQUANTIZE_BLOCK_ELEMENTS` weights is one block, the whole GEMM; larger ones may round
    differently from one whole GEMM, as any two GEMM shapes may (oneDNN picks its blocking by shape)."""
    block = max(16, DEQUANTIZE_BLOCK_ELEMENTS // rows.shape[-1] // 16 * 16)
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)
    for start in range(0, out_features, block):
        columns = slice(start, min(start + block, out_features))
        weight = weight_rows(columns)
        if bias is None:
            torch.mm(rows, weight.t(), out=out[:, columns])
        else:
            torch.addmm(bias[columns].to(rows.dtype), rows, weight.t(), out=out[:, columns])
    return out


def codes_fit_int8(w_bits: int, w_symmetric: bool, a_bits: int, a_symmetric: bool) -> bool:
    """Whether centred weight and activation codes fit int8 (asymmetric codes minus their zero point span
    2**bits - 1 values either side of 0)."""
    def fits(bits: int, symmetric: bool) -> bool:
        return bits <= (8 if symmetric else 7)

    return fits(w_bits, w_symmetric) and fits(a_bits, a_symmetric)


def int8_gemm_supported(w_bits: int, w_symmetric: bool, a_bits: int, a_granularity: str, a_symmetric: bool) -> bool:
    """Whether the integer GEMM serves these codes: per-token activations, codes that fit int8 (per-channel weights
    assumed; `torch._int_mm` also needs both matrix sizes to be multiples of 8 on CUDA, which `QuantLinear`
    checks)."""
    return a_granularity == "per_token" and codes_fit_int8(w_bits, w_symmetric, a_bits, a_symmetric)


def amx_activation_group(a_granularity: str, a_group_size: int, in_features: int) -> int | None:
    """Channels sharing one activation scale on the AMX GEMM (dynamic activations only), or None."""
    if a_granularity == "per_token":
        return in_features
    if a_granularity == "per_group" and in_features % a_group_size == 0:
        return a_group_size
    return None


def centered_weight_codes(codes: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Signed int8 ``q - z`` [out, in] for per-channel codes (``zero`` [out, 1], or the symmetric offset)."""
    center = zero.to(torch.int16) if zero is not None else 2 ** (bits - 1)
    return (codes.to(torch.int16) - center).to(torch.int8)


def int8_gemm(
    x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """W4A4 as an integer GEMM: per-token activation codes times per-channel weight codes ([out, in] int8),
    accumulated exactly in int32 and scaled once in float32 (``weight_scale``: float32 [1, out]); returns
    ``x.dtype``."""
    codes, scale = fused.per_token_int8_codes(x.reshape(-1, x.shape[-1]), bits, symmetric)
    out = fused.scale_accumulated(torch._int_mm(codes, weight_codes.t()), scale, weight_scale, x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def amx_int8_gemm(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero: torch.Tensor | None,
                  group_size: int, a_group_size: int, a_bits: int, a_symmetric: bool,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """W4A4 on AMX tiles: dynamic activation codes (one scale per ``a_group_size`` channels of a token) times the
    packed 4-bit weight (centred by ``zero``, or by 8 where symmetric); the int32 sums of each run of channels
    inside one weight group and one activation group are scaled in float32 by both groups' scales (``weight_scale``:
    float32 [out, groups]) and accumulated; ``bias`` added in float32; returns ``x.dtype``."""
    in_features = x.shape[-1]
    codes, scale = fused.per_token_int8_codes(x.reshape(-1, a_group_size), a_bits, a_symmetric)
    codes, scale = codes.reshape(-1, in_features), scale.reshape(-1, in_features // a_group_size)
    out = fused.amx_int8_gemm(codes, scale, packed, weight_scale, zero, group_size, a_group_size, bias, x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
