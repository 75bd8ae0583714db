"""Model card and `push_to_hub` for compressed models (the card replaces transformers' generic one)."""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .config import QAPrunerConfig

CARD_TAGS = ["optimum-qap", "qapruner", "quantized", "token-pruning", "llava", "image-text-to-text"]


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


def model_card(config: QAPrunerConfig, repo_id: str | None = None) -> ModelCard:
    """A model card with Hub metadata, the compression settings, calibration and how to load the model."""
    base_model = config.base_model
    if base_model is not None and os.path.isdir(base_model):
        base_model = None  # a local folder is not a Hub id
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(CARD_TAGS),
    )
    name = repo_id or "this model"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'QAPruner-compressed model'}",
        "",
        f"{name} is {'`' + base_model + '`' if base_model else 'a LLaVA model'} compressed with "
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
        "```python",
        "import optimum_qap  # registers the quantization method",
        "from transformers import LlavaForConditionalGeneration",
        f'model = LlavaForConditionalGeneration.from_pretrained("{repo_id or "path/to/model"}")',
        "```",
        "",
    ]
    return ModelCard("\n".join(lines))


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload QAPruner-compressed model",
    revision: str | None = None,
    create_pr: bool = False,
    processor=None,
    **save_kwargs,
):
    """Save ``model`` (and ``processor``) with a generated model card and upload the folder to ``repo_id``."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        if processor is not None:
            processor.save_pretrained(folder)
        model_card(model.config.quantization_config, repo_id).save(os.path.join(folder, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
