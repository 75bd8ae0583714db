"""semantic="cdpruner" with a CLIP text tower (CDPruner's original formulation), against CLIPModel itself."""

import pytest
import tiny
import torch
from test_pruning_integration import new_tokens, reference_generate
from transformers import AutoTokenizer, LlavaForConditionalGeneration

import optimum_qap  # noqa: F401  (registers "qap")
from optimum_qap import QAPrunerConfig, last_selection
from optimum_qap.cli import main
from optimum_qap.hub import model_card
from optimum_qap.pruning import attach_pruner
from optimum_qap.pruning.clip_text import ClipTextRelevance
from optimum_qap.pruning.scoring import minmax_normalize

PROMPTS = [
    "USER: <image>\nwhat is in the image ? ASSISTANT:",
    "USER: <image>\nhow many shapes are there in the picture and where do you see red objects ? ASSISTANT:",
]


@pytest.fixture(scope="module")
def clip_and_llava(tmp_path_factory):
    """A tiny CLIP and a tiny LLaVA whose vision tower is that CLIP's (as LLaVA-1.5's is openai/clip-vit-large)."""
    clip_dir, llava_dir = tmp_path_factory.mktemp("clip"), tmp_path_factory.mktemp("llava-with-clip")
    llava = tiny.tiny_llava()
    clip = tiny.save_tiny_clip(clip_dir, llava.config.vision_config)
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.save_pretrained(llava_dir)
    tiny.tiny_processor().save_pretrained(llava_dir)
    return clip, str(clip_dir), str(llava_dir)


def load(repo, clip_dir, **config):
    settings = {"w_bits": 16, "a_bits": 16, "keep_ratio": 0.25, "semantic": "cdpruner", "clip_text_model": clip_dir}
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=QAPrunerConfig(**settings | config))


def reference_relevance(clip, clip_dir, pixel_values, prompt):
    """CDPruner's relevance computed with the full CLIPModel: feature layer -2 patches through CLIP's own
    post_layernorm and visual_projection, the instruction through get_text_features."""
    with torch.no_grad():
        states = clip.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        image = clip.visual_projection(clip.vision_model.post_layernorm(states))[0]
        ids = AutoTokenizer.from_pretrained(clip_dir)(prompt.replace("<image>", ""), return_tensors="pt").input_ids
        text = clip.get_text_features(input_ids=ids).pooler_output
    similarity = torch.nn.functional.cosine_similarity(image[:, None], text[None], dim=-1).mean(-1)
    return minmax_normalize(similarity)


def test_relevance_equals_clip_model_and_generation_matches_reference(clip_and_llava):
    clip, clip_dir, llava_dir = clip_and_llava
    model = load(llava_dir, clip_dir)
    inputs = tiny.tiny_processor()(images=[tiny.noise_image(i) for i in range(2)], text=PROMPTS,
                                   return_tensors="pt", padding=True)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    selections = last_selection(model)
    for index, (selection, prompt) in enumerate(zip(selections, PROMPTS, strict=True)):
        expected = reference_relevance(clip, clip_dir, inputs["pixel_values"][index : index + 1], prompt)
        torch.testing.assert_close(selection.semantic, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(selection.kept, torch.topk(selection.fused, 4).indices.sort().values)
    # the two prompts differ, so CLIP's relevance must differ: the instruction is really read
    assert not torch.allclose(selections[0].semantic, selections[1].semantic)
    # the pruned model generates what the plain model generates from the kept tokens alone
    expected = reference_generate(model, inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(new_tokens(generated, inputs), expected)


def test_long_instruction_is_read_in_windows(clip_and_llava):
    clip, clip_dir, _ = clip_and_llava
    relevance = ClipTextRelevance.from_pretrained(clip_dir)
    words = "how many shapes are there in the picture and where do you see red objects ? " * 4
    embeds = relevance.text_embeds(words)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    ids = tokenizer(words).input_ids[1:-1]  # 64 words; windows of 32 positions hold 30 words + <s> </s>
    assert embeds.shape == (3, 24)
    first = torch.tensor([[tokenizer.bos_token_id, *ids[:30], tokenizer.eos_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(embeds[0], clip.get_text_features(input_ids=first).pooler_output[0])


def test_save_reload_and_bf16(clip_and_llava, tmp_path):
    _, clip_dir, llava_dir = clip_and_llava
    model = load(llava_dir, clip_dir)
    inputs = tiny.tiny_processor()(images=[tiny.noise_image(0)], text=PROMPTS[:1], return_tensors="pt")
    expected = model(**inputs).logits
    kept = last_selection(model)[0].kept
    model.save_pretrained(tmp_path)
    tiny.tiny_processor().save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.clip_text_model == clip_dir
    card = str(model_card(reloaded.config.quantization_config))
    assert f"S^P (cdpruner with the CLIP text tower of {clip_dir})" in card
    assert torch.equal(reloaded(**inputs).logits, expected)
    assert torch.equal(last_selection(reloaded)[0].kept, kept)

    half = load(llava_dir, clip_dir, keep_ratio=0.5)
    half = LlavaForConditionalGeneration.from_pretrained(
        llava_dir, dtype=torch.bfloat16, quantization_config=half.config.quantization_config
    )
    assert half.qap_pruner.clip.visual_projection.weight.dtype == torch.bfloat16
    half(**inputs.to(torch.bfloat16))
    assert last_selection(half)[0].semantic.dtype == torch.float32


def test_attach_pruner_reuses_the_loaded_clip(clip_and_llava):
    _, clip_dir, llava_dir = clip_and_llava
    model = load(llava_dir, clip_dir)
    first = model.qap_pruner.clip
    config = QAPrunerConfig.from_dict(model.config.quantization_config.to_dict() | {"keep_ratio": 0.5})
    assert attach_pruner(model, config).clip is first


def test_bad_clip_settings_are_refused(clip_and_llava, tmp_path):
    _, clip_dir, llava_dir = clip_and_llava
    with pytest.raises(ValueError, match=r"clip_text_model=.*semantic=\"cdpruner\", but semantic is \"cls_attention\""):
        QAPrunerConfig(clip_text_model=clip_dir)
    with pytest.raises(ValueError, match=r"clip_text_model='.*missing' could not be loaded"):
        load(llava_dir, str(tmp_path / "missing"))
    wide = tiny.tiny_llava(vision_hidden=48)
    tiny.save_tiny_clip(tmp_path / "wide-clip", wide.config.vision_config)
    with pytest.raises(ValueError, match=r"projects 48-wide vision features, but this model's vision tower is 32"):
        load(llava_dir, str(tmp_path / "wide-clip"))
    unnamed = tiny.tiny_llava()  # built from a config: there is no tokenizer to read the prompt back with
    with pytest.raises(ValueError, match="LLaVA tokenizer"):
        attach_pruner(unnamed, QAPrunerConfig(keep_ratio=0.25, semantic="cdpruner", clip_text_model=clip_dir))


def test_cli_compress_with_clip_text_model(clip_and_llava, tmp_path, capsys):
    _, clip_dir, llava_dir = clip_and_llava
    args = ["compress", llava_dir, "--output", str(tmp_path / "out"), "--keep-ratio", "0.25", "--semantic"]
    assert main([*args, "cdpruner", "--clip-text-model", clip_dir]) == 0
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.qap_pruner.clip is not None
    assert main([*args, "cls_attention", "--clip-text-model", clip_dir, "--overwrite"]) == 2
    assert "clip_text_model" in capsys.readouterr().err
