"""QuaRot-style computational invariance for a LLaVA language model: same function, no outlier channels.

`rotate_language_model` edits the weights in place, in the model's dtype, one tensor at a time (each computed in
float32 in row blocks, so there is never a float32 copy of the model):

1. Every RMSNorm gain is fused into the linears that read that norm, and set to 1. A gain-free RMSNorm commutes
   with an orthogonal Q (||xQ|| = ||x||).
2. The residual stream is rotated by a randomized Hadamard Q (`KroneckerRotation.hadamard(hidden, seed)`): token
   embeddings and the projector's last linear (where image tokens enter the stream) write x Q; readers
   (q/k/v/gate/up, lm_head) get W Q; writers (o_proj, down_proj) get Qᵀ W.
3. Value path: a Hadamard inside every head is folded into v_proj's output rows offline; the o_proj input gets the
   across-heads Hadamard online, so o_proj sees z (H_heads ⊗ H_head) and holds W_o (H_heads ⊗ H_head).
4. down_proj input: a Hadamard of the intermediate size online (any size: see `hadamard.py`), folded into
   down_proj as W_d H.

The online transforms are forward pre-hooks rebuilt from the config by `attach_online_rotations` (nothing of them
is saved); everything else is baked into the saved weights. Activations are quantized after the online transform.
`fold_online_rotations` bakes them in as well, for a float model that needs no hooks (`model.dequantize()`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..progress import progress_bar
from .hadamard import KroneckerRotation

ROTATABLE_TEXT_MODELS = ("llama", "mistral", "qwen2")
# rows rotated at once: bounds each float32 temporary to ~64 MB whatever the tensor
BLOCK_ELEMENTS = 2**24
ONLINE_HOOK = "_qap_online_rotation"


def _text_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (with `.layers`, `.norm`, `.embed_tokens`) and the lm_head of a LLaVA-style model."""
    text_config = getattr(model.config, "text_config", model.config)
    if text_config.model_type not in ROTATABLE_TEXT_MODELS:
        raise ValueError(
            f"QAPrunerConfig(rotation=True) supports Llama-style language models {ROTATABLE_TEXT_MODELS}; this "
            f"model's is {text_config.model_type!r}. Load it with rotation=False."
        )
    return model.model.language_model, model.lm_head


def _edit(weight: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """weight[rows] = function(weight[rows].float()), block by block, in place in the weight's dtype."""
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[-1]))
    for block in weight.split(rows):
        block.copy_(function(block.float()))


def rotate_inputs(linear: nn.Linear, rotation: KroneckerRotation, gain: torch.Tensor | None = None) -> None:
    """W <- W diag(gain) Q: the layer reads x Q (of a stream whose norm gain was ``gain``) and computes the same."""
    scale = None if gain is None else gain.float()
    _edit(linear.weight.data, lambda w: rotation.apply(w if scale is None else w * scale))


def rotate_outputs(linear: nn.Linear, rotation: KroneckerRotation) -> None:
    """W <- Qᵀ W, b <- b Q: the layer writes y Q instead of y."""
    transposed = linear.weight.data.T  # rows of Wᵀ are the outputs of one input channel
    _edit(transposed, rotation.apply)
    if linear.bias is not None:
        _edit(linear.bias.data.unsqueeze(0), rotation.apply)


def _fuse_norm(norm: nn.Module, readers: list[nn.Linear], rotation: KroneckerRotation) -> None:
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias; rotation needs gain-only RMSNorms")
    for linear in readers:
        rotate_inputs(linear, rotation, norm.weight.data)
    norm.weight.data.fill_(1)


def _untie_lm_head(model: nn.Module, embed: nn.Embedding, lm_head: nn.Linear) -> None:
    # a tied head would receive the embedding's rotation E Q, but it needs diag(g_final) Q: give it its own copy
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
        for config in {id(c): c for c in (model.config, getattr(model.config, "text_config", model.config))}.values():
            config.tie_word_embeddings = False


def _check_materialized(model: nn.Module) -> None:
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"rotation edits weights in place, but {meta[0]} (and {len(meta) - 1} more) is offloaded (meta); "
            "load with a device_map that keeps every layer on a device (cpu or gpu), or with rotation=False."
        )


def head_layout(model: nn.Module) -> tuple[int, int]:
    text_config = getattr(model.config, "text_config", model.config)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_attention_heads, head_dim


@torch.no_grad()
def rotate_language_model(model: nn.Module, seed: int = 0, progress: bool = True) -> None:
    """Fuse the norms and rotate the residual stream, value path and down_proj input of ``model`` in place."""
    rotate_layer = rotate_outside_layers(model, seed)
    for layer in progress_bar(_text_parts(model)[0].layers, "Rotating", progress, unit="layer"):
        rotate_layer(layer)


