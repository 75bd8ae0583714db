"""PEFT LoRA on a qap model: targets, Trainer, adapter save / reload, merge refusal."""

import pytest
import torch
from test_loading import sample_inputs
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

from optimum_qap import QAPrunerConfig, QuantLinear, pruning_disabled

peft = pytest.importorskip("peft", reason="LoRA fine-tuning needs PEFT: pip install 'optimum-qap[train]'")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from optimum_qap.lora import LoraMergeError, QuantLoraLinear  # noqa: E402

LAYERS = 2  # decoder layers of the tiny model, 7 linears each


def load(repo, **config):
    config = {"w_group_size": 32, "keep_ratio": 0.5} | config
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=QAPrunerConfig(**config))


def adapted(model) -> dict[str, type]:
    """Adapted layer name -> type of the layer it wraps."""
    return {name: type(m.get_base_layer()) for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_all_linear_adapts_the_language_model_quant_linears(tiny_repo):
    model = get_peft_model(load(tiny_repo), LoraConfig(r=4, target_modules="all-linear"))
    layers = adapted(model)
    assert len(layers) == 7 * LAYERS and set(layers.values()) == {QuantLinear}
    assert all(".language_model.layers." in name for name in layers)
    assert all(isinstance(m, QuantLoraLinear) for n, m in model.named_modules() if n in layers)


def test_all_linear_on_a_float_model_is_peft_s_own(tiny_repo):
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tiny_repo),
                           LoraConfig(r=4, target_modules="all-linear"))
    layers = adapted(model)
    assert not any(isinstance(m, QuantLoraLinear) for m in model.modules())
    assert sum(".language_model." in name for name in layers) == 7 * LAYERS and len(layers) > 7 * LAYERS


def test_named_targets_and_a_second_adapter(tiny_repo):
    model = get_peft_model(load(tiny_repo), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    lora_layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(lora_layers) == 7 * LAYERS  # the q/v layers gained an adapter, none was wrapped twice
    assert sum("default" in m.lora_A for m in lora_layers) == 2 * LAYERS
    assert all("second" in m.lora_A for m in lora_layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_starts_as_the_identity_and_lives_on_the_model_dtype(tiny_repo, dtype):
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, dtype=dtype, quantization_config=QAPrunerConfig(w_group_size=32, keep_ratio=0.5))
    inputs = sample_inputs(dtype)
    with torch.no_grad():
        expected = model(**inputs).logits
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"),
                                    autocast_adapter_dtype=False)
        assert torch.equal(peft_model(**inputs).logits, expected)  # B starts at zero
    layer = next(m for m in peft_model.modules() if isinstance(m, QuantLoraLinear))
    assert layer.lora_A["default"].weight.dtype == dtype


def training_batch():
    inputs = sample_inputs()
    labels = inputs["input_ids"].clone()
    labels[labels == 4] = -100  # image placeholders carry no target
    return {**inputs, "labels": labels}


class RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self, batch, length):
        self.example = {key: value[0] for key, value in batch.items()}
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.example


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN equal to NaN (uncalibrated input ranges are NaN)."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num()))


def test_trainer_decreases_loss_and_changes_only_the_adapter(tiny_repo, tmp_path):
    model = get_peft_model(load(tiny_repo), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    batch = training_batch()
    with torch.no_grad():
        start_loss = model(**batch).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, learning_rate=2e-2,
                             report_to=[], save_strategy="no", logging_steps=4, use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True,
                             dataloader_pin_memory=False)
    Trainer(model=model, args=args, train_dataset=RepeatedBatch(batch, 24)).train()
    with torch.no_grad():
        assert model(**batch).loss.item() < 0.8 * start_loss  # memorising one batch
    after = model.state_dict()
    changed = {name for name, t in after.items() if not identical(t, before[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert any(".lora_B." in name for name in changed) and any(".lora_A." in name for name in changed)
    packed = [name for name in after if name.endswith("weight_packed")]
    assert len(packed) == 7 * LAYERS and not changed & set(packed)


def test_adapter_saves_and_reloads_onto_a_reloaded_qap_model(tiny_repo, tmp_path):
    model = load(tiny_repo)
    model.save_pretrained(tmp_path / "qap")
    inputs = sample_inputs()
    with torch.no_grad():
        base = model(**inputs).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    assert not torch.allclose(expected, base)  # the adapter does something
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tmp_path / "qap"),
                                         tmp_path / "adapter")
    assert len([m for m in reloaded.modules() if isinstance(m, QuantLoraLinear)]) == 7 * LAYERS
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def test_merge_into_packed_weights_is_refused_before_any_layer_merges(tiny_repo):
    model = get_peft_model(load(tiny_repo), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    inputs = sample_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(LoraMergeError, match=r"keep the adapter unmerged.*model\.dequantize\(\)") as error:
            merge()
        assert "language_model.layers.0.self_attn.q_proj" in str(error.value)
    # the vision tower's q_proj (a float nn.Linear, merged first if anything were) is untouched
    assert not any(getattr(m, "merged", False) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    layer = next(m for m in model.modules() if isinstance(m, QuantLoraLinear))
    with pytest.raises(LoraMergeError, match="requantizing"):
        layer.merge()


def test_merging_into_the_dequantized_model_is_the_documented_alternative(tiny_repo, tmp_path):
    model = load(tiny_repo, a_bits=16, rotation=False)  # dequantize() is exact without activation quantization
    model.save_pretrained(tmp_path / "qap")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = sample_inputs()
    with torch.no_grad(), pruning_disabled(model):
        expected = peft_model(**inputs).logits
    float_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "qap").dequantize()
    merged = PeftModel.from_pretrained(float_model, tmp_path / "adapter").merge_and_unload()
    assert not any(isinstance(m, (QuantLinear, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_initialisations_that_need_the_float_weight_are_refused(tiny_repo):
    with pytest.raises(ValueError, match="init_lora_weights='pissa' needs the float base weight"):
        get_peft_model(load(tiny_repo), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_demo_finetune_supervises_the_answer_and_trains_only_the_adapter():
    from transformers import AutoProcessor

    from optimum_qap.demo import DEMO_MODEL_PATH
    from optimum_qap.demo.finetune import MODEL_INPUTS, AnswerBatches, LoraRun, TrainingSplit, lora_finetune

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_PATH)
    examples = TrainingSplit(3)
    batch = AnswerBatches(processor.tokenizer)([examples[i] for i in range(3)])
    assert tuple(batch) == MODEL_INPUTS
    assert ((batch["labels"] != -100).sum(1) == 2).all()  # the answer word and </s>
    model = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL_PATH,
                                                          quantization_config=QAPrunerConfig(keep_ratio=0.125))
    packed = [(m, m.weight_packed.clone()) for m in model.modules() if isinstance(m, QuantLinear)]
    peft_model, history = lora_finetune(model, processor, LoraRun(steps=2, batch_size=2))
    assert history[-1]["step"] == 2 and not peft_model.training
    assert packed and all(torch.equal(m.weight_packed, before) for m, before in packed)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
