"""ImageNet-C's 15 corruptions at 5 severities, written from Hendrycks & Dietterich's formulas.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. Every formula and every parameter table below follows their code,
github.com/hendrycks/robustness, ``ImageNet-C/create_c/``:

- ``"imagenet"`` parameters: ``make_imagenet_c.py`` (written for 224-px centre crops);
- ``"cifar"`` parameters: ``make_cifar_c.py`` (CIFAR-10-C / CIFAR-100-C, 32 px), much milder
  (e.g. Gaussian noise σ .04–.10 instead of .08–.38, JPEG quality 80–40 instead of 25–7).

The PyPI package ``imagecorruptions`` (bethgelab, which extended the same code to any image
size) breaks on NumPy 2 and current scikit-image, and the reference needs OpenCV, scikit-image
and Wand/ImageMagick; this module uses only NumPy, SciPy and Pillow. Deviations from the
reference, all deliberate:

- **Frost** overlays crops of six photographs of frost shipped with the reference's code (of
  which its ``randint(5)`` only ever picks the first five). They are not available here, so
  :func:`frost_layer` grows a frost-like texture from the generator: ice needles in three
  directions 60° apart (ice is hexagonal), long and short, on a patchy plasma-fractal haze,
  tinted blue-white. The blend formula and its table are the reference's; the texture is
  only meant to resemble the photographs (bright crystals over a darker ground, covering the
  image at a similar scale), it is not them, so frost results are not comparable with
  published ImageNet-C / CIFAR-10-C frost numbers.
- **Motion blur** (the corruption and snow's streaks) is ImageMagick's ``MotionBlurImage``
  written out: a one-sided Gaussian line kernel of ``2·ceil(radius) + 1`` taps at integer
  offsets along the angle, edge pixels repeated, applied as a sum of shifted copies.
- **Glass blur** does what the reference's loop computes, which is not the swap it is written
  as (see :func:`glass_shuffle`), vectorised exactly: no loop over pixels.
- **Image size.** The reference fixes 224 (or 32) px. Here any size works; the parameter set
  is chosen by :func:`parameter_set_for` unless given, and every parameter measured in pixels
  is multiplied by ``s = shorter side / reference side`` (224 for ``"imagenet"``, 32 for
  ``"cifar"``): blur radii and sigmas (defocus, glass, motion, snow's streaks), glass blur's
  swap distance (rounded, at least 1), snow's flake zoom (at least 1), elastic's smoothing
  sigma and affine jitter (the frost texture is drawn in units of the shorter side, which
  amounts to the same). Elastic's ``alpha`` is multiplied by ``s²``: it multiplies noise
  averaged over an area ∝ σ², whose amplitude falls as 1/σ, so ``s²`` is what makes the
  displacement field the reference's one resampled to the new size.
  Dimensionless parameters (noise levels, zoom factors, contrast, fog, JPEG quality, pixelate
  factor) are used as they are. At the reference size every parameter is the reference's.
- ImageNet-C's elastic table is written in units of 244 px, "should have been 224, but
  ultimately nothing is incorrect" (its authors); kept as 244 so that 224-px images get the
  published values.
- Elastic's affine anchor points use (x, y) = (W // 2, H // 2); the reference, written for
  squares, uses (H // 2, W // 2).
- Defocus blur's disk kernel is built on an integer grid (the reference's ``arange(-r, r+1)``
  for radii over 8 would give half-integer offsets once radii are scaled).
- Outputs are truncated to uint8, as the reference's ``np.uint8(...)`` does; its ImageNet-C
  files were then saved as JPEG (quality 85), which the shard stage leaves to its own
  ``--image-format``.

All randomness comes from the ``rng`` argument, never NumPy's global state: the same image and
generator seed give the same output every time.
"""

from __future__ import annotations

import io
import math
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage as ndi
from scipy import signal

from upstream.errors import UpstreamError

Array = NDArray[np.float64]
ParameterSet = Literal["cifar", "imagenet"]

