"""`QAPrunerConfig`: one transformers quantization config for W4A4 quantization and QAPruner token pruning."""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration_data import is_serializable, saved_form
from .config_checks import (
    check_bool,
    check_calibration,
    check_choice,
    check_positive_int,
    check_str_list,
    check_unit_interval,
    invalid,
    is_int,
    is_json_object,
    is_real,
)
from .quant.kernels import KERNEL_MODES
from .reload import LOADING_FIELDS, records_explicit_fields

QUANT_METHOD = "qap"
# Bump when the on-disk layout of quantized modules changes; loading a newer version is refused.
# 2: rotation (norm gains fused, weights rotated, online transforms rebuilt from the config) and GPTQ weights.
FORMAT_VERSION = 2

WEIGHT_BITS = (2, 3, 4, 8, 16)
ACTIVATION_BITS = (2, 3, 4, 8, 16)
ACTIVATION_GRANULARITIES = ("per_token", "per_group", "static_per_channel", "static_per_tensor")
STATIC_GRANULARITIES = ("static_per_channel", "static_per_tensor")
SEMANTIC_SCORES = ("cls_attention", "cdpruner")
AUTO_CRITERIA = ("kl", "answer")
WEIGHT_METHODS = ("rtn", "gptq")
SELECTIONS = ("topk", "dpp")
SENSITIVITY_SPACES = ("projector", "quantizer")
FUSIONS = ("weighted", "outlier_slots")
AUTO = "auto"
# alpha when no calibration samples are given (with samples the default is "auto", docs/results.md): the top of the
# authors' public range (0.3-0.7). The demo models favour alpha 1, the paper's gains on real LLaVA need weight on S^Q;
# without samples to decide, the paper's method is the default.
DEFAULT_ALPHA = 0.7
MAX_CALIBRATION_SAMPLES = 4096


