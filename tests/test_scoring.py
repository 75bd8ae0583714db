import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from optimum_qap.pruning.scoring import (
    SensitivityScores,
    channel_range,
    cls_attention_row,
    cls_attention_scores,
    encoder_layer_index,
    fuse_scores,
    group_quant_error,
    instruction_relevance,
    minmax_normalize,
    quantization_sensitivity,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _close(actual, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32, device=actual.device)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---- group_quant_error ---------------------------------------------------------------------------


def test_group_quant_error_single_group_by_hand():
    # s = 7/7 = 1; v/s = [7, 3.4, -1.2, 0] -> round [7, 3, -1, 0]; error [0, .4, -.2, 0]
    tokens = torch.tensor([[7.0, 3.4, -1.2, 0.0]])
    _close(group_quant_error(tokens, group_size=4, bits=4), [math.sqrt(0.4**2 + 0.2**2)])


def test_group_quant_error_ragged_last_group_by_hand():
    # group [1.0, 0.3]: s = 1/7, v/s = [7, 2.1] -> [7, 2], error 0.3 - 2/7 = 0.1/7
    # group [14.0] (padded with 0): s = 2, v/s = 7, exact
    tokens = torch.tensor([[1.0, 0.3, 14.0]])
    _close(group_quant_error(tokens, group_size=2, bits=4), [0.1 / 7])


def test_group_quant_error_two_bits_by_hand():
    # qmax = 1, s = 0.6; v/s = [1, -1/3, 0.583] -> [1, 0, 1]; error [0, -0.2, -0.25]
    tokens = torch.tensor([[0.6, -0.2, 0.35]])
    _close(group_quant_error(tokens, group_size=3, bits=2), [math.sqrt(0.2**2 + 0.25**2)])


def test_group_quant_error_groups_are_independent():
    # same token split in two groups = sqrt(E_a^2 + E_b^2) of the groups alone
    a = torch.tensor([7.0, 3.4, -1.2, 0.0])
    b = torch.tensor([0.6, -0.2, 0.35, 0.1])
    both = group_quant_error(torch.cat([a, b])[None], group_size=4)
    alone = torch.stack([group_quant_error(a[None], group_size=4), group_quant_error(b[None], group_size=4)])
    _close(both, alone.square().sum(0).sqrt())


def test_group_quant_error_zero_token_is_zero_not_nan():
    tokens = torch.zeros(3, 256)
    tokens[1, :128] = 1.5  # one all-zero group next to a constant one
    error = group_quant_error(tokens)
    assert torch.isfinite(error).all()
    _close(error, [0.0, 0.0, 0.0])


def test_group_quant_error_leading_batch_axes():
    tokens = torch.randn(2, 5, 200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(group_quant_error(tokens)[1], group_quant_error(tokens[1]))


@pytest.mark.parametrize("bits,group_size", [(1, 128), (4, 0)])
def test_group_quant_error_rejects_bad_quantizer(bits, group_size):
    with pytest.raises(ValueError):
        group_quant_error(torch.ones(1, 4), group_size=group_size, bits=bits)


# ---- channel_range / minmax_normalize --------------------------------------------------------------


def test_channel_range_by_hand():
    _close(channel_range(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])), [5.0, 0.0])


def test_minmax_normalize_by_hand():
    _close(minmax_normalize(torch.tensor([2.0, 4.0, 6.0, 3.0])), [0.0, 0.5, 1.0, 0.25])


def test_minmax_normalize_constant_is_zeros():
    out = minmax_normalize(torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 3.0]]))
    _close(out, [[0.0, 0.0, 0.0], [0.0, 0.5, 1.0]])


def test_minmax_normalize_dim():
    out = minmax_normalize(torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]]), dim=0)
    _close(out, [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])


# ---- quantization_sensitivity / fuse ---------------------------------------------------------------


def test_quantization_sensitivity_by_hand():
    tokens = torch.tensor(
        [
            [7.0, 3.4, -1.2, 0.0],  # E = sqrt(.2) = .44721 (see above), R = 8.2
            [1.0, 1.0, 1.0, 1.0],  # s = 1/7, exact: E = 0, R = 0
            [2.0, -2.0, 0.5, 0.0],  # s = 2/7, 0.5/s = 1.75 -> 2, err 0.5 - 4/7 = -1/14; R = 4
        ]
    )
    scores = quantization_sensitivity(tokens, group_size=4)
    assert isinstance(scores, SensitivityScores)
    e2 = (1 / 14) / math.sqrt(0.2)  # E' of token 2
    r2 = 4 / 8.2  # R' of token 2
    _close(scores.error, [1.0, 0.0, e2])
    _close(scores.range, [1.0, 0.0, r2])
    _close(scores.sensitivity, [1.0, 0.0, 0.5 * e2 + 0.5 * r2])
    weighted = quantization_sensitivity(tokens, group_size=4, error_weight=1.0, range_weight=0.0)
    _close(weighted.sensitivity, [1.0, 0.0, e2])


def test_quantization_sensitivity_identical_tokens_are_zero():
    tokens = torch.randn(1, 64).expand(5, 64)
    scores = quantization_sensitivity(tokens, group_size=32)
    for field in scores:
        _close(field, [0.0] * 5)


