"""Fast paths of `QuantLinear` against the simulated W4A4 reference, on the machine the suite runs on.

Each fast path must equal the simulated one up to float rounding, within a bound derived from the rounding steps
that differ between them (docstrings of `int4_bound` and `int8_bound`).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import optimum_qap
from optimum_qap.quant import functional as qf
from optimum_qap.quant import fused, kernels
from optimum_qap.quant.linear import QuantLinear, QuantSpec
from optimum_qap.quant.packing import unpack_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def layer(spec: QuantSpec, dtype: torch.dtype, device: str, in_features=256, out_features=96, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True, device=device, dtype=dtype)
    return QuantLinear.from_linear(linear, spec)


def simulated(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    mode, module.kernels = module.kernels, "simulated"
    try:
        return module(x)
    finally:
        module.kernels = mode


def exact_operands(module: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|x_hat| and |w| in float64, without any rounding to the model dtype."""
    x_hat = qf.fake_quant_per_token(x.double(), module.spec.a_bits, module.spec.a_symmetric)
    codes = unpack_codes(module.weight_packed, module.spec.w_bits, module.in_features)
    zero = module.weight_zero if not module.spec.w_symmetric else None
    weight = qf.dequantize_weight(codes, module.weight_scale.double(), zero, module.spec.w_bits,
                                  module.weight_group_size, torch.float64)
    return x_hat.abs(), weight.abs()


