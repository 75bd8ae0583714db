"""`QuantLinear`: a drop-in `nn.Linear` replacement with packed low-bit weights and fake-quantized inputs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import functional as qf
from . import fused, kernels
from .packing import pack_codes, packed_length, unpack_codes, unpack_codes_as_float

# elements quantized at once: bounds the float32 temporaries (~64 MB each) whatever the layer size
QUANTIZE_BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer is quantized (a plain copy of the relevant `QAPrunerConfig` fields)."""

    w_bits: int = 4
    w_group_size: int | None = 128
    w_symmetric: bool = False
    a_bits: int = 4
    a_granularity: str = "per_token"
    a_group_size: int = 128
    a_symmetric: bool = False

    @classmethod
    def from_config(cls, config) -> QuantSpec:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    @property
    def packs_weight(self) -> bool:
        return self.w_bits < 16

    @property
    def is_static(self) -> bool:
        return self.a_bits < 16 and self.a_granularity.startswith("static")


# per thread: id(QuantLinear) -> (low, high) input range observed so far (None: not seen yet); None outside calibration
_OBSERVATIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qap_observations", default=None)


@contextlib.contextmanager
def observing_inputs(modules: Iterable[QuantLinear]) -> Iterator[None]:
    """Inside the block, ``modules`` called from this thread record their per-channel input ranges instead of
    quantizing their inputs. When the block completes, the ranges seen replace their calibrated ranges (NaN for a
    layer that saw nothing); if it raises, the old ranges stay. Other threads keep quantizing with the old ranges."""
    modules = list(modules)
    store: dict = {id(module): None for module in modules}
    token = _OBSERVATIONS.set(store)
    try:
        yield
    finally:
        _OBSERVATIONS.reset(token)
    for module in modules:
        seen = store[id(module)]
        nan = torch.full_like(module.input_min, float("nan"))
        module.set_input_ranges(*(seen if seen is not None else (nan, nan)))


def needs_gradient(x: torch.Tensor) -> bool:
    """Whether autograd records this call: the straight-through path, which the fused kernels cannot serve."""
    return x.requires_grad and torch.is_grad_enabled()


