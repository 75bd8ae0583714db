"""Corrupted or edited qap checkpoints load exactly or fail with an error naming the tensor or field."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_loading import sample_inputs
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig
from optimum_qap.checkpoint import LAYOUT_KEY, CheckpointError

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"  # as the LLaVA checkpoint names it


@pytest.fixture(scope="module")
def saved(tiny_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qap-checkpoint")
    config = QAPrunerConfig(w_group_size=32, keep_ratio=1.0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    model.save_pretrained(folder)
    return folder, model(**sample_inputs()).logits


def copy_of(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved[0], folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def test_the_layout_is_recorded_and_an_untouched_copy_loads_bit_exact(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    with safe_open(folder / "model.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()[LAYOUT_KEY])["w_group_size"] == 32
    reloaded = LlavaForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(reloaded(**sample_inputs()).logits, saved[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [("w_group_size", 33), ("w_symmetric", True), ("w_bits", 16), ("quantize_projector", True),
     ("modules_to_not_convert", ["down_proj"]), ("a_granularity", "per_group"), ("rotation", False)],
)
def test_an_edited_quantization_field_is_refused_by_name(saved, tmp_path, field, value):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, **{field: value})
    with pytest.raises(CheckpointError, match=rf"does not match the layout.*{field}: saved"):
        LlavaForConditionalGeneration.from_pretrained(folder)


def test_pruning_fields_may_change(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, keep_ratio=0.5)
    assert LlavaForConditionalGeneration.from_pretrained(folder).config.quantization_config.keep_ratio == 0.5


@pytest.mark.parametrize(
    ("tensor", "edit", "message"),
    [("weight_scale", "delete", "weight_scale is missing"), ("input_min", "delete", "input_min is missing"),
     ("weight_zero", "delete", "weight_zero is missing"),
     ("weight_packed", torch.int8, "weight_packed is torch.int8, expected torch.uint8"),
     ("weight_scale", torch.int32, "weight_scale is torch.int32, expected"),
     ("input_max", torch.float16, "input_max is torch.float16, expected torch.float32")],
)
def test_a_missing_or_retyped_tensor_is_refused_by_name(saved, tmp_path, tensor, edit, message):
    folder = copy_of(saved, tmp_path)
    key = f"{Q_PROJ}.{tensor}"

    def corrupt(tensors):
        if edit == "delete":
            del tensors[key]
        else:
            tensors[key] = tensors[key].to(edit)

    edit_tensors(folder, corrupt)
    with pytest.raises(CheckpointError, match=f"layers.0.self_attn.q_proj.{message}"):
        LlavaForConditionalGeneration.from_pretrained(folder)


def test_a_reshaped_tensor_is_refused_by_name(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    key = f"{Q_PROJ}.weight_scale"
    edit_tensors(folder, lambda tensors: tensors.update({key: tensors[key][:, :1].contiguous()}))
    with pytest.raises(CheckpointError, match=r"q_proj.weight_scale has shape \[64, 1\], expected \[64, 2\]"):
        LlavaForConditionalGeneration.from_pretrained(folder)


def test_a_truncated_file_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read .*truncated"):
        LlavaForConditionalGeneration.from_pretrained(folder)


def test_a_missing_full_precision_tensor_is_refused_too(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_tensors(folder, lambda tensors: tensors.pop("language_model.lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight is missing"):
        LlavaForConditionalGeneration.from_pretrained(folder)
