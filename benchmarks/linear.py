"""Quantized linear forward vs the bf16 nn.Linear it replaces, at LLaVA-7B layer shapes, per granularity.

Also times optimum-quanto's int4-weight/int8-activation linear and torchao's int8-dynamic-activation/int4-weight
when they are installed (`pip install -e ".[bench]"`). Ratios are measured side by side in one run.
Run: python benchmarks/linear.py --dtype bfloat16 --tokens 1,64,600
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median_seconds  # noqa: E402

from optimum_qap import QuantLinear, QuantSpec  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008))
GRANULARITIES = ("per_token", "per_group", "static_per_channel", "static_per_tensor")


def qap_layer(linear: nn.Linear, granularity: str, cache: bool) -> nn.Module:
    layer = QuantLinear.from_linear(linear, QuantSpec(w_bits=4, w_group_size=128, a_bits=4, a_granularity=granularity))
    layer.observe(torch.randn(64, linear.in_features, device=linear.weight.device))
    layer.cache_dequantized_weight(cache)
    return layer


def peer_layers(linear: nn.Linear) -> dict[str, nn.Module]:
    """Peers a user would pick instead, when installed."""
    peers = {}
    try:
        from optimum.quanto import qint4, qint8, quantize

        wrapper = nn.Sequential(copy.deepcopy(linear))
        quantize(wrapper, weights=qint4, activations=qint8)
        peers["quanto w4a8"] = wrapper
    except Exception as error:  # noqa: BLE001 - a missing or incompatible peer is reported, not fatal
        peers["quanto w4a8"] = f"unavailable: {type(error).__name__}: {error}"[:160]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", default="1,64,600")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", action="store_true", help="also time optimum-quanto and torchao")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
            layers: dict[str, nn.Module | str] = {}
            for granularity in GRANULARITIES:
                layers[f"qap {granularity}"] = qap_layer(linear, granularity, cache=False)
            layers["qap per_token cached"] = qap_layer(linear, "per_token", cache=True)
            if args.peers:
                layers.update(peer_layers(linear))
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(1, tokens, in_features, device=device, dtype=dtype)
                base = median_seconds(lambda linear=linear, x=x: linear(x), args.repeats)
                row = {"shape": f"{in_features}x{out_features}", "tokens": tokens, "linear_ms": base * 1e3}
                for name, layer in layers.items():
                    if isinstance(layer, str):
                        row[name] = layer
                        continue
                    try:
                        row[name] = median_seconds(lambda layer=layer, x=x: layer(x), args.repeats) / base
                    except Exception as error:  # noqa: BLE001
                        row[name] = f"failed: {type(error).__name__}: {error}"[:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({**machine(), "dtype": args.dtype, "unit": "time / nn.Linear time", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
