"""The benchmark scripts run end to end (on tiny widths): a benchmark that breaks with the code it measures is
caught here, not at the next measurement. Their numbers are not checked; the JSON they print is."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def narrow_llava_config(decoder_layers: int) -> LlavaConfig:
    """LLaVA-1.5's layout (336 px, patch 14, 576 image tokens, its vocabulary) at tiny widths."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=decoder_layers, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32064, max_position_embeddings=1024, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


@pytest.fixture
def benchmark(monkeypatch, capsys):
    """Import a benchmark module with 7B widths narrowed; returns run(name, *argv) -> the JSON it printed last."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "llava_7b_config", narrow_llava_config)

    def run(name: str, *argv: str, **overrides) -> dict:
        module = importlib.import_module(name)
        for attribute, value in overrides.items():
            monkeypatch.setattr(module, attribute, value)
        monkeypatch.setattr(sys, "argv", [name, *argv])
        capsys.readouterr()
        module.main()
        output = capsys.readouterr().out
        return json.loads(output[output.rfind("\n{") + 1:])

    return run


def test_linear_and_crossover_benchmarks_run(benchmark):
    linear = benchmark("linear", "--tokens", "1,5", "--repeats", "1", SHAPES=((64, 96),))
    assert [row["tokens"] for row in linear["rows"]] == [1, 5]
    assert linear["rows"][0]["qap paths"]["qap per_token"] in ("int4_weight_only", "simulated")
    crossover = benchmark("crossover", "--tokens", "1,8", "--repeats", "1", SHAPES=((64, 96),),
                          LAYER_COUNTS={"64x96": 7})
    assert {"linear", "group 128 simulated", "per-channel simulated"} <= set(crossover["decoder_layer_ms"][0])


def test_prefill_and_generation_benchmarks_run(benchmark, tmp_path):
    prefill = benchmark("prefill", "--decoder-layers", "1", "--keep-ratios", "0.125", "--repeats", "1",
                        "--workdir", str(tmp_path))
    assert prefill["rows"][0]["kept_tokens"] == 72
    generation = benchmark("generation", "--decoder-layers", "1", "--new-tokens", "2", "--calib-samples", "1",
                           "--repeats", "1", "--workdir", str(tmp_path))
    assert generation["decode_tokens_per_s_pruned"] > 0 and generation["prompt_tokens"] > 576


def test_fused_ops_benchmark_runs(benchmark):
    fused = benchmark("fused_ops", "--repeats", "1")
    assert len(fused["rows"]) == 6 and all(row["fused_us"] > 0 for row in fused["rows"])
