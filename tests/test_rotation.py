"""Rotation (QuaRot-style computational invariance): orthogonal transforms, same function, exact save/reload."""

import json

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, gained_llava, tiny_processor
from torch import nn
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig, QuantLinear
from optimum_qap.pruning.scoring import channel_range, minmax_normalize
from optimum_qap.transforms.hadamard import KroneckerRotation, dct_matrix, orthogonal_factors, sylvester_hadamard
from optimum_qap.transforms.rotation import ONLINE_HOOK, attach_online_rotations, rotate_language_model

OFF = {"w_bits": 16, "a_bits": 16, "keep_ratio": 1.0}


def inputs(dtype=torch.float32, seed=0):
    ids = torch.tensor([[2] + [IMAGE_TOKEN_ID] * NUM_PATCHES + [8, 9, 10, 11, 12]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return {"input_ids": ids, "pixel_values": pixels}


@pytest.fixture(scope="module")
def gained_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gained")
    gained_llava().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return str(folder)


def test_rotations_first_built_in_inference_mode_still_serve_autograd():
    """Rotations are shared (cached per size and device): one first built inside `torch.inference_mode` (a served
    model) must not hand inference tensors to a later forward that trains (LoRA on the same model)."""
    with torch.inference_mode():
        KroneckerRotation.hadamard(40, seed=987654).apply(torch.randn(2, 40))
    x = torch.randn(2, 40, requires_grad=True)
    KroneckerRotation.hadamard(40, seed=987654).apply(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("size", [1, 2, 3, 12, 40, 64, 96, 768, 4096])
def test_rotations_are_orthogonal(size):
    q = KroneckerRotation.hadamard(size, seed=3).dense()
    assert torch.allclose(q @ q.T, torch.eye(size, dtype=q.dtype), atol=1e-12)


@pytest.mark.parametrize("size", [11008, 13824, 5120])
def test_real_llama_sizes_split_into_small_factors_and_keep_norms(size):
    factors = orthogonal_factors(size)
    assert max(f.shape[0] for f in factors) <= 256 and torch.tensor([f.shape[0] for f in factors]).prod() == size
    rotation = KroneckerRotation.hadamard(size)
    x = torch.randn(3, size, dtype=torch.float64)
    y = rotation.apply(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1)) and torch.allclose(rotation.apply(y, transpose=True), x)


def test_one_channel_is_spread_over_all_channels():
    # the point of the rotation: an outlier in one channel becomes a small value in every channel
    rotation = KroneckerRotation.hadamard(768)  # 3 x 256: DCT_3 ⊗ H_256
    spike = torch.zeros(1, 768, dtype=torch.float64)
    spike[0, 5] = 1.0
    spread = rotation.apply(spike).abs()
    assert spread.max() <= (2 / 3) ** 0.5 / 16 + 1e-12 and (spread > 0).all()


def test_factor_matrices_are_the_textbook_ones():
    assert torch.equal(sylvester_hadamard(2) * 2**0.5, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    x = torch.randn(5, dtype=torch.float64)
    # DCT-II: X_k = sqrt(2/m) c_k sum_i x_i cos(pi (2i + 1) k / 2m)
    expected = [sum(x[i] * torch.cos(torch.tensor(torch.pi * (2 * i + 1) * k / 10, dtype=torch.float64))
                    for i in range(5)) * (2 / 5) ** 0.5 * (0.5**0.5 if k == 0 else 1) for k in range(5)]
    assert torch.allclose(dct_matrix(5) @ x, torch.stack(expected))


def test_blockwise_rotations_act_inside_or_across_blocks():
    h4 = sylvester_hadamard(4)
    inside = KroneckerRotation.blockwise(3, 4, across=False).dense()
    assert torch.allclose(inside, torch.block_diag(h4, h4, h4))
    across = KroneckerRotation.blockwise(4, 3, across=True).dense()
    assert torch.allclose(across, torch.kron(h4, torch.eye(3, dtype=torch.float64)))


@pytest.mark.parametrize("hidden", [64, 96])  # 96 = 3 x 32: a residual width that is not a power of 2
def test_rotated_model_computes_the_same_function_in_fp32(hidden):
    model = gained_llava(hidden=hidden)
    expected = model(**inputs()).logits
    with torch.no_grad():
        rotate_language_model(model, seed=1, progress=False)
    attach_online_rotations(model)
    assert torch.allclose(model(**inputs()).logits, expected, atol=2e-5, rtol=1e-4)
    decoder = model.model.language_model
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight))
               for norm in (decoder.norm, decoder.layers[0].input_layernorm))


def test_rotated_model_in_bf16_stays_within_bf16_noise():
    model = gained_llava()
    exact = model(**inputs()).logits
    bf16 = model.to(torch.bfloat16)
    plain = bf16(**inputs(torch.bfloat16)).logits.float()
    with torch.no_grad():
        rotate_language_model(bf16, seed=0, progress=False)
    attach_online_rotations(bf16)
    rotated = bf16(**inputs(torch.bfloat16)).logits.float()
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    noise = (plain - exact).abs().max()
    assert (rotated - exact).abs().max() <= 4 * noise


def test_online_hooks_are_attached_once():
    model = gained_llava()
    with torch.no_grad():
        rotate_language_model(model, progress=False)
    attach_online_rotations(model)
    expected = model(**inputs()).logits
    attach_online_rotations(model)  # again: replaces, does not stack
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    assert len(o_proj._forward_pre_hooks) == 1 and getattr(o_proj, ONLINE_HOOK) is not None
    assert torch.equal(model(**inputs()).logits, expected)


