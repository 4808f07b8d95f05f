"""Objects in clutter: a generated downstream set whose class is not in the pixel statistics.

scikit-learn's ``digits`` is nearly linearly separable in pixels, so a linear probe on a
randomly initialised tower does as well as on any pre-trained one and a study cannot show
pre-training helping at small k (Entezari et al. 2023). Here the class is the *shape* of one
object, and everything a linear model on pixels could use varies independently of the class:

- **Class**: one of :data:`OBJECTS`, each a silhouette made of a few parts (bars, discs,
  triangles, holes) in a fixed configuration, so that classes share local parts and differ in
  how they are put together. Per image the parts' proportions are jittered (anisotropic
  stretch up to ±15 %), so no class is a single template.
- **Pose**: rotation uniform over the full circle, random mirror, radius 28–45 % of the image
  side, centre anywhere that keeps most of the object in the frame. A class so has no pixel
  where it tends to be.
- **Colours**: the object's and the background's colours are drawn independently per image
  (any RGB, at least 180 apart in L1 so that the object stays visible); which is lighter is
  random, so the sign of a pixel says nothing either.
- **Texture**: the background and every layer on it are filled with one of flat, noise,
  stripes, checks or smooth blotches (random period, angle, phase, second colour near the
  first), so that local intensity patterns do not identify the object.
- **Clutter**: beneath the object, 2–5 distractors — parts of the objects (a bar, a disc, a
  triangle, the pieces the classes are built of) at a third of the object's size or less,
  each in its own colour, texture and pose, and 1–3 strokes (flat, each its own colour). The
  local features the classes are made of are thus everywhere in every image; the object is
  the one large silhouette, drawn last and complete (never occluded), so it can always be
  recognised.

Nothing of this was tuned on transfer results: the only measurements behind it are the ones
``tests/test_sources_hard.py`` asserts (a logistic regression on pixels stays near chance; a
small CNN learns the classes). Instances depend on (split, seed, class, instance), so the
splits never share an image and the same seed makes the same images. Layers are drawn as
PIL masks at a supersampled size, box-filtered down (anti-aliasing) and blended with numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from upstream.data.base import GeneratedSource

DEFAULT_INSTANCES = 100
#: Object radius as a share of the image side (the parts span about ±0.85 of it).
RADIUS = (0.28, 0.45)
#: Distractor radius relative to the object's: small enough that the object is the one
#: large silhouette, large enough to carry the same parts.
DISTRACTOR_SCALE = (0.18, 0.34)
DISTRACTORS = (2, 5)
STROKES = (1, 3)
#: Least L1 distance (over RGB, 0–255) between the object's and the background's colours,
#: and between either and a distractor's.
MIN_CONTRAST = 180
MIN_CLUTTER_CONTRAST = 90
STRETCH = 0.15
TEXTURES = ("flat", "noise", "stripes", "checks", "blotches")

Polygon = list[tuple[float, float]]
#: A part: ``(polygon in the object's frame, fill)``; fill False cuts a hole.
Part = tuple[Polygon, bool]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _disc(cx: float, cy: float, r: float, n: int = 20) -> Polygon:
    return [
        (cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n))
        for i in range(n)
    ]


def _star(points: int, outer: float, inner: float) -> Polygon:
    n = 2 * points
    return [
        (
            (outer if i % 2 == 0 else inner) * math.cos(math.pi * i / points - math.pi / 2),
            (outer if i % 2 == 0 else inner) * math.sin(math.pi * i / points - math.pi / 2),
        )
        for i in range(n)
    ]


#: Each object in a frame of about [-0.85, 0.85]², as parts drawn in order.
OBJECTS: dict[str, list[Part]] = {
    "tee": [(_rect(-0.8, -0.8, 0.8, -0.42), True), (_rect(-0.19, -0.42, 0.19, 0.8), True)],
    "ell": [(_rect(-0.6, -0.8, -0.22, 0.8), True), (_rect(-0.22, 0.42, 0.62, 0.8), True)],
    "plus": [(_rect(-0.85, -0.19, 0.85, 0.19), True), (_rect(-0.19, -0.85, 0.19, 0.85), True)],
    "arrow": [
        (_rect(-0.85, -0.16, 0.15, 0.16), True),
        ([(0.1, -0.6), (0.85, 0.0), (0.1, 0.6)], True),
    ],
    "dumbbell": [
        (_rect(-0.5, -0.13, 0.5, 0.13), True),
        (_disc(-0.55, 0.0, 0.32), True),
        (_disc(0.55, 0.0, 0.32), True),
    ],
    "house": [
        (_rect(-0.6, -0.1, 0.6, 0.8), True),
        ([(-0.8, -0.1), (0.0, -0.85), (0.8, -0.1)], True),
    ],
    "ring": [(_disc(0.0, 0.0, 0.82, 24), True), (_disc(0.0, 0.0, 0.46, 20), False)],
    "crescent": [(_disc(0.0, 0.0, 0.82, 24), True), (_disc(0.38, 0.0, 0.68, 24), False)],
    "star": [(_star(5, 0.9, 0.38), True)],
    "hourglass": [
        ([(-0.7, -0.8), (0.7, -0.8), (0.0, 0.0)], True),
        ([(-0.7, 0.8), (0.7, 0.8), (0.0, 0.0)], True),
        (_rect(-0.7, -0.85, 0.7, -0.7), True),
        (_rect(-0.7, 0.7, 0.7, 0.85), True),
    ],
}
NAMES = tuple(OBJECTS)
#: What distractors are made of: every filled part of every object, and plain primitives.
PARTS: tuple[Polygon, ...] = (
    *(poly for parts in OBJECTS.values() for poly, fill in parts if fill),
    _rect(-0.85, -0.2, 0.85, 0.2),
    _disc(0.0, 0.0, 0.8),
    [(-0.8, 0.7), (0.8, 0.7), (0.0, -0.8)],
)


def _supersample(size: int) -> int:
    # PIL's polygons have no anti-aliasing: drawn larger and box-filtered down instead.
    return 4 if size <= 64 else 2


@functools.cache
def _axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x as a row and y as a column: patterns are made by broadcasting the two."""
    axis = np.arange(size, dtype=np.float32)
    return axis, axis[:, None]


