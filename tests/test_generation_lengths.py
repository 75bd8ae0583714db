"""Length settings of `generate` on a pruned model count the caller's prompt, not the compacted one."""

import pytest
import tiny
import torch
from test_pruning_integration import PROMPTS, batch, load
from transformers import GenerationConfig

from optimum_qap import pruning_disabled

EOS = tiny.VOCAB["</s>"]


def generate_with_max_length(model, inputs, source, max_length):
    if source == "argument":
        return model.generate(**inputs, max_length=max_length, do_sample=False)
    if source == "generation_config":
        return model.generate(**inputs, generation_config=GenerationConfig(max_length=max_length, do_sample=False))
    model.generation_config.max_length = max_length
    try:
        return model.generate(**inputs, do_sample=False)
    finally:
        model.generation_config.max_length = None


@pytest.mark.parametrize("source", ["argument", "generation_config", "model_generation_config"])
def test_max_length_gives_as_many_new_tokens_as_unpruned(tiny_repo, source):
    model = load(tiny_repo)  # keeps 4 of 16 visual tokens per image
    inputs = batch()  # three prompts of different lengths, padded on the left
    prompt_length = inputs["input_ids"].shape[1]
    pruned = generate_with_max_length(model, inputs, source, prompt_length + 5)
    with pruning_disabled(model):
        unpruned = generate_with_max_length(model, inputs, source, prompt_length + 5)
    assert pruned.shape == unpruned.shape == (3, prompt_length + 5)
    assert torch.equal(pruned, model.generate(**inputs, max_new_tokens=5, do_sample=False))


def eos_banned_steps(model, inputs, **lengths):
    result = model.generate(**inputs, max_new_tokens=7, do_sample=False, eos_token_id=EOS, output_scores=True,
                            return_dict_in_generate=True, **lengths)
    return [bool(torch.isinf(scores[:, EOS]).all()) for scores in result.scores]


@pytest.mark.parametrize("rows", [1, 3])
def test_min_length_bans_eos_for_as_many_steps_as_unpruned(tiny_repo, rows):
    model = load(tiny_repo)
    inputs = batch(PROMPTS[:rows])
    prompt_length = inputs["input_ids"].shape[1]
    expected = [True] * 4 + [False] * 3
    assert eos_banned_steps(model, inputs, min_length=prompt_length + 4) == expected
    assert eos_banned_steps(model, inputs, min_new_tokens=4) == expected
    with pruning_disabled(model):
        assert eos_banned_steps(model, inputs, min_length=prompt_length + 4) == expected


def test_callers_generation_config_is_left_unchanged(tiny_repo):
    model = load(tiny_repo)
    inputs = batch()
    config = GenerationConfig(max_length=inputs["input_ids"].shape[1] + 3, do_sample=False)
    model.generate(**inputs, generation_config=config)
    assert config.max_length == inputs["input_ids"].shape[1] + 3
