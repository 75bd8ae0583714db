"""Numerics of packing, weight quantization, activation fake quantization and QuantLinear against a plain reference."""

import pytest
import torch
from torch import nn

from optimum_qap import QuantLinear, QuantSpec, UncalibratedError
from optimum_qap.quant import functional as qf
from optimum_qap.quant.linear import observing_inputs
from optimum_qap.quant.packing import pack_codes, packed_length, unpack_codes, unpack_codes_as_float


def reference_fake_quant(values: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize one 1-D group the textbook way (range widened to contain zero)."""
    values = values.double()
    if symmetric:
        limit = 2 ** (bits - 1) - 1
        scale = values.abs().max() / limit
        scale = scale if scale > 0 else torch.tensor(1.0, dtype=torch.float64)
        return torch.clamp(torch.round(values / scale), -limit - 1, limit) * scale
    low, high = min(values.min().item(), 0.0), max(values.max().item(), 0.0)
    scale = (high - low) / (2**bits - 1) or 1.0
    zero = min(max(round(-low / scale), 0), 2**bits - 1)
    codes = torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)
    return (codes - zero) * scale


def reference_rows(x: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float64)
    step = group or x.shape[-1]
    for row in range(x.shape[0]):
        for start in range(0, x.shape[-1], step):
            out[row, start : start + step] = reference_fake_quant(x[row, start : start + step], bits, symmetric)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 8, 13, 64])
def test_packing_round_trip_and_size(bits, length):
    codes = torch.randint(0, 2**bits, (5, length), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_length(length, bits))
    assert torch.equal(unpack_codes(packed, bits, length), codes.to(torch.uint8))
    if length % 8 == 0:
        assert packed.numel() * 8 == codes.numel() * bits


def test_big_endian_unpacking_fallback_gives_the_same_codes(monkeypatch):
    """The 16-bit-lane unpacking reads bytes in little-endian order; elsewhere the interleaving fallback runs."""
    import types

    from optimum_qap.quant import packing

    codes = torch.randint(0, 16, (5, 37), generator=torch.Generator().manual_seed(4))
    packed = pack_codes(codes, 4)
    monkeypatch.setattr(packing, "sys", types.SimpleNamespace(byteorder="big"))
    assert torch.equal(unpack_codes(packed, 4, 37), codes.to(torch.uint8))
    floats, offset = unpack_codes_as_float(pack_codes(codes[:, :36], 4), 4, 36, torch.bfloat16)
    assert offset == 0 and torch.equal(floats, codes[:, :36].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,length", [(4, 64), (4, 13), (3, 40), (8, 16)])
def test_codes_unpacked_as_float_equal_the_integer_codes(dtype, bits, length):
    """The bit-assembled float codes (4-bit, 16-bit floats) and the convert fallback (other cases) hold
    code + offset exactly, in a fresh tensor."""
    codes = torch.randint(0, 2**bits, (6, length), generator=torch.Generator().manual_seed(length))
    packed = pack_codes(codes, bits)
    floats, offset = unpack_codes_as_float(packed, bits, length, dtype)
    assert floats.dtype == dtype and floats.shape == codes.shape
    assembled = bits == 4 and length % 2 == 0 and dtype != torch.float32
    assert offset == ({torch.bfloat16: 128, torch.float16: 1024}[dtype] if assembled else 0)
    assert torch.equal(floats.double() - offset, codes.double())
    assert floats.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantization_from_float_codes_is_bit_identical(dtype, symmetric):
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    codes = qf.quantize_weight(weight, 4, 64, symmetric)
    scale = codes.scale.to(dtype)
    expected = qf.dequantize_weight(codes.codes, scale, codes.zero, 4, 64, dtype)
    floats, offset = unpack_codes_as_float(pack_codes(codes.codes, 4), 4, 256, dtype)
    assert offset > 0
    assert torch.equal(qf.dequantize_weight(floats, scale, codes.zero, 4, 64, dtype, offset), expected)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 24])  # 24 leaves a ragged last group of 40 channels
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_quantization_matches_reference(bits, group, symmetric):
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    weight[0] = 0.0  # an all-zero row must not produce NaN
    weight[1] = weight[1].abs() + 1  # all positive: range widened to contain zero
    codes = qf.quantize_weight(weight, bits, group, symmetric)
    dequantized = qf.dequantize_weight(codes.codes, codes.scale, codes.zero, bits, group, torch.float64)
    torch.testing.assert_close(dequantized, reference_rows(weight, bits, group, symmetric), rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_activation_granularities_match_reference(symmetric):
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1)) * 3
    flat = x.reshape(-1, 40)
    per_token = qf.fake_quant_per_token(x, 4, symmetric).reshape(-1, 40)
    torch.testing.assert_close(per_token.double(), reference_rows(flat, 4, None, symmetric), rtol=0, atol=1e-5)
    per_group = qf.fake_quant_per_group(x, 4, 16, symmetric).reshape(-1, 40)
    torch.testing.assert_close(per_group.double(), reference_rows(flat, 4, 16, symmetric), rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 128])
def test_a_nan_token_stays_nan_and_leaves_the_other_tokens_alone(symmetric, group_size):
    """On every path: the fake-quantized row is NaN (not finite garbage from int8-cast NaN codes), the rest is
    what the same input without that row gives."""
    spec = QuantSpec(w_group_size=group_size, a_symmetric=symmetric)
    layer = QuantLinear.from_linear(nn.Linear(256, 64).bfloat16(), spec)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    x[7, 3] = float("nan")
    for kernels in ("auto", "simulated"):
        layer.kernels = kernels
        with torch.no_grad():
            out, clean = layer(x), layer(torch.cat((x[:7], x[8:])))
        assert out[7].isnan().all()
        torch.testing.assert_close(torch.cat((out[:7], out[8:])), clean, rtol=0, atol=0)


def reference_static(x, low, high, bits, symmetric):
    """Per-channel static range: quantize each channel with its own calibrated [low, high]."""
    x = x.double()
    out = torch.empty_like(x)
    for channel in range(x.shape[-1]):
        lo, hi = float(low[channel]), float(high[channel])
        if symmetric:
            limit = 2 ** (bits - 1) - 1
            scale = max(abs(lo), abs(hi)) / limit or 1.0
            out[..., channel] = torch.clamp(torch.round(x[..., channel] / scale), -limit - 1, limit) * scale
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = (hi - lo) / (2**bits - 1) or 1.0
            zero = round(-lo / scale)
            codes = torch.clamp(torch.round(x[..., channel] / scale) + zero, 0, 2**bits - 1)
            out[..., channel] = (codes - zero) * scale
    return out


def make_layer(spec: QuantSpec, bias: bool = True, dtype=torch.float32) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=bias).to(dtype)
    return linear, QuantLinear.from_linear(linear, spec)


@pytest.mark.parametrize("granularity", ["per_token", "per_group", "static_per_channel", "static_per_tensor"])
@pytest.mark.parametrize("a_symmetric", [False, True])
def test_quant_linear_forward_matches_reference(granularity, a_symmetric):
    spec = QuantSpec(w_bits=4, w_group_size=16, a_bits=4, a_granularity=granularity, a_group_size=16,
                     a_symmetric=a_symmetric)
    linear, layer = make_layer(spec)
    calibration = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(2))
    layer.observe(calibration)
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(3)) * 1.5  # exceeds the calibrated range
    low, high = calibration.reshape(-1, 40).amin(0), calibration.reshape(-1, 40).amax(0)
    if granularity == "static_per_tensor":
        low, high = low.min().expand(40), high.max().expand(40)
    flat = x.reshape(-1, 40)
    expected_x = {
        "per_token": lambda: reference_rows(flat, 4, None, a_symmetric),
        "per_group": lambda: reference_rows(flat, 4, 16, a_symmetric),
    }.get(granularity, lambda: reference_static(flat, low, high, 4, a_symmetric))()
    expected_w = reference_rows(linear.weight.detach(), 4, 16, False)
    expected = expected_x @ expected_w.T + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).reshape(-1, 24).double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_keeps_dtype_and_tracks_fp32(dtype):
    spec = QuantSpec(w_bits=8, w_group_size=None, a_bits=8)
    linear, layer = make_layer(spec, dtype=dtype)
    assert layer.weight_scale.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(3, 40).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), linear(x).float(), rtol=0.05, atol=0.05)


def test_four_bit_storage_is_a_quarter_of_bf16_plus_scales():
    spec = QuantSpec(w_bits=4, w_group_size=128, a_bits=4)
    layer = QuantLinear.from_linear(nn.Linear(1024, 512, bias=False).to(torch.bfloat16), spec)
    bf16_bytes = 1024 * 512 * 2
    scales_and_zeros = 512 * (1024 // 128) * (2 + 1)
    assert layer.weight_storage_bytes() == bf16_bytes // 4 + scales_and_zeros
    assert layer.weight_storage_bytes() / bf16_bytes < 0.27
    assert not hasattr(layer, "weight")


def test_weight_only_sixteen_bit_activations_is_plain_dequantized_matmul():
    spec = QuantSpec(w_bits=4, w_group_size=8, a_bits=16)
    linear, layer = make_layer(spec, bias=False)
    x = torch.randn(5, 40)
    expected = x.double() @ reference_rows(linear.weight.detach(), 4, 8, False).T
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("granularity", ["static_per_channel", "static_per_tensor"])
def test_static_granularity_without_calibration_is_an_error(granularity):
    _, layer = make_layer(QuantSpec(a_granularity=granularity, w_group_size=8))
    with pytest.raises(UncalibratedError, match="not calibrated.*optimum_qap.calibrate"):
        layer(torch.randn(2, 40))


def test_observe_widens_ranges_and_skips_activation_quantization():
    linear, layer = make_layer(QuantSpec(w_bits=8, w_group_size=None, a_granularity="static_per_channel"))
    a, b = torch.randn(3, 40), torch.randn(4, 40) * 5
    with observing_inputs([layer]):
        assert layer.observing
        out = layer(a)
        layer(b)
    assert not layer.observing
    both = torch.cat([a, b])
    assert torch.equal(layer.input_min, both.amin(0)) and torch.equal(layer.input_max, both.amax(0))
    dequantized = layer.dequantized_weight()
    torch.testing.assert_close(out, a @ dequantized.T + linear.bias.detach())


def test_cached_dequantized_weight_gives_identical_outputs_and_is_not_saved():
    _, layer = make_layer(QuantSpec(w_bits=4, w_group_size=8))
    x = torch.randn(3, 40)
    expected = layer(x)
    layer.cache_dequantized_weight(True)
    assert torch.equal(layer(x), expected) and torch.equal(layer(x), expected)
    assert layer._cached_weight is not None and "_cached_weight" not in layer.state_dict()
    layer.cache_dequantized_weight(False)
    assert layer._cached_weight is None


def test_weight_cached_inside_inference_mode_still_serves_training():
    """A served model (inference mode) that caches its weight, then fine-tuned: the cached weight is saved for the
    backward, which an inference tensor could not be."""
    _, layer = make_layer(QuantSpec(w_bits=4, w_group_size=8))
    layer.cache_dequantized_weight(True)
    x = torch.randn(3, 40)
    with torch.inference_mode():
        served = layer(x)
    leaf = x.clone().requires_grad_()
    out = layer(leaf)
    out.sum().backward()
    assert torch.equal(out.detach(), served)
    assert torch.equal(leaf.grad, torch.ones(3, 24) @ layer.dequantized_weight())  # straight-through
