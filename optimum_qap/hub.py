"""Model card, `push_to_hub` and `save_pretrained(push_to_hub=True)` for compressed models.

Both uploads take transformers' arguments (commit_message, commit_description, private, token, revision, create_pr,
max_shard_size, tags; repo_id for `save_pretrained`), upload through transformers' own commit helper, and carry the
optimum-qap model card instead of transformers' generic one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .config import QAPrunerConfig

CARD_TAGS = ["optimum-qap", "qapruner", "quantized", "token-pruning", "llava", "image-text-to-text"]
DEFAULT_COMMIT_MESSAGE = "Upload QAPruner-compressed model"
# a Hub cache snapshot folder: .../models--{org}--{name}/snapshots/{revision}
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots")


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` as a Hub model id: itself if it is one, the id of a Hub cache snapshot, else None (a local
    folder is no id, and its path is not written into a config that may be published)."""
    if not name_or_path:
        return None
    cached = _CACHE_SNAPSHOT.search(name_or_path)
    if cached:
        return f"{cached['org']}/{cached['name']}"
    if os.path.exists(name_or_path) or os.path.isabs(name_or_path) or name_or_path.startswith("."):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def _describe_quantization(config: QAPrunerConfig) -> list[str]:
    group = "per output channel" if config.w_group_size is None else f"groups of {config.w_group_size}"
    weights = (
        "kept in the model dtype"
        if not config.quantizes_weights
        else f"{config.w_bits}-bit {'symmetric' if config.w_symmetric else 'asymmetric'}, {group}, packed"
    )
    if config.quantizes_activations:
        granularity = config.a_granularity.replace("_", " ")
        if config.a_granularity == "per_group":
            granularity += f" (group {config.a_group_size})"
        activations = f"{config.a_bits}-bit {'symmetric' if config.a_symmetric else 'asymmetric'}, {granularity}"
    else:
        activations = "not quantized"
    parts = ["language model"]
    parts += ["projector"] * config.quantize_projector + ["vision tower"] * config.quantize_vision_tower
    if config.quantizes_weights:
        weights += ", GPTQ" if config.weight_method == "gptq" else ", round to nearest"
    rotation = (
        f"randomized Hadamard (QuaRot-style, seed {config.rotation_seed}; norms fused, online transforms before "
        "o_proj and down_proj)"
        if config.rotation
        else "none"
    )
    return [
        f"- Rotation: {rotation}",
        f"- Weights: {weights}",
        f"- Activations: {activations}",
        f"- Quantized parts: {', '.join(parts)} (lm_head kept in full precision)",
    ]


def _describe_pruning(config: QAPrunerConfig) -> list[str]:
    if not config.prunes:
        return ["- Visual token pruning: off"]
    budget = f"{config.keep_tokens} tokens" if config.keep_tokens is not None else f"{config.keep_ratio:.1%}"
    auto = config.auto_selection or {}
    semantic = config.semantic
    if config.clip_text_model is not None:
        semantic += f" with the CLIP text tower of {config.clip_text_model}"
    lines = [f"- Visual tokens kept per image: {budget} ({config.selection} selection)"]
    if config.fusion == "outlier_slots":
        slots = auto.get("outlier_slots", config.outlier_slots)
        lines.append(
            f"- Fusion: up to {slots} slots for tokens whose range or quantization error exceeds "
            f"{config.outlier_ratio} x the calibrated median, the rest by {semantic} score"
        )
    else:
        alpha = auto.get("alpha", config.alpha)
        lines.append(
            f"- Score: S = {alpha} * S^P ({semantic}) + {1 - alpha:.3g} * S^Q "
            f"(S^Q = {config.error_weight} * group error + {config.range_weight} * range)"
        )
    if auto:
        name, curve = ("outlier slots", auto["slot_curve"]) if "slot_curve" in auto else ("alpha", auto["alpha_curve"])
        points = ", ".join(f"{key}: {value:.4g}" for key, value in curve.items())
        lines.append(
            f"- {name} chosen automatically on {auto['samples']} calibration samples by {auto['criterion']} "
            f"(lower is better): {points}"
        )
    return lines