#: (x0, y0, x1, y1) in output pixels, x1 and y1 excluded.
Box = tuple[int, int, int, int]


def _colours(
    rng: np.random.Generator, n: int, away_from: Sequence[np.ndarray], least: int
) -> list[np.ndarray]:
    """``n`` random colours, each at least ``least`` (L1) from every one of ``away_from``."""
    candidates = rng.integers(0, 256, size=(8 * n + 8, 3)).astype(np.float32)
    ok = np.ones(len(candidates), dtype=bool)
    for c in away_from:
        ok &= np.abs(candidates - c).sum(axis=1) >= least
    found = list(candidates[ok][:n])
    # Rarely short (mid-grey colours to stay away from): the cube's corner farthest from
    # the first of them makes up the rest.
    corner = np.where(away_from[0] < 128, 255.0, 0.0).astype(np.float32)
    return found + [corner] * (n - len(found))


def texture(colour: np.ndarray, size: int, rng: np.random.Generator, box: Box) -> np.ndarray:
    """The fill around ``colour`` of the pixels in ``box`` of a ``size``-pixel image (h×w×3,
    or a colour that broadcasts): flat, noise, stripes, checks or blotches, the last three
    between ``colour`` and a second colour near it."""
    # Every parameter in one draw, as Python floats: at these sizes the calls and the numpy
    # scalars cost more than the arithmetic on pixels.
    r = rng.random(9).tolist()
    kind = TEXTURES[int(r[0] * len(TEXTURES))]
    x0, y0, x1, y1 = box
    if kind == "flat":
        return colour
    if kind == "noise":
        noise = rng.standard_normal((y1 - y0, x1 - x0, 1), dtype=np.float32)
        return colour + noise * np.float32(22.0)
    other = np.clip(colour + np.asarray(r[1:4], dtype=np.float32) * 160 - 80, 0, 255)
    mid, half = (colour + other) / 2, (other - colour) / 2
    xs, ys = _axes(size)
    xs, ys = xs[x0:x1], ys[y0:y1]
    c, s = math.cos(r[4] * math.pi), math.sin(r[4] * math.pi)
    scale = size / 32
    if kind == "stripes":
        k = 2 * math.pi / ((3 + 6 * r[5]) * scale)
        t = np.sin((xs * (c * k) + 2 * math.pi * r[6]) + ys * (s * k))
    elif kind == "checks":
        k = 1 / ((4 + 6 * r[5]) * scale)
        u = np.floor(xs * (c * k) + ys * (s * k))
        v = np.floor(ys * (c * k) - xs * (s * k))
        t = ((u + v) % 2) * 2 - 1
    else:
        # Two slow waves across each other: a few soft blotches per image.
        f1, f2 = ((0.6 + 1.4 * q) * 2 * math.pi / size for q in (r[5], r[6]))
        p1, p2 = 2 * math.pi * r[7], 2 * math.pi * r[8]
        t = 0.5 * (
            np.sin((xs * (c * f1) + p1) + ys * (s * f1))
            + np.sin((ys * (c * f2) + p2) - xs * (s * f2))
        )
    return mid + t[..., None] * half


def _placed(
    poly: Polygon, cx: float, cy: float, radius: float, angle: float, sx: float, sy: float
) -> Polygon:
    c, s = math.cos(angle), math.sin(angle)
    return [
        (cx + radius * (x * sx * c - y * sy * s), cy + radius * (x * sx * s + y * sy * c))
        for x, y in poly
    ]


