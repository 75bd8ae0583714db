"""GPTQ inside from_pretrained: layer-by-layer Hessians from the calibration samples, wiring and round trips."""

import pytest
import tiny
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, QuantLinear, calibrate, quantizer
from optimum_qap.calibration import builtin_calibration_samples, model_inputs
from optimum_qap.quant.gptq import HessianAccumulator, run_gptq
from optimum_qap.transforms.gptq_model import capture_layer_inputs, gptq_quantize_model
from optimum_qap.transforms.rotation import attach_online_rotations, rotate_language_model, rotate_outside_layers

SAMPLES = 4


def gptq_config(**changes) -> QAPrunerConfig:
    return QAPrunerConfig(**{"calibration": "builtin", "num_calibration_samples": SAMPLES, "keep_ratio": 1.0,
                             "w_group_size": 32, **changes})


def eval_inputs(seed: int):
    processor = tiny.tiny_processor()
    return processor(images=tiny.noise_image(seed), text="USER: <image>\ndescribe the image . ASSISTANT:",
                     return_tensors="pt")


@pytest.fixture(scope="module")
def gained_repo(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gained-llava")
    tiny.gained_llava().save_pretrained(folder)
    tiny.tiny_processor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gptq_model(tiny_repo):
    return LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=gptq_config())


def test_samples_make_gptq_the_weight_method_and_every_decoder_linear_is_quantized(gptq_model):
    config = gptq_model.config.quantization_config
    assert config.weight_method == "gptq" and config.rotation
    linears = {n: type(m) for n, m in gptq_model.named_modules() if ".language_model.layers." in n
               and isinstance(m, (nn.Linear, QuantLinear))}
    assert len(linears) == 2 * 7 and set(linears.values()) == {QuantLinear}
    gptq = config.calibration_summary["gptq"]
    assert gptq["samples"] == SAMPLES and gptq["seconds"] > 0 and len(gptq["layers"]) == 14
    assert all(row["gptq"] <= row["rtn"] for row in gptq["layers"].values())
    assert gptq["mean_error_reduction_vs_rtn"] > 0.05


def test_gptq_brings_the_outputs_closer_to_full_precision_than_rtn(tiny_repo):
    # on held-out samples of the calibration distribution (the tiny random model's Hessians come from few tokens)
    config = gptq_config(num_calibration_samples=16, a_bits=16)
    gptq = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    rtn = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=gptq_config(
        weight_method="rtn", a_bits=16))
    fp = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    processor = tiny.tiny_processor()
    errors = {"gptq": 0.0, "rtn": 0.0}
    with torch.no_grad():
        for sample in builtin_calibration_samples(8, seed=1):
            inputs = model_inputs(fp, processor, sample["image"], sample["text"])
            reference = fp(**inputs).logits
            errors["gptq"] += float((gptq(**inputs).logits - reference).pow(2).mean())
            errors["rtn"] += float((rtn(**inputs).logits - reference).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_model_codes_are_gptq_of_the_hessian_of_what_the_layer_reads(tiny_repo, gptq_model):
    # layer 0's down_proj reads the online-rotated MLP activations: collect them on the rotated float model
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    with torch.no_grad():
        rotate_language_model(model, seed=0, progress=False)
    attach_online_rotations(model)
    down = model.model.language_model.layers[0].mlp.down_proj
    accumulator = HessianAccumulator(down.in_features)
    handle = down.register_forward_hook(lambda _m, args, _o: accumulator.add(args[0]))
    processor = tiny.tiny_processor()
    with torch.no_grad():
        for sample in builtin_calibration_samples(SAMPLES):
            model(**model_inputs(model, processor, sample["image"], sample["text"]))
    handle.remove()
    config = gptq_model.config.quantization_config
    expected = run_gptq(down.weight, accumulator.hessian, 4, 32, False, config.gptq_damping, True, 128).codes
    quantized = gptq_model.model.language_model.layers[0].mlp.down_proj
    assert torch.equal(quantized.weight_zero, expected.zero)
    torch.testing.assert_close(quantized.weight_scale, expected.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotating_each_layer_before_its_gptq_gives_the_model_of_rotating_all_first(gained_repo, dtype):
    config = gptq_config(quantize_projector=True)
    model = LlavaForConditionalGeneration.from_pretrained(gained_repo, dtype=dtype, quantization_config=config)
    # the reference: the whole language model rotated before GPTQ starts (what the loader did before)
    reference = LlavaForConditionalGeneration.from_pretrained(gained_repo, dtype=dtype)
    reference.config.quantization_config = reference_config = gptq_config(quantize_projector=True)
    processor, samples = tiny.tiny_processor(), builtin_calibration_samples(SAMPLES)
    rotate_language_model(reference, seed=0, progress=False)
    attach_online_rotations(reference)
    gptq_quantize_model(reference, processor, samples, reference_config, progress=False)
    quantizer.quantize_linears(reference, reference_config)
    attach_online_rotations(reference)
    calibrate(reference, processor, samples, progress=False)
    expected, got = reference.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8)) for key in expected)
    report = model.config.quantization_config.calibration_summary["gptq"]["layers"]
    assert report == reference_config.calibration_summary["gptq"]["layers"]