def _describe_calibration(config: QAPrunerConfig) -> str:
    summary = config.calibration_summary
    if not summary:
        if config.needs_calibration:
            return "Not calibrated: static activation ranges must be calibrated before use."
        return "No calibration: activation ranges are computed per token at run time."
    details = ", ".join(f"{key}: {value}" for key, value in summary.items())
    return f"Calibrated with optimum-qap ({details})."


def model_card(config: QAPrunerConfig, repo_id: str | None = None, tags: Iterable[str] = ()) -> ModelCard:
    """A model card with Hub metadata, the compression settings, calibration and how to install and load the model."""
    base_model = hub_model_id(config.base_model)
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(dict.fromkeys([*CARD_TAGS, *tags])),
    )
    path = repo_id or "path/to/model"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'QAPruner-compressed LLaVA'}",
        "",
        f"This model is {'`' + base_model + '`' if base_model else 'a LLaVA model'} compressed with "
        "[optimum-qap](https://github.com/optimum-qap/optimum-qap): low-bit weights and activations in the "
        "language model, and QAPruner visual-token pruning (semantic relevance fused with quantization "
        "sensitivity).",
        "",
        "## Settings",
        "",
        *_describe_quantization(config),
        *_describe_pruning(config),
        "",
        "## Calibration",
        "",
        _describe_calibration(config),
        "",
        "## Load",
        "",
        "The weights are packed in optimum-qap's format: install it, and import it before loading.",
        "",
        "```bash",
        "pip install optimum-qap",
        "```",
        "",
        "```python",
        "import optimum_qap  # registers the qap quantization method with transformers",
        "from transformers import AutoModelForImageTextToText, pipeline",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{path}")  # the checkpoint\'s own class',
        f'pipe = pipeline("image-text-to-text", model="{path}")',
        "```",
        "",
        "Without `import optimum_qap`, transformers does not know the `qap` method and refuses the checkpoint (a "
        "size mismatch on an empty guard tensor). Pruning settings can be changed at load time, e.g. "
        f'`from_pretrained("{path}", quantization_config=optimum_qap.QAPrunerConfig(keep_ratio=0.25))`; '
        "`model.dequantize()` gives the plain float model.",
        "",
    ]
    return ModelCard("\n".join(lines))


def _tag_list(model, tags: str | Iterable[str] | None) -> list[str]:
    extra = [tags] if isinstance(tags, str) else list(tags or [])
    return list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *extra]))


def _write_card(model, folder: str, repo_id: str, tags: list[str]) -> None:
    model_card(model.config.quantization_config, repo_id, tags).save(os.path.join(folder, "README.md"))


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    processor=None,
):
    """`PreTrainedModel.push_to_hub` for a qap model: the same arguments, plus ``processor`` (saved beside the
    model), and the optimum-qap model card (carrying ``tags``) as README.md."""
    repo_id = HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        type(model).save_pretrained(model, folder, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(folder)
        _write_card(model, folder, repo_id, _tag_list(model, tags))
        return model._upload_modified_files(
            folder, repo_id, {}, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, token=token,
            create_pr=create_pr, revision=revision, commit_description=commit_description,
        )


def save_pretrained(model, save_directory, *args, push_to_hub: bool = False, **kwargs):
    """`PreTrainedModel.save_pretrained` for a qap model; with ``push_to_hub=True`` the files it changed are
    uploaded with the optimum-qap model card, honouring repo_id (default: the folder's name), commit_message,
    commit_description, create_pr, revision, private and token."""
    save = type(model).save_pretrained
    if not push_to_hub:
        return save(model, save_directory, *args, **kwargs)
    commit = {name: kwargs.pop(name) for name in ("commit_message", "commit_description", "create_pr", "revision")
              if name in kwargs}
    commit.setdefault("commit_message", DEFAULT_COMMIT_MESSAGE)
    repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
    token = kwargs.get("token")
    repo_id = HfApi().create_repo(repo_id, private=kwargs.pop("private", None), token=token, exist_ok=True).repo_id
    os.makedirs(save_directory, exist_ok=True)
    timestamps = model._get_files_timestamps(save_directory)
    save(model, save_directory, *args, **kwargs)
    _write_card(model, str(save_directory), repo_id, _tag_list(model, None))
    return model._upload_modified_files(str(save_directory), repo_id, timestamps, token=token, **commit)
