"""The AMX integer GEMM (``csrc/amx_cpu.cpp``): against float64 on its own operands, against the simulated path
within the derived bound, across its blocking (token chunks, channel blocks, row tasks), threads and batches."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from test_kernels import assert_within, exact_operands, int8_bound, layer, simulated, unit_roundoff
from torch import nn

from optimum_qap.quant import functional as qf
from optimum_qap.quant import fused, kernels
from optimum_qap.quant.linear import QuantLinear, QuantSpec
from optimum_qap.quant.packing import pack_codes

pytestmark = pytest.mark.skipif(not fused.amx_available(), reason="no AMX tiles on this CPU (or no C++ compiler)")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def problem(tokens: int, in_features: int, out_features: int, group_size: int, w_symmetric: bool, seed: int = 0):
    """Centred activation codes and scales, packed weight codes, float32 scales, zero points, bias."""
    torch.manual_seed(seed)
    weight = qf.quantize_weight(torch.randn(out_features, in_features), 4, group_size, w_symmetric)
    x = torch.randn(tokens, in_features) * torch.logspace(-2, 2, tokens).unsqueeze(-1)
    codes, scale = qf.per_token_codes(x, 4, False)
    return codes.to(torch.int8), scale, weight, torch.randn(out_features)


def exact_product(codes, scale, weight, group_size, bias):
    """float64 ``x_hat @ w.T + bias`` and ``|x_hat| @ |w|.T`` from the same codes and float32 scales (``scale``
    [tokens, activation groups])."""
    center = weight.zero.double() if weight.zero is not None else torch.full_like(weight.scale, 8, dtype=torch.float64)
    w = (weight.codes.double() - center.repeat_interleave(group_size, 1)) * weight.scale.double().repeat_interleave(
        group_size, 1)
    x = (codes.double().unflatten(-1, (scale.shape[-1], -1)) * scale.double().unsqueeze(-1)).flatten(-2)
    return x @ w.T + bias.double(), x.abs() @ w.abs().T


# tokens across the 640-token chunks and 16/32-token tiles; channels across 1024-channel blocks (1088: a partial
# last block); outputs across the 8-block row tasks (288 = 9 blocks of 32)
SHAPES = [(1, 64, 32), (15, 1088, 96), (17, 1024, 288), (33, 2048, 64), (641, 1088, 32), (1300, 128, 32)]


CASES = [(*shape, group) for shape in SHAPES for group in (64, 128, shape[1]) if shape[1] % group == 0]


@pytest.mark.parametrize("tokens,in_features,out_features,group_size", CASES)
@pytest.mark.parametrize("w_symmetric", [False, True])
def test_kernel_equals_float64_within_float32_rounding(tokens, in_features, out_features, group_size, w_symmetric):
    codes, scale, weight, bias = problem(tokens, in_features, out_features, group_size, w_symmetric)
    out = fused.amx_int8_gemm(codes, scale, pack_codes(weight.codes, 4), weight.scale.float(), weight.zero,
                              group_size, in_features, bias, torch.float32)
    exact, magnitude = exact_product(codes, scale, weight, group_size, bias)
    # each group's int32 sum is exact; scaling and adding it rounds once (fused multiply-add), then the token scale
    # and the bias round once each
    groups, u32 = in_features // group_size, unit_roundoff(torch.float32)
    bound = (groups + 3) * u32 * (magnitude + bias.double().abs())
    assert ((out.double() - exact).abs() <= bound).all()


def test_kernel_blocks_channels_that_span_groups_wider_than_a_block():
    codes, scale, weight, bias = problem(40, 4096, 64, 2048, False)
    out = fused.amx_int8_gemm(codes, scale, pack_codes(weight.codes, 4), weight.scale.float(), weight.zero, 2048,
                              4096, None, torch.float32)
    exact, magnitude = exact_product(codes, scale, weight, 2048, torch.zeros(64))
    assert ((out.double() - exact).abs() <= 5 * unit_roundoff(torch.float32) * magnitude).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtypes_round_the_float32_result_once(dtype):
    codes, scale, weight, bias = problem(50, 1024, 96, 128, False)
    args = (codes, scale, pack_codes(weight.codes, 4), weight.scale.float(), weight.zero, 128, 1024, bias)
    wide = fused.amx_int8_gemm(*args, torch.float32)
    torch.testing.assert_close(fused.amx_int8_gemm(*args, dtype), wide.to(dtype), rtol=0, atol=0)


def test_rows_do_not_depend_on_the_batch_or_the_threads():
    """Each output sums its groups in one fixed order, whatever the chunking, tiling and thread split."""
    codes, scale, weight, bias = problem(700, 1088, 288, 64, False)
    args = (pack_codes(weight.codes, 4), weight.scale.float(), weight.zero, 64, 1088, bias, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(fused.amx_int8_gemm(codes, scale, *args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    for start, stop in ((0, 1), (5, 22), (639, 700)):
        assert torch.equal(fused.amx_int8_gemm(codes[start:stop], scale[start:stop], *args), outputs[0][start:stop])


def test_concurrent_calls_from_several_threads_equal_sequential_ones():
    """Scratch buffers are per thread: calls from serving threads do not see each other's activations."""
    problems = [problem(tokens, 1024, 96, 128, False, seed) for seed, tokens in enumerate((37, 640, 700, 5))]
    packed = [pack_codes(weight.codes, 4) for _, _, weight, _ in problems]

    def call(i: int) -> torch.Tensor:
        codes, scale, weight, bias = problems[i]
        return fused.amx_int8_gemm(codes, scale, packed[i], weight.scale.float(), weight.zero, 128, 1024, bias,
                                   torch.bfloat16)

    expected = [call(i) for i in range(len(problems))]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def worker(i: int) -> None:
        for repeat in range(3):
            results[i, repeat] = call(i)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert all(torch.equal(results[i, r], expected[i]) for i, r in itertools.product(range(len(problems)), range(3)))


