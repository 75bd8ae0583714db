"""Quantized linear forward vs the bf16 nn.Linear it replaces, at LLaVA-7B layer shapes, per granularity.

qap rows run on the path `QuantLinear` picks (`kernels="auto"`: int4 weight-only kernel, int8 GEMM or simulated;
the path is printed per row) and, for reference, forced to the simulated path. Also times torchao's int4
weight-only and int8-dynamic-activation/int4-weight linears and optimum-quanto's int4-weight (with and without
int8 activations) when they are installed (`pip install -e ".[bench]"`). Ratios are measured side by side in one run.
Run: python benchmarks/linear.py --dtype bfloat16 --tokens 1,16,64,600
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_medians, layer_benchmark_parser, machine  # noqa: E402

from optimum_qap import QuantLinear, QuantSpec  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008))
GRANULARITIES = ("per_token", "per_group", "static_per_channel", "static_per_tensor")


def qap_layer(linear: nn.Linear, granularity: str, cache: bool = False, group_size: int | None = 128,
              kernels: str = "auto") -> QuantLinear:
    spec = QuantSpec(w_bits=4, w_group_size=group_size, a_bits=4, a_granularity=granularity)
    layer = QuantLinear.from_linear(linear, spec)
    layer.observe(torch.randn(64, linear.in_features, device=linear.weight.device))
    layer.cache_dequantized_weight(cache)
    layer.kernels = kernels
    return layer


def qap_layers(linear: nn.Linear) -> dict[str, QuantLinear]:
    layers = {f"qap {granularity}": qap_layer(linear, granularity) for granularity in GRANULARITIES}
    layers["qap per_token simulated"] = qap_layer(linear, "per_token", kernels="simulated")
    layers["qap per_token per-channel"] = qap_layer(linear, "per_token", group_size=None)
    layers["qap per_token cached"] = qap_layer(linear, "per_token", cache=True)
    return layers


def peer_layers(linear: nn.Linear) -> dict[str, nn.Module]:
    """Peers a user would pick instead, when installed."""
    peers = {}
    try:
        from optimum.quanto import qint4, qint8, quantize

        for name, activations in (("quanto w4", None), ("quanto w4a8", qint8)):
            wrapper = nn.Sequential(copy.deepcopy(linear))
            quantize(wrapper, weights=qint4, activations=activations)
            peers[name] = wrapper
    except Exception as error:  # noqa: BLE001 - a missing or incompatible peer is reported, not fatal
        peers["quanto w4a8"] = f"unavailable: {type(error).__name__}: {error}"[:160]
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        wrapper = nn.Sequential(copy.deepcopy(linear))
        if linear.weight.device.type == "cpu":
            # torchao's CPU int4 weight-only (the same _weight_int4pack_mm_for_cpu kernel) is a prototype config
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            quantize_(wrapper, PrototypeInt4WeightOnlyConfig(group_size=128))
        else:
            quantize_(wrapper, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        peers["torchao w4 weight-only"] = wrapper
    except Exception as error:  # noqa: BLE001
        peers["torchao w4 weight-only"] = f"unavailable: {type(error).__name__}: {error}"[:160]
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        wrapper = nn.Sequential(copy.deepcopy(linear))
        quantize_(
            wrapper, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(128))
        )
        peers["torchao w4a8-dyn"] = wrapper
    except Exception as error:  # noqa: BLE001
        peers["torchao w4a8-dyn"] = f"unavailable: {type(error).__name__}: {error}"[:160]
    return peers


def repeated(layer: nn.Module, x: torch.Tensor, count: int):
    def call():
        for _ in range(count):
            layer(x)

    return call


def main() -> None:
    parser = layer_benchmark_parser(__doc__, "1,16,64,600")
    parser.add_argument("--peers", action="store_true", help="also time optimum-quanto and torchao")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
            layers: dict[str, nn.Module | str] = dict(qap_layers(linear))
            if args.peers:
                layers.update(peer_layers(linear))
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(1, tokens, in_features, device=device, dtype=dtype)
                row = {"shape": f"{in_features}x{out_features}", "tokens": tokens,
                       "qap paths": {name: layer.matmul_path(x) for name, layer in layers.items()
                                     if isinstance(layer, QuantLinear)}}
                # a sample of short calls runs several of them, so that timer and scheduler noise stays small
                # next to differences of a few percent
                inner = max(1, 64 // tokens)
                calls = {"linear": repeated(linear, x, inner)}
                for name, layer in layers.items():
                    try:
                        if isinstance(layer, str):
                            raise RuntimeError(layer)
                        layer(x)
                        calls[name] = repeated(layer, x, inner)
                    except Exception as error:  # noqa: BLE001 - a failing peer is reported, not fatal
                        row[name] = str(error)[:160]
                # timed in turn within every repeat, so that drift falls on all of them alike
                medians = interleaved_medians(calls, args.repeats)
                row["linear_ms"] = medians["linear"] / inner * 1e3
                row.update({name: seconds / medians["linear"] for name, seconds in medians.items() if name != "linear"})
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({**machine(), "dtype": args.dtype, "unit": "time / nn.Linear time", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
