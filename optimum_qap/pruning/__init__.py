"""QAPruner token scoring, selection and the LLaVA integration."""

from .auto import select_fusion
from .patch import ImageSelection, attach_pruner, compact_processor, last_selection, pruning_disabled

__all__ = [
    "ImageSelection",
    "attach_pruner",
    "compact_processor",
    "last_selection",
    "pruning_disabled",
    "select_fusion",
]