def test_kernel_names_bad_input():
    codes, scale, weight, bias = problem(4, 128, 32, 64, False)
    packed, scales = pack_codes(weight.codes, 4), weight.scale.float()
    with pytest.raises(RuntimeError, match="int8"):
        fused.amx_int8_gemm(codes.float(), scale, packed, scales, weight.zero, 64, 128, None, torch.float32)
    with pytest.raises(RuntimeError, match="does not serve"):
        fused.amx_int8_gemm(codes[:, :96], scale, packed[:, :48], scales, weight.zero, 64, 96, None, torch.float32)
    with pytest.raises(RuntimeError, match="groups"):
        fused.amx_int8_gemm(codes, scale, packed, scales[:, :1], weight.zero, 64, 128, None, torch.float32)
    with pytest.raises(RuntimeError, match="zero points"):
        fused.amx_int8_gemm(codes, scale, packed, scales, weight.zero[:, :1], 64, 128, None, torch.float32)
    with pytest.raises(RuntimeError, match="output dtype"):
        fused.amx_int8_gemm(codes, scale, packed, scales, weight.zero, 64, 128, None, torch.float64)
    with pytest.raises(RuntimeError, match="2 activation scales per token"):
        fused.amx_int8_gemm(codes, scale, packed, scales, weight.zero, 64, 64, None, torch.float32)


def test_shape_rules():
    assert fused.amx_serves(4096, 11008, 128, 4096) and fused.amx_serves(11008, 4096, 11008, 11008)
    assert fused.amx_serves(4096, 4096, 2048, 4096) and fused.amx_serves(1088, 32, 64, 1088)
    assert fused.amx_serves(4096, 4096, 128, 64) and fused.amx_serves(4096, 4096, 64, 256)  # per-group activations
    assert fused.amx_serves(4096, 4096, 4096, 128)
    assert not fused.amx_serves(4096, 4096, 32, 4096)  # groups narrower than one tile row of 64 channels
    assert not fused.amx_serves(4096, 4096, 128, 32)
    assert not fused.amx_serves(4096, 48, 128, 4096)  # outputs not a multiple of 32
    assert not fused.amx_serves(96, 32, 96, 96)  # channels not a multiple of 64
    assert not fused.amx_serves(4096, 4096, 1536, 4096)  # groups that straddle the 1024-channel blocks
    assert not fused.amx_serves(1088, 32, 128, 1088)  # a ragged last group
    assert not fused.amx_serves(3072, 32, 128, 192)  # neither group a multiple of the other