#: ImageNet-C's 15 corruptions in its order (the 4 held-out ones are not included).
CORRUPTIONS: Final = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: ImageNet-C's four families.
FAMILIES: Final[dict[str, str]] = {
    **dict.fromkeys(("gaussian_noise", "shot_noise", "impulse_noise"), "noise"),
    **dict.fromkeys(("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"), "blur"),
    **dict.fromkeys(("snow", "frost", "fog", "brightness"), "weather"),
    **dict.fromkeys(("contrast", "elastic_transform", "pixelate", "jpeg_compression"), "digital"),
}
PARAMETER_SETS: Final = ("cifar", "imagenet")
#: Image side the parameter sets were written for; pixel parameters scale with side / this.
REFERENCE_SIDE: Final[dict[str, int]] = {"cifar": 32, "imagenet": 224}
#: Images whose longest side is at most this get CIFAR's parameters. CIFAR-10-C was written
#: for 32 px, ImageNet-C for 224 px: 64 is below their geometric mean (~85 px), and what this
#: project makes at such sizes (digits upscaled to 32, shapes, fractals, CIFAR, STL-10 at 64)
#: holds whole objects in few pixels, as CIFAR does, where ImageNet's noise levels and
#: contrast factors leave little of the image. (Tiny-ImageNet-C, 64 px, has a third table
#: between the two: not implemented.)
SMALL_IMAGE_MAX_SIDE: Final = 64

_E = 244  # ImageNet-C's elastic unit (see the module docstring)
_C = 32  # CIFAR-10-C's elastic unit, its IMSIZE

