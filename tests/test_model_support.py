"""Every image-text `*ForConditionalGeneration` QAPrunerConfig may be pointed at: it is quantized (and saves and
reloads), and pruning either works or is refused with one clear error before the weights load. Never a bare
AttributeError. The README's "Supported models" table states the same matrix."""

import pytest
import tiny_anyres
import torch
import transformers as hf

from optimum_qap import QAPrunerConfig
from optimum_qap.quant.linear import QuantLinear

SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
             patch_size=14)


def qwen2_vl():
    text = {**SHAPES, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2)
    return hf.Qwen2VLForConditionalGeneration(hf.Qwen2VLConfig(text_config=text, vision_config=vision,
                                                               image_token_id=100, video_token_id=101))


def mistral3():
    vision = hf.PixtralVisionConfig(**TOWER, head_dim=16)
    return hf.Mistral3ForConditionalGeneration(hf.Mistral3Config(
        text_config=hf.MistralConfig(**SHAPES, head_dim=16), vision_config=vision, image_token_index=100))


def gemma3():
    return hf.Gemma3ForConditionalGeneration(hf.Gemma3Config(
        text_config=hf.Gemma3TextConfig(**SHAPES, head_dim=16), vision_config=hf.SiglipVisionConfig(**TOWER),
        mm_tokens_per_image=4, image_token_index=100))


def paligemma():
    return hf.PaliGemmaForConditionalGeneration(hf.PaliGemmaConfig(
        text_config=hf.GemmaConfig(**SHAPES, head_dim=16), vision_config=hf.SiglipVisionConfig(**TOWER,
                                                                                               projection_dim=64),
        image_token_index=100, projection_dim=64))


def idefics3():
    return hf.Idefics3ForConditionalGeneration(hf.Idefics3Config(
        text_config=hf.LlamaConfig(**SHAPES), vision_config=hf.Idefics3VisionConfig(**TOWER), image_token_id=100))


def vipllava():
    return hf.VipLlavaForConditionalGeneration(hf.VipLlavaConfig(
        text_config=hf.LlamaConfig(**SHAPES), vision_config=hf.CLIPVisionConfig(**TOWER),
        vision_feature_layers=[-2, -1]))


# model -> (rotation supported, token pruning supported); LLaVA-1.5 is covered by test_pruning_integration.py
MATRIX = {
    "llava_next": (lambda: hf.LlavaNextForConditionalGeneration(tiny_anyres.next_config()), True, True),
    "llava_onevision": (lambda: hf.LlavaOnevisionForConditionalGeneration(tiny_anyres.onevision_config()), True,
                        True),
    "qwen2_vl": (qwen2_vl, False, False),
    "mistral3": (mistral3, True, False),
    "gemma3": (gemma3, False, False),
    "paligemma": (paligemma, False, False),
    "vipllava": (vipllava, True, False),
}


@pytest.fixture(scope="module", params=list(MATRIX))
def saved(request, tmp_path_factory):
    build, rotates, prunes = MATRIX[request.param]
    torch.manual_seed(0)
    model = build().eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return type(model), folder, rotates, prunes, model


def load(saved, **config):
    cls, folder = saved[:2]
    return cls.from_pretrained(folder, quantization_config=QAPrunerConfig(**config))


def test_pruning_works_or_is_refused_with_one_clear_error(saved):
    cls, _, _, prunes, _ = saved
    if prunes:
        model = load(saved, semantic="cdpruner", rotation=False)
        assert model.qap_pruner is not None
        return
    with pytest.raises(ValueError, match=rf"token pruning is not supported for {cls.__name__} .*keep_ratio=1\.0"):
        load(saved, semantic="cdpruner", rotation=False)


def test_rotation_works_or_is_refused_with_one_clear_error(saved):
    _, _, rotates, _, plain = saved
    if not rotates:
        with pytest.raises(ValueError, match=r"rotation=True\) supports Llama-style.*rotation=False"):
            load(saved, keep_ratio=1.0)
        return
    model = load(saved, keep_ratio=1.0, w_bits=16, a_bits=16)  # rotation alone must not change the function
    ids = torch.randint(5, 40, (2, 7))  # inside every vocabulary here
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_quantization_works_and_round_trips(saved, tmp_path):
    cls, _, _, _, plain = saved
    model = load(saved, keep_ratio=1.0, rotation=False, w_bits=8, a_bits=8)
    language_model = next(m for name, m in model.named_modules() if name.endswith("language_model"))
    linears = [m for m in language_model.modules() if isinstance(m, torch.nn.Linear | QuantLinear)]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    ids = torch.randint(5, 40, (2, 7))  # inside every vocabulary here
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert float((logits - expected).norm() / expected.norm()) < 0.05  # W8A8 stays close to the float model
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    assert reloaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (2, 10)


def test_model_without_language_model_is_refused_with_one_clear_error(tmp_path):
    torch.manual_seed(0)
    idefics3().save_pretrained(tmp_path)
    for config in ({}, {"keep_ratio": 1.0, "rotation": False}):
        with pytest.raises(ValueError, match="quantization is not supported for Idefics3ForConditionalGeneration"):
            hf.Idefics3ForConditionalGeneration.from_pretrained(tmp_path, quantization_config=QAPrunerConfig(**config))
