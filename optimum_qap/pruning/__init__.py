"""QAPruner token scoring, selection and the LLaVA integration."""

from .auto import select_fusion
from .patch import (
    ImageSelection,
    aligned_to_input,
    attach_pruner,
    compact_processor,
    last_positions,
    last_selection,
    pruning_disabled,
)

__all__ = [
    "ImageSelection",
    "aligned_to_input",
    "attach_pruner",
    "compact_processor",
    "last_positions",
    "last_selection",
    "pruning_disabled",
    "select_fusion",
]