@pytest.mark.parametrize("calibration", [None, "builtin"])  # round to nearest, GPTQ
def test_a_decoder_layer_is_rotated_only_once_the_layers_before_it_are_quantized(tiny_repo, monkeypatch,
                                                                                  calibration):
    # so that the rotated float weights (copies on write of the memory-mapped checkpoint) of one layer exist at a time
    quantized_when_rotated = []

    def recording_rotate_outside_layers(model, seed):
        rotate_layer = rotate_outside_layers(model, seed)
        layers = model.model.language_model.layers

        def rotate(layer):
            quantized_when_rotated.append([isinstance(each.mlp.down_proj, QuantLinear) for each in layers])
            rotate_layer(layer)

        return rotate

    monkeypatch.setattr(quantizer, "rotate_outside_layers", recording_rotate_outside_layers)
    LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=gptq_config(calibration=calibration))
    assert quantized_when_rotated == [[False, False], [True, False]]


def test_capture_stops_at_the_first_decoder_layer(tiny_repo):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    calls = []
    model.model.language_model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    captured = capture_layer_inputs(model, tiny.tiny_processor(), builtin_calibration_samples(3),
                                    model.model.language_model.layers[0])
    assert len(captured) == 3 and not calls
    assert captured[0][0][0].shape[-1] == model.config.text_config.hidden_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_checkpoint_reloads_exactly(tiny_repo, tmp_path, dtype):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, dtype=dtype,
                                                          quantization_config=gptq_config(keep_ratio=0.5))
    assert all(p.dtype == dtype for n, p in model.named_parameters())
    inputs = eval_inputs(7)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.weight_method == "gptq"
    assert torch.equal(reloaded(**inputs).logits, expected)


def test_symmetric_per_channel_gptq_without_act_order(tiny_repo):
    config = gptq_config(w_group_size=None, w_symmetric=True, gptq_act_order=False, a_symmetric=True)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    q_proj = model.model.language_model.layers[1].self_attn.q_proj
    assert q_proj.weight_scale.shape == (q_proj.out_features, 1) and not hasattr(q_proj, "weight_zero")
    assert model.config.quantization_config.calibration_summary["gptq"]["mean_error_reduction_vs_rtn"] > 0


def test_device_map_load_rotates_and_runs_gptq_in_place(tiny_repo, gptq_model):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, device_map="cpu",
                                                          quantization_config=gptq_config())
    inputs = eval_inputs(3)
    assert torch.equal(model(**inputs).logits, gptq_model(**inputs).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_rotation_and_gptq_on_cuda_match_cpu(tiny_repo):
    config = gptq_config()
    cuda = LlavaForConditionalGeneration.from_pretrained(tiny_repo, dtype=torch.bfloat16, device_map="cuda",
                                                         quantization_config=config)
    cpu = LlavaForConditionalGeneration.from_pretrained(tiny_repo, dtype=torch.bfloat16, quantization_config=config)
    fp = LlavaForConditionalGeneration.from_pretrained(tiny_repo)
    assert cuda.model.language_model.layers[0].mlp.down_proj.weight_packed.device.type == "cuda"
    inputs = eval_inputs(5)
    reference = fp(**inputs).logits
    got = cuda(**{k: v.cuda() for k, v in inputs.items()}).logits.float().cpu()
    expected = cpu(**inputs).logits.float()
    # both are bf16 W4A4 of the same float model: as close to each other as each is to full precision
    assert (got - expected).norm() <= (expected - reference).norm()