class QAPrunerConfig(QuantizationConfigMixin):
    """Quantize a LLaVA model's language model to low-bit weights and activations and prune its visual tokens.

    `QAPrunerConfig()` is the paper's setting: W4A4 with QAPruner pruning at 12.5 % retention. The default
    activation granularity (dynamic per-token) needs no calibration; the static ones do (see `calibration`).

    Quantization:
        w_bits: weight bits, one of 2, 3, 4, 8 or 16 (16 keeps weights in the model dtype).
        w_group_size: input channels sharing one weight scale; None means one scale per output channel.
        w_symmetric: symmetric weights (no zero point) instead of asymmetric min-max.
        a_bits: activation bits, one of 2, 3, 4, 8 or 16 (16 turns activation quantization off).
        a_granularity: "per_token" and "per_group" (dynamic), "static_per_channel" (calibrated per-channel
            ranges, the paper's Q-VLM setting) or "static_per_tensor".
        a_group_size: channels per group for "per_group".
        a_symmetric: symmetric activations instead of asymmetric min-max.
        quantize_projector / quantize_vision_tower: also quantize the multimodal projector / the vision tower.
        modules_to_not_convert: module names (or name suffixes) left in full precision; lm_head always is.
        calibration: None, "builtin", a list of {"image": PIL image or path, "text": prompt} dicts, of PIL images or
            of chat conversations, or a `datasets.Dataset` with image and text columns (optimum_qap.calibration_data);
            when set, `from_pretrained` GPTQs the weights and calibrates activation ranges, outlier statistics and
            "auto" values on these samples. In-memory samples are not saved: config.json says "in_memory".
        num_calibration_samples: how many "builtin" samples (or rows of a dataset) to use (32: enough for the "auto"
            choices too).
        outlier_ratio: a channel whose calibrated absolute maximum exceeds this multiple of the layer's median
            channel is reported as an outlier channel.

    Backbone (docs/method.md, "Rotation and GPTQ"):
        rotation: QuaRot-style computational invariance before quantizing: RMSNorm gains fused into the linears,
            the residual stream rotated by a randomized Hadamard transform, the value/o_proj path rotated per head
            (offline) and across heads (online), the down_proj input rotated online. Same full-precision function;
            outlier channels spread over all channels, so 4-bit activations survive them.
        rotation_seed: seed of the residual rotation's random signs.
        weight_method: "rtn" (round to nearest) or "gptq" (error-compensating, needs calibration samples). Default
            (None): "gptq" when `calibration` is given, else "rtn".
        gptq_damping: GPTQ damping, as a fraction of the mean Hessian diagonal.
        gptq_act_order: GPTQ quantizes columns in order of decreasing Hessian diagonal (groups stay contiguous).
        gptq_block_size: columns per GPTQ lazy-update block.
        kernels: "auto" runs each call on the fastest exact path for its layout, device and token count (fused
            int4 weight-only kernels for decode, an int8 integer GEMM for per-channel layouts); "simulated" always
            dequantizes the weight and fake-quantizes the input (the reference). A runtime choice, not saved in
            the tensors; `optimum_qap.set_kernels(model, mode)` switches a loaded model.

    Pruning:
        keep_ratio: share of visual tokens that reach the language model (1.0 disables pruning).
        keep_tokens: absolute number of kept visual tokens per image; overrides keep_ratio.
        alpha: fusion weight, S = alpha * S^P + (1 - alpha) * S^Q; 1.0 is the semantic-only pruner. "auto" picks
            it from `alpha_grid` on the calibration samples (semantic only unless a value brings the model's outputs
            measurably closer to the unpruned ones; see `optimum_qap.select_fusion`). Default (None): "auto" when
            `calibration` is given, else 0.7.
        alpha_grid: the values "auto" tries; 0.0 and 1.0 (semantic only) are always tried as well.
        fusion: "weighted" (the paper's S) or "outlier_slots": reserve up to `outlier_slots` of the K tokens for
            tokens whose range or group-quantization error is a genuine outlier relative to the calibrated token
            statistics (more than `outlier_ratio` x their calibration median), fill the rest by semantic score.
        outlier_slots: m, an int >= 0 or "auto" (chosen from `slot_grid` like alpha).
        slot_grid: the values of m that "auto" tries (those above K are skipped).
        auto_max_samples: at most this many calibration samples are used by the "auto" choices (bounds their cost).
        auto_criterion: what "auto" minimises. "kl": KL divergence of the next-token distribution at the answer
            position (the prompt's last position) from the unpruned model's; needs no answers. "answer": the
            cross-entropy of each sample's "answer".
        semantic: "cls_attention" ([CLS] attention of the vision tower) or "cdpruner" (instruction relevance).
        clip_text_model: with semantic="cdpruner", a CLIP checkpoint (Hub id or folder, e.g.
            "openai/clip-vit-large-patch14-336") whose text tower encodes the instruction and whose image projection
            maps the vision tower's feature-layer patches into the joint space: CDPruner's original formulation.
            None (default) compares the projector outputs with the LLM's own embeddings of the instruction.
        selection: "topk" or "dpp" (conditional DPP as in CDPruner).
        error_weight / range_weight: weights of the normalised group-quantization error and range in S^Q.
        sensitivity_group_size: group size of the simulated quantization in S^Q.
        sensitivity_bits: bits of the simulated quantization in S^Q; None uses a_bits (4 when a_bits is 16).
        sensitivity_space: where S^Q looks at the visual tokens. "projector": the projector outputs in the
            unrotated basis, as the paper does. "quantizer": what the first decoder layer's quantizer sees, the
            tokens after its RMSNorm (and after the rotation, when `rotation` is on).

    Loading only (keyword, not saved):
        processor: the processor that turns calibration samples into model inputs, for checkpoints that hold none
            (default: `AutoProcessor.from_pretrained` of the checkpoint).

    Provenance (filled in by optimum-qap, shown in the model card):
        base_model: the model id the weights were quantized from.
        calibration_summary: what calibration ran on (sample count, source, seconds).

    Example:
        >>> import optimum_qap
        >>> cfg = optimum_qap.QAPrunerConfig(w_bits=4, a_bits=8, a_granularity="per_group", keep_ratio=0.25)
        >>> optimum_qap.QAPrunerConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
        True
    """

    @records_explicit_fields
    def __init__(
        self,
        w_bits: int = 4,
        w_group_size: int | None = 128,
        w_symmetric: bool = False,
        a_bits: int = 4,
        a_granularity: str = "per_token",
        a_group_size: int = 128,
        a_symmetric: bool = False,
        quantize_projector: bool = False,
        quantize_vision_tower: bool = False,
        modules_to_not_convert: list[str] | None = None,
        calibration: Any = None,
        num_calibration_samples: int = 32,
        outlier_ratio: float = 20.0,
        rotation: bool = True,
        rotation_seed: int = 0,
        weight_method: str | None = None,
        gptq_damping: float = 0.01,
        gptq_act_order: bool = True,
        gptq_block_size: int = 128,
        kernels: str = "auto",
        keep_ratio: float = 0.125,
        keep_tokens: int | None = None,
        alpha: float | str | None = None,
        alpha_grid: list[float] | None = None,
        fusion: str = "weighted",
        outlier_slots: int | str = AUTO,
        slot_grid: list[int] | None = None,
        auto_max_samples: int = 32,
        auto_criterion: str = "kl",
        semantic: str = "cls_attention",
        clip_text_model: str | None = None,
        selection: str = "topk",
        error_weight: float = 0.5,
        range_weight: float = 0.5,
        sensitivity_group_size: int = 128,
        sensitivity_bits: int | None = None,
        sensitivity_space: str = "projector",
        base_model: str | None = None,
        calibration_summary: dict[str, Any] | None = None,
        token_statistics: dict[str, float] | None = None,
        auto_selection: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        *,
        processor: Any = None,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.w_bits = w_bits
        self.w_group_size = w_group_size
        self.w_symmetric = w_symmetric
        self.a_bits = a_bits
        self.a_granularity = a_granularity
        self.a_group_size = a_group_size
        self.a_symmetric = a_symmetric
        self.quantize_projector = quantize_projector
        self.quantize_vision_tower = quantize_vision_tower
        self.modules_to_not_convert = copy.deepcopy(modules_to_not_convert)
        # in-memory samples (images, datasets) are kept as given, never copied; config.json records "in_memory"
        self.calibration = (
            copy.deepcopy(calibration)
            if is_serializable(calibration)
            else list(calibration) if isinstance(calibration, list) else calibration
        )
        self.processor = processor
        self.num_calibration_samples = num_calibration_samples
        self.outlier_ratio = outlier_ratio
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.weight_method = ("gptq" if calibration is not None else "rtn") if weight_method is None else weight_method
        self.gptq_damping = gptq_damping
        self.gptq_act_order = gptq_act_order
        self.gptq_block_size = gptq_block_size
        self.kernels = kernels
        self.keep_ratio = keep_ratio
        self.keep_tokens = keep_tokens
        self.alpha = (AUTO if calibration is not None else DEFAULT_ALPHA) if alpha is None else alpha
        self.alpha_grid = [0.0, 0.25, 0.5, 0.75, 1.0] if alpha_grid is None else copy.deepcopy(alpha_grid)
        self.fusion = fusion
        self.outlier_slots = outlier_slots
        self.slot_grid = [0, 1, 2, 4, 8] if slot_grid is None else copy.deepcopy(slot_grid)
        self.auto_max_samples = auto_max_samples
        self.auto_criterion = auto_criterion
        self.semantic = semantic
        self.clip_text_model = clip_text_model
        self.selection = selection
        self.error_weight = error_weight
        self.range_weight = range_weight
        self.sensitivity_group_size = sensitivity_group_size
        self.sensitivity_bits = sensitivity_bits
        self.sensitivity_space = sensitivity_space
        self.base_model = base_model
        self.calibration_summary = copy.deepcopy(calibration_summary)
        self.token_statistics = copy.deepcopy(token_statistics)
        self.auto_selection = copy.deepcopy(auto_selection)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raises `ValueError` naming the field, the value and what is allowed."""
        if not is_int(self.format_version) or self.format_version < 1:
            raise invalid("format_version", self.format_version, "expected a positive integer")
        if self.format_version > FORMAT_VERSION:
            raise invalid(
                "format_version",
                self.format_version,
                f"this checkpoint was written by a newer optimum-qap (format {self.format_version}); this release "
                f"reads format <= {FORMAT_VERSION}, upgrade with `pip install -U optimum-qap`",
            )
        check_choice("w_bits", self.w_bits, WEIGHT_BITS)
        check_positive_int("w_group_size", self.w_group_size, optional=True)
        check_bool("w_symmetric", self.w_symmetric)
        check_choice("a_bits", self.a_bits, ACTIVATION_BITS)
        check_choice("a_granularity", self.a_granularity, ACTIVATION_GRANULARITIES)
        check_positive_int("a_group_size", self.a_group_size)
        check_bool("a_symmetric", self.a_symmetric)
        check_bool("quantize_projector", self.quantize_projector)
        check_bool("quantize_vision_tower", self.quantize_vision_tower)
        check_str_list("modules_to_not_convert", self.modules_to_not_convert)
        check_calibration("calibration", self.calibration)
        check_positive_int("num_calibration_samples", self.num_calibration_samples)
        if self.num_calibration_samples > MAX_CALIBRATION_SAMPLES:
            raise invalid(
                "num_calibration_samples",
                self.num_calibration_samples,
                f"at most {MAX_CALIBRATION_SAMPLES} (calibration holds every sample's inputs; 32-512 is typical)",
            )
        if not is_real(self.outlier_ratio) or self.outlier_ratio <= 1:
            raise invalid("outlier_ratio", self.outlier_ratio, "expected a number greater than 1")
        check_bool("rotation", self.rotation)
        if not is_int(self.rotation_seed) or self.rotation_seed < 0:
            raise invalid("rotation_seed", self.rotation_seed, "expected an integer >= 0")
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        if not is_real(self.gptq_damping) or not 0 < self.gptq_damping <= 1:
            raise invalid("gptq_damping", self.gptq_damping, "expected a number in (0, 1]")
        check_bool("gptq_act_order", self.gptq_act_order)
        check_positive_int("gptq_block_size", self.gptq_block_size)
        check_choice("kernels", self.kernels, KERNEL_MODES)
        check_unit_interval("keep_ratio", self.keep_ratio, low_open=True)
        check_positive_int("keep_tokens", self.keep_tokens, optional=True)
        if self.alpha != AUTO:
            check_unit_interval("alpha", self.alpha)
        if not isinstance(self.alpha_grid, list) or not self.alpha_grid:
            raise invalid("alpha_grid", self.alpha_grid, "expected a non-empty list of numbers in [0, 1]")
        for value in self.alpha_grid:
            check_unit_interval("alpha_grid", value)
        check_choice("fusion", self.fusion, FUSIONS)
        if self.outlier_slots != AUTO and (not is_int(self.outlier_slots) or self.outlier_slots < 0):
            raise invalid("outlier_slots", self.outlier_slots, 'expected an integer >= 0 or "auto"')
        if self.keep_tokens is not None and is_int(self.outlier_slots) and self.outlier_slots > self.keep_tokens:
            raise invalid("outlier_slots", self.outlier_slots, f"cannot exceed keep_tokens={self.keep_tokens}")
        if (
            not isinstance(self.slot_grid, list)
            or not self.slot_grid
            or not all(is_int(m) and m >= 0 for m in self.slot_grid)
        ):
            raise invalid("slot_grid", self.slot_grid, "expected a non-empty list of integers >= 0")
        check_positive_int("auto_max_samples", self.auto_max_samples)
        check_choice("auto_criterion", self.auto_criterion, AUTO_CRITERIA)
        check_choice("semantic", self.semantic, SEMANTIC_SCORES)
        if self.clip_text_model is not None:
            if not isinstance(self.clip_text_model, str) or not self.clip_text_model:
                raise invalid("clip_text_model", self.clip_text_model, "expected a CLIP model id or folder, or None")
            if self.semantic != "cdpruner":
                raise invalid(
                    "clip_text_model",
                    self.clip_text_model,
                    f'it sets the text tower of semantic="cdpruner", but semantic is "{self.semantic}"',
                )
        check_choice("selection", self.selection, SELECTIONS)
        check_unit_interval("error_weight", self.error_weight)
        check_unit_interval("range_weight", self.range_weight)
        if self.error_weight + self.range_weight == 0:
            raise invalid("error_weight", self.error_weight, "error_weight and range_weight cannot both be 0")
        check_positive_int("sensitivity_group_size", self.sensitivity_group_size)
        if self.sensitivity_bits is not None:
            check_choice("sensitivity_bits", self.sensitivity_bits, (2, 3, 4, 8))
        check_choice("sensitivity_space", self.sensitivity_space, SENSITIVITY_SPACES)
        if self.base_model is not None and (not isinstance(self.base_model, str) or not self.base_model):
            raise invalid("base_model", self.base_model, "expected a model id or None")
        for field in ("calibration_summary", "token_statistics", "auto_selection"):
            value = getattr(self, field)
            if value is not None and not is_json_object(value):
                raise invalid(field, value, "expected a JSON object or None")

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges must be calibrated before the model can run."""
        return self.quantizes_activations and self.a_granularity in STATIC_GRANULARITIES

    def check_can_quantize(self) -> None:
        """Raise when these settings cannot quantize a float model (a saved config may describe finished weights)."""
        if self.weight_method == "gptq" and self.calibration is None and self.quantizes_weights:
            raise invalid(
                "weight_method",
                self.weight_method,
                'GPTQ needs calibration samples: pass calibration="builtin" or a list of samples, or use "rtn"',
            )

    @property
    def quantizes_after_loading(self) -> bool:
        """Rotation and GPTQ need whole float layers, so the weights are quantized once loading has finished."""
        return self.rotation or (self.weight_method == "gptq" and self.quantizes_weights)

    @property
    def prunes(self) -> bool:
        return self.keep_tokens is not None or self.keep_ratio < 1.0

    @property
    def needs_auto_selection(self) -> bool:
        """An "auto" value is set and has not been chosen yet."""
        auto = self.alpha == AUTO if self.fusion == "weighted" else self.outlier_slots == AUTO
        return self.prunes and auto and not self.auto_selection

    @property
    def scoring_bits(self) -> int:
        if self.sensitivity_bits is not None:
            return self.sensitivity_bits
        return self.a_bits if self.quantizes_activations else 4

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build a config from `to_dict()` output; unknown keys or a foreign `quant_method` raise `ValueError`."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"QAPrunerConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        fields = dict(config_dict)
        method = fields.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise invalid("quant_method", method, f'expected "{QUANT_METHOD}"')
        unknown = sorted(set(fields) - set(_init_fields()), key=str)
        if unknown:
            raise ValueError(
                f"QAPrunerConfig got unknown field(s) {unknown}; known fields are {sorted(_init_fields())}. "
                "A checkpoint written by a newer optimum-qap may need `pip install -U optimum-qap`."
            )
        version = fields.get("format_version", 1)
        if is_int(version) and version < 2:
            # written before rotation and GPTQ existed: its weights are plain round-to-nearest
            fields.setdefault("rotation", False)
            fields.setdefault("weight_method", "rtn")
        config = cls(**fields)
        unused = {}
        for key, value in kwargs.items():
            if key in _init_fields():
                setattr(config, key, value)
                config._explicit_fields |= {key}
            else:
                unused[key] = value
        config.post_init()
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        fields = {k: saved_form(self.calibration) if k == "calibration" else copy.deepcopy(getattr(self, k))
                  for k in _init_fields()}
        return {"quant_method": QUANT_METHOD, **fields}

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller passed (not left at their defaults); `from_dict` passes all it is given."""
        return getattr(self, "_explicit_fields", frozenset())

    def get_loading_attributes(self) -> dict[str, Any]:
        """The pruning fields this config sets: what applies when it is passed to reload a checkpoint (reload.py)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in LOADING_FIELDS if name in self.explicit_fields}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QAPrunerConfig) and self.to_dict() == other.to_dict()


@functools.cache
def _init_fields() -> tuple[str, ...]:
    # the saved fields; keyword-only arguments (the processor) are never saved
    parameters = list(inspect.signature(QAPrunerConfig.__init__).parameters.values())[1:]
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
