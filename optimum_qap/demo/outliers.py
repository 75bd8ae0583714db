"""Give a LLaVA model LLM-style activation outlier channels, by function-preserving weight edits.

Why. Round-to-nearest W4A4 is hard on real LLaMA-class models because a few input channels of their linear layers
carry activations far above the rest: LLM.int8 (Dettmers et al., arXiv 2208.07339) found "outlier features" of
magnitude up to ~20-60 in a handful of fixed hidden dimensions of 6.7B-parameter models, present in most tokens
and most layers, and SmoothQuant (Xiao et al., arXiv 2211.10438) found the activation absmax of those channels
~100x the other channels'. Beyond them, LLaMA-2-7B has "massive activations" ~1e3-1e4x the median in dims 1415 and
2533 of its residual stream on a few tokens (Sun et al., arXiv 2402.17762). With per-token activation ranges, every
token's 4-bit grid is then set by its outlier channels and its ordinary channels collapse onto a few codes. A small
model trained from scratch (the shipped shapes-VQA demo) has none of this: its q/k/v/o/gate/up inputs have a channel
absmax of ~1.6-4x the median, so W4A4 costs it almost nothing and says little about a quantizer.

What. `plant_outlier_channels` rescales a few channels of every decoder linear's input by a factor s and divides
the weights that read them by s, so the model computes the same function (up to float rounding) while the measured
channel absmax of the chosen channels reaches ``ratio`` (default 50) x the layer's median channel absmax, the
statistic `optimum_qap.outlier_report` reports:

* q/k/v_proj inputs (after ``input_layernorm``) and gate/up_proj inputs (after ``post_attention_layernorm``): the
  RMSNorm gain of the chosen hidden channels is multiplied by s, the matching input columns of the reading linears
  divided by s. As in LLM.int8, the hidden channels are the same in every layer.
* o_proj input: attention output is linear in V, so a few ``v_proj`` output rows (one kv head, one within-head
  index each) are multiplied by s and the ``o_proj`` input columns they feed (every query head of that kv group,
  same within-head index) divided by s.
* down_proj input: SiLU(gate) * up is linear in up, so a few ``up_proj`` output rows are multiplied by s and the
  matching ``down_proj`` columns divided by s.

s is chosen per linear input and channel from one measuring pass on calibration-like inputs: s = ratio x median /
(the channel's absmax), at least 1. The rescalings commute with each other and leave every other activation
unchanged, so one pass suffices; a second pass measures what was reached.

Gain-fused outliers vs residual-stream outliers. The q/k/v and gate/up outliers above live in the RMSNorm gains, so
a quantizer that folds the gains into the next linears (QuaRot, SpinQuant) removes them, while LLaMA's outliers
are in the normalised residual stream itself. The only exact function-preserving edit of the normalised stream is an
orthogonal change of basis (RMSNorm commutes with it once its gains are folded): ``residual="top"`` folds the gains,
then rotates embeddings, readers, writers, ``lm_head`` and the projector's last linear with an orthogonal Q
(a chain of Householder reflections) that maps the stream's top principal directions onto the chosen hidden
channels; ``residual="pca"`` uses the whole principal basis (top directions on the chosen channels, the others in a
seeded order). The normalised stream of every token has norm sqrt(hidden), which bounds what a rotation can reach:
on the demo model (hidden 256) the top direction holds 40-63 % of the energy and "top" reaches only ~6-8x, so it is
off by default. "pca" reaches 20-70x, but in 11-21 graded channels (the stream has ~30 effective dimensions, so the
median channel is a dead direction) and round-to-nearest W4A4 keeps its accuracy: max / median overstates how hard
such a basis is to quantize. Either way the gain rescaling then lifts the chosen channels to ``ratio``; the record
says how much of the ratio survives gain folding.

The demo's down_proj inputs already have natural outliers (SiLU(gate) * up is sparse: 20-58 channels above 20x,
up to ~90x, on image tokens) which W4A4 tolerates; the planted channels are added to them.

The result is an ordinary `LlavaForConditionalGeneration` (weight edits only, no hooks); what was planted is stored
in ``model.config.planted_outlier_channels``. `build_outlier_demo` does this to the shipped demo model and saves
model + processor + ``outlier_stats.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

OUTLIER_CONFIG_KEY = "planted_outlier_channels"
RESIDUAL_MODES = ("none", "top", "pca")
NORM_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


# ----------------------------------------------------------------------------- measurement


def _text_model(model: nn.Module) -> nn.Module:
    return model.model.language_model


def _layers(model: nn.Module) -> nn.ModuleList:
    return _text_model(model).layers


def calibration_inputs(model: nn.Module, processor, samples: Sequence[dict]) -> list[dict[str, torch.Tensor]]:
    """Model inputs of ``{"image", "text"}`` samples, one unpadded sample each (padding would pollute ranges)."""
    from ..calibration import model_inputs

    return [model_inputs(model, processor, s["image"], s["text"]) for s in samples]


@torch.no_grad()
def linear_input_absmax(model: nn.Module, inputs: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Per-channel absmax over all tokens of the input of every decoder linear (name relative to the layers)."""
    absmax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args):
            value = args[0].detach().float().abs().flatten(0, -2).amax(0)
            absmax[name] = value if name not in absmax else torch.maximum(absmax[name], value)

        return record

    _run_with_hooks(model, inputs, [
        module.register_forward_pre_hook(hook(name))
        for name, module in _layers(model).named_modules()
        if isinstance(module, nn.Linear)
    ])
    return absmax


