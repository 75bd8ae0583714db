"""from_pretrained with QAPrunerConfig: what gets quantized, dtypes, calibration, save/reload."""

import json
import os

import pytest
import tiny
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig, QuantLinear, QuantSpec, UncalibratedError

NO_PRUNING = {"keep_ratio": 1.0}


def load(repo, dtype=torch.float32, **config):
    return LlavaForConditionalGeneration.from_pretrained(
        repo, dtype=dtype, quantization_config=QAPrunerConfig(**(NO_PRUNING | config))
    )


def sample_inputs(dtype=torch.float32, seed=0):
    processor = tiny.tiny_processor()
    image = tiny.noise_image(seed)
    inputs = processor(images=image, text="USER: <image>\ndescribe the image . ASSISTANT:", return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def linear_kinds(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def test_default_quantizes_every_language_model_linear_and_nothing_else(tiny_repo):
    kinds = linear_kinds(load(tiny_repo))
    quantized = {n for n, k in kinds.items() if k is QuantLinear}
    assert quantized and all(".language_model." in f".{n}" for n in quantized)
    assert {n for n in kinds if "language_model" in n} == quantized
    assert kinds["lm_head"] is nn.Linear


def test_projector_vision_tower_opt_in_and_modules_to_not_convert(tiny_repo):
    kinds = linear_kinds(
        load(tiny_repo, quantize_projector=True, quantize_vision_tower=True, modules_to_not_convert=["down_proj"])
    )
    assert kinds["model.multi_modal_projector.linear_1"] is QuantLinear
    assert kinds["model.vision_tower.encoder.layers.0.self_attn.q_proj"] is QuantLinear
    assert kinds["model.language_model.layers.0.mlp.down_proj"] is nn.Linear
    assert kinds["model.language_model.layers.0.mlp.up_proj"] is QuantLinear


def test_sixteen_bit_everything_replaces_nothing(tiny_repo):
    assert QuantLinear not in linear_kinds(load(tiny_repo, w_bits=16, a_bits=16)).values()


@pytest.mark.parametrize("granularity", ["per_token", "per_group"])
def test_quantize_while_loading_equals_quantizing_the_loaded_model(tiny_repo, granularity):
    # without rotation, round-to-nearest weights are quantized tensor by tensor while they load
    config = QAPrunerConfig(w_group_size=32, a_granularity=granularity, a_group_size=32, rotation=False, **NO_PRUNING)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    spec = QuantSpec.from_config(config)
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear) and "language_model" in name:
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, QuantLinear.from_linear(module, spec))
    inputs = sample_inputs()
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_requested_dtype_is_kept_everywhere(tiny_repo, dtype):
    model = load(tiny_repo, dtype=dtype)
    floats = {t.dtype for n, t in model.state_dict().items() if t.is_floating_point() and "input_m" not in n}
    assert floats == {dtype}  # nothing materialised in fp32 besides the calibration ranges
    assert model(**sample_inputs(dtype)).logits.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_reload_resave_gives_identical_logits(tiny_repo, tmp_path, dtype):
    model = load(tiny_repo, dtype=dtype, w_bits=3, w_group_size=16, a_bits=8, a_granularity="per_group",
                 a_group_size=16)
    inputs = sample_inputs(dtype)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "a")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    assert reloaded.dtype == dtype and torch.equal(reloaded(**inputs).logits, expected)
    reloaded.save_pretrained(tmp_path / "b")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    assert torch.equal(again(**inputs).logits, expected)
    assert again.config.quantization_config == reloaded.config.quantization_config


def test_checkpoint_holds_packed_codes_not_float_weights(tiny_repo, tmp_path):
    load(tiny_repo, dtype=torch.bfloat16, w_group_size=32).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path))[:2] == ["config.json", "generation_config.json"]
    assert not any(name.endswith(".bin") for name in os.listdir(tmp_path))
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        keys = set(checkpoint.keys())
        q_proj = [k for k in keys if "language_model" in k and "layers.0.self_attn.q_proj" in k]
        assert sorted(k.rsplit(".", 1)[1] for k in q_proj) == [
            "input_max", "input_min", "weight", "weight_packed", "weight_scale", "weight_zero"
        ]  # "weight": the empty guard against a load without optimum-qap (checkpoint.py)
        packed = checkpoint.get_tensor(next(k for k in q_proj if k.endswith("weight_packed")))
        assert packed.dtype == torch.uint8 and packed.shape == (64, 32)  # 64x64 weight, two 4-bit codes a byte
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qap" and config["format_version"] == 2