def test_fuse_scores_by_hand():
    semantic = torch.tensor([1.0, 0.0, 0.5])
    sensitivity = torch.tensor([0.0, 1.0, 0.5])
    _close(fuse_scores(semantic, sensitivity, alpha=0.25), [0.25, 0.75, 0.5])
    _close(fuse_scores(semantic, sensitivity, alpha=1.0), semantic)
    with pytest.raises(ValueError):
        fuse_scores(semantic, sensitivity, alpha=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_match_float32(device, dtype):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 300, generator=generator)
    tokens[3, 17] = 40.0  # an outlier token, as in LLaVA projector outputs
    reference = quantization_sensitivity(tokens, group_size=128)
    half = quantization_sensitivity(tokens.to(device, dtype), group_size=128)
    # bf16 keeps 8 mantissa bits: relative input error 2^-9, and E, R are continuous in the input
    tolerance = 2e-2 if dtype is torch.bfloat16 else 3e-3
    for got, want in zip(half, reference, strict=True):
        assert got.dtype == torch.float32 and got.device.type == device
        torch.testing.assert_close(got.cpu(), want, atol=tolerance, rtol=0)
    raw = group_quant_error(tokens.to(device, dtype))
    torch.testing.assert_close(raw.cpu(), group_quant_error(tokens), atol=0, rtol=tolerance)


# ---- instruction_relevance -------------------------------------------------------------------------


def test_instruction_relevance_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # one instruction token along x: cos = [1, 0, 1/sqrt2]
    _close(instruction_relevance(image, torch.tensor([[1.0, 0.0]])), [1.0, 0.0, 1 / math.sqrt(2)])
    # two tokens (norms do not matter): mean cos = [.5, .5, 1/sqrt2] -> [0, 0, 1]
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    _close(instruction_relevance(image, text), [0.0, 0.0, 1.0])
    _close(instruction_relevance(image, text, negate=True), [1.0, 1.0, 0.0])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_instruction_relevance_half_and_batched(dtype):
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 20, 64, generator=generator), torch.randn(7, 64, generator=generator)
    reference = instruction_relevance(image, text)
    torch.testing.assert_close(reference[1], instruction_relevance(image[1], text))
    got = instruction_relevance(image.to(dtype), text.to(dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=3e-2, rtol=0)


# ---- [CLS] attention -------------------------------------------------------------------------------


def test_encoder_layer_index():
    assert encoder_layer_index(-2, 24) == 22  # LLaVA default: layers[-2], input hidden_states[-3]
    assert encoder_layer_index(-1, 24) == 23
    assert encoder_layer_index(1, 24) == 0
    assert encoder_layer_index(24, 24) == 23
    with pytest.raises(ValueError):
        encoder_layer_index(0, 24)
    with pytest.raises(IndexError):
        encoder_layer_index(-26, 24)


def _tiny_clip(attn_implementation):
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    torch.manual_seed(0)
    return CLIPVisionModel._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="module")
def clip_models():
    eager = _tiny_clip("eager")
    sdpa = _tiny_clip("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return eager, sdpa, pixel_values


@torch.no_grad()
def test_cls_attention_matches_eager_attentions(clip_models):
    eager, _, pixel_values = clip_models
    out = eager(pixel_values, output_attentions=True, output_hidden_states=True)
    layers = eager.encoder.layers  # 5.24: no `.vision_model` wrapper on CLIPVisionModel
    layer_idx = encoder_layer_index(-2, len(layers))
    # hidden_states[-3] enters layers[-2], which produces LLaVA's feature hidden_states[-2]
    torch.testing.assert_close(layers[layer_idx](out.hidden_states[-3], None), out.hidden_states[-2])
    row = cls_attention_row(out.hidden_states[-3], layers[layer_idx])
    assert row.shape == (2, 16)
    torch.testing.assert_close(row, out.attentions[-2][:, :, 0, 1:].mean(1))
    torch.testing.assert_close(cls_attention_scores(out.hidden_states[-3], layers[layer_idx]), minmax_normalize(row))


@torch.no_grad()
def test_cls_attention_same_under_sdpa(clip_models):
    eager, sdpa, pixel_values = clip_models
    reference = eager(pixel_values, output_attentions=True, output_hidden_states=True).attentions[-2]
    out = sdpa(pixel_values, output_hidden_states=True)
    row = cls_attention_row(out.hidden_states[-3], sdpa.encoder.layers[-2])
    torch.testing.assert_close(row, reference[:, :, 0, 1:].mean(1))


@torch.no_grad()
def test_cls_attention_bf16_tower(clip_models):
    eager, _, pixel_values = clip_models
    hidden = eager(pixel_values, output_hidden_states=True).hidden_states[-3]
    reference = cls_attention_scores(hidden, eager.encoder.layers[-2])
    layer = _tiny_clip("sdpa").encoder.layers[-2]
    layer.load_state_dict(eager.encoder.layers[-2].state_dict())
    got = cls_attention_scores(hidden.bfloat16(), layer.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=5e-2, rtol=0)
