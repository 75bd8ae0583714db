"""A qap checkpoint loads exactly or fails with an error naming the tensor (or field) and the problem.

Two checks, both on the safetensors headers only (no tensor data is read), before any weight loads:

- The layout: `save_pretrained` records the quantization fields (`LAYOUT_FIELDS`) in the safetensors metadata
  (`qap_layout`). A config.json edited afterwards (say `w_group_size` 128 -> 136, which keeps every tensor shape on a
  4096-wide layer) no longer matches the tensors, and is refused.
- The tensors: every tensor a `QuantLinear` serializes must be present, with the dtype and shape its layout implies.
  transformers would otherwise leave a missing buffer uninitialised, or cast a wrong dtype silently.

A load without optimum-qap never reaches these checks; guard.py makes it fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .quant.linear import QuantLinear

LAYOUT_KEY = "qap_layout"
LAYOUT_FIELDS = (
    "w_bits", "w_group_size", "w_symmetric", "a_bits", "a_granularity", "a_group_size", "a_symmetric",
    "quantize_projector", "quantize_vision_tower", "modules_to_not_convert", "rotation", "rotation_seed",
)
_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
           "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointError(ValueError):
    """A qap checkpoint whose tensors or recorded layout do not match its config."""


def layout(config) -> str:
    """The quantization fields that shape the saved tensors, as canonical JSON (stored in the safetensors)."""
    return json.dumps({name: getattr(config, name) for name in LAYOUT_FIELDS}, sort_keys=True)


def read_headers(files: Iterable[str]) -> tuple[dict[str, tuple[torch.dtype | str, tuple]], list[dict]]:
    """Name -> (dtype, shape) of every tensor in the safetensors ``files``, and each file's metadata."""
    tensors, metadata = {}, []
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(file, "pt") as handle:
                metadata.append(handle.metadata() or {})
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    info = handle.get_slice(key)
                    tensors[key] = (_DTYPES.get(info.get_dtype(), info.get_dtype()), tuple(info.get_shape()))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{file} cannot be read ({error}): truncated, or not a safetensors file?") from error
    return tensors, metadata


def check_layout(config, metadata: list[dict]) -> None:
    recorded = {m[LAYOUT_KEY] for m in metadata if LAYOUT_KEY in m}
    if not recorded:
        return  # written before the layout was recorded (format 1): nothing to compare with
    saved = json.loads(recorded.pop())
    current = json.loads(layout(config))
    changed = [f"{name}: saved {saved.get(name)!r}, config {current[name]!r}" for name in current
               if saved.get(name) != current[name]]
    if changed:
        raise CheckpointError(
            "this checkpoint's config.json does not match the layout its tensors were saved with "
            f"({'; '.join(changed)}); restore the saved values, or re-quantize from the original model."
        )


def expected_tensors(module: QuantLinear) -> dict[str, tuple[tuple[torch.dtype, ...], tuple]]:
    """What a `QuantLinear` loads: name -> (allowed dtypes, shape)."""
    names = ["input_min", "input_max", *(["bias"] if module.bias is not None else [])]
    names += ["weight_packed", "weight_scale", *([] if module.spec.w_symmetric else ["weight_zero"])] \
        if module.spec.packs_weight else ["weight"]
    allowed = {"weight_packed": (torch.uint8,), "weight_zero": (torch.uint8,), "input_min": (torch.float32,),
               "input_max": (torch.float32,)}
    return {name: (allowed.get(name, FLOAT_DTYPES), tuple(getattr(module, name).shape)) for name in names}


def model_keys(model: nn.Module, tensors: dict[str, tuple], names: dict) -> dict[str, tuple]:
    """The checkpoint's tensors under the model's own names, renamed as `from_pretrained` renames them (LLaVA
    checkpoints say ``language_model.model.layers...`` for the module ``model.language_model.layers...``);
    ``names``: the model's state-dict keys."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    return {rename_source_key(key, renamings, converters, prefix, names)[0]: info for key, info in tensors.items()}


def check_tensors(model: nn.Module, tensors: dict[str, tuple]) -> None:
    """Every tensor of the model is in the checkpoint (a missing one would be left uninitialised), and every
    `QuantLinear` tensor has an allowed dtype and its shape."""
    names = dict.fromkeys(model.state_dict())
    tensors = model_keys(model, tensors, names)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # targets of tied weights are not saved
    problems = [f"{key} is missing" for key in names if key not in tensors and key not in tied]
    for prefix, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        for name, (dtypes, shape) in expected_tensors(module).items():
            key = f"{prefix}.{name}"
            found = tensors.get(key)
            if found is None:
                continue  # reported above
            if found[0] not in dtypes:
                problems.append(f"{key} is {found[0]}, expected {' or '.join(map(str, dtypes))}")
            elif found[1] != shape:
                problems.append(f"{key} has shape {list(found[1])}, expected {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"this qap checkpoint cannot load exactly: {'; '.join(problems[:5])}{more}.")
