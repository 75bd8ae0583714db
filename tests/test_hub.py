"""push_to_hub / save_pretrained(push_to_hub=True): no Hub is reachable here, so the tests check what would be uploaded
(the arguments of huggingface_hub's create_commit, the one call both uploads end in)."""

import json
import os

import pytest
import tiny
import yaml
from huggingface_hub import HfApi
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig
from optimum_qap.hub import hub_model_id, model_card


@pytest.fixture
def hub(monkeypatch):
    """Records create_repo and create_commit calls; the commit's files are read while they still exist."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = {"repo_id": repo_id, **kwargs}
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as file:
                files[op.path_in_repo] = file.read()
        calls["commit"] = {"repo_id": repo_id, "files": files, **kwargs}
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, **kwargs: calls.setdefault("branch", kwargs))
    return calls


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def quantized(repo, **config):
    return LlavaForConditionalGeneration.from_pretrained(
        repo, quantization_config=QAPrunerConfig(**({"a_bits": 8, "keep_ratio": 0.25} | config))
    )


def test_push_to_hub_honours_its_arguments_and_uploads_the_qap_card(tiny_repo, hub):
    model = quantized(tiny_repo)
    model.config.quantization_config.base_model = "llava-hf/llava-1.5-7b-hf"
    result = model.push_to_hub("me/llava-qap", tags=["my-tag"], commit_message="first", commit_description="details",
                               private=True, revision="v1", create_pr=True, processor=tiny.tiny_processor())
    assert result == "commit-url" and hub["repo"]["private"] is True
    commit = hub["commit"]
    assert (commit["repo_id"], commit["commit_message"], commit["commit_description"]) == ("me/llava-qap", "first",
                                                                                          "details")
    assert commit["revision"] == "v1" and commit["create_pr"] is True and hub["branch"]["branch"] == "v1"
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= set(commit["files"])
    card = commit["files"]["README.md"].decode()
    metadata = front_matter(card)
    assert metadata["base_model"] == "llava-hf/llava-1.5-7b-hf" and metadata["base_model_relation"] == "quantized"
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    assert {"optimum-qap", "my-tag"} <= set(metadata["tags"])
    assert "4-bit asymmetric, groups of 128, packed" in card and "8-bit asymmetric, per token" in card
    assert "Visual tokens kept per image: 25.0%" in card
    assert "pip install optimum-qap" in card and "import optimum_qap" in card
    assert 'from_pretrained("me/llava-qap")' in card


def test_save_pretrained_push_to_hub_uploads_the_qap_card(tiny_repo, hub, tmp_path):
    model = quantized(tiny_repo)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/out", commit_message="msg",
                          commit_description="why", create_pr=True)
    commit = hub["commit"]
    assert (commit["repo_id"], commit["commit_message"], commit["commit_description"], commit["create_pr"]) == (
        "me/out", "msg", "why", True)
    assert "optimum-qap" in front_matter(commit["files"]["README.md"].decode())["tags"]
    assert {"config.json", "model.safetensors"} <= set(commit["files"])
    assert (tmp_path / "out" / "README.md").exists()
    model.save_pretrained(tmp_path / "plain")  # no push: no card, as transformers' own save_pretrained
    assert not (tmp_path / "plain" / "README.md").exists() and "branch" not in hub


def test_pushed_config_has_no_local_paths(tiny_repo, hub, tmp_path):
    image = tmp_path / "calibration-image.png"
    tiny.noise_image(3).save(image)
    samples = [{"image": str(image), "text": "USER: <image>\nwhat is in the image ? ASSISTANT:"}]
    model = quantized(tiny_repo, a_granularity="static_per_channel", calibration=samples, weight_method="rtn",
                      alpha=0.5)
    config = model.config.quantization_config
    assert config.base_model is None  # tiny_repo is a local folder, not a Hub id
    assert config.calibration is None and config.calibration_summary["source"] == "user samples"
    model.push_to_hub("me/llava-qap")
    pushed = hub["commit"]["files"]["config.json"].decode()
    assert str(tmp_path) not in pushed and tiny_repo not in pushed
    assert json.loads(pushed)["quantization_config"]["calibration_summary"]["samples"] == 1
    assert "base_model" not in front_matter(hub["commit"]["files"]["README.md"].decode())


def test_resaving_an_older_checkpoint_drops_its_local_base_model(tiny_repo, tmp_path):
    quantized(tiny_repo).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["quantization_config"]["base_model"] = tiny_repo  # what earlier releases wrote
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["base_model"] is None


def test_card_reads_well_without_a_base_model(tmp_path):
    config = QAPrunerConfig(a_granularity="static_per_channel", base_model=str(tmp_path))
    card = str(model_card(config))
    assert "base_model" not in card.split("---")[1]
    body = card.split("---", 2)[2].strip().splitlines()
    assert body[0].startswith("# ") and body[2].startswith("This model is a LLaVA model compressed")
    assert "Not calibrated" in card and "pip install optimum-qap" in card


def test_hub_model_id():
    snapshot = os.path.join("cache", "hub", "models--llava-hf--llava-1.5-7b-hf", "snapshots", "0123abc")
    assert hub_model_id(snapshot) == "llava-hf/llava-1.5-7b-hf"
    assert hub_model_id("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert hub_model_id(os.path.abspath("some/model")) is None and hub_model_id("./model") is None
    assert hub_model_id(None) is None
