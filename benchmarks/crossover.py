"""Where the path thresholds of `QuantLinear` come from: every path a layout can take, forced, per token count.

At LLaVA-7B layer shapes: the default group-wise layout on the int4 kernel and on the simulated path, and the
per-channel layout on the int4 kernel, the integer GEMM and the simulated path, against the bf16 `nn.Linear`.
`kernels.INT4_MAX_TOKENS` is where int4 stops beating simulated over a decoder layer's seven linears (four of
4096x4096, two 4096x11008, one 11008x4096); `kernels.INT8_MIN_TOKENS` is where the integer GEMM overtakes int4;
`kernels.AMX_MIN_TOKENS` is where the AMX integer GEMM (CPUs with AMX tiles) overtakes both.
Run: python benchmarks/crossover.py --tokens 1,2,4,8,16,32,64,96,128 --dtype bfloat16
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, layer_benchmark_parser, machine  # noqa: E402
from linear import qap_layer, repeated  # noqa: E402

from optimum_qap.quant import kernels  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
LAYER_COUNTS = {"4096x4096": 4, "4096x11008": 2, "11008x4096": 1}  # linears of one decoder layer


@contextlib.contextmanager
def forced(path: str, device: str):
    """Thresholds set so that every call takes ``path`` where its layout allows it."""
    tables = (kernels.INT4_MAX_TOKENS, kernels.INT8_MIN_TOKENS, kernels.AMX_MIN_TOKENS)
    saved = [table.get(device) for table in tables]
    kernels.INT4_MAX_TOKENS[device] = 2**31 if path == "int4_weight_only" else 0
    kernels.INT8_MIN_TOKENS[device] = 1 if path == "int8_gemm" else 2**31
    kernels.AMX_MIN_TOKENS[device] = 1 if path == "amx_int8_gemm" else 2**31
    try:
        yield
    finally:
        for table, value in zip(tables, saved, strict=True):
            if value is None:
                table.pop(device)
            else:
                table[device] = value


def time_paths(linear: nn.Linear, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per call of bf16 and of each (layout, path) pair the layout can take."""
    device = x.device.type
    inner = max(1, 64 // (x.numel() // x.shape[-1]))
    layouts = {"group 128": qap_layer(linear, "per_token"),
               "per-channel": qap_layer(linear, "per_token", group_size=None)}
    choices = [("group 128", "int4_weight_only"), ("group 128", "amx_int8_gemm"), ("group 128", "simulated"),
               ("per-channel", "int4_weight_only"), ("per-channel", "int8_gemm"), ("per-channel", "amx_int8_gemm"),
               ("per-channel", "simulated")]
    seconds = {"linear": interleaved_medians({"linear": repeated(linear, x, inner)}, repeats)["linear"] / inner}
    for layout, path in choices:
        layer = layouts[layout]
        layer.kernels = "simulated" if path == "simulated" else "auto"
        with forced(path, device):
            taken = layer.matmul_path(x)
            if taken != path:
                continue
            pair = {"linear": repeated(linear, x, inner), "layer": repeated(layer, x, inner)}
            try:
                medians = interleaved_medians(pair, repeats)
            except RuntimeError:  # a kernel's own limit, e.g. torch._int_mm on CUDA needs more than 16 rows
                continue
            seconds[f"{layout} {path}"] = medians["layer"] / medians["linear"] * seconds["linear"]
    return seconds


def main() -> None:
    parser = layer_benchmark_parser(__doc__, "1,2,4,8,16,32,64,96,128")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(1, tokens, in_features, device=device, dtype=dtype)
                row = {"shape": f"{in_features}x{out_features}", "tokens": tokens,
                       **{name: value * 1e3 for name, value in time_paths(linear, x, args.repeats).items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    layer_ms = {}  # one decoder layer's seven linears, per (layout, path) and token count
    for row in rows:
        for name, ms in row.items():
            if name not in ("shape", "tokens"):
                key = (name, row["tokens"])
                layer_ms[key] = layer_ms.get(key, 0.0) + LAYER_COUNTS[row["shape"]] * ms
    decoder_layer = [{"tokens": tokens, **{name: ms for (name, t), ms in layer_ms.items() if t == tokens}}
                     for tokens in map(int, args.tokens.split(","))]
    print(json.dumps({**machine(), "dtype": args.dtype, "unit": "ms per call", "rows": rows,
                      "decoder_layer_ms": decoder_layer,
                      "thresholds": {"INT4_MAX_TOKENS": kernels.INT4_MAX_TOKENS,
                                     "INT8_MIN_TOKENS": kernels.INT8_MIN_TOKENS,
                                     "AMX_MIN_TOKENS": kernels.AMX_MIN_TOKENS}}, indent=2))


if __name__ == "__main__":
    main()