@torch.no_grad()
def normalised_stream(model: nn.Module, inputs: Sequence[dict]) -> torch.Tensor:
    """Unit-RMS residual stream (RMSNorm before its gain) at both norms of every layer, tokens stacked: [T, D]."""
    store: list[torch.Tensor] = []
    norms = [m for n, m in _text_model(model).named_modules() if n.endswith("layernorm")]

    def record(module, args):
        x = args[0].detach().double().flatten(0, -2)
        store.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    _run_with_hooks(model, inputs, [norm.register_forward_pre_hook(record) for norm in norms])
    return torch.cat(store)


def _run_with_hooks(model: nn.Module, inputs: Sequence[dict], handles: list) -> None:
    """Run ``model`` on every input, then remove the hook ``handles`` (also when a forward raises)."""
    try:
        for sample in inputs:
            model(**sample)
    finally:
        for handle in handles:
            handle.remove()


def ratio_summary(absmax: torch.Tensor, channels: Sequence[int] | None = None, threshold: float = 20.0) -> dict:
    """max / median channel absmax, the ratios of ``channels`` and how many channels exceed ``threshold`` x median."""
    median = float(absmax.median())
    summary = {"max_ratio": round(float(absmax.max()) / median, 2), "median": round(median, 5),
               "outliers": int((absmax > threshold * median).sum())}
    if channels is not None:
        summary["channel_ratios"] = [round(float(absmax[c]) / median, 2) for c in channels]
    return summary


# ----------------------------------------------------------------------------- channel choice


def _draw(count: int, size: int, generator: torch.Generator) -> list[int]:
    return sorted(int(c) for c in torch.randperm(size, generator=generator)[:count])


