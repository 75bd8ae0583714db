"""Deterministic synthetic VQA task for the demo LLaVA model ("shapes VQA").

Each example is one 224x224 RGB image and one question with a one-word answer.

Scene: a dark-grey background with 1-4 large filled shapes (circle, square, triangle) in
four colours (red, green, blue, yellow). Every shape sits in one of four fixed *slots*
(left, right, top, bottom: a plus-shaped layout), is 48-56 px wide (about 4x4 patches of
14 px) and is jittered by at most 4 px. Objects never overlap, and together they cover at
most ~25 % of the 256 patches, so the information needed to answer lives in a few
spatially localised patches: a token pruner that drops the object patches must fail.

Questions (one template per type, lower-case word-level vocabulary):

=========  ===============================  ===============================
type       template                         answers
=========  ===============================  ===============================
color      what color is the {shape} ?      red / green / blue / yellow
count      how many {shape}s are there ?    one / two / three
yesno      is there a {color} {shape} ?     yes / no
position   where is the {shape} ?           left / right / top / bottom
=========  ===============================  ===============================

The question type is uniform and the answer is uniform within each type (the scene is
built to match the drawn answer), so the answer distribution is balanced. For ``color``
and ``position`` the asked shape occurs exactly once. Half of the "no" answers are hard
negatives (the shape is there in another colour, or the colour on another shape).

Everything is a pure function of an integer seed: ``make_example(seed)``. The ``train``,
``val`` and ``test`` splits use disjoint seed ranges (see :data:`SPLIT_OFFSETS`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 patches per side -> 256 patches

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
}
COLOR_NAMES = tuple(COLORS)
SLOTS = {  # slot name -> object centre (x, y)
    "left": (48, 112),
    "right": (176, 112),
    "top": (112, 48),
    "bottom": (112, 176),
}
SLOT_NAMES = tuple(SLOTS)
COUNT_WORDS = ("one", "two", "three")

QUESTION_TYPES = ("color", "count", "yesno", "position")
ANSWERS = {
    "color": COLOR_NAMES,
    "count": COUNT_WORDS,
    "yesno": ("yes", "no"),
    "position": SLOT_NAMES,
}
TEMPLATES = {
    "color": "what color is the {shape} ?",
    "count": "how many {plural} are there ?",
    "yesno": "is there a {color} {shape} ?",
    "position": "where is the {shape} ?",
}
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

SPLIT_SIZE = 1_000_000_000
SPLIT_OFFSETS = {"train": 0, "val": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}

BACKGROUND = (60, 60, 60)


@dataclass
class SceneObject:
    shape: str
    color: str
    slot: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel box of the drawn shape)


@dataclass
class Example:
    seed: int
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject]
    # 224x224 uint8 map: 0 = background, i + 1 = objects[i]
    object_map: np.ndarray = field(repr=False)

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)


def format_prompt(question: str) -> str:
    """The exact prompt the demo model was trained on (answer follows after a space)."""
    return PROMPT_TEMPLATE.format(question=question)


def vocabulary() -> list[str]:
    """Every word that can occur in a prompt or an answer (for the word-level tokenizer)."""
    words: list[str] = ["USER", ":", "ASSISTANT"]
    for qtype in QUESTION_TYPES:
        words += TEMPLATES[qtype].replace("{shape}", "").replace("{plural}", "").replace("{color}", "").split()
        words += list(ANSWERS[qtype])
    words += list(SHAPES) + list(PLURALS.values()) + list(COLOR_NAMES)
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


# ----------------------------------------------------------------------------- scenes


def _random_objects(rng: random.Random, n: int, shapes: list[str] | None = None) -> list[tuple[str, str]]:
    return [(rng.choice(shapes or list(SHAPES)), rng.choice(COLOR_NAMES)) for _ in range(n)]


def _scene_for(rng: random.Random, qtype: str, answer: str) -> tuple[list[tuple[str, str]], dict]:
    """Return (list of (shape, color) objects, template fields) consistent with ``answer``."""
    if qtype in ("color", "position"):
        target = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != target]
        color = answer if qtype == "color" else rng.choice(COLOR_NAMES)
        objs = [(target, color)] + _random_objects(rng, rng.randint(0, 2), others)
        return objs, {"shape": target, "target_index": 0, "target_slot": answer if qtype == "position" else None}
    if qtype == "count":
        target = rng.choice(SHAPES)
        n = COUNT_WORDS.index(answer) + 1
        others = [s for s in SHAPES if s != target]
        n_other = rng.randint(0, 4 - n) if n < 3 else rng.randint(0, 1)
        objs = [(target, rng.choice(COLOR_NAMES)) for _ in range(n)] + _random_objects(rng, n_other, others)
        return objs, {"shape": target, "plural": PLURALS[target]}
    if qtype == "yesno":
        shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        n = rng.randint(1, 3)
        if answer == "yes":
            objs = [(shape, color)] + _random_objects(rng, n - 1)
        else:
            while True:
                objs = _random_objects(rng, n)
                if rng.random() < 0.5:  # hard negative: right shape / wrong colour or vice versa
                    if rng.random() < 0.5:
                        objs[0] = (shape, rng.choice([c for c in COLOR_NAMES if c != color]))
                    else:
                        objs[0] = (rng.choice([s for s in SHAPES if s != shape]), color)
                if (shape, color) not in objs:
                    break
        return objs, {"shape": shape, "color": color}
    raise ValueError(f"unknown question type {qtype!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(shape)


def make_example(seed: int, qtype: str | None = None) -> Example:
    """Build the example for ``seed`` (pure function of ``seed`` and ``qtype``).

    ``qtype`` forces the question type; by default it is drawn uniformly from the seed.
    """
    rng = random.Random(int(seed) * 1_000_003 + 17)
    if qtype is None:
        qtype = rng.choice(QUESTION_TYPES)
    answer = rng.choice(ANSWERS[qtype])
    objs, fields = _scene_for(rng, qtype, answer)

    # slots: the position target goes to the answered slot, the rest are shuffled
    free = list(SLOT_NAMES)
    rng.shuffle(free)
    target_slot = fields.get("target_slot")
    if target_slot is not None:
        free.remove(target_slot)
        free.insert(0, target_slot)
    order = list(range(len(objs)))
    if target_slot is None:
        rng.shuffle(order)

    bg = tuple(int(c + rng.randint(-8, 8)) for c in BACKGROUND)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    omap = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(omap)
    objects: list[SceneObject] = []
    for k, idx in enumerate(order):
        shape, color = objs[idx]
        slot = free[k]
        cx, cy = SLOTS[slot]
        size = rng.randint(48, 56)
        cx += rng.randint(-4, 4)
        cy += rng.randint(-4, 4)
        box = (cx - size // 2, cy - size // 2, cx - size // 2 + size - 1, cy - size // 2 + size - 1)
        rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[color])
        _draw_shape(draw, shape, box, rgb)
        _draw_shape(mdraw, shape, box, len(objects) + 1)
        objects.append(SceneObject(shape=shape, color=color, slot=slot, bbox=box))

    question = TEMPLATES[qtype].format(**{k: v for k, v in fields.items() if k in ("shape", "plural", "color")})
    return Example(
        seed=int(seed),
        image=image,
        question=question,
        answer=answer,
        qtype=qtype,
        objects=objects,
        object_map=np.asarray(omap, dtype=np.uint8).copy(),
    )


def split_seeds(n: int, split: str = "test", start: int = 0) -> list[int]:
    """Seeds of examples ``start .. start + n - 1`` of ``split`` (disjoint ranges per split)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    if start < 0 or start + n > SPLIT_SIZE:
        raise ValueError("index range outside the split")
    base = SPLIT_OFFSETS[split] + start
    return list(range(base, base + n))


