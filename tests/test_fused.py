"""The fused CPU ops against the eager code they replace, bit for bit (`optimum_qap.quant.fused`)."""

from __future__ import annotations

import logging
import shutil
from unittest import mock

import pytest
import torch
from torch import nn

from optimum_qap.quant import functional as qf
from optimum_qap.quant import fused, kernels
from optimum_qap.quant.linear import QuantLinear, QuantSpec
from optimum_qap.quant.packing import pack_codes

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_extension_builds_where_a_compiler_is_present():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the eager code serves (checked by the rest of the suite)")
    assert fused.ops() is not None


ops = pytest.mark.skipif(fused.ops() is None, reason="fused CPU ops unavailable (no C++ compiler)")


def activation_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows that exercise the range math: Gaussian, outlier channels, all-positive, all-negative, all-zero,
    constant, ties at half codes, a NaN, an infinity, tiny values; then 1024 Gaussian rows over 8 decades, whose
    16-bit values land on exact ties often enough that rounding by a reciprocal instead of a division shows."""
    torch.manual_seed(0)
    rows = torch.randn(24, 200) * torch.logspace(-3, 3, 24).unsqueeze(-1)
    rows[0, 7] = 80.0
    rows[1] = rows[1].abs()
    rows[2] = -rows[2].abs()
    rows[3] = 0.0
    rows[4] = 1.5
    rows[5] = torch.arange(200) % 16 - 7.5  # exact halves: ties round to even
    rows[6, 3] = float("nan")
    rows[7, 9] = float("inf")
    rows[8] = rows[8] * 1e-30
    rows[9, 0] = -0.0
    spread = torch.randn(1024, 200) * torch.logspace(-4, 4, 1024).unsqueeze(-1)
    return torch.cat((rows, spread)).to(dtype)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("symmetric", (False, True))
def test_fake_quant_rows_equals_eager(dtype, bits, symmetric):
    x = activation_rows(dtype)
    assert_identical(fused.ops().fake_quant_rows(x, bits, symmetric), qf.fake_quant_per_token(x, bits, symmetric))


@ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,symmetric", ((4, False), (4, True), (7, False), (8, True)))
def test_int8_codes_rows_equal_eager(dtype, bits, symmetric):
    x = activation_rows(dtype)
    codes, scale = fused.ops().int8_codes_rows(x, bits, symmetric)
    expected_codes, expected_scale = qf.per_token_codes(x, bits, symmetric)
    assert_identical(scale, expected_scale)
    finite = ~expected_codes.isnan()
    assert torch.equal(codes[finite], expected_codes[finite].to(torch.int8))


@ops
def test_int8_codes_rows_refuse_codes_beyond_int8():
    with pytest.raises(RuntimeError, match="do not fit int8"):
        fused.ops().int8_codes_rows(torch.randn(2, 8), 8, False)


@ops
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_accumulated_equals_eager(dtype):
    torch.manual_seed(0)
    accumulated = torch.randint(-2**20, 2**20, (9, 48), dtype=torch.int32)
    row_scale, column_scale = torch.rand(9, 1) * 1e-2, torch.rand(1, 48) * 1e-2
    row_scale[3] = float("nan")
    expected = accumulated.float().mul_(row_scale).mul_(column_scale).to(dtype)
    assert_identical(fused.ops().scale_accumulated(accumulated, row_scale, column_scale, dtype), expected)


@ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("length,group_size", ((256, 64), (250, 64), (131, None), (96, 96)))
def test_dequantize_packed_equals_eager(dtype, bits, symmetric, length, group_size):
    torch.manual_seed(0)
    weight = torch.randn(10, length) * torch.logspace(-2, 2, 10).unsqueeze(-1)
    codes = qf.quantize_weight(weight, bits, group_size, symmetric)
    scale = codes.scale.to(dtype)
    expected = qf.dequantize_weight(codes.codes, scale, codes.zero, bits, group_size, dtype)
    packed = pack_codes(codes.codes, bits)
    actual = fused.ops().dequantize_packed(packed, scale, codes.zero, bits, group_size or length, length)
    assert_identical(actual, expected)


@ops
def test_fused_ops_name_bad_input():
    with pytest.raises(RuntimeError, match=r"expected rows \[n, length\]"):
        fused.ops().fake_quant_rows(torch.randn(2, 3, 4), 4, False)
    with pytest.raises(RuntimeError, match="serves 4- and 8-bit codes"):
        fused.ops().dequantize_packed(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 1), None, 3, 8, 8)


def layer_outputs(spec: QuantSpec, dtype: torch.dtype, tokens: int) -> dict[str, torch.Tensor]:
    """A layer's output on every path it can take for ``tokens`` tokens."""
    torch.manual_seed(0)
    module = QuantLinear.from_linear(nn.Linear(256, 96, dtype=dtype), spec)
    x = torch.randn(2, tokens, 256).to(dtype)
    outputs = {}
    for path in ("int4_weight_only", "int8_gemm", "simulated"):
        with mock.patch.object(QuantLinear, "matmul_path", lambda self, x, path=path: path):
            try:
                outputs[path] = module(x)
            except (RuntimeError, TypeError, AttributeError):
                continue  # a path this layout or dtype cannot take
    return outputs


@ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", (QuantSpec(), QuantSpec(w_group_size=None, a_symmetric=True),
                                  QuantSpec(a_granularity="per_group", a_group_size=64, w_symmetric=True)),
                         ids=("default", "per-channel", "per-group"))