def choose_channels(config, count: int = 3, seed: int = 0) -> dict:
    """Deterministic channels from ``seed``: hidden ones shared by all layers, v rows and up rows per layer."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    hidden = _draw(count, text.hidden_size, generator)
    layers = []
    for _ in range(text.num_hidden_layers):
        layers.append({"v_rows": _draw(count, text.num_key_value_heads * head_dim, generator),
                       "up_rows": _draw(count, text.intermediate_size, generator)})
    return {"hidden": hidden, "layers": layers}


def o_proj_columns(v_row: int, attention: nn.Module) -> list[int]:
    """The o_proj input columns fed by one v_proj output row: every query head of its kv group (GQA)."""
    head_dim, groups = attention.head_dim, attention.num_key_value_groups
    kv_head, index = divmod(v_row, head_dim)
    return [(kv_head * groups + g) * head_dim + index for g in range(groups)]


def _scale(target: float, absmax: float) -> float:
    """s that lifts a channel of absmax ``absmax`` to ``target``; never below 1, so no existing outlier is hidden."""
    value = max(1.0, target / max(absmax, 1e-12))
    # 4 significant digits: measurements that differ in the last float bits (thread counts) give identical weights
    return float(f"{value:.4g}")


# ----------------------------------------------------------------------------- function-preserving edits


@torch.no_grad()
def fold_norm_gains(model: nn.Module) -> None:
    """Fold every decoder RMSNorm gain into the linears that read it (and the final norm into lm_head); gains = 1.

    This is the first step of QuaRot/SpinQuant; it removes outliers that live in the gains.
    """
    text = _text_model(model)
    for layer in text.layers:
        for norm_name, readers in NORM_READERS.items():
            norm = getattr(layer, norm_name)
            for reader in readers:
                linear = layer.get_submodule(reader)
                linear.weight.mul_(norm.weight.to(linear.weight)[None, :])
            norm.weight.fill_(1.0)
    model.lm_head.weight.mul_(text.norm.weight.to(model.lm_head.weight)[None, :])
    text.norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_residual(model: nn.Module, rotation: torch.Tensor) -> None:
    """Change the residual stream basis to h' = R h (R orthogonal, [D, D]); gains must be folded (all ones).

    RMSNorm(R h) = R RMSNorm(h) for unit gains, so writers (embeddings, projector output, o_proj, down_proj) get
    R W and readers (q/k/v, gate/up, lm_head) W R^T; the model's function is unchanged.
    """
    text = _text_model(model)
    norms = [m for n, m in text.named_modules() if n.endswith("layernorm")] + [text.norm]
    if any(not torch.all(norm.weight == 1) for norm in norms):
        raise ValueError("rotate_residual needs unit RMSNorm gains; call fold_norm_gains first")
    if model.config.tie_word_embeddings:
        raise ValueError("rotate_residual does not support tied embeddings")
    r = rotation.double()

    def write(linear: nn.Linear) -> None:
        linear.weight.copy_((r @ linear.weight.double()).to(linear.weight))
        if linear.bias is not None:
            linear.bias.copy_((r @ linear.bias.double()).to(linear.bias))

    def read(weight: torch.Tensor) -> None:
        weight.copy_((weight.double() @ r.T).to(weight))

    read(text.embed_tokens.weight)  # rows are stream vectors: E R^T
    write(model.model.multi_modal_projector.linear_2)
    for layer in text.layers:
        write(layer.self_attn.o_proj)
        write(layer.mlp.down_proj)
        for readers in NORM_READERS.values():
            for reader in readers:
                read(layer.get_submodule(reader).weight)
    read(model.lm_head.weight)


def householder_rotation(directions: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Orthogonal R with R u_i = e_{c_i} for orthonormal rows u_i of ``directions``, as close to I as reflections go.

    Each reflection maps the (already reflected) next direction onto its channel and fixes the earlier channels,
    because that direction is orthogonal to them.
    """
    size = directions.shape[1]
    rotation = torch.eye(size, dtype=torch.float64)
    for u, c in zip(directions.double(), channels, strict=True):
        v = rotation @ u
        v[c] -= 1.0
        if float(v.norm()) > 1e-12:
            v = v / v.norm()
            rotation = rotation - 2.0 * torch.outer(v, v @ rotation)
    return rotation


def principal_rotation(
    stream: torch.Tensor, channels: Sequence[int], mode: str, seed: int
) -> tuple[torch.Tensor, dict]:
    """Rotation that moves the stream's top principal (uncentred) directions onto ``channels``."""
    second_moment = stream.T @ stream / stream.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(second_moment)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1).T  # rows, by decreasing energy
    # fixed sign: the stream's mean projects positively (LLM outlier features keep their sign across tokens)
    signs = torch.where(stream.mean(0) @ vectors.T < 0, -1.0, 1.0).to(vectors)
    vectors = vectors * signs[:, None]
    k = len(channels)
    if mode == "top":
        rotation = householder_rotation(vectors[:k], channels)
    else:
        rest = [c for c in range(stream.shape[1]) if c not in set(channels)]
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 7))
        targets = list(channels) + [rest[int(i)] for i in order]
        rotation = torch.zeros_like(second_moment)
        rotation[targets] = vectors  # row c of R reads the direction that lands on channel c
    energy = eigenvalues / eigenvalues.sum()
    return rotation, {"energy_fraction_top": [round(float(e), 4) for e in energy[: max(k, 4)]]}


