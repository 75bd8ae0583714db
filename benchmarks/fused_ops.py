"""The fused CPU ops against the eager PyTorch code they replace, side by side (`optimum_qap.quant.fused`).

Per op and size: microseconds of the eager code, of the fused op, and their ratio. Sizes: one 4096-channel token
(decode) and 600 of them (prefill) for the activation steps; a 512 x 4096 block and a whole 4096 x 4096 weight for
the dequantization. Both compute the same values bit for bit (tests/test_fused.py).
Run: python benchmarks/fused_ops.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, machine  # noqa: E402

from optimum_qap.quant import functional as qf  # noqa: E402
from optimum_qap.quant import fused  # noqa: E402
from optimum_qap.quant.linear import QuantLinear, QuantSpec  # noqa: E402
from optimum_qap.quant.packing import unpack_codes_as_float  # noqa: E402


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def cases(dtype: torch.dtype) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (eager, fused, calls per timing)."""
    torch.manual_seed(0)
    ops = fused.ops()
    token, prompt = torch.randn(1, 4096).to(dtype), torch.randn(600, 4096).to(dtype)
    accumulated = torch.randint(-2**15, 2**15, (600, 4096), dtype=torch.int32)
    row_scale, column_scale = torch.rand(600, 1), torch.rand(1, 4096)
    layer = QuantLinear.from_linear(nn.Linear(4096, 4096, dtype=dtype), QuantSpec())

    def dequantize(rows: slice):
        """What `QuantLinear.dequantized_weight(rows)` runs without and with the fused ops."""
        packed, scale, zero = layer.weight_packed[rows], layer.weight_scale[rows], layer.weight_zero[rows]

        def eager():
            codes, offset = unpack_codes_as_float(packed, 4, 4096, scale.dtype)
            return qf.dequantize_weight(codes, scale, zero, 4, 128, scale.dtype, offset)

        return eager, lambda: ops.dequantize_packed(packed, scale, zero, 4, 128, 4096)

    return {
        "activation rounding, 1 token": (lambda: qf.fake_quant_per_token(token, 4, False),
                                         lambda: ops.fake_quant_rows(token, 4, False), 200),
        "activation rounding, 600 tokens": (lambda: qf.fake_quant_per_token(prompt, 4, False),
                                            lambda: ops.fake_quant_rows(prompt, 4, False), 3),
        "int8 codes, 600 tokens": (lambda: qf.per_token_codes(prompt, 4, True)[0].to(torch.int8),
                                   lambda: ops.int8_codes_rows(prompt, 4, True), 3),
        "int32 -> float scaling, 600 x 4096": (
            lambda: accumulated.float().mul_(row_scale).mul_(column_scale).to(dtype),
            lambda: ops.scale_accumulated(accumulated, row_scale, column_scale, dtype), 3),
        "dequantization, 512 x 4096 block": (*dequantize(slice(0, 512)), 5),
        "dequantization, 4096 x 4096": (*dequantize(slice(None)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if fused.ops() is None:
        raise SystemExit("the fused CPU ops could not be built here (see the warning above)")
    rows = []
    with torch.inference_mode():
        for name, (eager, fast, calls) in cases(getattr(torch, args.dtype)).items():
            times = interleaved_medians({"eager": repeated(eager, calls), "fused": repeated(fast, calls)},
                                        args.repeats, warmup=2)
            eager_us, fused_us = (times[k] / calls * 1e6 for k in ("eager", "fused"))
            rows.append({"op": name, "eager_us": eager_us, "fused_us": fused_us,
                         "fused_over_eager": fused_us / eager_us})
            print(f"{name}: eager {eager_us:.1f} us, fused {fused_us:.1f} us", file=sys.stderr)
    print(json.dumps({**machine(), "dtype": args.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
