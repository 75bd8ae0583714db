"""Gradients through `QuantLinear`: the fake-quantized input is straight-through (STE), the weights stay frozen."""

import pytest
import torch
from test_quant import make_layer
from torch import nn

from optimum_qap import QuantSpec


def spec_for(granularity: str) -> QuantSpec:
    return QuantSpec(w_bits=4, w_group_size=16, a_bits=4, a_granularity=granularity, a_group_size=16)


def calibrated(layer, x: torch.Tensor):
    layer.set_input_ranges(*torch.aminmax(x.detach().float().reshape(-1, layer.in_features), dim=0))
    return layer


@pytest.mark.parametrize("granularity", ["per_token", "per_group", "static_per_channel", "static_per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_simulated_output_and_input_gradient_is_straight_through(granularity, dtype):
    _, layer = make_layer(spec_for(granularity), dtype=dtype)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    calibrated(layer, x)
    layer.kernels = "simulated"
    with torch.no_grad():
        expected = layer(x)
    layer.kernels = "auto"  # an input that needs gradients takes the simulated path anyway
    leaf = x.clone().requires_grad_()
    out = layer(leaf)
    assert torch.equal(out, expected)  # bit for bit: the STE changes no forward value

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    # STE: the gradient of a plain linear with the dequantized weight, as if the rounding were the identity
    plain = leaf.detach().clone().requires_grad_()
    (reference,) = torch.autograd.grad(nn.functional.linear(plain, layer.dequantized_weight()), plain, upstream)
    assert torch.equal(grad, reference)
    assert grad.abs().sum() > 0  # the rounding's own gradient would be zero


def test_packed_weights_and_scales_get_no_gradient():
    _, layer = make_layer(spec_for("per_token"))
    x = torch.randn(4, 40, requires_grad=True)
    layer(x).sum().backward()
    assert all(not buffer.requires_grad for buffer in layer.buffers())
    assert [name for name, p in layer.named_parameters() if p.grad is not None] == ["bias"]
