"""A picture of the visual tokens a model keeps, beside an informative alternative, and the scores behind them.

Title: the question and K/N kept. Top row: the image as the vision tower sees it (after the processor's resize and
crop) on its sqrt(N) x sqrt(N) patch grid, pruned patches faded towards white, for the selection the model uses and
for a contrast: semantic-only pruning when the model fuses in quantization sensitivity, else QAPruner at the paper's
alpha. Bottom row: heat maps of S^P (semantic relevance) and S^Q (quantization sensitivity), with a colour bar.
Pure PIL.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn

from .calibration import model_inputs
from .config import DEFAULT_ALPHA, QAPrunerConfig
from .pruning.patch import ImageSelection, attach_pruner, last_selection

MARGIN = 8
GAP = 8  # pixels between the left and right panels
FONT_SIZE = 13
LINE = 17  # pixels per text line
TITLE_LINES = 3
TITLE_HEIGHT = TITLE_LINES * LINE + MARGIN
CAPTION_HEIGHT = 2 * LINE + 4  # two lines: what the panel is, then its details
STRIP_HEIGHT = 2 * LINE + 6  # the legend under the top row, the colour bar under the bottom row
MIN_PANEL = 256  # panels are at least this many pixels wide, so that small model inputs stay readable
PRUNED_FADE = 0.75  # how far a pruned patch is blended towards white
HEAT_OPACITY = 0.7
BACKGROUND, INK, GRID = (255, 255, 255), (20, 20, 20), (200, 200, 200)
# a perceptually ordered dark-to-light ramp (close to matplotlib's "inferno")
COLORMAP = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


@dataclass(frozen=True)
class Selection:
    """One panel of the top row: what was kept and how to name it."""

    label: str
    image: ImageSelection


def panel_size(grid: int, input_size: int) -> int:
    """Side of one panel: a whole number of pixels per patch, at least `MIN_PANEL` and the model's input size."""
    return grid * max(math.ceil(MIN_PANEL / grid), math.ceil(input_size / grid))


def panel_box(index: int, side: int) -> tuple[int, int, int, int]:
    """Pixel box of panel ``index`` (0, 1: the selections; 2, 3: S^P, S^Q) in a figure of ``side``-wide panels."""
    row, column = divmod(index, 2)
    x = MARGIN + column * (side + GAP)
    y = TITLE_HEIGHT + CAPTION_HEIGHT + row * (side + STRIP_HEIGHT + CAPTION_HEIGHT)
    return x, y, x + side, y + side


def figure_size(side: int) -> tuple[int, int]:
    return 2 * (MARGIN + side) + GAP, panel_box(3, side)[3] + STRIP_HEIGHT


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
    """``view`` with the patches not in ``kept`` faded towards white, on the patch grid."""
    mask = [0] * grid * grid
    for index in kept.tolist():
        mask[index] = 255
    faded = Image.blend(view, Image.new("RGB", view.size, BACKGROUND), PRUNED_FADE)
    picture = Image.composite(view, faded, _grid_image(mask, grid, view.width, "L"))
    draw, cell = ImageDraw.Draw(picture), view.width // grid
    for line in range(1, grid):
        draw.line([(line * cell, 0), (line * cell, view.height)], fill=GRID)
        draw.line([(0, line * cell), (view.width, line * cell)], fill=GRID)
    for index in kept.tolist():  # outlined too, so a kept patch stands out where the image is pale already
        row, column = divmod(index, grid)
        draw.rectangle((column * cell, row * cell, (column + 1) * cell - 1, (row + 1) * cell - 1), outline=INK)
    return picture


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except ImportError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _title(prompt: str, kept: int, total: int, width: int, font) -> list[str]:
    """The question, wrapped to the figure (at most `TITLE_LINES` - 1 lines), then the token count."""
    characters = max(20, int(width / max(font.getlength("n"), 1)))
    lines = textwrap.wrap(f"Q: {' '.join(prompt.split())}", characters, max_lines=TITLE_LINES - 1, placeholder=" ...")
    return [*lines, f"{kept} of {total} visual tokens reach the language model ({100 * kept / total:.1f} %)"]


def _fit(text: str, width: int, font) -> str:
    """``text`` cut (with "...") to ``width`` pixels, so that a caption never runs into the next panel."""
    while font.getlength(text) > width and len(text) > 4:
        text = text[:-4].rstrip() + "..."
    return text


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, font) -> None:
    """Swatches saying what full colour and faded patches mean."""
    faded = tuple(round(c + PRUNED_FADE * (b - c)) for c, b in zip((60, 120, 200), BACKGROUND, strict=True))
    for swatch, text in (((60, 120, 200), "kept token (full colour, outlined)"), (faded, "pruned token (faded)")):
        draw.rectangle((x, y + 3, x + 12, y + 15), fill=swatch, outline=INK if swatch != faded else GRID)
        draw.text((x + 18, y + 2), text, fill=INK, font=font)
        x += 30 + int(font.getlength(text))