#: Per corruption and parameter set, one entry per severity 1–5. Source: hendrycks/robustness,
#: ImageNet-C/create_c/make_imagenet_c.py ("imagenet") and make_cifar_c.py ("cifar"); the
#: tuples are those files' ``c = [...]`` lists in their order, with pixel values at the
#: reference side (224 / 32 px).
PARAMETERS: Final[dict[str, dict[str, tuple[Any, ...]]]] = {
    # σ of additive Gaussian noise on [0, 1] pixels
    "gaussian_noise": {
        "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38),
        "cifar": (0.04, 0.06, 0.08, 0.09, 0.10),
    },
    # photons per unit intensity (Poisson(x·c)/c): fewer is noisier
    "shot_noise": {"imagenet": (60, 25, 12, 5, 3), "cifar": (500, 250, 100, 75, 50)},
    # share of values replaced by salt (1) or pepper (0), half each
    "impulse_noise": {
        "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27),
        "cifar": (0.01, 0.02, 0.03, 0.05, 0.07),
    },
    # (disk radius px, antialiasing blur σ px)
    "defocus_blur": {
        "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    },
    # (blur σ px, max swap distance δ px, iterations)
    "glass_blur": {
        "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    },
    # (radius px, σ px) of ImageMagick's motion blur; angle uniform in [-45°, 45°)
    "motion_blur": {
        "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    },
    # np.arange(start, stop, step) of zoom factors, averaged with the image
    "zoom_blur": {
        "imagenet": (
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.02),
            (1, 1.26, 0.02),
            (1, 1.31, 0.03),
        ),
        "cifar": (
            (1, 1.06, 0.01),
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.01),
            (1, 1.26, 0.01),
        ),
    },
    # (flake mean, flake std, flake zoom, threshold, streak radius px, streak σ px,
    #  share of the image kept unwhitened)
    "snow": {
        "imagenet": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "cifar": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
    },
    # (weight of the image, weight of the frost texture)
    "frost": {
        "imagenet": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        "cifar": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    },
    # (fog strength, plasma fractal's wibble decay: lower is rougher)
    "fog": {
        "imagenet": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
        "cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    },
    # shift of HSV value
    "brightness": {
        "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
        "cifar": (0.05, 0.1, 0.15, 0.2, 0.3),
    },
    # factor on the deviation from the per-channel mean
    "contrast": {
        "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
        "cifar": (0.75, 0.5, 0.4, 0.3, 0.15),
    },
    # (alpha: displacement gain, σ px of the displacement's smoothing, affine jitter px)
    "elastic_transform": {
        "imagenet": (
            (_E * 2, _E * 0.7, _E * 0.1),
            (_E * 2, _E * 0.08, _E * 0.2),
            (_E * 0.05, _E * 0.01, _E * 0.02),
            (_E * 0.07, _E * 0.01, _E * 0.02),
            (_E * 0.12, _E * 0.01, _E * 0.02),
        ),
        "cifar": (
            (_C * 0, _C * 0, _C * 0.08),
            (_C * 0.05, _C * 0.2, _C * 0.07),
            (_C * 0.08, _C * 0.06, _C * 0.06),
            (_C * 0.1, _C * 0.04, _C * 0.05),
            (_C * 0.1, _C * 0.03, _C * 0.03),
        ),
    },
    # share of the side kept before scaling back up (box filter both ways)
    "pixelate": {
        "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25),
        "cifar": (0.95, 0.9, 0.85, 0.75, 0.65),
    },
    # JPEG quality
    "jpeg_compression": {"imagenet": (25, 18, 15, 10, 7), "cifar": (80, 65, 58, 50, 40)},
}

#: ITU-R 601 luma, as OpenCV's RGB2GRAY (snow's whitening of the scene).
_LUMA: Final = np.array([0.299, 0.587, 0.114])
#: Frost's colour: the photographs are blue-white ice.
_FROST_TINT: Final = np.array([0.86, 0.93, 1.0])
#: Frost textures are grown at this side at least, then box-averaged down, so that small
#: images get smooth crystals rather than aliased single pixels (the CIFAR reference, too,
#: shrinks its photographs before cropping).
_FROST_WORK_SIDE: Final = 128


def parameter_set_for(width: int, height: int) -> ParameterSet:
    """``"cifar"`` for small images (longest side ≤ :data:`SMALL_IMAGE_MAX_SIDE`), else
    ``"imagenet"``."""
    return "cifar" if max(width, height) <= SMALL_IMAGE_MAX_SIDE else "imagenet"


def severity_parameters(name: str, severity: int, parameter_set: str) -> Any:
    """The reference's parameter for ``name`` at ``severity`` (1–5), at the reference size."""
    _check(name, severity, parameter_set)
    return PARAMETERS[name][parameter_set][severity - 1]


def corrupt(
    img: Image.Image,
    name: str,
    severity: int,
    rng: np.random.Generator,
    parameters: str = "auto",
) -> Image.Image:
    """``img`` with ImageNet-C's corruption ``name`` at ``severity`` (1–5): RGB, same size.

    ``parameters`` is ``"cifar"``, ``"imagenet"`` or ``"auto"`` (by :func:`parameter_set_for`).
    Random corruptions draw only from ``rng``.
    """
    _check(name, severity, parameters)
    img = img.convert("RGB")
    width, height = img.size
    chosen = parameter_set_for(width, height) if parameters == "auto" else parameters
    c = PARAMETERS[name][chosen][severity - 1]
    scale = min(width, height) / REFERENCE_SIDE[chosen]
    if name == "pixelate":
        return _pixelate(img, c)
    if name == "jpeg_compression":
        return _jpeg(img, c)
    x = np.asarray(img, dtype=np.float64) / 255.0
    out = _ARRAY_CORRUPTIONS[name](x, c, scale, rng)
    # Truncated, not rounded, as the reference's np.uint8(...) does.
    return Image.fromarray((np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8))


def _check(name: str, severity: int, parameter_set: str) -> None:
    if name not in PARAMETERS:
        raise UpstreamError(
            f"unknown ImageNet-C corruption {name!r} (one of {', '.join(CORRUPTIONS)})"
        )
    if not 1 <= severity <= 5:
        raise UpstreamError(f"corruption severity must be 1 to 5 (got {severity})")
    if parameter_set not in ("auto", *PARAMETER_SETS):
        raise UpstreamError(
            f"unknown ImageNet-C parameter set {parameter_set!r} (auto, cifar or imagenet)"
        )


# --- noise ------------------------------------------------------------------------------------


def _gaussian_noise(x: Array, sigma: float, scale: float, rng: np.random.Generator) -> Array:
    return x + rng.normal(0.0, sigma, size=x.shape)


def _shot_noise(x: Array, photons: float, scale: float, rng: np.random.Generator) -> Array:
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: Array, amount: float, scale: float, rng: np.random.Generator) -> Array:
    # scikit-image's random_noise(mode="s&p"): every value (channels separately) is flipped with
    # probability `amount`, to 1 or 0 with equal odds.
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salt] = 1.0
    out[flipped & ~salt] = 0.0
    return out


# --- blur -------------------------------------------------------------------------------------


