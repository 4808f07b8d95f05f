"""Image corruptions for out-of-distribution test sets, in the spirit of ImageNet-C / CIFAR-10-C.

Two groups. Four simple kinds (rotate, noise, blur, contrast; ``mixed`` picks one per image),
whose strengths follow CIFAR-10-C's severities 1–5 (Hendrycks & Dietterich, 2019) where it has
the corruption, with blur radii scaled by image size (CIFAR's are for 32 px). And ImageNet-C's
15 corruptions by their names (``gaussian_noise`` … ``jpeg_compression``; its contrast is
``imagenet_c_contrast``), from :mod:`upstream.data.imagenet_c`, with CIFAR-10-C's parameters
for small images and ImageNet-C's for large ones. Each image's corruption depends only on the
seed and its sample index, so a set is reproducible and the same image gets the same
corruption in every subset of it.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from PIL import Image, ImageFilter

from upstream.data import imagenet_c
from upstream.data.base import seed_words
from upstream.errors import UpstreamError

KINDS: Final = ("rotate", "noise", "blur", "contrast")
#: ImageNet-C's 15 corruptions as kinds, in its order: its own names, except that its contrast
#: is ``imagenet_c_contrast``, since ``contrast`` is the simple kind above (CIFAR-10-C's factors
#: at every size, which ``mixed`` draws too).
IMAGENET_C: Final = tuple(
    "imagenet_c_contrast" if name == "contrast" else name for name in imagenet_c.CORRUPTIONS
)
_IMAGENET_C_NAMES: Final = dict(zip(IMAGENET_C, imagenet_c.CORRUPTIONS, strict=True))
#: Everything ``corrupt`` accepts: the kinds, ``none``, ``mixed`` (a seeded kind per image)
#: and ImageNet-C's corruptions.
CHOICES: Final = ("none", *KINDS, "mixed", *IMAGENET_C)

#: Largest rotation (degrees) per severity; the sign is random.
ROTATE_DEGREES: Final = (8.0, 16.0, 24.0, 32.0, 40.0)
#: Gaussian noise std (on [0, 1] pixels), CIFAR-10-C.
NOISE_STD: Final = (0.04, 0.06, 0.08, 0.09, 0.10)
#: Gaussian blur sigma at 32 px, CIFAR-10-C; scaled with the image side.
BLUR_SIGMA_32PX: Final = (0.4, 0.6, 0.7, 0.8, 1.0)
#: Contrast factor (1 = unchanged), CIFAR-10-C.
CONTRAST: Final = (0.75, 0.5, 0.4, 0.3, 0.15)


def corrupt(
    img: Image.Image, kind: str, severity: int, seed: int, index: int
) -> tuple[Image.Image, str]:
    """``img`` corrupted by ``kind`` at ``severity`` (1–5); returns the image and the kind used.

    The kind used differs from ``kind`` only for ``mixed``, which picks one of :data:`KINDS`
    per image. ImageNet-C's corruptions use CIFAR-10-C's parameters up to 64 px (longest side)
    and ImageNet-C's above (:func:`upstream.data.imagenet_c.parameter_set_for`).
    """
    if kind not in CHOICES:
        raise UpstreamError(f"unknown corruption {kind!r} (one of {', '.join(CHOICES)})")
    if not 1 <= severity <= 5:
        raise UpstreamError(f"corruption severity must be 1 to 5 (got {severity})")
    if kind == "none":
        return img, kind
    rng = np.random.default_rng(seed_words("corrupt", seed, index))
    if kind in _IMAGENET_C_NAMES:
        return imagenet_c.corrupt(img, _IMAGENET_C_NAMES[kind], severity, rng), kind
    if kind == "mixed":
        kind = KINDS[int(rng.integers(len(KINDS)))]
    level = severity - 1
    img = img.convert("RGB")
    if kind == "rotate":
        angle = float(rng.uniform(0.5, 1.0)) * ROTATE_DEGREES[level] * float(rng.choice([-1, 1]))
        # Fill the uncovered corners with the mean colour, not black, so the rotation is not
        # given away by a border no clean image has.
        fill = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(axis=0).round())
        out = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    elif kind == "noise":
        x = np.asarray(img, dtype=np.float64) / 255.0
        x = x + rng.normal(0.0, NOISE_STD[level], size=x.shape)
        out = Image.fromarray((np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8))
    elif kind == "blur":
        sigma = BLUR_SIGMA_32PX[level] * img.width / 32
        out = img.filter(ImageFilter.GaussianBlur(radius=sigma))
    else:  # contrast
        x = np.asarray(img, dtype=np.float64) / 255.0
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * CONTRAST[level] + mean
        out = Image.fromarray((np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8))
    return out, kind
