"""Fused CPU operations: the element-wise W4A4 steps as single compiled passes, bit for bit equal to the eager
PyTorch code in `functional` and `kernels` (``csrc/fused_cpu.cpp``; tests/test_fused.py compares them), and the
AMX integer GEMM for 4-bit weights (``csrc/amx_cpu.cpp``; tests/test_amx.py), built with them.

Eager, those steps are ~20 dispatched operations per call: at decode about 24 us beside a 4096x4096 int4 kernel
call of about 0.8 ms, enough to fall behind torchao's weight-only layer; over long prompts each is a pass over the
activations (`benchmarks/fused_ops.py`). The extension is compiled with
PyTorch's C++ extension builder at first use (a C++ compiler and ninja are needed; 10-15 s here, then cached under
``TORCH_EXTENSIONS_DIR``). Where it cannot be built, every caller keeps the eager code, with one warning.
``OPTIMUM_QAP_FUSED=0`` turns the fused ops off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from . import functional as qf

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("fused_cpu.cpp", "amx_cpu.cpp")]
# -ffp-contract=off: no fused multiply-add, so every float operation rounds as PyTorch's kernels round it.
# -march=native: built on the machine that runs it, for its vector units.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math"]

# the dtypes whose products PyTorch's CPU kernels compute in float32, as the fused dequantization does
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("OPTIMUM_QAP_FUSED", "1") != "0"


def machine_key() -> str:
    """Names one build per CPU feature set and torch version: the build uses every instruction of the machine that
    compiles it, so a cache shared by different machines (a home directory on a cluster) must not hand one's code to
    another, and it links against this torch (PyTorch's builder keys its cache on the sources and flags only)."""
    features = platform.machine() + torch.backends.cpu.get_cpu_capability() + torch.__version__
    with contextlib.suppress(OSError):
        features += next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(features.encode()).hexdigest()[:12]


def _build() -> object:
    from torch.utils import cpp_extension

    logger.info("optimum-qap: building the fused CPU ops (first use on this machine; cached afterwards)")
    cpp_extension.load(name=f"optimum_qap_fused_cpu_{machine_key()}", sources=[str(source) for source in SOURCES],
                       extra_cflags=CFLAGS, is_python_module=False, verbose=False)
    return torch.ops.optimum_qap


def ops():
    """The compiled operations (``torch.ops.optimum_qap``), built on first call; None where unavailable."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            try:
                _state["ops"] = _build() if enabled() else None
            except Exception as error:  # no compiler, no ninja, a read-only cache...: the eager code serves
                logger.warning("optimum-qap: fused CPU ops unavailable (%s: %s); using the eager PyTorch code, "
                               "which is slower at decode and on long inputs", type(error).__name__, error)
                _state["ops"] = None
    return _state["ops"]


def serves(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` can use the fused ops: a CPU tensor outside autograd and torch.compile (which
    fuses the eager code itself)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()) and ops() is not None)


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """`functional.fake_quant_per_token`, as one fused pass where served."""
    if not serves(x):
        return qf.fake_quant_per_token(x, bits, symmetric)
    return ops().fake_quant_rows(x.reshape(-1, x.shape[-1]), bits, symmetric).reshape(x.shape)


def fake_quant_per_group(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """`functional.fake_quant_per_group`, as one fused pass where served (groups that tile the channels)."""
    if not serves(x) or x.shape[-1] % group_size:
        return qf.fake_quant_per_group(x, bits, group_size, symmetric)
    return ops().fake_quant_rows(x.reshape(-1, group_size), bits, symmetric).reshape(x.shape)


def per_token_int8_codes(rows: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred per-token codes of ``rows`` [n, channels] as int8, and their float32 scales [n, 1]."""
    if not serves(rows):
        codes, scale = qf.per_token_codes(rows, bits, symmetric)
        return codes.to(torch.int8), scale
    return ops().int8_codes_rows(rows, bits, symmetric)


def scale_accumulated(accumulated: torch.Tensor, row_scale: torch.Tensor, column_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """``(float(accumulated) * row_scale) * column_scale`` in ``dtype``: the integer GEMM's epilogue."""
    if not serves(accumulated):
        return accumulated.float().mul_(row_scale).mul_(column_scale).to(dtype)
    return ops().scale_accumulated(accumulated, row_scale, column_scale, dtype)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      group_size: int | None, length: int) -> torch.Tensor | None:
    """The weight in ``scale.dtype`` from packed 4- or 8-bit codes in one pass, or None where not served
    (the caller then unpacks and dequantizes eagerly)."""
    # float64 scales: the eager code multiplies in float64, the fused op in float32
    if bits not in (4, 8) or scale.dtype not in FLOAT_DTYPES or not serves(packed):
        return None
    return ops().dequantize_packed(packed, scale, zero, bits, group_size or length, length)


def amx_available() -> bool:
    """Whether the AMX integer GEMM (``csrc/amx_cpu.cpp``) runs here: built for a CPU with AMX tiles and granted
    them by the OS (Linux, Sapphire Rapids or later)."""
    if "amx" not in _state:
        _state["amx"] = ops() is not None and bool(ops().amx_available())
    return _state["amx"]


@functools.cache
def amx_serves(in_features: int, out_features: int, group_size: int, a_group_size: int) -> bool:
    """Whether the AMX integer GEMM runs here for a 4-bit layer of this shape, weight group size and activation
    group size (in_features for per-channel weights and per-token activations): channels a multiple of 64, outputs
    of 32, groups of whole 64-channel tile rows, the larger group a multiple of the smaller, which tiles the
    kernel's 1024-channel blocks (or spans whole ones)."""
    return amx_available() and bool(ops().amx_serves(in_features, out_features, group_size, a_group_size))


def amx_int8_gemm(codes: torch.Tensor, code_scale: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                  zero: torch.Tensor | None, group_size: int, a_group_size: int, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """``codes [n, in]`` (centred int8, scales ``code_scale [n, in / a_group_size]``) times the packed 4-bit
    weight: int32 sums per weight and activation group, scaled in float32, in ``dtype`` (see
    `kernels.amx_int8_gemm`)."""
    return ops().amx_int8_gemm(codes, code_scale, packed, weight_scale, zero, group_size, a_group_size, bias, dtype)