class _Canvas:
    """An image built bottom-up: each layer a mask (drawn supersampled, box-filtered down)
    and a fill, both only over the layer's bounding box (clutter is small)."""

    def __init__(self, size: int, background: np.ndarray, rng: np.random.Generator) -> None:
        self.size = size
        self.ss = _supersample(size)
        self.big = size * self.ss
        self.rng = rng
        self.pixels = np.empty((size, size, 3), dtype=np.float32)
        self.pixels[:] = texture(background, size, rng, (0, 0, size, size))

    def pose(self, radius: float, inside: float) -> tuple[float, ...]:
        """A random pose at ``radius`` (supersampled pixels) with at least ``inside`` of the
        radius between the centre and the edge."""
        r = self.rng.random(6)
        lo, span = radius * inside, max(0.0, self.big - 2 * radius * inside)
        cx, cy = lo + span * r[0], lo + span * r[1]
        sx, sy = 1 + STRETCH * (2 * r[2] - 1), 1 + STRETCH * (2 * r[3] - 1)
        if r[5] < 0.5:
            sx = -sx  # mirrored
        return cx, cy, radius, 2 * math.pi * r[4], sx, sy

    def _box(self, points: Sequence[tuple[float, float]], pad: float) -> Box | None:
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        ss, n = self.ss, self.size
        x0, y0 = max(0, int((min(xs) - pad) // ss)), max(0, int((min(ys) - pad) // ss))
        x1, y1 = min(n, int((max(xs) + pad) // ss) + 1), min(n, int((max(ys) + pad) // ss) + 1)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def layer(self, parts: Sequence[Part], pose: tuple[float, ...], colour: np.ndarray) -> None:
        placed = [(_placed(poly, *pose), solid) for poly, solid in parts]
        box = self._box([p for poly, _ in placed for p in poly], 0)
        if box is None:
            return
        mask, offset = self._mask(box)
        draw = ImageDraw.Draw(mask)
        for poly, solid in placed:
            draw.polygon([(x - offset[0], y - offset[1]) for x, y in poly], fill=255 * solid)
        self._blend(mask, box, colour)

    def stroke(self, points: Polygon, width: int, colour: np.ndarray) -> None:
        box = self._box(points, width)
        if box is None:
            return
        mask, (ox, oy) = self._mask(box)
        moved = [(x - ox, y - oy) for x, y in points]
        ImageDraw.Draw(mask).line(moved, fill=255, width=width, joint="curve")
        # Flat: a texture would not show on a line 1-2 pixels wide.
        self._blend(mask, box, colour, textured=False)

    def _mask(self, box: Box) -> tuple[Image.Image, tuple[int, int]]:
        x0, y0, x1, y1 = box
        ss = self.ss
        return Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0), (x0 * ss, y0 * ss)

    def _blend(
        self, mask: Image.Image, box: Box, colour: np.ndarray, textured: bool = True
    ) -> None:
        x0, y0, x1, y1 = box
        small = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(y1 - y0, x1 - x0, 1)
        alpha = alpha * np.float32(1 / 255)
        region = self.pixels[y0:y1, x0:x1]
        fill = texture(colour, self.size, self.rng, box) if textured else colour
        region += alpha * (fill - region)

    def image(self) -> Image.Image:
        return Image.fromarray(np.clip(self.pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def draw(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Object ``name`` at a random pose in random clutter, ``size``×``size`` RGB."""
    fg = rng.integers(0, 256, size=3).astype(np.float32)
    (bg,) = _colours(rng, 1, [fg], MIN_CONTRAST)
    canvas = _Canvas(size, bg, rng)
    big = canvas.big
    radius = float(rng.uniform(*RADIUS)) * big
    strokes = int(rng.integers(STROKES[0], STROKES[1] + 1))
    distractors = int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))
    colours = _colours(rng, strokes + distractors, [bg, fg], MIN_CLUTTER_CONTRAST)

    for colour in colours[:strokes]:
        points = [(float(x), float(y)) for x, y in rng.uniform(0, big, size=(3, 2))]
        width = max(1, round(float(rng.uniform(0.8, 2.0)) * canvas.ss * size / 32))
        canvas.stroke(points, width, colour)
    for colour in colours[strokes:]:
        part = PARTS[int(rng.integers(len(PARTS)))]
        r = radius * float(rng.uniform(*DISTRACTOR_SCALE))
        canvas.layer([(part, True)], canvas.pose(r, 0.0), colour)
    # Last, so that it is never occluded: its whole silhouette is the class.
    canvas.layer(OBJECTS[name], canvas.pose(radius, 0.7), fg)
    return canvas.image()


class ClutterSource(GeneratedSource):
    """The first ``num_classes`` of :data:`OBJECTS` × ``instances`` images each."""

    kind = "clutter"
    caption_template = "a picture of a {label} among clutter."
    names = NAMES
    default_instances = DEFAULT_INSTANCES
    seed_tag = "clutter-instance"

    def draw(self, name: str, rng: np.random.Generator) -> Image.Image:
        return draw(name, self.image_size, rng)
