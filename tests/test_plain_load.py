"""A qap checkpoint loaded without optimum-qap (or with a mistyped quant_method) fails instead of loading a LLaVA
whose quantized layers are random."""

import json
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig


@pytest.fixture(scope="module")
def qap_repo(tiny_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qap")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig())
    model.save_pretrained(folder)
    tiny.tiny_processor().save_pretrained(folder)
    return folder


def run_without_optimum_qap(code: str) -> subprocess.CompletedProcess:
    guard = "import sys; sys.modules['optimum_qap'] = None\n"  # an accidental import would fail the test
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "load",
    [
        "from transformers import LlavaForConditionalGeneration as cls; cls.from_pretrained(repo)",
        "from transformers import AutoModelForImageTextToText as cls; cls.from_pretrained(repo)",
        "from transformers import pipeline; pipeline('image-text-to-text', model=repo)",
    ],
    ids=["llava", "auto", "pipeline"],
)
def test_load_without_import_fails_loudly(qap_repo, load):
    result = run_without_optimum_qap(f"repo = {str(qap_repo)!r}\n{load}\nprint('LOADED')")
    assert result.returncode != 0 and "LOADED" not in result.stdout
    assert "Unknown quantization type, got qap" in result.stderr
    assert "RuntimeError" in result.stderr and "MISMATCH" in result.stderr
    assert "layers.0.self_attn.q_proj.weight" in result.stderr  # the guard, named in transformers' report


def test_mistyped_quant_method_fails_even_with_the_import(qap_repo, tmp_path):
    for file in qap_repo.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "qapp"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_guard_is_one_empty_tensor_and_the_qap_load_ignores_it(qap_repo, caplog):
    with safe_open(qap_repo / "model.safetensors", "pt") as checkpoint:
        keys = checkpoint.keys()  # noqa: SIM118 (safe_open is not a dict)
        weights = [key for key in keys if key.endswith("_proj.weight") and "language_model" in key]
        assert weights == ["language_model.model.layers.0.self_attn.q_proj.weight"]
        assert checkpoint.get_tensor(weights[0]).shape == (0,)
    model = LlavaForConditionalGeneration.from_pretrained(qap_repo)
    assert "UNEXPECTED" not in caplog.text
    assert not hasattr(model.model.language_model.layers[0].self_attn.q_proj, "weight")
    assert torch.isfinite(model(**tiny.tiny_processor()(images=tiny.noise_image(0), text="USER: <image>\nwhat ?",
                                                        return_tensors="pt")).logits).all()