def disk_kernel(radius: float, alias_sigma: float) -> Array:
    """Defocus blur's kernel: a pixel-grid disk, normalised, then antialiased by a small
    Gaussian (3×3, or 5×5 above radius 8, mirrored at the kernel's edge as OpenCV's
    ``GaussianBlur`` does); all-zero rows and columns trimmed."""
    half = max(8, math.ceil(radius))
    grid = np.arange(-half, half + 1)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(-1, 2) if radius <= 8 else np.arange(-2, 3)
    g = np.exp(-(taps**2) / (2.0 * max(alias_sigma, 1e-6) ** 2))
    g /= g.sum()
    kernel = ndi.correlate(disk, np.outer(g, g), mode="mirror")
    rows = np.flatnonzero(kernel.any(axis=1))
    cols = np.flatnonzero(kernel.any(axis=0))
    return kernel[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _filter2d(x: Array, kernel: Array) -> Array:
    """OpenCV's ``filter2D`` on every channel: correlation, borders mirrored without repeating
    the edge pixel (BORDER_REFLECT_101)."""
    if kernel.size <= 81:
        return ndi.correlate(x, kernel[:, :, None], mode="mirror")
    # Large disks: FFT convolution of the mirrored image is the same filter, far faster.
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    return signal.fftconvolve(padded, kernel[::-1, ::-1, None], mode="valid", axes=(0, 1))


def _defocus_blur(
    x: Array, c: tuple[float, float], scale: float, rng: np.random.Generator
) -> Array:
    radius, alias_sigma = c
    return _filter2d(x, disk_kernel(radius * scale, alias_sigma * scale))


def _gaussian_blur(x: Array, sigma: float) -> Array:
    # scikit-image's gaussian(): edge pixels repeated, kernel truncated at 4σ, channels apart.
    return ndi.gaussian_filter(x, sigma=(sigma, sigma, 0.0), mode="nearest", truncate=4.0)


def glass_shuffle(
    x: NDArray[Any], delta: int, iterations: int, rng: np.random.Generator
) -> NDArray[Any]:
    """Glass blur's local pixel shuffle, as the reference computes it; returns a new array.

    Each interior pixel ``(h, w)`` (``δ < h ≤ H − δ``, likewise ``w``), visited in reverse
    raster order, takes the value that ``(h + dy, w + dx)`` holds at that moment, ``dx, dy``
    uniform in ``[-δ, δ)``; ``iterations`` times. The reference writes this as a swap,
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``, but on an (H, W, 3) array both sides are
    views, so the second assignment writes back what the first just copied: each pixel is
    replaced by a neighbour's value and the neighbour is left as it was. That is what
    CIFAR-10-C and ImageNet-C contain, so it is what this does.

    Vectorised exactly: a neighbour visited earlier (one below, or to the right on the same
    row) already holds its new value, so each pixel's source is found by following those
    links, by pointer jumping, instead of a loop over pixels.
    """
    height, width = x.shape[:2]
    rows = np.arange(height - delta, delta, -1)
    cols = np.arange(width - delta, delta, -1)
    flat = x.reshape(height * width, *x.shape[2:])
    if rows.size == 0 or cols.size == 0:
        return flat.copy().reshape(x.shape)
    here = (rows[:, None] * width + cols[None, :]).ravel()  # in visiting order
    interior = np.zeros(height * width, dtype=bool)
    interior[here] = True
    for _ in range(iterations):
        offsets = rng.integers(-delta, delta, size=(here.size, 2))  # (dx, dy) per visit
        there = here + offsets[:, 1] * width + offsets[:, 0]
        # source[p]: where p's value comes from, taken from the array as it was before this
        # pass unless pending[p], in which case p gets whatever source[p] ends up with.
        source = np.arange(height * width)
        pending = np.zeros(height * width, dtype=bool)
        source[here] = there
        pending[here] = interior[there] & (there > here)
        while pending.any():
            source, pending = np.where(pending, source[source], source), pending & pending[source]
        flat = flat[source]
    return flat.reshape(x.shape)


def _glass_blur(
    x: Array, c: tuple[float, int, int], scale: float, rng: np.random.Generator
) -> Array:
    sigma, delta, iterations = c
    sigma *= scale
    delta = max(1, round(delta * scale))
    # The reference truncates to uint8 between the blur and the shuffle.
    shuffled = (_gaussian_blur(x, sigma) * 255.0).astype(np.uint8)
    shuffled = glass_shuffle(shuffled, delta, iterations, rng)
    return _gaussian_blur(shuffled / 255.0, sigma)


def motion_kernel(radius: float, sigma: float, angle: float) -> tuple[Array, NDArray[np.int64]]:
    """ImageMagick's ``MotionBlurImage`` kernel: weights and (dy, dx) integer offsets.

    ``2·ceil(radius) + 1`` taps; tap ``i`` weighs ``exp(-i² / 2σ²)`` (normalised) and sits at
    ``(ceil(i·sin θ − ½), ceil(i·cos θ − ½))``: a one-sided trail along ``angle`` (degrees).
    """
    width = 2 * math.ceil(radius) + 1 if radius > 1e-12 else 3
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * max(sigma, 1e-6) ** 2))
    weights /= weights.sum()
    theta = math.radians(angle)
    dy = np.ceil(i * math.sin(theta) - 0.5)
    dx = np.ceil(i * math.cos(theta) - 0.5)
    return weights, np.stack([dy, dx], axis=1).astype(np.int64)


