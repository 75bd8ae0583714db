"""optimum-qap: QAPruner (quantization-aware vision-token pruning) for Hugging Face transformers.

`import optimum_qap` registers `QAPrunerConfig` under the quantization method name "qap", so that
`from_pretrained(..., quantization_config=QAPrunerConfig())` quantizes a LLaVA model and saved checkpoints reload.
"""

from transformers.quantizers import auto as _auto

from .calibration import builtin_calibration_samples, calibrate, outlier_report
from .config import QUANT_METHOD, QAPrunerConfig
from .pruning import (
    ImageSelection,
    aligned_to_input,
    attach_pruner,
    compact_processor,
    last_positions,
    last_selection,
    pruning_disabled,
    select_fusion,
)
from .quant.linear import QuantLinear, QuantSpec, UncalibratedError
from .quantizer import (
    QAPrunerHfQuantizer,
    cache_dequantized_weights,
    quantized_modules,
    set_kernels,
    weight_storage_bytes,
)
from .reload import install_merge


def _register() -> None:
    # transformers raises on a second registration of a name; re-imports (reload, notebooks) must stay silent
    if QUANT_METHOD not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _auto.register_quantization_config(QUANT_METHOD)(QAPrunerConfig)
    if QUANT_METHOD not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantizer(QUANT_METHOD)(QAPrunerHfQuantizer)
    install_merge()


_register()

__all__ = [
    "ImageSelection",
    "aligned_to_input",
    "attach_pruner",
    "builtin_calibration_samples",
    "cache_dequantized_weights",
    "calibrate",
    "compact_processor",
    "last_positions",
    "last_selection",
    "outlier_report",
    "pruning_disabled",
    "select_fusion",
    "QAPrunerConfig",
    "QAPrunerHfQuantizer",
    "QuantLinear",
    "QuantSpec",
    "UncalibratedError",
    "quantized_modules",
    "set_kernels",
    "weight_storage_bytes",
]
__version__ = "0.1.0"
