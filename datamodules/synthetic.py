"""Procedural images of nameable shapes, for tests and quick runs (no files, no downloads).

Every image is a function of its key alone, so any split is reproducible on any machine. The
in-distribution style is ``photo`` (a filled, coloured shape on a tinted background); the shifted
styles are ``sketch`` (black outline on white) and ``negative`` (the photo with inverted colours).
"""
import math
from typing import List

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from datamodules.base import EvalSet, FewShotDataModule, key_rng

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
STYLES = ("photo", "sketch", "negative")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float):
    if shape == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    elif shape == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        corners = [(0, -1.2), (0.8, 0), (0, 1.2), (-0.8, 0)]
    elif shape == "cross":
        a, b = 0.35, 1.0
        corners = [(a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a), (-a, -b), (a, -b), (a, -a),
                   (b, -a), (b, a), (a, a)]
    else:  # star
        corners = [((1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5 - math.pi / 2),
                    (1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5 - math.pi / 2)) for i in range(10)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in corners]


def render(shape: str, style: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of ``shape`` in ``style``; position, size, rotation and colours come from ``rng``."""
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(-0.4, 0.4)
    fill = tuple(int(v) for v in rng.integers(20, 200, size=3))
    background = tuple(int(v) for v in rng.integers(180, 256, size=3))
    sketch = style == "sketch"
    image = Image.new("RGB", (size, size), (255, 255, 255) if sketch else background)
    draw = ImageDraw.Draw(image)
    kwargs = dict(outline=(0, 0, 0), width=max(1, size // 24)) if sketch else dict(fill=fill)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kwargs)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), **kwargs)
    return ImageOps.invert(image) if style == "negative" else image


class SyntheticDataModule(FewShotDataModule):
    """Shapes in three styles: train/val pools and the ID test set in ``photo``, OOD sets in the others."""

    def __init__(self, train_per_class: int = 32, val_per_class: int = 8, test_per_class: int = 20,
                 image_size: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.train_per_class, self.val_per_class = train_per_class, val_per_class
        self.test_per_class, self.image_size = test_per_class, image_size

    def all_classnames(self) -> List[str]:
        return list(SHAPES)

    def templates(self):
        return ("a photo of a {}.", "a drawing of a {}.", "a picture of a {} shape.")

    def _items(self, split: str, style: str, per_class: int):
        n = len(SHAPES)
        return [(f"{split}/{style}/{i}", i % n) for i in range(per_class * n)]

    def pools(self):
        return {"train": self._items("train", "photo", self.train_per_class),
                "val": self._items("val", "photo", self.val_per_class)}

    def build_eval_sets(self):
        return [EvalSet(style, self._items("test", style, self.test_per_class), self.all_classnames(),
                        self.templates(), self.load_image) for style in STYLES]

    def load_image(self, key: str) -> Image.Image:
        _, style, index = key.split("/")
        return render(SHAPES[int(index) % len(SHAPES)], style, key_rng(key), self.image_size)
