"""model.dequantize(): a plain float LLaVA that computes what the qap model computes (activation quantization off)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import tiny
import torch
from test_loading import sample_inputs
from torch import nn
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, QuantLinear, pruning_disabled


def load(repo, dtype=torch.float32, **config):
    config = {"a_bits": 16, "keep_ratio": 0.25, "w_group_size": 32} | config
    return LlavaForConditionalGeneration.from_pretrained(repo, dtype=dtype,
                                                         quantization_config=QAPrunerConfig(**config))


@pytest.mark.parametrize(("rotation", "dtype"), [(False, torch.float32), (False, torch.bfloat16),
                                                 (True, torch.float32)])
def test_dequantized_model_computes_what_the_quantized_one_does(tiny_repo, rotation, dtype):
    model = load(tiny_repo, dtype, rotation=rotation)
    inputs = sample_inputs(dtype)
    with pruning_disabled(model):
        expected = model(**inputs).logits
    float_model = model.dequantize()
    assert float_model is model and float_model.dtype == dtype
    logits = float_model(**inputs).logits  # every visual token: the pruner is detached
    if rotation:  # the online rotations are folded into o_proj and down_proj: equal up to their rounding
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits, expected)


def test_with_quantized_activations_it_is_the_model_without_activation_quantization(tiny_repo):
    model = load(tiny_repo, a_bits=4, rotation=False)
    inputs = sample_inputs()
    with pruning_disabled(model):
        quantized = model(**inputs).logits
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.spec = dataclasses.replace(module.spec, a_bits=16)
        expected = model(**inputs).logits
    logits = model.dequantize()(**inputs).logits
    assert torch.equal(logits, expected) and not torch.equal(logits, quantized)


def test_dequantized_model_is_a_plain_llava(tiny_repo):
    model = load(tiny_repo).dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    layer = model.model.language_model.layers[0]
    for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
        assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and not linear._forward_pre_hooks
    assert not hasattr(model, "qap_pruner") and "forward" not in vars(model) and "generate" not in vars(model)
    assert not hasattr(model.config, "quantization_config") and not model.is_quantized
    assert "push_to_hub" not in vars(model) and "num_parameters" not in vars(model)


def test_dequantized_model_saves_and_reloads_without_optimum_qap(tiny_repo, tmp_path):
    model = load(tiny_repo).dequantize()
    model.save_pretrained(tmp_path / "model")
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    inputs = dict(sample_inputs())
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import sys, torch; sys.modules['optimum_qap'] = None\n"
        "from transformers import LlavaForConditionalGeneration\n"
        f"folder = {str(tmp_path)!r}\n"
        "model = LlavaForConditionalGeneration.from_pretrained(folder + '/model')\n"
        "torch.save(model(**torch.load(folder + '/inputs.pt')).logits, folder + '/logits.pt')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model(**inputs).logits)


def test_num_parameters_counts_packed_weights_at_their_logical_size(tiny_repo, tmp_path):
    float_model = tiny.tiny_llava()
    model = load(tiny_repo, w_bits=3, rotation=False)
    assert model.num_parameters() == float_model.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == float_model.num_parameters(exclude_embeddings=True)
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert model.num_parameters(only_trainable=True) == float_model.num_parameters() - packed  # buffers: not trained
    model.save_pretrained(tmp_path)
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path).num_parameters() == float_model.num_parameters()
    assert model.dequantize().num_parameters() == float_model.num_parameters()