@torch.no_grad()
def _scale_norm_channels(layer: nn.Module, norm_name: str, scales: dict[int, float]) -> None:
    norm = getattr(layer, norm_name)
    for channel, s in scales.items():
        norm.weight[channel] *= s
        for reader in NORM_READERS[norm_name]:
            layer.get_submodule(reader).weight[:, channel] /= s


@torch.no_grad()
def _scale_through(writer: nn.Linear, reader: nn.Linear, row: int, columns: Sequence[int], s: float) -> None:
    """Multiply output ``row`` of ``writer`` by s, divide the ``columns`` of ``reader`` it feeds by s."""
    writer.weight[row] *= s
    if writer.bias is not None:
        writer.bias[row] *= s
    reader.weight[:, list(columns)] /= s


# ----------------------------------------------------------------------------- public API


def _plan(model: nn.Module, absmax: dict[str, torch.Tensor], channels: dict, ratio: float) -> list[dict]:
    """Scale factors per layer: hidden channel -> s per norm, v row -> s, up row -> s (all to reach ``ratio``)."""
    plan = []
    for index, layer in enumerate(_layers(model)):
        chosen = channels["layers"][index]
        entry: dict = {}
        for norm_name, readers in NORM_READERS.items():
            x = absmax[f"{index}.{readers[0]}"]
            target = ratio * float(x.median())
            entry[norm_name] = {c: _scale(target, float(x[c])) for c in channels["hidden"]}
        o_in = absmax[f"{index}.self_attn.o_proj"]
        entry["v_rows"] = {}
        for row in chosen["v_rows"]:
            columns = o_proj_columns(row, layer.self_attn)
            entry["v_rows"][row] = _scale(ratio * float(o_in.median()), float(o_in[columns].max()))
        d_in = absmax[f"{index}.mlp.down_proj"]
        entry["up_rows"] = {r: _scale(ratio * float(d_in.median()), float(d_in[r])) for r in chosen["up_rows"]}
        plan.append(entry)
    return plan


def _apply(model: nn.Module, plan: list[dict]) -> None:
    for layer, entry in zip(_layers(model), plan, strict=True):
        for norm_name in NORM_READERS:
            _scale_norm_channels(layer, norm_name, entry[norm_name])
        for row, s in entry["v_rows"].items():
            _scale_through(layer.self_attn.v_proj, layer.self_attn.o_proj, row, o_proj_columns(row, layer.self_attn), s)
        for row, s in entry["up_rows"].items():
            _scale_through(layer.mlp.up_proj, layer.mlp.down_proj, row, [row], s)


def _reading_gain(model: nn.Module, name: str) -> torch.Tensor | None:
    """The RMSNorm gain in front of a decoder linear input (None for o_proj and down_proj)."""
    index, reader = name.split(".", 1)
    for norm_name, readers in NORM_READERS.items():
        if reader in readers:
            return getattr(_layers(model)[int(index)], norm_name).weight.detach()
    return None


def _input_channels(model: nn.Module, channels: dict) -> dict[str, list[int]]:
    """Planted channels per decoder linear input (names relative to the layers, as `linear_input_absmax`)."""
    out: dict[str, list[int]] = {}
    for index, layer in enumerate(_layers(model)):
        for readers in NORM_READERS.values():
            for reader in readers:
                out[f"{index}.{reader}"] = list(channels["hidden"])
        v_rows = channels["layers"][index]["v_rows"]
        out[f"{index}.self_attn.o_proj"] = sorted(c for r in v_rows for c in o_proj_columns(r, layer.self_attn))
        out[f"{index}.mlp.down_proj"] = list(channels["layers"][index]["up_rows"])
    return out