@torch.no_grad()
def rotate_outside_layers(model: nn.Module, seed: int = 0) -> Callable[[nn.Module], None]:
    """The part of `rotate_language_model` outside the decoder layers (embeddings, the projector's output, the
    final norm into lm_head); returns the function that rotates one decoder layer in place.

    The model computes its function again once that function has run on every decoder layer; in between, a layer
    can be rotated just before it is quantized, so that one layer's rotated float weights exist at a time.
    """
    decoder, lm_head = _text_parts(model)
    _check_materialized(model)
    embed = decoder.embed_tokens
    residual = KroneckerRotation.hadamard(embed.weight.shape[1], seed)
    _untie_lm_head(model, embed, lm_head)
    _edit(embed.weight.data, residual.apply)
    projector = getattr(model.model, "multi_modal_projector", None)
    if projector is not None:
        rotate_outputs(_last_linear(projector), residual)
    _fuse_norm(decoder.norm, [lm_head], residual)
    num_heads, head_dim = head_layout(model)
    return functools.partial(rotate_decoder_layer, residual=residual, num_heads=num_heads, head_dim=head_dim)


@torch.no_grad()
def rotate_decoder_layer(layer: nn.Module, residual: KroneckerRotation, num_heads: int, head_dim: int) -> None:
    """Fuse the two norms of one decoder layer and rotate its linears (see the module docstring)."""
    attention, mlp = layer.self_attn, layer.mlp
    _fuse_norm(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj], residual)
    num_kv = attention.v_proj.weight.shape[0] // head_dim
    rotate_outputs(attention.v_proj, KroneckerRotation.blockwise(num_kv, head_dim, across=False))
    rotate_inputs(attention.o_proj, KroneckerRotation.blockwise(num_heads, head_dim, across=False))
    rotate_inputs(attention.o_proj, KroneckerRotation.blockwise(num_heads, head_dim, across=True))
    rotate_outputs(attention.o_proj, residual)
    _fuse_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], residual)
    rotate_inputs(mlp.down_proj, KroneckerRotation.hadamard(mlp.down_proj.in_features))
    rotate_outputs(mlp.down_proj, residual)


def _last_linear(projector: nn.Module) -> nn.Linear:
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(projector).__name__} has no linear layer whose output could be rotated")
    return linears[-1]


def online_rotations(model: nn.Module) -> dict[str, KroneckerRotation]:
    """Module name -> the rotation its input needs at run time (o_proj: across heads; down_proj: full)."""
    decoder, _ = _text_parts(model)
    num_heads, head_dim = head_layout(model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    across_heads = KroneckerRotation.blockwise(num_heads, head_dim, across=True)
    rotations = {}
    for index, layer in enumerate(decoder.layers):
        rotations[f"{prefix}.layers.{index}.self_attn.o_proj"] = across_heads
        down = KroneckerRotation.hadamard(layer.mlp.down_proj.in_features)
        rotations[f"{prefix}.layers.{index}.mlp.down_proj"] = down
    return rotations


def attach_online_rotations(model: nn.Module) -> None:
    """Register (once) the input rotations of o_proj and down_proj; stateless hooks, safe under threads."""
    for name, rotation in online_rotations(model).items():
        module = model.get_submodule(name)
        previous = getattr(module, ONLINE_HOOK, None)
        if previous is not None:
            previous.remove()

        def rotate_input(_module, args, rotation=rotation):
            return (rotation.apply(args[0]), *args[1:])

        setattr(module, ONLINE_HOOK, module.register_forward_pre_hook(rotate_input))


def hooked_layers(model: nn.Module) -> set[str]:
    """Names of the layers that carry an online input rotation."""
    return {name for name, module in model.named_modules() if getattr(module, ONLINE_HOOK, None) is not None}


@torch.no_grad()
def fold_online_rotations(model: nn.Module, layers: set[str]) -> None:
    """Fold the online input rotation Q of each named (float) layer into its weight, W <- W Qᵀ, and drop its hook:
    (x Q) Wᵀ = x (W Qᵀ)ᵀ, so the layer computes the same with no transform at run time."""
    for name, rotation in online_rotations(model).items():
        if name not in layers:
            continue
        module = model.get_submodule(name)
        hook = module.__dict__.pop(ONLINE_HOOK, None)
        if hook is not None:
            hook.remove()
        _edit(module.weight.data, lambda w, rotation=rotation: rotation.apply(w, transpose=True))