def int4_bound(module: QuantLinear, x: torch.Tensor, fast: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The kernel reads w = (q - 8) s + rnd((8 - z) s); the reference rnd((q - z) s). Per weight they differ by at
    most u |(8 - z) s| + u |w| (u: unit roundoff of the dtype), plus float32 work in the kernel. Both accumulate
    sum |x_hat| |w| in float32 (at most K * 2^-24 relative each) and round the output once (u |y|)."""
    u, u32 = unit_roundoff(x.dtype), unit_roundoff(torch.float32)
    x_abs, w_abs = exact_operands(module, x)
    zero = module.weight_zero.double() if not module.spec.w_symmetric else torch.full_like(
        module.weight_scale, 8, dtype=torch.float64)
    shift = (8 - zero).abs() * module.weight_scale.double()
    shift = qf.merge_groups(shift.unsqueeze(-1).expand(*shift.shape, module.weight_group_size or module.in_features),
                            module.in_features)
    per_weight = u * shift + (u + 4 * u32) * w_abs + 4 * u32 * shift
    accumulation = 2 * module.in_features * u32 * (x_abs @ w_abs.T)
    return x_abs @ per_weight.T + accumulation + u * (fast.double().abs() + reference.double().abs())


def int8_bound(module: QuantLinear, x: torch.Tensor, fast: torch.Tensor, reference: torch.Tensor,
               groups: int = 1) -> torch.Tensor:
    """The integer GEMM is exact and scales once (two float32 products); with weight ``groups``, each group's
    exact sum is scaled and added in float32 (one rounding per group, the AMX GEMM). The reference rounds x_hat
    and w to the dtype (u each, plus 2^-24 for x_hat's float32 product) and accumulates in float32 (K * 2^-24);
    both round the output once."""
    u, u32 = unit_roundoff(x.dtype), unit_roundoff(torch.float32)
    x_abs, w_abs = exact_operands(module, x)
    relative = 2 * u + (4 + groups) * u32 + 2 * module.in_features * u32
    return relative * (x_abs @ w_abs.T) + u * (fast.double().abs() + reference.double().abs())


def assert_within(fast: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, bias: torch.Tensor) -> None:
    # both paths add the bias: the fast paths after the matmul (one more rounding of |y|), the reference inside it
    bound = bound + unit_roundoff(fast.dtype) * (fast.double().abs() + bias.double().abs())
    error = (fast.double() - reference.double()).abs()
    assert (error <= bound).all(), f"max excess {(error - bound).max().item():.3g}"


@pytest.mark.parametrize("device,dtype", [(d, dtype) for d in DEVICES for dtype in kernels.INT4_DTYPES[d]])
@pytest.mark.parametrize("group_size,w_symmetric,a_symmetric",
                         list(itertools.product((32, 64, 128, 256, None), (False, True), (False, True))))
def test_int4_weight_only_matches_simulated(device, dtype, group_size, w_symmetric, a_symmetric):
    module = layer(QuantSpec(w_group_size=group_size, w_symmetric=w_symmetric, a_symmetric=a_symmetric), dtype, device)
    # as many tokens as the int4 path takes before per-channel layouts move to the integer GEMM
    tokens = min(kernels.INT8_MIN_TOKENS[device] - 1, kernels.INT4_MAX_TOKENS[device])
    x = torch.randn(1, tokens, module.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        assert module.matmul_path(x) == "int4_weight_only"
        fast, reference = module(x), simulated(module, x)
    bound = int4_bound(module, x.reshape(-1, module.in_features), fast.reshape(-1, 96), reference.reshape(-1, 96))
    assert_within(fast.reshape(-1, 96), reference.reshape(-1, 96), bound, module.bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_symmetric,a_symmetric", list(itertools.product((False, True), (False, True))))
def test_int8_gemm_matches_simulated(device, dtype, w_symmetric, a_symmetric, monkeypatch):
    monkeypatch.setattr(kernels, "AMX_MIN_TOKENS", {})  # the path of CPUs without AMX tiles
    module = layer(QuantSpec(w_group_size=None, w_symmetric=w_symmetric, a_symmetric=a_symmetric), dtype, device)
    x = torch.randn(40, module.in_features, device=device, dtype=dtype) * 3
    with torch.no_grad():
        assert module.matmul_path(x) == "int8_gemm"
        fast, reference = module(x), simulated(module, x)
    assert_within(fast, reference, int8_bound(module, x, fast, reference), module.bias)


@pytest.mark.parametrize("group_size", [None, 64])
def test_integer_gemms_accumulate_exactly(group_size):
    """On integer-valued operands every path must be exact: the integer GEMMs give the float64 result."""
    module = layer(QuantSpec(w_group_size=group_size, w_symmetric=True, a_symmetric=True), torch.float32, "cpu")
    module.weight_scale.fill_(1.0)
    module.bias.data.zero_()
    x = torch.randint(-7, 8, (32, module.in_features)).float()
    x[:, 0] = 7  # absmax 7 per token: activation scale 1, codes are the integers themselves
    with torch.no_grad():
        out = module(x) - module.bias
    codes = unpack_codes(module.weight_packed, 4, module.in_features).double() - 8
    assert torch.equal(out.double(), x.double() @ codes.T)


AMX = fused.amx_available()


@pytest.mark.parametrize("amx", [False] + [True] * AMX)
@pytest.mark.parametrize("group_size", [128, None])
def test_path_choice_by_tokens(amx, group_size, monkeypatch):
    if not amx:  # as on CPUs without AMX tiles
        monkeypatch.setattr(fused, "amx_serves", lambda *shape: False)
    module = layer(QuantSpec(w_group_size=group_size), torch.bfloat16, "cpu")
    for tokens in range(1, 2 * kernels.INT4_MAX_TOKENS["cpu"]):
        if amx and tokens >= kernels.AMX_MIN_TOKENS["cpu"]:
            expected = "amx_int8_gemm"
        elif group_size is None and tokens >= kernels.INT8_MIN_TOKENS["cpu"]:
            expected = "int8_gemm"
        else:
            expected = "int4_weight_only" if tokens <= kernels.INT4_MAX_TOKENS["cpu"] else "simulated"
        assert module.matmul_path(torch.zeros(tokens, module.in_features, dtype=torch.bfloat16)) == expected


@pytest.mark.parametrize("amx", [False] + [True] * AMX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_int4_kernel_serves_bf16_only(dtype, amx, monkeypatch):
    """PyTorch's CPU int4 kernel runs fp32 / fp16 inputs far slower than the simulated path: they stay there, or
    take the AMX GEMM from one token where it runs (it does not depend on the dtype)."""
    if not amx:
        monkeypatch.setattr(fused, "amx_serves", lambda *shape: False)
    module = layer(QuantSpec(), dtype, "cpu")
    expected = "amx_int8_gemm" if amx else "simulated"
    assert module.matmul_path(torch.zeros(1, module.in_features, dtype=dtype)) == expected


def test_layouts_the_kernels_cannot_serve_stay_simulated(monkeypatch):
    monkeypatch.setattr(fused, "amx_serves", lambda *shape: False)  # as on CPUs without AMX (tests/test_amx.py)
    x = torch.zeros(1, 256)
    for spec in (QuantSpec(w_bits=3), QuantSpec(w_group_size=16), QuantSpec(w_bits=16)):
        assert layer(spec, torch.float32, "cpu").matmul_path(x) == "simulated"
    assert layer(QuantSpec(), torch.float32, "cpu", out_features=40).matmul_path(x) == "simulated"  # out % 16
    wide = torch.zeros(kernels.INT4_MAX_TOKENS["cpu"] + 1, 256)
    assert layer(QuantSpec(w_group_size=None, a_bits=8), torch.float32, "cpu").matmul_path(wide) == "simulated"
    assert layer(QuantSpec(w_group_size=None, a_granularity="per_group"), torch.float32, "cpu").matmul_path(
        wide) == "simulated"


def test_forced_simulated_cached_weight_and_gradients_use_the_reference():
    module = layer(QuantSpec(), torch.bfloat16, "cpu")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    module.kernels = "simulated"
    assert module.matmul_path(x) == "simulated"
    module.kernels = "auto"
    module.cache_dequantized_weight(True)
    assert module.matmul_path(x) == "simulated"
    module.cache_dequantized_weight(False)
    assert module.matmul_path(x.requires_grad_()) == "simulated"  # the kernels have no backward
    with torch.no_grad():
        assert module.matmul_path(x) == "int4_weight_only"


def test_kernel_tensors_follow_weight_updates_and_are_never_saved():
    module = layer(QuantSpec(), torch.bfloat16, "cpu")
    saved = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        module(x)
        assert module.kernel_tensor_bytes() > 0
        assert module.state_dict().keys() == saved.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(module.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True)
        other = layer(QuantSpec(), torch.bfloat16, "cpu", seed=1)
        module.load_state_dict(other.state_dict())  # in-place copies into the same buffers
        fast, reference = module(x), simulated(other, x)
    assert_within(fast, reference, int4_bound(other, x, fast, reference), other.bias)


def test_config_field_and_set_kernels(tiny_repo):
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(ValueError, match="kernels"):
        optimum_qap.QAPrunerConfig(kernels="fast")
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=optimum_qap.QAPrunerConfig(kernels="simulated", keep_ratio=1.0))
    modules = optimum_qap.quantized_modules(model).values()
    assert {m.kernels for m in modules} == {"simulated"}
    optimum_qap.set_kernels(model, "auto")
    assert {m.kernels for m in modules} == {"auto"} and model.config.quantization_config.kernels == "auto"
    with pytest.raises(ValueError, match="simulated"):
        optimum_qap.set_kernels(model, "triton")


@pytest.mark.parametrize("group_size", [128, None])
def test_quant_linear_compiles_without_graph_breaks(group_size, monkeypatch):
    module = layer(QuantSpec(w_group_size=group_size), torch.bfloat16, "cpu")
    for tokens in (1, 40, kernels.INT4_MAX_TOKENS["cpu"] + 1):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        with torch.no_grad(), monkeypatch.context() as eager:
            # the one-time repack runs eagerly, on the path the compiled graph takes (the fused ops and the AMX
            # GEMM serve eager calls only)
            eager.setattr(fused, "amx_serves", lambda *shape: False)
            module(x)
            explained = torch._dynamo.explain(module)(x)
        assert explained.graph_break_count == 0, (module.matmul_path(x), explained.break_reasons)


def test_generate_with_a_compiled_decode_step_equals_eager(tiny_repo):
    from test_loading import sample_inputs
    from transformers import CompileConfig, LlavaForConditionalGeneration

    tiny_inputs = sample_inputs()

    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=optimum_qap.QAPrunerConfig())
    assert model.hf_quantizer.is_compileable
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(**tiny_inputs, max_new_tokens=4, do_sample=False)
        compiled = model.generate(**tiny_inputs, max_new_tokens=4, do_sample=False, cache_implementation="static",
                                  compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # generate did compile the decode step
    assert torch.equal(eager, compiled)


def test_kernels_choice_applies_at_reload_and_is_saved(tiny_repo, tmp_path):
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(
        tiny_repo, quantization_config=optimum_qap.QAPrunerConfig(keep_ratio=1.0)).save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=optimum_qap.QAPrunerConfig(kernels="simulated"))
    assert {m.kernels for m in optimum_qap.quantized_modules(model).values()} == {"simulated"}
    model.save_pretrained(tmp_path / "again")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert {m.kernels for m in optimum_qap.quantized_modules(again).values()} == {"simulated"}
