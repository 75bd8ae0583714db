"""push_to_hub: no Hub is reachable here, so the test checks what is handed to huggingface_hub's upload call."""

import os

import yaml
from huggingface_hub import HfApi
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig
from optimum_qap.hub import model_card


def test_push_to_hub_uploads_checkpoint_and_generated_card(tiny_repo, monkeypatch):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        with open(os.path.join(folder_path, "README.md")) as card:
            uploaded["card"] = card.read()
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=QAPrunerConfig(a_bits=8, keep_ratio=0.25)
    )
    model.config.quantization_config.base_model = "llava-hf/llava-1.5-7b-hf"
    assert model.push_to_hub("me/llava-qap") == "commit-url"
    assert uploaded["repo_id"] == "me/llava-qap"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    front_matter = yaml.safe_load(uploaded["card"].split("---")[1])
    assert front_matter["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert front_matter["base_model_relation"] == "quantized"
    assert front_matter["library_name"] == "transformers"
    assert front_matter["pipeline_tag"] == "image-text-to-text"
    assert "optimum-qap" in front_matter["tags"]
    body = uploaded["card"]
    assert "4-bit asymmetric, groups of 128, packed" in body and "8-bit asymmetric, per token" in body
    assert "Visual tokens kept per image: 25.0%" in body
    assert "import optimum_qap" in body and 'from_pretrained("me/llava-qap")' in body


def test_card_omits_local_base_model_and_reports_missing_calibration(tmp_path):
    config = QAPrunerConfig(a_granularity="static_per_channel", base_model=str(tmp_path))
    card = str(model_card(config))
    assert "base_model" not in card.split("---")[1]
    assert "Not calibrated" in card