def test_quant_linear_outputs_do_not_depend_on_the_fused_ops(spec, dtype):
    fast = layer_outputs(spec, dtype, tokens=5)
    with mock.patch.object(fused, "ops", lambda: None):
        eager = layer_outputs(spec, dtype, tokens=5)
    assert fast.keys() == eager.keys() and "simulated" in fast
    for path in fast:
        assert_identical(fast[path], eager[path])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("bias", (False, True))
def test_matmul_in_row_blocks_equals_one_linear(monkeypatch, dtype, bias):
    """Blocks of 16 weight rows (7 blocks, the last one ragged) give `nn.functional.linear`'s values."""
    monkeypatch.setattr(kernels, "DEQUANTIZE_BLOCK_ELEMENTS", 16 * 40)
    torch.manual_seed(0)
    rows, weight = torch.randn(9, 40).to(dtype), torch.randn(100, 40).to(dtype)
    offset = torch.randn(100).to(dtype) if bias else None
    requested = []

    def weight_rows(block: slice) -> torch.Tensor:
        requested.append((block.start, block.stop))
        return weight[block]

    out = kernels.matmul_in_row_blocks(rows, weight_rows, 100, offset)
    assert requested == [(start, min(start + 16, 100)) for start in range(0, 100, 16)]
    assert_identical(out, nn.functional.linear(rows, weight, offset))


def test_unbuildable_extension_warns_once_and_leaves_the_eager_code(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setattr(fused, "_build", mock.Mock(side_effect=OSError("no compiler")))
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert fused.ops() is None and fused.ops() is None
    assert fused._build.call_count == 1
    assert [r.getMessage() for r in caplog.records] == [
        "optimum-qap: fused CPU ops unavailable (OSError: no compiler); using the eager PyTorch code, which is "
        "slower at decode and on long inputs"]
    x = torch.randn(3, 64)
    assert_identical(fused.fake_quant_per_token(x, 4, False), qf.fake_quant_per_token(x, 4, False))


def test_environment_switch_turns_the_fused_ops_off(monkeypatch):
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setenv("OPTIMUM_QAP_FUSED", "0")
    monkeypatch.setattr(fused, "_build", mock.Mock(side_effect=AssertionError("must not build")))
    assert fused.ops() is None and not fused.serves(torch.randn(2))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_simulated_layer_in_blocks_equals_the_whole_weight_matmul(monkeypatch, dtype):
    """A layer's simulated call in 6 blocks of 16 rows gives the values of one matmul with the whole dequantized
    weight, and the autograd path (one whole matmul) agrees with it."""
    monkeypatch.setattr(kernels, "DEQUANTIZE_BLOCK_ELEMENTS", 16 * 256)
    torch.manual_seed(0)
    module = QuantLinear.from_linear(nn.Linear(256, 96, dtype=dtype), QuantSpec())
    module.kernels = "simulated"
    x = torch.randn(2, 7, 256).to(dtype)
    calls = []
    dequantized = module.dequantized_weight

    def counted(rows: slice = slice(None)) -> torch.Tensor:
        calls.append(rows)
        return dequantized(rows)

    with mock.patch.object(module, "dequantized_weight", counted), torch.no_grad():
        blocked = module(x)
    assert len(calls) == 6
    whole = nn.functional.linear(module.quantize_input(x).reshape(-1, 256), dequantized(), module.bias)
    assert_identical(blocked, whole.reshape(2, 7, 96).detach())
    assert_identical(module(x.clone().requires_grad_()).detach(), blocked)


def test_loading_a_cpu_model_builds_the_fused_ops(tmp_path):
    """The build (seconds at a machine's first use) happens in from_pretrained, not in the first generate."""
    import tiny
    from transformers import LlavaForConditionalGeneration

    from optimum_qap import QAPrunerConfig

    repo = tiny.save_tiny(tmp_path / "tiny")
    with mock.patch.object(fused, "ops", wraps=fused.ops) as built:
        LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=QAPrunerConfig(keep_ratio=1.0))
    assert built.call_count >= 1


@ops
def test_fused_ops_do_not_depend_on_the_thread_count():
    """Rows are split between intra-op threads; each row's values must not depend on the split."""
    x = activation_rows(torch.bfloat16)
    accumulated = torch.randint(-2**20, 2**20, (x.shape[0], 48), dtype=torch.int32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            codes, scale = fused.ops().int8_codes_rows(x, 4, True)
            results.append((fused.ops().fake_quant_rows(x, 4, False), codes, scale,
                            fused.ops().scale_accumulated(accumulated, scale, torch.rand(1, 48,
                                                          generator=torch.Generator().manual_seed(0)), x.dtype)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for actual, expected in zip(other, results[0], strict=True):
            assert_identical(actual, expected)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
def test_dequantized_weight_equals_eager_in_every_dtype(dtype):
    """float64 layers keep the eager dequantization (it multiplies in float64, the fused op in float32)."""
    torch.manual_seed(0)
    module = QuantLinear.from_linear(nn.Linear(256, 48, dtype=dtype), QuantSpec())
    fast = module.dequantized_weight()
    with mock.patch.object(fused, "ops", lambda: None):
        eager = module.dequantized_weight()
    assert_identical(fast, eager)
