"""GPTQ over a whole LLaVA language model, one decoder layer at a time (memory stays bounded on a 7B model).

The calibration samples run through the model once, up to the first decoder layer, whose inputs are kept. Then
for each layer: the caller prepares it (the quantizer rotates it here, once the layers before it are quantized:
one layer's rotated float weights exist at a time), hooks accumulate the Hessian of every selected linear's input
(after its online rotation, so GPTQ sees what the quantizer sees), GPTQ quantizes each weight against its
Hessian, the layer is swapped for its quantized version, and the kept inputs are run through it to become the
next layer's inputs. Only one layer's Hessians exist at a time; inputs propagate through quantized weights, as in
the GPTQ reference.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from ..calibration import model_inputs
from ..progress import progress_bar
from ..quant import functional as qf
from ..quant.gptq import HessianAccumulator, layer_output_error, run_gptq
from ..quant.linear import QuantLinear, observing_inputs


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer is needed."""


def capture_layer_inputs(model: nn.Module, processor, samples: list[dict], layer: nn.Module) -> list[tuple]:
    """(args, kwargs) of ``layer``'s forward for every sample, without running the model past it."""
    from ..pruning.patch import pruning_disabled

    captured = []

    def capture(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with pruning_disabled(model):
            for sample in samples:
                with contextlib.suppress(_StopForward):
                    model(**model_inputs(model, processor, sample["image"], sample["text"]), use_cache=False)
    finally:
        handle.remove()
    return captured


def _next_inputs(hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def _quantize_layer(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[tuple], config) -> tuple[dict, dict]:
    """GPTQ codes and the output-error report of ``linears`` (full name -> module) inside one decoder layer."""
    accumulators = {name: HessianAccumulator(linear.in_features) for name, linear in linears.items()}
    handles = [linear.register_forward_hook(lambda _m, args, _o, name=name: accumulators[name].add(args[0]))
               for name, linear in linears.items()]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    codes, report = {}, {}
    for name, linear in linears.items():
        hessian = accumulators.pop(name).hessian
        weight = linear.weight.detach()
        # a group size >= in_features means one group per row, in run_gptq and quantize_weight alike
        found = run_gptq(weight, hessian, config.w_bits, config.w_group_size, config.w_symmetric,
                         config.gptq_damping, config.gptq_act_order, config.gptq_block_size)
        codes[name] = found.codes
        report[name] = _error_reduction(weight, found.dequantized, hessian, config)
        del found, hessian  # a float weight and a Hessian: gone before the next linear's GPTQ allocates its own
    return codes, report


# output rows the error report is computed on: tr(ΔW H ΔWᵀ) costs out x in² (as much as GPTQ itself), so it is
# estimated on evenly spaced rows, the same rows for both methods
REPORT_ROWS = 256


def _error_reduction(weight: torch.Tensor, gptq: torch.Tensor, hessian: torch.Tensor, config) -> dict:
    """Output error tr(ΔW H ΔWᵀ) of GPTQ's and of round-to-nearest weights, and the share GPTQ removes."""
    rows = slice(0, weight.shape[0], max(1, weight.shape[0] // REPORT_ROWS))
    weight, gptq = weight[rows], gptq[rows]
    group_size = config.w_group_size
    rtn = qf.quantize_weight(weight, config.w_bits, group_size, config.w_symmetric)
    rtn = qf.dequantize_weight(rtn.codes, rtn.scale, rtn.zero, config.w_bits, group_size, torch.float32)
    rtn_error = layer_output_error(weight, rtn, hessian)
    gptq_error = layer_output_error(weight, gptq, hessian)
    return {"rtn": rtn_error, "gptq": gptq_error, "reduction": 1 - gptq_error / rtn_error if rtn_error > 0 else 0.0}


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    processor,
    samples: list[dict],
    config,
    prepare_layer: Callable[[nn.Module], None] = lambda _layer: None,
    progress: bool = True,
) -> dict:
    """Replace every selected linear of the decoder layers by its GPTQ-quantized `QuantLinear`, layer by layer;
    returns the per-layer error report. ``prepare_layer`` runs on each layer just before its Hessians are
    collected (the quantizer rotates it there: only the layers before it have run by then).

    Each layer's codes are packed as soon as they exist and its float weights released (nothing model-sized is
    kept); linears outside the decoder layers (a quantized projector or vision tower) are left to the caller.
    Records time and per-layer output error (GPTQ vs round to nearest, tr(ΔW H ΔWᵀ) on the calibration inputs,
    over `REPORT_ROWS` evenly spaced output rows) in ``config.calibration_summary["gptq"]``.
    """
    from ..quantizer import decoder_layer_linears, quantize_linears
    from ..transforms.rotation import attach_online_rotations

    start = time.perf_counter()
    inputs = capture_layer_inputs(model, processor, samples, model.model.language_model.layers[0])
    report = {}
    for layer, names in progress_bar(decoder_layer_linears(model, config), "GPTQ", progress, unit="layer"):
        prepare_layer(layer)
        linears = {name: model.get_submodule(name) for name in names}
        codes, errors = _quantize_layer(layer, linears, inputs, config)
        report.update(errors)
        del linears  # no name may hold the float linears, or their memory-mapped pages could not be released
        quantize_linears(model, config, codes, names=names)
        del codes
        if config.rotation:
            attach_online_rotations(model)  # the hooks belong to the modules that were just replaced
        quantized = [m for m in layer.modules() if isinstance(m, QuantLinear)]
        with observing_inputs(quantized):  # weights quantized; activation ranges are calibrated afterwards
            inputs = [_next_inputs(_layer_output(layer(*args, **kwargs)), args, kwargs) for args, kwargs in inputs]
    seconds = time.perf_counter() - start
    reductions = [r["reduction"] for r in report.values()]
    config.calibration_summary = {
        **(config.calibration_summary or {}),
        "gptq": {
            "seconds": round(seconds, 2),
            "seconds_per_sample": round(seconds / max(1, len(samples)), 3),
            "samples": len(samples),
            "mean_error_reduction_vs_rtn": round(sum(reductions) / max(1, len(reductions)), 4),
            "layers": {name: {k: float(f"{v:.4g}") for k, v in r.items()} for name, r in report.items()},
        },
    }
    return report
