"""A picture of the visual tokens QAPruner keeps, beside those of the semantic-only pruner, and the scores behind them.

Top row: the image as the vision tower sees it (after the processor's resize and crop) on its sqrt(N) x sqrt(N)
patch grid, pruned patches darkened, for alpha = 1 (semantic relevance only) and for QAPruner's alpha. Bottom row:
heat maps of S^P (semantic relevance) and S^Q (quantization sensitivity) over the image. Pure PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import nn

from .calibration import model_inputs
from .config import QAPrunerConfig
from .pruning.patch import attach_pruner, last_selection

CAPTION_HEIGHT = 18
GAP = 4  # pixels between the left and right panels
MIN_PANEL = 256  # panels are at least this many pixels wide, so that small model inputs stay readable
PRUNED_BRIGHTNESS = 0.25
HEAT_OPACITY = 0.7
# a perceptually ordered dark-to-light ramp (close to matplotlib's "inferno")
COLORMAP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def panel_size(grid: int, input_size: int) -> int:
    """Side of one panel: a whole number of pixels per patch, at least `MIN_PANEL` and the model's input size."""
    return grid * max(math.ceil(MIN_PANEL / grid), math.ceil(input_size / grid))


def model_view(pixel_values: torch.Tensor, image_processor) -> Image.Image:
    """The RGB image of normalised ``pixel_values`` [3, H, W] (what the vision tower sees)."""
    pixels = pixel_values.detach().float().cpu()
    if getattr(image_processor, "do_normalize", False):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        pixels = pixels * std + mean
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, "RGB")


def _grid_image(values: Sequence, grid: int, size: int, mode: str) -> Image.Image:
    small = Image.new(mode, (grid, grid))
    small.putdata(list(values))
    return small.resize((size, size), Image.Resampling.NEAREST)


def _color(value: float) -> tuple[int, int, int]:
    position = min(max(value, 0.0), 1.0) * (len(COLORMAP) - 1)
    low = min(int(position), len(COLORMAP) - 2)
    t = position - low
    return tuple(round(a + t * (b - a)) for a, b in zip(COLORMAP[low], COLORMAP[low + 1], strict=True))


def heat_map(view: Image.Image, scores: torch.Tensor, grid: int) -> Image.Image:
    """Per-patch ``scores`` (min-max normalised for display) as colours over a grey copy of ``view``."""
    scores = scores.detach().float().cpu()
    span = float(scores.max() - scores.min())
    normalised = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    heat = _grid_image([_color(v) for v in normalised.tolist()], grid, view.width, "RGB")
    return Image.blend(ImageOps.grayscale(view).convert("RGB"), heat, HEAT_OPACITY)


def kept_map(view: Image.Image, kept: torch.Tensor, grid: int) -> Image.Image:
    """``view`` with the patches not in ``kept`` darkened, on the patch grid."""
    mask = [0] * grid * grid
    for index in kept.tolist():
        mask[index] = 255
    dark = ImageEnhance.Brightness(view).enhance(PRUNED_BRIGHTNESS)
    picture = Image.composite(view, dark, _grid_image(mask, grid, view.width, "L"))
    draw, cell = ImageDraw.Draw(picture), view.width // grid
    for line in range(1, grid):
        draw.line([(line * cell, 0), (line * cell, view.height)], fill=(128, 128, 128))
        draw.line([(0, line * cell), (view.width, line * cell)], fill=(128, 128, 128))
    return picture


def compose(panels: Sequence[Image.Image], captions: Sequence[str]) -> Image.Image:
    """Four equal square panels in a 2 x 2 figure, each under a one-line caption."""
    side = panels[0].width
    figure = Image.new("RGB", (2 * side + GAP, 2 * (side + CAPTION_HEIGHT)), "black")
    draw = ImageDraw.Draw(figure)
    for index, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        x, y = (index % 2) * (side + GAP), (index // 2) * (side + CAPTION_HEIGHT)
        draw.text((x + 4, y + 3), caption, fill="white")
        figure.paste(panel, (x, y + CAPTION_HEIGHT))
    return figure


def visualize_selection(model: nn.Module, processor, image, prompt: str, config: QAPrunerConfig) -> Image.Image:
    """Run ``model`` on one image + prompt with ``config``'s pruning, and with alpha = 1; draw both selections.

    Re-attaches the pruner (left with ``config``). Only the vision tower and projector decide the selection, so a
    full-precision model shows the tokens its quantized version keeps.
    """
    inputs = model_inputs(model, processor, image, prompt)
    chosen = (config.auto_selection or {}).get("alpha", config.alpha)  # an "auto" alpha shows its chosen value
    picks = []
    for alpha in (1.0, chosen):
        attach_pruner(model, QAPrunerConfig.from_dict({**config.to_dict(), "alpha": alpha}))
        with torch.no_grad():
            model(**inputs)
        picks.append(last_selection(model)[0])
    semantic, qapruner = picks
    n = len(qapruner.semantic)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"the {n} visual tokens of an image do not form a square patch grid")
    view = model_view(inputs["pixel_values"][0], processor.image_processor)
    side = panel_size(grid, max(view.size))
    view = view.resize((side, side), Image.Resampling.BICUBIC)
    k, shared = len(qapruner.kept), len(set(semantic.kept.tolist()) & set(qapruner.kept.tolist()))
    captions = (
        f"semantic only (alpha=1): {len(semantic.kept)}/{n} kept",
        f"QAPruner (alpha={chosen:g}): {k}/{n} kept, {shared} shared",
        f"S^P: semantic relevance ({config.semantic})",
        "S^Q: quantization sensitivity",
    )
    panels = (
        kept_map(view, semantic.kept, grid),
        kept_map(view, qapruner.kept, grid),
        heat_map(view, qapruner.semantic, grid),
        heat_map(view, qapruner.sensitivity, grid),
    )
    return compose(panels, captions)