@torch.no_grad()
def plant_outlier_channels(
    model: nn.Module,
    processor,
    samples: Sequence[dict],
    ratio: float = 50.0,
    channels_per_input: int = 3,
    seed: int = 0,
    residual: str = "none",
) -> dict:
    """Edit a `LlavaForConditionalGeneration` in place so every decoder linear input has outlier channels.

    Args:
        model: a LLaVA model with a Llama-style decoder (fp32 recommended: the edits are exact up to rounding).
        processor: its processor; ``samples`` are ``{"image": PIL image or path, "text": prompt}`` dicts to measure on.
        ratio: the planted channels' absmax as a multiple of the median channel absmax of each linear input.
        channels_per_input: hidden channels (shared by all layers), v rows and up rows (per layer) to plant.
        seed: chooses the channels (and the order of the other principal directions with ``residual="pca"``).
        residual: "none", "top" or "pca": first rotate the residual stream so its principal directions land on the
            hidden channels (module docstring); the gains are folded first.

    Returns:
        JSON-serialisable record (also stored in ``model.config.planted_outlier_channels``): channels, scales and,
        per linear input (``"<layer>.<module>"``) its planted input ``channels``, ``ratio_summary`` before and after
        planting and, for the norm-fed
        inputs, after folding the gains (``gain_folded``: what survives QuaRot-style fusion).
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    start = time.perf_counter()
    model.eval()
    inputs = calibration_inputs(model, processor, samples)
    channels = choose_channels(model.config, channels_per_input, seed)
    input_channels = _input_channels(model, channels)
    before = linear_input_absmax(model, inputs)
    rotation_record = None
    if residual != "none":
        fold_norm_gains(model)
        rotation, rotation_record = principal_rotation(normalised_stream(model, inputs), channels["hidden"], residual,
                                                       seed)
        rotate_residual(model, rotation)
    rotated = linear_input_absmax(model, inputs) if residual != "none" else before
    plan = _plan(model, rotated, channels, ratio)
    _apply(model, plan)
    after = linear_input_absmax(model, inputs)
    layers_record = {}
    for name, chosen in input_channels.items():
        entry = {"channels": chosen, "before": ratio_summary(before[name], chosen),
                 "after": ratio_summary(after[name], chosen)}
        gain = _reading_gain(model, name)
        if gain is not None:  # a norm-fed input: |g x| = |g| |x| per channel, so folding divides the absmax by |g|
            entry["gain_folded"] = ratio_summary(after[name] / gain.abs().float(), chosen)
        layers_record[name] = entry
    record = {
        "ratio_target": ratio,
        "channels_per_input": channels_per_input,
        "seed": seed,
        "residual": residual,
        "residual_rotation": rotation_record,
        "measured_on": len(inputs),
        "channels": channels,
        "scales": [{k: {str(c): s for c, s in v.items()} for k, v in entry.items()} for entry in plan],
        "linear_inputs": layers_record,
        "seconds": round(time.perf_counter() - start, 2),
    }
    record = json.loads(json.dumps(record))
    setattr(model.config, OUTLIER_CONFIG_KEY, record)
    return record


def default_samples(num_samples: int = 16) -> list[dict]:
    """Calibration-like samples: shapes-VQA training examples (image + prompt)."""
    from . import make_dataset

    return [{"image": e.image, "text": e.prompt} for e in make_dataset(num_samples, "train")]


def build_outlier_demo(
    output_dir: str | Path,
    num_samples: int = 16,
    model_path: str | Path | None = None,
    **kwargs,
) -> dict:
    """Plant outlier channels into the shipped demo model (measured on training examples); save model + processor.

    ``kwargs`` go to `plant_outlier_channels`. Writes ``outlier_stats.json`` (with the source weights' SHA-256)
    beside the weights; returns the stats.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import DEMO_MODEL_PATH
    from .planted import save_derived_model

    start = time.perf_counter()
    source = DEMO_MODEL_PATH if model_path is None else model_path
    model = LlavaForConditionalGeneration.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    stats = plant_outlier_channels(model, processor, default_samples(num_samples), **kwargs)
    stats["build_seconds"] = round(time.perf_counter() - start, 2)
    return save_derived_model(output_dir, model, processor, stats, source, "outlier_stats.json")