def make_dataset(n: int, split: str = "test", start: int = 0) -> list[Example]:
    """``n`` examples of ``split`` ("train", "val" or "test"), deterministic."""
    return [make_example(s) for s in split_seeds(n, split, start)]


# ----------------------------------------------------------------------------- patch-level targets


def patch_coverage(example: Example, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(n_objects + 1, G, G) fraction of each patch covered by background / each object."""
    g = IMAGE_SIZE // patch_size
    m = example.object_map[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size)
    n = len(example.objects) + 1
    cov = np.stack([(m == i).mean(axis=(1, 3)) for i in range(n)])
    return cov


def object_patch_mask(example: Example, patch_size: int = PATCH_SIZE, min_coverage: float = 0.0) -> np.ndarray:
    """Boolean (G, G) mask (row-major = LLaVA token order) of patches touching any object.

    ``min_coverage`` is the fraction of the patch that must be covered (0 = any pixel).
    """
    cov = 1.0 - patch_coverage(example, patch_size)[0]
    return cov > min_coverage if min_coverage > 0 else cov > 0


def patch_labels(example: Example, min_coverage: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch (shape, color) class ids, flattened to 256 in token order.

    shape id: 0 = background, 1 + SHAPES.index; color id: 0 = background, 1 + COLOR_NAMES.index.
    A patch gets the label of the object covering most of it if that covers >= ``min_coverage``.
    """
    cov = patch_coverage(example)
    best = cov[1:].argmax(0) if len(example.objects) else np.zeros(cov.shape[1:], dtype=int)
    frac = cov[1:].max(0) if len(example.objects) else np.zeros(cov.shape[1:])
    shape_ids = np.zeros(best.shape, dtype=np.int64)
    color_ids = np.zeros(best.shape, dtype=np.int64)
    for i, obj in enumerate(example.objects):
        sel = (best == i) & (frac >= min_coverage)
        shape_ids[sel] = 1 + SHAPES.index(obj.shape)
        color_ids[sel] = 1 + COLOR_NAMES.index(obj.color)
    return shape_ids.reshape(-1), color_ids.reshape(-1)


def slot_labels(example: Example) -> np.ndarray:
    """Per-slot class (len 4, SLOT_NAMES order): 0 = empty, else 1 + shape_idx * 4 + color_idx."""
    out = np.zeros(len(SLOT_NAMES), dtype=np.int64)
    for obj in example.objects:
        out[SLOT_NAMES.index(obj.slot)] = 1 + SHAPES.index(obj.shape) * len(COLOR_NAMES) + COLOR_NAMES.index(obj.color)
    return out


def noise_image(seed: int) -> Image.Image:
    """A uniform-noise 224x224 RGB image (image-dependence control)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")