def test_tied_embeddings_are_untied_before_rotation():
    model = gained_llava()
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    expected = model(**inputs()).logits
    with torch.no_grad():
        rotate_language_model(model, progress=False)
    attach_online_rotations(model)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    assert torch.allclose(model(**inputs()).logits, expected, atol=2e-5, rtol=1e-4)


def test_from_pretrained_with_quantization_off_keeps_the_logits(gained_repo):
    reference = LlavaForConditionalGeneration.from_pretrained(gained_repo)
    model = LlavaForConditionalGeneration.from_pretrained(gained_repo, quantization_config=QAPrunerConfig(**OFF))
    assert model.config.quantization_config.rotation
    assert torch.allclose(model(**inputs()).logits, reference(**inputs()).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_while_loading_equals_rotating_then_quantizing(gained_repo, dtype):
    config = QAPrunerConfig(w_group_size=32, keep_ratio=1.0)
    model = LlavaForConditionalGeneration.from_pretrained(gained_repo, dtype=dtype, quantization_config=config)
    reference = LlavaForConditionalGeneration.from_pretrained(gained_repo, dtype=dtype)
    with torch.no_grad():
        rotate_language_model(reference, seed=config.rotation_seed, progress=False)
    spec = optimum_qap.QuantSpec.from_config(config)
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear) and ".language_model." in name:
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, QuantLinear.from_linear(module, spec))
    attach_online_rotations(reference)
    # the loader rotates each decoder layer just before quantizing it: byte for byte the same model
    expected, got = reference.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8)) for key in expected)
    assert torch.equal(model(**inputs(dtype)).logits, reference(**inputs(dtype)).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_checkpoint_reloads_exactly_and_rebuilds_online_transforms(gained_repo, tmp_path, dtype):
    config = QAPrunerConfig(w_group_size=32, keep_ratio=0.5)
    model = LlavaForConditionalGeneration.from_pretrained(gained_repo, dtype=dtype, quantization_config=config)
    expected = model(**inputs(dtype)).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["rotation"] is True and saved["format_version"] == 2
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    down = reloaded.model.language_model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and getattr(down, ONLINE_HOOK, None) is not None
    assert torch.equal(reloaded(**inputs(dtype)).logits, expected)


def test_a_format_1_checkpoint_is_read_as_unrotated_rtn():
    old = QAPrunerConfig(rotation=False).to_dict()
    for field in ("rotation", "rotation_seed", "weight_method", "gptq_damping", "gptq_act_order", "gptq_block_size"):
        old.pop(field)
    old["format_version"] = 1
    config = QAPrunerConfig.from_dict(old)
    assert config.rotation is False and config.weight_method == "rtn"


def test_unsupported_language_model_is_refused_clearly():
    model = gained_llava()
    model.config.text_config.model_type = "gemma"
    with pytest.raises(ValueError, match="rotation=False"):
        rotate_language_model(model, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rotation", 1, "true or false"), ("rotation_seed", -1, "integer >= 0"), ("weight_method", "awq", "one of"),
     ("gptq_damping", 0, r"\(0, 1\]"), ("gptq_block_size", 0, "positive integer")],
)
def test_backbone_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=f"{field}.*{message}"):
        QAPrunerConfig(**{field: value})


def test_gptq_without_samples_names_the_fix(gained_repo):
    with pytest.raises(ValueError, match='calibration="builtin"'):
        LlavaForConditionalGeneration.from_pretrained(gained_repo,
                                                      quantization_config=QAPrunerConfig(weight_method="gptq"))
    assert QAPrunerConfig().weight_method == "rtn"
    assert QAPrunerConfig(calibration="builtin").weight_method == "gptq"


def test_online_rotations_are_safe_under_concurrent_calls(gained_repo):
    # the rotations' per-device matrix cache is the only shared state the backbone adds; fill it from many threads
    from concurrent.futures import ThreadPoolExecutor

    config = QAPrunerConfig(keep_ratio=1.0)
    model = LlavaForConditionalGeneration.from_pretrained(gained_repo, quantization_config=config)
    batches = [inputs(seed=seed) for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda batch: model(**batch).logits, batches))
    for batch, logits in zip(batches, concurrent, strict=True):
        assert torch.equal(logits, model(**batch).logits)


def test_projector_space_scores_equal_the_unrotated_models_and_quantizer_space_reads_the_norm(gained_repo):
    from optimum_qap import last_selection

    def selection(**changes):
        config = QAPrunerConfig(**{**OFF, "keep_ratio": 0.5, "alpha": 0.5, **changes})
        model = LlavaForConditionalGeneration.from_pretrained(gained_repo, quantization_config=config)
        model(**inputs())
        return model, last_selection(model)[0]

    _, plain = selection(rotation=False)
    _, rotated = selection(rotation=True)
    torch.testing.assert_close(rotated.error, plain.error, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rotated.range, plain.range, rtol=1e-4, atol=1e-5)
    assert torch.equal(rotated.kept, plain.kept)
    model, quantizer = selection(rotation=True, sensitivity_space="quantizer")
    with optimum_qap.pruning_disabled(model):
        features = model.model.get_image_features(pixel_values=inputs()["pixel_values"]).pooler_output[0]
    normed = model.model.language_model.layers[0].input_layernorm(features)
    expected = minmax_normalize(channel_range(normed))
    torch.testing.assert_close(quantizer.range, expected)
    assert not torch.allclose(quantizer.range, rotated.range)