def test_reloading_a_future_format_fails_clearly(tiny_repo, tmp_path):
    load(tiny_repo).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer optimum-qap"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("granularity", ["static_per_channel", "static_per_tensor"])
def test_static_modes_need_calibration_and_keep_it_across_save(tiny_repo, tmp_path, granularity):
    model = load(tiny_repo, a_granularity=granularity)
    inputs = sample_inputs()
    with pytest.raises(UncalibratedError, match="not calibrated"):
        model(**inputs)
    report = optimum_qap.calibrate(model, tiny.tiny_processor(), optimum_qap.builtin_calibration_samples(3))
    assert set(report) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    layer = report["model.language_model.layers.0.self_attn.q_proj"]
    assert layer.absmax.shape == (64,) and layer.median > 0 and layer.max_ratio >= 1
    assert model.config.quantization_config.calibration_summary["samples"] == 3
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded(**inputs).logits, expected)


def test_calibration_named_in_the_config_runs_in_from_pretrained(tiny_repo, tmp_path):
    image = tmp_path / "cat.png"
    tiny.noise_image(30).save(image)
    samples = [{"image": str(image), "text": "what is in the image ?"}]
    model = load(tiny_repo, a_granularity="static_per_channel", calibration=samples)
    model(**sample_inputs())  # calibrated: no error
    assert model.config.quantization_config.calibration_summary["source"] == "user samples"
    builtin = load(tiny_repo, a_granularity="static_per_tensor", calibration="builtin", num_calibration_samples=2)
    assert builtin.config.quantization_config.calibration_summary["samples"] == 2


def test_outlier_report_flags_planted_outlier_channel(tiny_repo):
    model = load(tiny_repo)
    with pytest.raises(ValueError, match="no calibrated layer"):
        optimum_qap.outlier_report(model)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    values = torch.ones(64)
    values[7] = 500.0
    layer.observe(torch.stack([values, -values]))
    report = optimum_qap.outlier_report(model)
    assert list(report) == ["model.language_model.layers.0.self_attn.q_proj"]
    assert report["model.language_model.layers.0.self_attn.q_proj"].outlier_channels == [7]


def test_calibration_rejects_bad_input(tiny_repo, tmp_path):
    model = load(tiny_repo, a_granularity="static_per_tensor")
    with pytest.raises(ValueError, match="got no samples"):
        optimum_qap.calibrate(model, tiny.tiny_processor(), [])
    with pytest.raises(ValueError, match="cannot be read"):
        optimum_qap.calibrate(model, tiny.tiny_processor(), [{"image": str(tmp_path / "missing.png"), "text": "x"}])
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    with pytest.raises(ValueError, match="no QuantLinear"):
        optimum_qap.calibrate(plain, tiny.tiny_processor(), optimum_qap.builtin_calibration_samples(1))


def test_device_map_places_quantized_model(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, device_map="cpu", quantization_config=QAPrunerConfig(**NO_PRUNING)
    )
    assert model.model.language_model.layers[0].mlp.up_proj.weight_packed.device.type == "cpu"


def test_non_llava_model_gets_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantization is not supported for LlamaForCausalLM.*`language_model`"):
        LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=QAPrunerConfig())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_load_matches_cpu(tiny_repo, dtype):
    cuda = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, dtype=dtype, device_map="cuda", quantization_config=QAPrunerConfig(**NO_PRUNING)
    )
    cpu = load(tiny_repo, dtype=dtype)
    assert cuda.model.language_model.layers[0].mlp.up_proj.weight_packed.device.type == "cuda"
    inputs = sample_inputs(dtype)
    expected = cpu(**inputs).logits.float()
    got = cuda(**{k: v.cuda() for k, v in inputs.items()}).logits.float().cpu()
    # 4-bit activation codes can round the other way when CUDA accumulates in another order (seen on an H200:
    # 4 of 1125 logits off by up to 0.073): require almost all logits close and none far off
    difference = (got - expected).abs()
    assert (difference > 0.05).float().mean() < 0.01 and difference.max() < 0.25