@pytest.mark.parametrize("weight_group,activation_group", [(128, 64), (64, 128), (1024, 256), (2048, 128)])
def test_kernel_with_per_group_activation_scales(weight_group, activation_group):
    tokens, in_features, out_features = 45, 4096, 64
    torch.manual_seed(0)
    weight = qf.quantize_weight(torch.randn(out_features, in_features), 4, weight_group, False)
    x = torch.randn(tokens, in_features) * torch.logspace(-2, 2, in_features)  # scales that differ per group
    codes, scale = qf.per_token_codes(x.reshape(-1, activation_group), 4, False)
    codes, scale = codes.to(torch.int8).reshape(tokens, -1), scale.reshape(tokens, -1)
    bias = torch.randn(out_features)
    out = fused.amx_int8_gemm(codes, scale, pack_codes(weight.codes, 4), weight.scale.float(), weight.zero,
                              weight_group, activation_group, bias, torch.float32)
    exact, magnitude = exact_product(codes, scale, weight, weight_group, bias)
    runs, u32 = in_features // min(weight_group, activation_group), unit_roundoff(torch.float32)
    # per run: the exact int32 sum times the activation scale (one rounding), then a fused multiply-add
    bound = (2 * runs + 3) * u32 * (magnitude + bias.double().abs())
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [64, 128, None])
@pytest.mark.parametrize("w_symmetric,a_symmetric", list(itertools.product((False, True), (False, True))))
def test_quant_linear_amx_path_matches_simulated(dtype, group_size, w_symmetric, a_symmetric):
    spec = QuantSpec(w_group_size=group_size, w_symmetric=w_symmetric, a_symmetric=a_symmetric)
    module = layer(spec, dtype, "cpu")
    x = torch.randn(2, 40, module.in_features, dtype=dtype) * 3
    with torch.no_grad():
        assert module.matmul_path(x) == "amx_int8_gemm"
        fast, reference = module(x).reshape(80, -1), simulated(module, x).reshape(80, -1)
    rows = x.reshape(80, -1)
    assert_within(fast, reference, int8_bound(module, rows, fast, reference, module.num_weight_groups), module.bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,a_group_size", [(128, 64), (64, 128), (None, 128)])
def test_quant_linear_amx_path_with_per_group_activations_matches_simulated(dtype, group_size, a_group_size):
    spec = QuantSpec(w_group_size=group_size, a_granularity="per_group", a_group_size=a_group_size)
    module = layer(spec, dtype, "cpu")
    x = torch.randn(70, module.in_features, dtype=dtype) * torch.logspace(-1, 1, module.in_features).to(dtype)
    with torch.no_grad():
        assert module.matmul_path(x) == "amx_int8_gemm"
        fast, reference = module(x), simulated(module, x)
    x_hat = qf.fake_quant_per_group(x.double(), spec.a_bits, a_group_size, spec.a_symmetric).abs()
    _, w_abs = exact_operands(module, x)
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    runs = module.in_features // min(group_size or module.in_features, a_group_size)
    relative = 2 * u + (4 + 2 * runs) * u32 + 2 * module.in_features * u32
    bound = relative * (x_hat @ w_abs.T) + u * (fast.double().abs() + reference.double().abs())
    assert_within(fast, reference, bound, module.bias)


def test_quant_linear_amx_path_reads_the_saved_buffers():
    """The only kernel tensor is a float32 copy of the scales (none for a float32 layer); weight updates apply."""
    module = layer(QuantSpec(), torch.bfloat16, "cpu", in_features=512)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        module(x)
        assert module.kernel_tensor_bytes() == module.weight_scale.numel() * 4
        other = layer(QuantSpec(), torch.bfloat16, "cpu", in_features=512, seed=1)
        module.load_state_dict(other.state_dict())
        torch.testing.assert_close(module(x), other(x), rtol=0, atol=0)
    wide = layer(QuantSpec(), torch.float32, "cpu", in_features=512)
    with torch.no_grad():
        wide(x.float())
    assert wide.kernel_tensor_bytes() == 0


def test_layouts_and_modes_the_amx_path_does_not_serve():
    x = torch.randn(64, 256)
    for spec in (QuantSpec(w_group_size=32), QuantSpec(a_granularity="per_group", a_group_size=32),
                 QuantSpec(a_granularity="per_group", a_group_size=96), QuantSpec(a_bits=8), QuantSpec(w_bits=8),
                 QuantSpec(a_granularity="static_per_tensor")):
        assert layer(spec, torch.float32, "cpu").matmul_path(x) != "amx_int8_gemm", spec
    assert layer(QuantSpec(), torch.float32, "cpu", out_features=48).matmul_path(x) != "amx_int8_gemm"
    module = layer(QuantSpec(), torch.float32, "cpu")
    assert module.matmul_path(x.requires_grad_()) == "simulated"
    module.kernels = "simulated"
    with torch.no_grad():
        assert module.matmul_path(x) == "simulated"


def test_from_linear_layer_serves_a_7b_shape():
    linear = nn.Linear(4096, 11008, bias=False, dtype=torch.bfloat16)
    module = QuantLinear.from_linear(linear, QuantSpec())
    x = torch.randn(kernels.AMX_MIN_TOKENS["cpu"], 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        assert module.matmul_path(x) == "amx_int8_gemm"
        fast, reference = module(x), simulated(module, x)
    bound = int8_bound(module, x, fast, reference, module.num_weight_groups)
    assert ((fast.double() - reference.double()).abs() <= bound + unit_roundoff(x.dtype) * fast.double().abs()).all()
