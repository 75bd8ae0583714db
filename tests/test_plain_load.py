"""A qap checkpoint loaded without optimum-qap (or with a mistyped quant_method) fails instead of loading a LLaVA
whose layers are random or miss their rotation."""

import json
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig

CONFIGS = {
    "w4a4": {},
    "pruning-only-rotated": {"w_bits": 16, "a_bits": 16},
    "w16a4-rotated": {"w_bits": 16},
}


def save_qap(source, folder, **config):
    model = LlavaForConditionalGeneration.from_pretrained(source, quantization_config=QAPrunerConfig(**config))
    model.save_pretrained(folder)
    tiny.tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def qap_repo(request, tiny_repo, tmp_path_factory):
    return save_qap(tiny_repo, tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


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
    guard = "layers.0.self_attn.q_proj.weight" if "w4a4" in qap_repo.name else "language_model.norm.weight"
    assert guard in result.stderr  # named in transformers' load report


def test_mistyped_quant_method_fails_even_with_the_import(qap_repo, tmp_path):
    for file in qap_repo.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "qapp"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)


def sample():
    return tiny.tiny_processor()(images=tiny.noise_image(0), text="USER: <image>\nwhat ?", return_tensors="pt")


def test_packed_guard_is_one_empty_tensor_and_the_qap_load_ignores_it(tiny_repo, tmp_path, caplog):
    folder = save_qap(tiny_repo, tmp_path)
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        keys = checkpoint.keys()  # noqa: SIM118 (safe_open is not a dict)
        weights = [key for key in keys if key.endswith("_proj.weight") and "language_model" in key]
        assert weights == ["language_model.model.layers.0.self_attn.q_proj.weight"]
        assert checkpoint.get_tensor(weights[0]).shape == (0,)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    assert "UNEXPECTED" not in caplog.text
    assert not hasattr(model.model.language_model.layers[0].self_attn.q_proj, "weight")
    assert torch.isfinite(model(**sample()).logits).all()


NORM = "language_model.model.norm.weight"


@pytest.mark.parametrize("config", ["pruning-only-rotated", "w16a4-rotated"])
def test_norm_guard_reloads_bit_exact(tiny_repo, tmp_path, config):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo,
                                                          quantization_config=QAPrunerConfig(**CONFIGS[config]))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        assert checkpoint.get_tensor(NORM).shape == (0,)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    norm = reloaded.model.language_model.norm.weight
    assert norm.shape == (64,) and torch.equal(norm, torch.ones(64))
    assert torch.equal(reloaded(**sample()).logits, model(**sample()).logits)


def test_checkpoint_written_before_the_guard_still_loads(tiny_repo, tmp_path):
    folder = save_qap(tiny_repo, tmp_path / "new", w_bits=16, a_bits=16)
    with safe_open(folder / "model.safetensors", "pt") as checkpoint:
        metadata = checkpoint.metadata()
        tensors = {key: checkpoint.get_tensor(key) for key in checkpoint.keys()}  # noqa: SIM118
    tensors[NORM] = torch.ones(64)  # what the fused norm held before the guard
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(model.model.language_model.norm.weight, torch.ones(64))
    assert torch.isfinite(model(**sample()).logits).all()