class StraightThrough(torch.autograd.Function):
    """``quantize(x)`` in the forward, the identity in the backward: the straight-through estimator of QAT and
    QLoRA (rounding has a zero gradient almost everywhere, and the range's gradient would only add noise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize) -> torch.Tensor:
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class UncalibratedError(RuntimeError):
    """A static activation granularity was used before its ranges were calibrated."""


class QuantLinear(nn.Module):
    """Linear layer holding packed integer weight codes, per-group scales (and zero points).

    The weight is dequantized on the fly in the scale dtype (the model dtype). Inputs are fake-quantized
    according to ``spec.a_granularity``. ``input_min`` / ``input_max`` hold per-channel calibrated input ranges
    (NaN until calibrated); static granularities quantize with them, every granularity reports outliers from them.

    Serialized names: ``weight_packed`` (uint8), ``weight_scale``, ``weight_zero`` (uint8, asymmetric only),
    ``input_min``, ``input_max`` (float32), ``bias``; ``weight`` only when ``w_bits == 16``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        awaiting_weight: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self._checked_calibration = False
        self._cache_weight = False
        self._cached_weight: torch.Tensor | None = None
        self.kernels = "auto"
        # what the layout allows, fixed per layer: the int4 kernels' group size (None: not servable) and whether
        # the integer GEMM fits; matmul_path adds the per-call conditions (device, dtype, tokens)
        self._int4_group = (kernels.int4_kernel_group_size(in_features, self.weight_group_size, out_features)
                            if spec.packs_weight and spec.w_bits == 4 else None)
        self._int8_fits = (spec.packs_weight and self.weight_group_size is None
                           and in_features % 8 == 0 and out_features % 8 == 0
                           and kernels.int8_gemm_supported(spec.w_bits, spec.w_symmetric, spec.a_bits,
                                                           spec.a_granularity, spec.a_symmetric))
        # the AMX GEMM's weight and activation group sizes (in_features for per-channel weights and per-token
        # activations), or None; the kernel's shape rules are checked at the first CPU call (`fused.amx_serves`)
        a_group = kernels.amx_activation_group(spec.a_granularity, spec.a_group_size, in_features)
        amx_fits = (spec.packs_weight and spec.w_bits == 4 and a_group is not None
                    and kernels.codes_fit_int8(spec.w_bits, spec.w_symmetric, spec.a_bits, spec.a_symmetric))
        self._amx_groups = (self.weight_group_size or in_features, a_group) if amx_fits else None
        # (path, device, dtype) -> (fingerprint of the saved buffers it was derived from, kernel-format tensors)
        self._kernel_cache: dict[tuple, tuple] = {}
        if spec.packs_weight:
            groups = self.num_weight_groups
            codes_shape = (out_features, packed_length(in_features, spec.w_bits))
            self.register_buffer("weight_packed", torch.zeros(codes_shape, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
            if not spec.w_symmetric:
                self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        if not spec.packs_weight or awaiting_weight:
            # While loading, the float weight arrives here before `prepare_from_weight` packs it.
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nan = torch.full((in_features,), float("nan"), dtype=torch.float32, device=device)
        self.register_buffer("input_min", nan)
        self.register_buffer("input_max", nan.clone())

    @property
    def qweight(self) -> torch.Tensor:
        """The stored weight tensor (packed codes; the float weight at 16 bits): where PEFT, by its convention for
        quantized linears, finds the layer's device when it places LoRA adapters (`optimum_qap.lora`)."""
        return self.weight_packed if self.spec.packs_weight else self.weight

    @property
    def num_weight_groups(self) -> int:
        size = self.spec.w_group_size
        return 1 if size is None else -(-self.in_features // size)

    @property
    def weight_group_size(self) -> int | None:
        size = self.spec.w_group_size
        return None if size is None or size >= self.in_features else size

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, codes: qf.WeightCodes | None = None) -> QuantLinear:
        """Quantize an existing `nn.Linear` (keeps its device and dtype), to nearest or to given ``codes`` (GPTQ)."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        state = module.quantized_state(linear.weight.detach()) if codes is None else module.state_from_codes(codes)
        for name, tensor in state.items():
            getattr(module, name).data = tensor
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def quantized_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Serialized tensors (name -> value) for a float weight; stats start uncalibrated (NaN)."""
        state = {name: torch.full_like(getattr(self, name), float("nan"), device=weight.device)
                 for name in ("input_min", "input_max")}
        if not self.spec.packs_weight:
            return {"weight": weight, **state}
        rows_per_block = max(1, QUANTIZE_BLOCK_ELEMENTS // self.in_features)
        blocks = [self._quantize_rows(rows) for rows in weight.split(rows_per_block)]
        for name in blocks[0]:
            state[name] = torch.cat([block[name] for block in blocks])
        return state

    def _quantize_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.state_from_codes(qf.quantize_weight(rows, self.spec.w_bits, self.weight_group_size,
                                                        self.spec.w_symmetric))

    def state_from_codes(self, codes: qf.WeightCodes) -> dict[str, torch.Tensor]:
        """Packed serialized tensors of unpacked weight codes (RTN or GPTQ) in this layer's layout."""
        block = {"weight_packed": pack_codes(codes.codes, self.spec.w_bits),
                 "weight_scale": codes.scale.to(self.weight_scale.dtype)}
        if codes.zero is not None:
            block["weight_zero"] = codes.zero
        return block

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight (its ``rows`` only) in the scale dtype, dequantized from the packed codes."""
        if not self.spec.packs_weight:
            return self.weight[rows]
        packed, scale = self.weight_packed[rows], self.weight_scale[rows]
        zero = self.weight_zero[rows] if not self.spec.w_symmetric else None
        weight = fused.dequantize_packed(packed, scale, zero, self.spec.w_bits, self.weight_group_size,
                                         self.in_features)
        if weight is not None:
            return weight
        codes, offset = unpack_codes_as_float(packed, self.spec.w_bits, self.in_features, scale.dtype)
        return qf.dequantize_weight(codes, scale, zero, self.spec.w_bits, self.weight_group_size, scale.dtype,
                                    offset)

    def cache_dequantized_weight(self, enabled: bool = True) -> None:
        """Keep the dequantized weight between calls: faster decoding, at the memory cost of a float weight."""
        self._cache_weight = enabled
        self._cached_weight = None

    def _weight_for_matmul(self, dtype: torch.dtype) -> torch.Tensor:
        if not self._cache_weight:
            return self.dequantized_weight().to(dtype)
        if self._cached_weight is None or self._cached_weight.dtype != dtype:
            # kept for later calls, which may train (LoRA): a tensor made inside `torch.inference_mode` could never
            # be saved for backward
            with torch.inference_mode(False):
                self._cached_weight = self.dequantized_weight().to(dtype)
        return self._cached_weight

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x``; under autograd its gradient passes the rounding unchanged (straight-through)."""
        if self.spec.a_bits >= 16:
            return x
        if needs_gradient(x):
            return StraightThrough.apply(x, self._fake_quantize)
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.a_granularity == "per_token":
            return fused.fake_quant_per_token(x, spec.a_bits, spec.a_symmetric)
        if spec.a_granularity == "per_group":
            return fused.fake_quant_per_group(x, spec.a_bits, spec.a_group_size, spec.a_symmetric)
        self._require_calibration()
        low, high = self.input_min, self.input_max
        if spec.a_granularity == "static_per_tensor":
            low, high = low.min(), high.max()
        return qf.fake_quant_range(x, low, high, spec.a_bits, spec.a_symmetric)

    def _require_calibration(self) -> None:
        if self._checked_calibration:
            return
        if torch.isnan(self.input_min).any() or torch.isnan(self.input_max).any():
            raise UncalibratedError(
                f"QuantLinear({self.in_features}->{self.out_features}) uses a_granularity="
                f"'{self.spec.a_granularity}', whose activation ranges are not calibrated. Run "
                "`optimum_qap.calibrate(model, processor, samples)` first, or pass `calibration=` in QAPrunerConfig."
            )
        self._checked_calibration = True

    @property
    def observing(self) -> bool:
        """Whether the calling thread is recording this layer's input ranges (see `observing_inputs`)."""
        if torch.compiler.is_compiling():
            return False  # calibration runs eagerly; dynamo cannot trace ContextVar.get
        store = _OBSERVATIONS.get()
        return store is not None and id(self) in store

    def observe(self, x: torch.Tensor) -> None:
        """Widen the per-channel input range with the tokens of ``x``: the calling thread's observation inside
        `observing_inputs`, the calibrated range itself outside it."""
        low, high = torch.aminmax(x.detach().float().reshape(-1, self.in_features), dim=0)
        if not self.observing:
            self.set_input_ranges(torch.fmin(self.input_min, low), torch.fmax(self.input_max, high))
            return
        store = _OBSERVATIONS.get()
        seen = store[id(self)]
        store[id(self)] = (low, high) if seen is None else (torch.fmin(seen[0], low), torch.fmax(seen[1], high))

    def set_input_ranges(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Replace the calibrated ranges with new tensors (a concurrent forward keeps the ones it has read)."""
        self.input_min, self.input_max = low.to(self.input_min), high.to(self.input_max)
        self._checked_calibration = False

    def matmul_path(self, x: torch.Tensor) -> str:
        """The path a call with input ``x`` takes: "amx_int8_gemm", "int4_weight_only", "int8_gemm" or "simulated"
        (dequantize the weight, fake-quantize the input, dense matmul). See `optimum_qap.quant.kernels`."""
        if self.kernels == "simulated" or self._cache_weight or needs_gradient(x):
            return "simulated"
        device = x.device.type
        tokens = x.numel() // self.in_features
        int4_serves = self._int4_group and x.dtype in kernels.INT4_DTYPES.get(device, ())
        # below AMX_MIN_TOKENS the int4 kernel is faster where it serves the call; fp32 / fp16 it does not serve
        amx_min = kernels.AMX_MIN_TOKENS.get(device, float("inf")) if int4_serves else 1
        if (self._amx_groups and tokens >= amx_min and device in kernels.AMX_MIN_TOKENS
                and x.dtype in kernels.AMX_DTYPES and fused.serves(x)
                and fused.amx_serves(self.in_features, self.out_features, *self._amx_groups)):
            return "amx_int8_gemm"
        if self._int8_fits and tokens >= kernels.INT8_MIN_TOKENS.get(device, float("inf")):
            return "int8_gemm"
        if int4_serves and tokens <= kernels.INT4_MAX_TOKENS.get(device, 0):
            return "int4_weight_only"
        return "simulated"

    def _kernel_tensors(self, path: str, device: torch.device, dtype: torch.dtype) -> tuple:
        """Kernel-format weight tensors for ``path``, repacked from the saved buffers once per device and dtype
        (and again whenever those buffers change)."""
        sources = (self.weight_packed, self.weight_scale, getattr(self, "weight_zero", self.weight_scale))
        key = (path, device, dtype)
        entry = self._kernel_cache.get(key)
        if torch.compiler.is_compiling() and entry is not None:
            return entry[1]
        # inference tensors keep no version counter (and cannot be written outside inference mode)
        fingerprint = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in sources)
        if entry is None or entry[0] != fingerprint:
            entry = (fingerprint, self._repack(path, dtype))
            # a layer moved to another device drops the old device's tensors
            self._kernel_cache = {k: v for k, v in self._kernel_cache.items() if k[1] == device} | {key: entry}
        return entry[1]

    def _repack(self, path: str, dtype: torch.dtype) -> tuple:
        if path == "amx_int8_gemm":
            return (self.weight_scale.float().contiguous(),)
        codes = unpack_codes(self.weight_packed, self.spec.w_bits, self.in_features)
        zero = self.weight_zero if not self.spec.w_symmetric else None
        if path == "int8_gemm":
            weight_scale = self.weight_scale.float().reshape(1, -1)
            return kernels.centered_weight_codes(codes, zero, self.spec.w_bits), weight_scale
        repeat = self.in_features // self._int4_group if self.weight_group_size is None else 1
        table = kernels.int4_scale_and_zero(self.weight_scale, zero, self.spec.w_bits, repeat, dtype)
        return kernels.pack_int4_for_kernel(codes), self._int4_group, table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return nn.functional.linear(x, self._weight_for_matmul(x.dtype), self.bias)
        path = self.matmul_path(x)
        if path == "amx_int8_gemm":
            (weight_scale,) = self._kernel_tensors(path, x.device, x.dtype)
            zero = self.weight_zero if not self.spec.w_symmetric else None
            return kernels.amx_int8_gemm(x, self.weight_packed, weight_scale, zero, *self._amx_groups,
                                         self.spec.a_bits, self.spec.a_symmetric, self.bias)
        if path == "int8_gemm":
            weight_codes, weight_scale = self._kernel_tensors(path, x.device, x.dtype)
            out = kernels.int8_gemm(x, weight_codes, weight_scale, self.spec.a_bits, self.spec.a_symmetric)
        elif path == "int4_weight_only":
            packed, group, table = self._kernel_tensors(path, x.device, x.dtype)
            out = kernels.int4_weight_only_matmul(self.quantize_input(x), packed, group, table)
        else:
            return self._simulated_matmul(self.quantize_input(x))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _simulated_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with the dequantized weight, over ``x`` flattened to rows: one GEMM with the bias
        added inside it, as `nn.functional.linear` computes a 2-D input (a 3-D one that is not contiguous it
        computes as a matmul and an add, which rounds differently). On CPU, without autograd or the compiler, the
        weight is dequantized in row blocks that stay in cache (`kernels.matmul_in_row_blocks`)."""
        rows = x.reshape(-1, x.shape[-1])
        records_gradient = needs_gradient(x) or (self.bias is not None and needs_gradient(self.bias))
        if (not self.spec.packs_weight or self._cache_weight or records_gradient or torch.compiler.is_compiling()
                or x.device.type not in kernels.ROW_BLOCK_DEVICES):
            out = nn.functional.linear(rows, self._weight_for_matmul(x.dtype), self.bias)
        else:
            out = kernels.matmul_in_row_blocks(rows, lambda block: self.dequantized_weight(block).to(x.dtype),
                                               self.out_features, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def weight_storage_bytes(self) -> int:
        """Bytes held for the weight: packed codes, scales and zero points (or the float weight)."""
        names = ("weight_packed", "weight_scale", "weight_zero") if self.spec.packs_weight else ("weight",)
        return sum(t.numel() * t.element_size() for n in names if (t := getattr(self, n, None)) is not None)

    def kernel_tensor_bytes(self) -> int:
        """Bytes held by kernel-format weight copies (repacked at first use of a fast path; never saved)."""
        saved = {t.data_ptr() for t in self.buffers()}  # a float32 layer's AMX scales are its own buffer
        return sum(t.numel() * t.element_size() for _, tensors in self._kernel_cache.values()
                   for t in tensors if isinstance(t, torch.Tensor) and t.data_ptr() not in saved)

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.w_group_size is None else f"g{s.w_group_size}"
        act = "off" if s.a_bits >= 16 else f"{s.a_bits}-bit {s.a_granularity}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={s.w_bits}-bit {group}{' sym' if s.w_symmetric else ''}, activations={act}"
        )
