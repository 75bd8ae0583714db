"""Picture: per-channel input magnitude of three linears of the outlier-faithful demo model, without and with rotation.

Each panel shows, for one decoder linear's input, every channel's calibrated absolute maximum divided by the median
channel (log scale), calibrated on the built-in samples: grey without rotation (what plain RTN W4A4 quantizes), blue
after the rotation the default `QAPrunerConfig()` applies.
Run: python examples/outlier_picture.py --output docs/assets/outlier-channels.png
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap.demo.outliers import build_outlier_demo

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
WIDTH, PANEL_HEIGHT, MARGIN = 900, 190, 48
TOP_RATIO = 100.0  # the y axis runs from 1x to this multiple of the median channel


def channel_ratios(path, rotation: bool, layer: int) -> dict[str, torch.Tensor]:
    config = optimum_qap.QAPrunerConfig(keep_ratio=1.0, rotation=rotation, calibration="builtin",
                                        num_calibration_samples=8)
    model = LlavaForConditionalGeneration.from_pretrained(path, quantization_config=config)
    report = optimum_qap.outlier_report(model)
    prefix = f"model.language_model.layers.{layer}."
    return {name: report[prefix + name].absmax / report[prefix + name].median for name in LINEARS}


def draw_panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: list[tuple[torch.Tensor, str]]) -> None:
    left, right, bottom = MARGIN, WIDTH - 10, top + PANEL_HEIGHT - 24
    height = bottom - (top + 20)

    def y_of(ratio: float) -> float:
        return bottom - height * min(1.0, math.log10(max(ratio, 1.0)) / math.log10(TOP_RATIO))

    draw.text((left, top + 2), title, fill="black")
    for tick in (1, 10, 100):
        y = y_of(tick)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((4, y - 6), f"{tick}x", fill="black")
    for ratios, color in series:
        step = (right - left) / len(ratios)
        for index, ratio in enumerate(ratios.tolist()):
            x = left + index * step
            draw.rectangle((x, y_of(ratio), x + max(1.0, step - 0.5), bottom), fill=color)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--output", default="docs/assets/outlier-channels.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        build_outlier_demo(folder)
        plain = channel_ratios(folder, rotation=False, layer=args.layer)
        rotated = channel_ratios(folder, rotation=True, layer=args.layer)
    image = Image.new("RGB", (WIDTH, 40 + PANEL_HEIGHT * len(LINEARS)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), f"Outlier-faithful demo model, layer {args.layer}: channel absmax / median channel "
              "(log scale). Grey: no rotation (plain RTN W4A4). Blue: rotated (QAPrunerConfig()).", fill="black")
    for index, name in enumerate(LINEARS):
        title = (f"{name} input: max {float(plain[name].max()):.0f}x without rotation, "
                 f"{float(rotated[name].max()):.1f}x with")
        draw_panel(draw, 30 + index * PANEL_HEIGHT, title, [(plain[name], (150, 150, 150)),
                                                            (rotated[name], (40, 100, 200))])
    image.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