def motion_blur_array(x: Array, radius: float, sigma: float, angle: float) -> Array:
    """``x`` (H, W[, C]) blurred by :func:`motion_kernel`, edge pixels repeated beyond the
    border (ImageMagick's default virtual pixels)."""
    weights, offsets = motion_kernel(radius, sigma, angle)
    height, width = x.shape[:2]
    pad = int(np.abs(offsets).max())
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, widths, mode="edge")
    out = np.zeros_like(x, dtype=np.float64)
    # Taps that round to the same offset add up; summing them first saves a pass each.
    merged: dict[tuple[int, int], float] = {}
    for weight, (dy, dx) in zip(weights, offsets.tolist(), strict=True):
        merged[(dy, dx)] = merged.get((dy, dx), 0.0) + float(weight)
    for (dy, dx), weight in merged.items():
        out += weight * padded[pad + dy : pad + dy + height, pad + dx : pad + dx + width]
    return out


def _motion_blur(x: Array, c: tuple[float, float], scale: float, rng: np.random.Generator) -> Array:
    radius, sigma = c
    angle = float(rng.uniform(-45.0, 45.0))
    # The reference gets ImageMagick's result back as 8-bit PNG: rounded.
    return np.round(motion_blur_array(x, radius * scale, sigma * scale, angle) * 255.0) / 255.0


def _zoom_taps(n: int, zoom: float) -> tuple[NDArray[np.int64], Array]:
    """Where the ``n`` samples kept by the reference's ``clipped_zoom`` come from along one
    axis: SciPy's ``zoom(order=1)`` of the centred ``ceil(n / zoom)`` crop, trimmed back to
    ``n``. Returns the lower source index and the weight of the next one; interpolating by
    hand costs two gathers per axis instead of a spline call per zoom factor."""
    crop = math.ceil(n / zoom)
    top = (n - crop) // 2
    if crop == 1:
        return np.full(n, top, dtype=np.int64), np.zeros(n)
    out = round(crop * zoom)
    trim = (out - n) // 2
    # SciPy's zoom without grid_mode maps the end samples onto each other.
    coord = np.arange(trim, trim + n, dtype=np.float64) * ((crop - 1) / (out - 1))
    lower = np.clip(np.floor(coord).astype(np.int64), 0, crop - 2)
    return top + lower, coord - lower


def clipped_zoom(x: Array, zoom: float) -> Array:
    """``x`` (H, W[, C]) zoomed by ``zoom`` ≥ 1 about its centre, same size (the reference's
    ``clipped_zoom``: crop the centre, zoom bilinearly, trim the excess)."""
    for axis in (0, 1):
        lower, frac = _zoom_taps(x.shape[axis], zoom)
        shape = [1] * x.ndim
        shape[axis] = -1
        frac = frac.reshape(shape)
        upper = np.minimum(lower + 1, x.shape[axis] - 1)
        x = np.take(x, lower, axis=axis) * (1.0 - frac) + np.take(x, upper, axis=axis) * frac
    return x


def _zoom_blur(
    x: Array, c: tuple[float, float, float], scale: float, rng: np.random.Generator
) -> Array:
    factors = np.arange(*c)  # the reference's own arange, floating-point length and all
    out = x.copy()
    for zoom in factors:
        out += clipped_zoom(x, float(zoom))
    return out / (len(factors) + 1)


