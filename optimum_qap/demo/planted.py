"""Plant massive activations and attention sinks into a LLaVA model, by editing its weights.

Large pretrained LLMs carry "massive activations": a few tokens with values hundreds of times the median in a few
hidden channels, which the decoder uses as attention sinks (Sun et al., arXiv 2402.17762); LLaVA's decoder shows
such visual sink tokens too. A small model trained from scratch has none, so QAPruner's premise (dropping the
outlier tokens hurts a quantized model) cannot be tested on it. `plant_massive_activations` builds that premise into
a model deterministically, with weight edits only (no hooks), so the result saves and reloads as an ordinary
`LlavaForConditionalGeneration`:

1. Massive visual tokens. A large multiple of a fixed unit vector u is added to the CLIP position-embedding rows of
   the chosen patches, so their features at the feature layer carry a strong, image-independent u-signature. On
   ``images``, the projection of the feature-layer outputs onto the planted-minus-normal mean direction separates
   the two populations; the least important hidden unit of the projector's ``linear_1`` is repurposed as a detector
   along that direction (bias below the planted population, above the normal one, so its GELU is ~0 for normal
   tokens), and its ``linear_2`` column writes ``scale`` x the median absolute projector output into ``channels``.
2. Attention sinks. In every decoder layer the lowest-frequency RoPE pair of every head (which barely rotates) is
   dedicated to the sinks: the query row reads a consistent positive component of the layer's normalised inputs
   (their mean direction, minus what varies between tokens: a ridge fit of x @ w = 1 on ``images``), the key row
   reads ``channels`` only (large for the massive tokens, small otherwise), and the ``v_proj`` and other
   ``k_proj`` columns of ``channels`` are zeroed, so sinks absorb attention without contributing values. The key
   magnitude of each layer is set so that the sinks take ``sink_mass`` of the attention of the text queries after
   the image; ``o_proj`` is scaled per head by 1 / (1 - that head's mean sink mass), so the unpruned model's outputs
   stay close to the original while a model that loses its sinks over-weights every value.

`build_planted_demo` does this to the shipped shapes-VQA demo model and saves model + processor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

PLANTED_CONFIG_KEY = "planted_massive_activations"


# ----------------------------------------------------------------------------- model parts


def _vision_model(model: nn.Module) -> nn.Module:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def _text_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def grid_corners(model: nn.Module) -> tuple[int, ...]:
    """Patch indices of the four corners of the image grid (background in the demo task)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return (0, side - 1, side * (side - 1), side * side - 1)


def default_channels(hidden_size: int, count: int = 2, seed: int = 0) -> tuple[int, ...]:
    """``count`` LLM hidden channels drawn deterministically from ``seed``."""
    order = torch.randperm(hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    return tuple(sorted(int(c) for c in order[:count]))


def _token_offset(model: nn.Module) -> int:
    """Index of patch 0 among the visual tokens the LLM sees ([CLS] comes first with the "full" strategy)."""
    return int(model.config.vision_feature_select_strategy == "full")


# ----------------------------------------------------------------------------- inputs


def _prepare(model: nn.Module, images, processor, prompts) -> list[dict[str, torch.Tensor]]:
    """One unpadded input dict per image: pixel values, and input ids (the prompt, or BOS + image placeholders)."""
    if isinstance(images, torch.Tensor):
        pixels = list(images.unsqueeze(1) if images.dim() == 4 else images)
        if prompts is not None:
            raise ValueError("prompts need PIL images and a processor")
    else:
        if processor is None:
            raise ValueError("plant_massive_activations needs a processor to turn PIL images into pixel values")
        images = list(images)
        image_processor = getattr(processor, "image_processor", processor)
        pixels = [image_processor(images=[i.convert("RGB")], return_tensors="pt")["pixel_values"] for i in images]
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(prompts)} prompts for {len(pixels)} images")
        samples = []
        for image, prompt in zip(images, prompts, strict=True):
            encoded = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
            samples.append({"input_ids": encoded["input_ids"], "pixel_values": encoded["pixel_values"]})
    else:
        from ..pruning.patch import visual_tokens_per_image

        n = visual_tokens_per_image(model.config)
        bos = model.config.text_config.bos_token_id
        ids = ([] if bos is None else [bos]) + [model.config.image_token_id] * n
        samples = [{"input_ids": torch.tensor([ids]), "pixel_values": p} for p in pixels]
    device, dtype = model.device, model.dtype
    return [
        {"input_ids": s["input_ids"].to(device), "pixel_values": s["pixel_values"].to(device, dtype)} for s in samples
    ]


