"""Rendered geometric shapes: random position, size, rotation and colours per image."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from upstream.data.base import GeneratedSource

SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring")
DEFAULT_INSTANCES = 100
#: Drawn this many times larger, then reduced: PIL's polygons have no anti-aliasing.
_SUPERSAMPLE = 4


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * i / n),
            cy + r * math.sin(angle + 2 * math.pi * i / n),
        )
        for i, r in enumerate(radii)
    ]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    w = 0.35 * r
    outline = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]  # fmt: skip
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour far enough apart to see the shape."""
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if np.abs(bg.astype(int) - fg.astype(int)).sum() >= 180:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * _SUPERSAMPLE
    bg, fg = _colours(rng)
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    r = float(rng.uniform(0.18, 0.42)) * big
    cx, cy = (float(rng.uniform(r, big - r)) for _ in range(2))
    angle = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        inner = 0.6 * r
        d.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=bg)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=fg)
    elif shape == "cross":
        d.polygon(_cross(cx, cy, r, angle), fill=fg)
    else:
        sides = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[shape]
        d.polygon(_polygon(cx, cy, [r] * sides, angle), fill=fg)
    return img.resize((size, size), Image.Resampling.BOX)


class ShapeSource(GeneratedSource):
    """The first ``num_classes`` of :data:`SHAPES` × ``instances`` images each."""

    kind = "shapes"
    caption_template = "a drawing of a {label}."
    names = SHAPES
    default_instances = DEFAULT_INSTANCES
    seed_tag = "shape-instance"

    def draw(self, name: str, rng: np.random.Generator) -> Image.Image:
        return draw(name, self.image_size, rng)