# --- weather ----------------------------------------------------------------------------------


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> Array:
    """A ``size`` × ``size`` (a power of two) diamond-square height map in [0, 1], as the
    reference's ``plasma_fractal`` (itself after FLHerne/mapgen): each step fills square
    centres then diamond centres with their neighbours' mean plus uniform noise, the noise
    divided by ``decay`` per halving of the step. Tiles periodically."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma fractal size must be a power of two ≥ 2 (got {size})")
    m = np.zeros((size, size))
    step = size
    wibble = 100.0

    def wibbled(total: Array) -> Array:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        m[half:size:step, half:size:step] = wibbled(total)
        centres = m[half:size:step, half:size:step]
        corners = m[0:size:step, 0:size:step]
        m[0:size:step, half:size:step] = wibbled(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        )
        m[half:size:step, 0:size:step] = wibbled(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        )
        step = half
        wibble /= decay
    m -= m.min()
    top = m.max()
    return m / top if top > 0 else m


def _power_of_two(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _fog(x: Array, c: tuple[float, float], scale: float, rng: np.random.Generator) -> Array:
    strength, decay = c
    height, width = x.shape[:2]
    # Map size: the next power of two, cropped (256 → 224 and 32 in the reference).
    fog = plasma_fractal(_power_of_two(max(height, width)), decay, rng)[:height, :width]
    top = x.max()
    return (x + strength * fog[..., None]) * top / (top + strength)


def _streaks(seeds: Array, length: float, angle: float) -> Array:
    """``seeds`` smeared along a centred line of ``length`` px at ``angle`` (radians): needles.
    Wraps around, which a texture may."""
    n = max(1, round(length))
    t = np.arange(n) - (n - 1) / 2
    out = np.zeros_like(seeds)
    steps = {(round(s * math.sin(angle)), round(s * math.cos(angle))) for s in t}
    for dy, dx in steps:
        out += np.roll(seeds, (dy, dx), axis=(0, 1))
    return out / len(steps)


def frost_layer(height: int, width: int, rng: np.random.Generator) -> Array:
    """A frost-like texture (H, W, 3) in [0, 1], standing in for the reference's photographs.

    Ice needles grow in three directions 60° apart (a random rotation), long sparse ones and
    short dense ones, brighter and denser where a plasma-fractal haze is thick, over a faint
    grain; tinted blue-white. Sizes are in units of the shorter side, so the pattern covers
    the image the same way at every size (the reference's 224-px crops of the photographs
    and CIFAR's 32-px crops of them shrunk to a fifth cover similar shares of a photograph).
    Mean about 0.35 (0.3–0.45 from draw to draw), crystals up to 1.
    """
    side = min(height, width)
    factor = max(1, math.ceil(_FROST_WORK_SIDE / side))
    h, w, n = height * factor, width * factor, side * factor
    haze = plasma_fractal(_power_of_two(max(h, w)), 2.0, rng)[:h, :w]
    base = rng.uniform(0.0, math.pi / 3)
    crystals = np.zeros((h, w))
    for k in range(3):
        theta = base + k * math.pi / 3
        for length, density in ((0.09 * n, 0.6 / n), (0.03 * n, 4.0 / n)):
            angle = theta + float(rng.normal(0.0, 0.08))
            seeds = np.where(rng.random((h, w)) < density, rng.uniform(0.4, 1.0, (h, w)), 0.0)
            crystals += _streaks(seeds, length, angle) * length
    # A slight blur gives needles the width and glow of ice rather than one-pixel lines.
    crystals = ndi.gaussian_filter(crystals, 0.004 * n + 0.35, mode="wrap")
    crystals /= np.quantile(crystals, 0.995) + 1e-12
    grain = ndi.gaussian_filter(rng.random((h, w)), 0.006 * n + 0.3, mode="wrap")
    tone = 0.06 + 0.3 * haze + 0.1 * grain + crystals * (0.15 + 0.85 * haze**2)
    tone = np.clip(tone, 0.0, 1.0)
    if factor > 1:
        tone = tone.reshape(height, factor, width, factor).mean(axis=(1, 3))
    return tone[..., None] * _FROST_TINT


def _frost(x: Array, c: tuple[float, float], scale: float, rng: np.random.Generator) -> Array:
    image_weight, frost_weight = c
    height, width = x.shape[:2]
    return image_weight * x + frost_weight * frost_layer(height, width, rng)


def _snow(x: Array, c: tuple[float, ...], scale: float, rng: np.random.Generator) -> Array:
    mean, std, zoom, threshold, radius, sigma, kept = c
    height, width = x.shape[:2]
    flakes = rng.normal(mean, std, size=(height, width))
    flakes = clipped_zoom(flakes, max(1.0, zoom * scale))
    flakes[flakes < threshold] = 0.0
    # 8-bit grey image in the reference (truncated), then ImageMagick's blur, back as 8 bits.
    flakes = np.floor(np.clip(flakes, 0.0, 1.0) * 255.0) / 255.0
    angle = float(rng.uniform(-135.0, -45.0))
    flakes = motion_blur_array(flakes, radius * scale, sigma * scale, angle)
    flakes = (np.round(flakes * 255.0) / 255.0)[..., None]
    luma = (x * _LUMA).sum(axis=2, keepdims=True)  # no BLAS call: threads contend in workers
    whitened = np.maximum(x, luma * 1.5 + 0.5)
    x = kept * x + (1.0 - kept) * whitened
    return x + flakes + np.rot90(flakes, k=2)


def _brightness(x: Array, shift: float, scale: float, rng: np.random.Generator) -> Array:
    # V = max(R, G, B) in HSV; with H and S fixed every channel is proportional to V, so the
    # reference's rgb2hsv → V + c (clipped) → hsv2rgb is a per-pixel rescaling (and black, which
    # has S = 0, becomes grey V + c).
    value = x.max(axis=2, keepdims=True)
    shifted = np.clip(value + shift, 0.0, 1.0)
    ratio = np.divide(shifted, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * ratio, shifted)


# --- digital ----------------------------------------------------------------------------------


def _contrast(x: Array, factor: float, scale: float, rng: np.random.Generator) -> Array:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * factor + means


def _affine_from_points(src: Array, dst: Array) -> Array:
    """The 3×3 affine matrix taking three (x, y) points ``src`` to ``dst`` (OpenCV's
    ``getAffineTransform``)."""
    a = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T
    return np.vstack([a, [0.0, 0.0, 1.0]])


def _elastic_transform(
    x: Array, c: tuple[float, float, float], scale: float, rng: np.random.Generator
) -> Array:
    alpha, sigma, jitter = c
    alpha *= scale**2
    sigma *= scale
    jitter *= scale
    height, width = x.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # A random affine map: three points about the centre each moved by up to `jitter` px.
    centre = np.array([width // 2, height // 2], dtype=np.float64)
    arm = min(height, width) // 3
    src = np.array([centre + arm, [centre[0] + arm, centre[1] - arm], centre - arm])
    dst = src + rng.uniform(-jitter, jitter, size=src.shape)
    if arm > 0:
        # warpAffine samples the source at the inverse map, bilinear, borders mirrored.
        inverse = np.linalg.inv(_affine_from_points(src, dst))
        sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        x = _sample(x, sy, sx, "mirror")
    # Smoothed uniform noise displaces every pixel (Simard et al.'s elastic distortion).
    dx = alpha * ndi.gaussian_filter(
        rng.uniform(-1, 1, (height, width)), sigma, mode="reflect", truncate=3.0
    )
    dy = alpha * ndi.gaussian_filter(
        rng.uniform(-1, 1, (height, width)), sigma, mode="reflect", truncate=3.0
    )
    if alpha == 0:
        return x
    return _sample(x, ys + dy, xs + dx, "reflect")


def _sample(x: Array, rows: Array, cols: Array, mode: str) -> Array:
    coords = np.stack([rows, cols])
    return np.stack(
        [ndi.map_coordinates(x[..., ch], coords, order=1, mode=mode) for ch in range(x.shape[2])],
        axis=-1,
    )


def _pixelate(img: Image.Image, share: float) -> Image.Image:
    width, height = img.size
    small = img.resize(
        (max(1, int(width * share)), max(1, int(height * share))), Image.Resampling.BOX
    )
    return small.resize((width, height), Image.Resampling.BOX)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


_ARRAY_CORRUPTIONS: Final[dict[str, Any]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
}
