"""FractalDB-style images: each category is an iterated function system (IFS).

As in FractalDB (Kataoka et al., 2020), a category is a set of 2–4 contractive affine maps
drawn at random and kept only if its attractor fills enough of the picture; instances of a
category are small jitters of its maps, drawn in other colours and orientations. Category
parameters depend only on the category index, so a category is the same shape in every split
and every run; instances depend on the split and the seed, so the splits never share one.
Rendering is the chaos game, vectorised over many chains with numpy.
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from PIL import Image

from upstream.data.base import SPLIT_IDS, Source, seed_words
from upstream.errors import UpstreamError

DEFAULT_CATEGORIES = 10
DEFAULT_INSTANCES = 100
MAX_CATEGORIES = 100_000
#: Size at which candidate categories are checked for how much of the picture they fill.
_CHECK_SIZE = 32
#: A category's attractor must cover at least this share of its bounding square: lower ones
#: are specks or lines that no instance jitter turns into a recognisable shape.
MIN_FILL = 0.12
_MAX_SINGULAR = 0.92


def _probabilities(maps: np.ndarray) -> np.ndarray:
    # The usual choice: pick each map in proportion to the area it keeps (|det|), floored so
    # that a nearly singular map still gets visited.
    det = np.abs(np.linalg.det(maps[:, :, :2]))
    p = np.maximum(det, 0.02 * det.sum() + 1e-3)
    return p / p.sum()


def _make_contractive(maps: np.ndarray) -> np.ndarray:
    out = maps.copy()
    for k in range(len(out)):
        s = np.linalg.svd(out[k, :, :2], compute_uv=False)[0]
        if s > _MAX_SINGULAR:
            out[k, :, :2] *= _MAX_SINGULAR / s
    return out


def chaos_game(
    maps: np.ndarray, num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points on the attractor of ``maps`` (k×2×3 affine maps) and which map made each."""
    p = _probabilities(maps)
    cum = np.cumsum(p)
    chains = 512
    burn_in = 12
    steps = burn_in + -(-num_points // chains)
    x = rng.uniform(-1.0, 1.0, size=(chains, 2))
    a, b = maps[:, :, :2], maps[:, :, 2]
    points, which = [], []
    for step in range(steps):
        k = np.minimum(np.searchsorted(cum, rng.random(chains)), len(maps) - 1)
        x = np.einsum("cij,cj->ci", a[k], x) + b[k]
        if step >= burn_in:
            points.append(x)
            which.append(k)
    return np.concatenate(points), np.concatenate(which)


def _pixels(points: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Integer pixel coordinates of ``points`` fitted, aspect kept, into a size×size image."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = max(float((hi - lo).max()), 1e-9)
    inner = size * (1 - 2 * margin)
    centre = (lo + hi) / 2
    xy = (points - centre) / span * inner + size / 2
    return np.clip(xy.astype(np.int64), 0, size - 1)


def fill_ratio(maps: np.ndarray, rng: np.random.Generator, size: int = _CHECK_SIZE) -> float:
    points, _ = chaos_game(maps, size * size * 3, rng)
    if not np.all(np.isfinite(points)):
        return 0.0
    xy = _pixels(points, size, margin=0.0)
    grid = np.zeros((size, size), dtype=bool)
    grid[xy[:, 1], xy[:, 0]] = True
    return float(grid.mean())


@functools.cache
def category_maps(category: int) -> np.ndarray:
    """The IFS of ``category`` (k×2×3), the same on every machine and in every split."""
    rng = np.random.default_rng(seed_words("fractal-category", category))
    for _ in range(10_000):
        k = int(rng.integers(2, 5))
        maps = rng.uniform(-1.0, 1.0, size=(k, 2, 3))
        if max(np.linalg.svd(m[:, :2], compute_uv=False)[0] for m in maps) >= 1.0:
            continue
        if fill_ratio(maps, rng) >= MIN_FILL:
            return maps
    raise AssertionError(f"no fractal found for category {category}")  # pragma: no cover


def _colour(rng: np.random.Generator, value: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(float(rng.random()), float(rng.uniform(0.5, 1.0)), value)
    return np.array([r, g, b]) * 255


def render(maps: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One instance: jittered maps, a random rotation and flip, random colours per map."""
    jitter = maps + rng.normal(0.0, 0.04, size=maps.shape)
    jitter = _make_contractive(jitter)
    points, which = chaos_game(jitter, max(4000, size * size * 4), rng)
    theta = rng.uniform(-np.pi / 6, np.pi / 6)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = points @ rot.T
    if rng.random() < 0.5:
        points[:, 0] = -points[:, 0]
    xy = _pixels(points, size, margin=0.08)
    background = _colour(rng, float(rng.uniform(0.0, 0.2)))
    colours = np.stack([_colour(rng, float(rng.uniform(0.7, 1.0))) for _ in range(len(maps))])
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = background
    canvas[xy[:, 1], xy[:, 0]] = colours[which]
    return Image.fromarray(canvas.round().astype(np.uint8))


class FractalSource(Source):
    """``num_categories`` IFS categories × ``instances`` rendered images each."""

    kind = "fractals"
    caption_template = "an image of the fractal {label}."

    def __init__(
        self, split: str, *, num_categories: int, instances: int, image_size: int, seed: int
    ) -> None:
        num_categories = num_categories or DEFAULT_CATEGORIES
        instances = instances or DEFAULT_INSTANCES
        if num_categories > MAX_CATEGORIES:
            raise UpstreamError(
                f"fractals: num_classes={num_categories} is more than {MAX_CATEGORIES}"
            )
        width = max(2, len(str(num_categories - 1)))
        names = [f"fractal-{c:0{width}d}" for c in range(num_categories)]
        super().__init__(names, np.repeat(np.arange(num_categories), instances), split)
        self.instances = instances
        self.image_size = image_size
        self.seed = seed

    def image(self, index: int) -> Image.Image:
        category, instance = divmod(index, self.instances)
        rng = np.random.default_rng(
            seed_words("fractal-instance", SPLIT_IDS[self.split], self.seed, category, instance)
        )
        return render(category_maps(category), self.image_size, rng)

    def meta(self, index: int) -> dict[str, int]:
        return {"instance": index % self.instances}