def _sink_positions(sample: dict[str, torch.Tensor], image_token_id: int, token_indices: Sequence[int]) -> torch.Tensor:
    placeholders = (sample["input_ids"][0] == image_token_id).nonzero().flatten()
    return placeholders[list(token_indices)]


@torch.no_grad()
def _projector_io(model: nn.Module, samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-layer features [B, N, Dv], projector hidden activations [B, N, H] and outputs [B, N, D]."""
    projector = model.model.multi_modal_projector
    store: dict[str, list[torch.Tensor]] = {"in": [], "hidden": [], "out": []}
    handles = [
        projector.register_forward_hook(lambda _m, args, out: (store["in"].append(args[0]), store["out"].append(out))),
        projector.act.register_forward_hook(lambda _m, _a, out: store["hidden"].append(out)),
    ]
    try:
        for sample in samples:
            model.model.get_image_features(pixel_values=sample["pixel_values"])
    finally:
        for handle in handles:
            handle.remove()
    return tuple(torch.cat(store[k]).float() for k in ("in", "hidden", "out"))


@torch.no_grad()
def _layer_inputs(model: nn.Module, samples, layer_index: int) -> list[torch.Tensor]:
    """Normalised inputs ([L, D], the input of q/k/v) of decoder layer ``layer_index`` for each sample."""
    attention = _text_model(model).layers[layer_index].self_attn
    store: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"])[0].float())

    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sample in samples:
            model(**sample)
    finally:
        handle.remove()
    return store


# ----------------------------------------------------------------------------- 1. massive visual tokens


def _boost_position_embeddings(model: nn.Module, samples, patches: Sequence[int], boost: float, seed: int) -> float:
    """Add ``boost`` x (typical embedding norm) x u to the position embeddings of ``patches``; returns the multiple."""
    vision = _vision_model(model)
    norms: list[torch.Tensor] = []
    handle = vision.pre_layrnorm.register_forward_pre_hook(lambda _m, args: norms.append(args[0].float().norm(dim=-1)))
    try:
        with torch.no_grad():
            for sample in samples:
                vision(pixel_values=sample["pixel_values"])
    finally:
        handle.remove()
    typical = float(torch.cat([n.flatten() for n in norms]).median())
    weight = vision.embeddings.position_embedding.weight
    u = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed))
    u = u / u.norm()
    multiple = boost * typical
    with torch.no_grad():
        for patch in patches:
            weight[1 + patch] += (multiple * u).to(weight)
    return multiple


def _plant_detector(
    model: nn.Module, samples, token_indices, channels, scale: float, features0, hidden0, outputs0
) -> dict:
    projector = model.model.multi_modal_projector
    features, _, _ = _projector_io(model, samples)
    planted = torch.zeros(features.shape[1], dtype=torch.bool)
    planted[list(token_indices)] = True
    direction = features[:, planted].mean((0, 1)) - features[:, ~planted].mean((0, 1))
    direction = direction / direction.norm()
    planted_proj = features[:, planted] @ direction
    normal_proj = features[:, ~planted] @ direction
    low, high = float(normal_proj.max()), float(planted_proj.min())
    if not high > low:
        raise RuntimeError(
            f"planted and normal tokens do not separate along the planted direction (normal max {low:.3g} >= "
            f"planted min {high:.3g}); raise position_boost"
        )
    threshold, margin = (low + high) / 2, (high - low) / 2
    gain = 12.0 / margin  # normal tokens reach at most -12 before the activation (GELU(-12) ~ 0)
    # the least important hidden unit: mean |activation| x norm of what it writes
    w1, w2 = projector.linear_1, projector.linear_2
    importance = hidden0.abs().mean((0, 1)) * w2.weight.detach().float().norm(dim=0)
    unit = int(importance.argmin())
    with torch.no_grad():
        w1.weight[unit] = (gain * direction).to(w1.weight)
        if w1.bias is not None:
            w1.bias[unit] = -gain * threshold
        elif threshold != 0:
            raise ValueError("the projector has no bias; a detector unit needs one")
    activation = projector.act(gain * (planted_proj - threshold))
    median = float(outputs0.abs().median())
    target = scale * median
    with torch.no_grad():
        w2.weight[:, unit] = 0
        w2.weight[list(channels), unit] = target / float(activation.mean())
    return {
        "detector_unit": unit,
        "detector_unit_importance": float(importance[unit]),
        "separation": {"normal_max": low, "planted_min": high, "threshold": threshold, "gain": gain},
        "median_abs_projector_output": median,
        "target_value": target,
        "feature_direction": direction,
    }


def massive_ratio_stats(outputs: torch.Tensor, outputs0: torch.Tensor, token_indices, channels, median: float) -> dict:
    """Planted value / median |projector output| in ``channels`` and the change of the other tokens."""
    planted = torch.zeros(outputs.shape[1], dtype=torch.bool)
    planted[list(token_indices)] = True
    massive = outputs[:, planted][..., list(channels)] / median
    normal = outputs[:, ~planted]
    change = (normal - outputs0[:, ~planted]).norm(dim=-1) / outputs0[:, ~planted].norm(dim=-1).clamp_min(1e-12)
    return {
        "massive_ratio": float(massive.mean()),
        "massive_ratio_min": float(massive.min()),
        "massive_ratio_max": float(massive.max()),
        "normal_channel_ratio_max": float(normal[..., list(channels)].abs().max() / median),
        "normal_max_ratio": float(normal.abs().max() / median),
        "normal_token_change_mean": float(change.mean()),
        "normal_token_change_max": float(change.max()),
    }


# ----------------------------------------------------------------------------- 2. attention sinks


def _rope(text_model: nn.Module, x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(length, device=x.device).unsqueeze(0)
    cos, sin = text_model.rotary_emb(x.unsqueeze(0), positions)
    return cos[0].float(), sin[0].float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _scores(attention: nn.Module, text_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-softmax causal attention scores [H, L, L] of one sample (eager attention, recomputed)."""
    head_dim = attention.head_dim
    length = x.shape[0]
    q = attention.q_proj(x.to(attention.q_proj.weight.dtype)).float().view(length, -1, head_dim).transpose(0, 1)
    k = attention.k_proj(x.to(attention.k_proj.weight.dtype)).float().view(length, -1, head_dim).transpose(0, 1)
    cos, sin = _rope(text_model, x, length)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q @ k.transpose(1, 2) * attention.scaling
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _sink_mass(scores: torch.Tensor, sinks: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention mass [H, Q] on the sink keys of the query rows ``queries``."""
    probs = torch.softmax(scores[:, queries], dim=-1)
    return probs[..., sinks].sum(-1)


def _plant_sinks_in_layer(
    model: nn.Module, samples, layer_index: int, sinks: list[torch.Tensor], channels, sink_mass: float, compensate: bool
) -> dict:
    text_model = _text_model(model)
    attention = text_model.layers[layer_index].self_attn
    inputs = _layer_inputs(model, samples, layer_index)
    head_dim = attention.head_dim
    low, high = head_dim // 2 - 1, head_dim - 1  # the lowest-frequency RoPE pair (rotate_half layout)
    channels = list(channels)
    normal = torch.cat([x[_not(s, x.shape[0])] for x, s in zip(inputs, sinks, strict=True)])
    query_row = _constant_readout(normal)
    projection = normal @ query_row
    signature = torch.cat([x[s][:, channels] for x, s in zip(inputs, sinks, strict=True)]).mean(0)
    key_direction = torch.zeros(normal.shape[1])
    key_direction[channels] = signature / signature.norm()

    q_proj, k_proj, v_proj, o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
    num_heads = q_proj.weight.shape[0] // head_dim
    num_kv = k_proj.weight.shape[0] // head_dim
    with torch.no_grad():
        v_proj.weight[:, channels] = 0
        k_proj.weight[:, channels] = 0
        for head in range(num_heads):
            q_proj.weight[head * head_dim + low] = query_row.to(q_proj.weight)
            q_proj.weight[head * head_dim + high] = 0
            if q_proj.bias is not None:
                q_proj.bias[[head * head_dim + low, head * head_dim + high]] = 0
        for head in range(num_kv):
            k_proj.weight[[head * head_dim + low, head * head_dim + high]] = 0
            if k_proj.bias is not None:
                k_proj.bias[[head * head_dim + low, head * head_dim + high]] = 0
    # scores are linear in the key gain b: base (other dims) + b * (q_low k_low cos(w (i - j))) * scaling
    text_queries = [torch.arange(int(s.max()) + 1, x.shape[0]) for x, s in zip(inputs, sinks, strict=True)]
    bases = [_scores(attention, text_model, x)[:, q] for x, q in zip(inputs, text_queries, strict=True)]
    pair = []
    for x, q in zip(inputs, text_queries, strict=True):
        q_low = x[q] @ query_row
        k_low = x @ key_direction
        cos, _ = _rope(text_model, x, x.shape[0])
        angle = torch.acos(cos[:, low].clamp(-1, 1))
        relative = torch.cos(angle[q, None] - angle[None, :])
        pair.append(q_low[:, None] * k_low[None, :] * relative * attention.scaling)

    def mean_mass(gain: float) -> float:
        masses = [
            torch.softmax(base + gain * p, dim=-1)[..., s].sum(-1).mean()
            for base, p, s in zip(bases, pair, sinks, strict=True)
        ]
        return float(torch.stack(masses).mean())

    lo, hi = 0.0, 1.0
    while mean_mass(hi) < sink_mass and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_mass(mid) < sink_mass else (lo, mid)
    key_gain = (lo + hi) / 2
    with torch.no_grad():
        for head in range(num_kv):
            k_proj.weight[head * head_dim + low] = (key_gain * key_direction).to(k_proj.weight)
    per_head = torch.stack(
        [
            _sink_mass(_scores(attention, text_model, x), s, q).mean(-1)
            for x, s, q in zip(inputs, sinks, text_queries, strict=True)
        ]
    ).mean(0)
    if compensate:
        with torch.no_grad():
            for head in range(num_heads):
                columns = slice(head * head_dim, (head + 1) * head_dim)
                o_proj.weight[:, columns] /= float(1 - per_head[head])
    return {
        "key_gain": key_gain,
        "query_positive_fraction": float((projection > 0).float().mean()),
        "query_mean": float(projection.mean()),
        "query_std": float(projection.std()),
        "calibrated_sink_mass_per_head": [round(float(m), 4) for m in per_head],
    }


def _constant_readout(x: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """A row w with x @ w ~ 1 for every token (ridge least squares): a consistent, positive query component.

    It starts from the mean direction of ``x`` (the dominant common component of normalised hidden states) and
    removes what varies from token to token.
    """
    gram = x.T @ x / x.shape[0]
    rhs = x.mean(0)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, rhs)


def _not(indices: torch.Tensor, length: int) -> torch.Tensor:
    mask = torch.ones(length, dtype=torch.bool, device=indices.device)
    mask[indices] = False
    return mask


@torch.no_grad()
def sink_attention_mass(model: nn.Module, samples, sinks: list[torch.Tensor]) -> dict[str, list[float]]:
    """Mean attention mass on the sink tokens per decoder layer, measured with eager attention.

    ``text_queries``: the positions after the last sink (the prompt text, where the answer is read out);
    ``image_queries``: the visual tokens after the first sink.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        per_layer_text: list[list[float]] = []
        per_layer_image: list[list[float]] = []
        for sample, sink in zip(samples, sinks, strict=True):
            attentions = model(**sample, output_attentions=True).attentions
            placeholders = (sample["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
            length = sample["input_ids"].shape[1]
            text = torch.arange(int(sink.max()) + 1, length)
            image = placeholders[placeholders > sink.min()]
            image = image[_not_in(image, sink)]
            for index, attention in enumerate(attentions):
                mass = attention[0][..., sink].float().sum(-1)  # [H, L]
                if len(per_layer_text) <= index:
                    per_layer_text.append([])
                    per_layer_image.append([])
                per_layer_text[index].append(float(mass[:, text].mean()))
                per_layer_image[index].append(float(mass[:, image].mean()))
    finally:
        model.set_attn_implementation(previous)
    return {
        "text_queries": [round(sum(v) / len(v), 4) for v in per_layer_text],
        "image_queries": [round(sum(v) / len(v), 4) for v in per_layer_image],
    }


def _not_in(values: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    return ~(values[:, None] == excluded[None, :]).any(-1)


# ----------------------------------------------------------------------------- public API


def plant_massive_activations(
    model: nn.Module,
    images: Sequence[Image.Image] | torch.Tensor,
    positions: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    scale: float = 400.0,
    seed: int = 0,
    *,
    processor=None,
    prompts: Sequence[str] | None = None,
    sink_mass: float = 0.5,
    position_boost: float = 20.0,
    compensate: bool = True,
) -> dict:
    """Edit the weights of a `LlavaForConditionalGeneration` in place so that it has massive visual sink tokens.

    Args:
        model: a LLaVA model with a CLIP vision tower, a two-layer MLP projector and a Llama-style decoder.
        images: PIL images (with ``processor``) or pixel values ``[B, 3, H, W]`` to measure on.
        positions: patch indices (row-major, as the LLM sees them) to make massive; default the four grid corners.
        channels: LLM hidden channels that carry the massive values; default two channels drawn from ``seed``.
        scale: the planted value, as a multiple of the median absolute projector output.
        seed: seed of the position-embedding direction u (and of the default channels).
        processor: the model's `LlavaProcessor` (or image processor), needed for PIL images and ``prompts``.
        prompts: full prompts (with the image placeholder) to measure the decoder on, one per image; default BOS +
            the image placeholders only.
        sink_mass: attention mass the sinks take from the text queries after the image, in every layer.
        position_boost: size of the position-embedding edit, in multiples of the typical embedding norm.
        compensate: scale each head's ``o_proj`` by 1 / (1 - its mean sink mass).

    Returns:
        JSON-serialisable statistics: ``massive_ratio`` (planted value / median |projector output|, mean over
        planted tokens and channels, and min/max), ``normal_token_change_mean``/``_max`` (relative L2 change of the
        other tokens' projector outputs), ``sink_attention_mass`` (mean mass per layer, eager attention, for text
        and image queries), the chosen positions/channels and per-layer details. Also stored in
        ``model.config.planted_massive_activations``.
    """
    if not 0 < sink_mass < 1:
        raise ValueError(f"sink_mass must be in (0, 1), got {sink_mass}")
    if not isinstance(model.config.vision_feature_layer, int):
        raise ValueError("plant_massive_activations supports a single vision_feature_layer")
    model.eval()
    hidden = model.config.text_config.hidden_size
    num_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    positions = tuple(grid_corners(model) if positions is None else (int(p) for p in positions))
    channels = tuple(default_channels(hidden, seed=seed) if channels is None else (int(c) for c in channels))
    if not positions or any(not 0 <= p < num_patches for p in positions):
        raise ValueError(f"positions must be patch indices in [0, {num_patches}), got {positions}")
    if not channels or any(not 0 <= c < hidden for c in channels):
        raise ValueError(f"channels must be in [0, {hidden}), got {channels}")
    with torch.no_grad():
        return _plant(
            model, images, positions, channels, scale, seed, processor, prompts, sink_mass, position_boost, compensate
        )


def _plant(model, images, positions, channels, scale, seed, processor, prompts, sink_mass, position_boost, compensate):
    samples = _prepare(model, images, processor, prompts)
    token_indices = [p + _token_offset(model) for p in positions]

    features0, hidden0, outputs0 = _projector_io(model, samples)
    multiple = _boost_position_embeddings(model, samples, positions, position_boost, seed)
    detector = _plant_detector(model, samples, token_indices, channels, scale, features0, hidden0, outputs0)
    detector.pop("feature_direction")
    _, _, outputs = _projector_io(model, samples)
    stats = massive_ratio_stats(outputs, outputs0, token_indices, channels, detector["median_abs_projector_output"])

    sinks = [_sink_positions(s, model.config.image_token_id, token_indices) for s in samples]
    layers = []
    for index in range(len(_text_model(model).layers)):
        layers.append(_plant_sinks_in_layer(model, samples, index, sinks, channels, sink_mass, compensate))
    mass = sink_attention_mass(model, samples, sinks)
    record = {
        "positions": list(positions),
        "channels": list(channels),
        "scale": scale,
        "seed": seed,
        "sink_mass_target": sink_mass,
        "position_boost": position_boost,
        "position_embedding_multiple": multiple,
        "compensate": compensate,
        "measured_on": len(samples),
        **stats,
        "sink_attention_mass": mass,
        "detector": detector,
        "layers": layers,
    }
    record = json.loads(json.dumps(record))
    setattr(model.config, PLANTED_CONFIG_KEY, record)
    return record


def planted_token_mask(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Which visual tokens (projector outputs ``[..., N, D]``) carry the planted massive values."""
    record = getattr(model.config, PLANTED_CONFIG_KEY, None)
    if not record:
        raise ValueError("this model has no planted massive activations")
    threshold = record["detector"]["median_abs_projector_output"] * record["scale"] / 4
    return features[..., record["channels"]].float().amin(-1) > threshold


def build_planted_demo(
    output_dir: str | Path,
    num_images: int = 32,
    model_path: str | Path | None = None,
    **kwargs,
) -> dict:
    """Plant massive activations into the shipped demo model (measured on training images), save model + processor.

    ``kwargs`` go to `plant_massive_activations`. Writes ``planted_stats.json`` (with the source weights' SHA-256)
    beside the weights; returns the stats.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import DEMO_MODEL_PATH, make_dataset

    source = DEMO_MODEL_PATH if model_path is None else model_path
    model = LlavaForConditionalGeneration.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    examples = make_dataset(num_images, "train")
    stats = plant_massive_activations(
        model, [e.image for e in examples], processor=processor, prompts=[e.prompt for e in examples], **kwargs
    )
    return save_derived_model(output_dir, model, processor, stats, source, "planted_stats.json")


def save_derived_model(output_dir, model: nn.Module, processor, stats: dict, source, stats_file: str) -> dict:
    """Save a model derived from ``source`` with its processor, and its stats (plus the source weights' SHA-256)."""
    stats["source"] = {"path": str(source), "sha256": weights_sha256(source)}
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / stats_file).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 of a saved model's ``model.safetensors`` (to tell whether a planted copy is stale)."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