def _colour_bar(figure: Image.Image, box: tuple[int, int, int, int], font) -> None:
    """The heat maps' colour ramp from low to high, with its meaning."""
    x0, y0, x1, _ = box
    ramp = Image.new("RGB", (x1 - x0, 10))
    ramp.putdata([_color(i / max(ramp.width - 1, 1)) for i in range(ramp.width)] * 10)
    figure.paste(ramp, (x0, y0 + 4))
    draw = ImageDraw.Draw(figure)
    text = "score, scaled per map: low -> high"
    draw.text((x0, y0 + 16), "low", fill=INK, font=font)
    draw.text(((x0 + x1 - font.getlength(text)) / 2, y0 + 16), text, fill=INK, font=font)
    draw.text((x1 - font.getlength("high"), y0 + 16), "high", fill=INK, font=font)


def compose(
    title: Sequence[str], panels: Sequence[Image.Image], captions: Sequence[tuple[str, str]]
) -> Image.Image:
    """Title, two selection panels with a legend, two heat maps with a colour bar, on a white figure."""
    side = panels[0].width
    figure, font = Image.new("RGB", figure_size(side), BACKGROUND), _font()
    draw = ImageDraw.Draw(figure)
    for line, text in enumerate(title):
        draw.text((MARGIN, MARGIN // 2 + line * LINE), text, fill=INK, font=font)
    for index, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        x, y, _, _ = panel_box(index, side)
        for line, text in enumerate(caption):
            draw.text((x, y - CAPTION_HEIGHT + 2 + line * LINE), _fit(text, side, font), fill=INK, font=font)
        figure.paste(panel, (x, y))
    _legend(draw, MARGIN, panel_box(0, side)[3] + 4, font)
    left, right = panel_box(2, side), panel_box(3, side)
    _colour_bar(figure, (left[0], left[3], right[2], left[3] + STRIP_HEIGHT), font)
    return figure


def contrast_config(config: QAPrunerConfig, chosen: dict) -> tuple[str, QAPrunerConfig]:
    """What to show beside the model's own selection: semantic-only pruning when the model weighs in quantization
    sensitivity, else (the model prunes semantically already) QAPruner at the paper's alpha."""
    semantic_only = chosen.get("alpha") == 1.0 or chosen.get("outlier_slots") == 0
    if semantic_only:
        alpha, label = DEFAULT_ALPHA, f"QAPruner (alpha={DEFAULT_ALPHA:g})"
    else:
        alpha, label = 1.0, "semantic only (alpha=1)"
    return label, QAPrunerConfig.from_dict({**config.to_dict(), "fusion": "weighted", "alpha": alpha})


def _selection_label(config: QAPrunerConfig, chosen: dict) -> str:
    if "outlier_slots" in chosen:
        slots = chosen["outlier_slots"]
        return f'outlier_slots="auto" chose {slots}' if config.outlier_slots == "auto" else f"{slots} outlier slots"
    alpha = f'alpha="auto" chose {chosen["alpha"]:g}' if config.alpha == "auto" else f"alpha={chosen['alpha']:g}"
    return f"semantic only ({alpha})" if chosen["alpha"] == 1.0 else f"QAPruner ({alpha})"


def _run(model: nn.Module, config: QAPrunerConfig, inputs: dict) -> tuple[dict, ImageSelection]:
    pruner = attach_pruner(model, config)
    with torch.no_grad():
        model(**inputs)
    chosen = {"outlier_slots": pruner.slots} if config.fusion == "outlier_slots" else {"alpha": float(pruner.alpha)}
    return chosen, last_selection(model)[0]


def visualize_selection(model: nn.Module, processor, image, prompt: str, config: QAPrunerConfig) -> Image.Image:
    """Run ``model`` on one image + prompt with ``config``'s pruning and with a contrast (`contrast_config`); draw
    both selections and the scores behind them.

    Leaves the model pruning with ``config``. Only the vision tower and projector decide the selection, so a
    full-precision model shows the tokens its quantized version keeps.
    """
    inputs = model_inputs(model, processor, image, prompt)
    chosen, own = _run(model, config, inputs)
    contrast_label, contrast = contrast_config(config, chosen)
    _, other = _run(model, contrast, inputs)
    attach_pruner(model, config)
    picks = (Selection(_selection_label(config, chosen), own), Selection(contrast_label, other))
    n = len(own.semantic)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"the {n} visual tokens of an image do not form a square patch grid")
    view = model_view(inputs["pixel_values"][0], processor.image_processor)
    side = panel_size(grid, max(view.size))
    view = view.resize((side, side), Image.Resampling.BICUBIC)
    shared = len(set(own.kept.tolist()) & set(other.kept.tolist()))
    captions = (
        ("the model's selection:", picks[0].label),
        (f"for contrast, {picks[1].label}:", f"{shared} of its {len(other.kept)} tokens the same"),
        ("S^P: semantic relevance", f"({config.semantic})"),
        ("S^Q: quantization sensitivity", f"({config.error_weight:g} x group error + {config.range_weight:g} x range)"),
    )
    panels = (
        *(kept_map(view, pick.image.kept, grid) for pick in picks),
        heat_map(view, own.semantic, grid),
        heat_map(view, own.sensitivity, grid),
    )
    title = _title(prompt, len(own.kept), n, figure_size(side)[0] - 2 * MARGIN, _font())
    return compose(title, panels, captions)
