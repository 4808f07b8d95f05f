"""Bounded decoding: an image's size comes from its header and is checked before any pixel
is decoded.

A few hundred kilobytes of PNG can hold 20000×20000 pixels (1.2 GB as RGB bytes, 4.8 GB as
floats), so every decoder in upstream reads the header first (PIL opens lazily; a PNG's size
is read straight from its IHDR chunk, the cheapest check on the hot path of the loader) and
refuses an image beyond its :class:`Bounds`:

- every image: at most :data:`MAX_PIXELS`;
- a shard set's images, at read time: no side beyond the manifest's ``image_size`` when its
  ``resize`` is ``square`` or ``max_side`` (what the shard stage wrote); ``keep`` sets have
  only the ceiling. The ceiling holds whatever a manifest says, so an altered manifest cannot
  lift it.

PIL's own decompression-bomb guard (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above
twice that) never speaks first: the ceiling is below its threshold, and its error, where it
comes, becomes the same one-line refusal.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

#: The most pixels any image may have where nothing else bounds it (``resize=keep`` sets,
#: source images as the shard stage decodes them): 8192×8192, 192 MiB as RGB bytes. Larger
#: than any common camera's frames, below PIL's decompression-bomb threshold (89.5 M).
MAX_PIXELS = 8192 * 8192

_PNG = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">4sII")  # chunk type, width, height


class TooLarge(ValueError):
    """An image whose header promises more pixels than its bounds allow (the message says)."""


@dataclass(frozen=True)
class Bounds:
    """The largest image a reader accepts: at most ``max_side`` pixels on either side (None:
    any) and ``max_pixels`` in all; ``promise`` names where ``max_side`` comes from."""

    max_side: int | None = None
    max_pixels: int = MAX_PIXELS
    promise: str = ""

    def check(self, width: int, height: int) -> None:
        """Raise :class:`TooLarge` for an image of ``width`` × ``height`` beyond these bounds."""
        if self.max_side is not None and max(width, height) > self.max_side:
            what = self.promise or "its bounds"
            raise TooLarge(f"it is {width}×{height} pixels, more than {what} allows "
                           f"({self.max_side} on a side)")
        if width * height > self.max_pixels:
            raise TooLarge(f"it is {width}×{height} pixels, more than the {self.max_pixels} "
                           "pixels an image may have (upstream.imagebounds.MAX_PIXELS)")


#: No bounds but the ceiling.
CEILING = Bounds()


def for_manifest(manifest: dict[str, object]) -> Bounds:
    """What the shard set of ``manifest`` promises about its images' sizes."""
    resize, size = manifest.get("resize"), manifest.get("image_size")
    if resize in ("square", "max_side") and isinstance(size, int) and size > 0:
        return Bounds(max_side=size, promise=f"the manifest's image_size (resize={resize})")
    return CEILING


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk (always its first), None if not a PNG."""
    if data[:8] != _PNG or len(data) < 24:
        return None
    kind, width, height = _IHDR.unpack_from(data, 12)
    return (width, height) if kind == b"IHDR" else None


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def open_image(data: bytes, bounds: Bounds = CEILING) -> Image.Image:
    """``data`` opened by PIL, its size checked against ``bounds``, not yet decoded.

    Raises :class:`TooLarge` beyond the bounds, PIL's errors (``OSError``, ``ValueError``, …)
    for data that is not an image.
    """
    size = png_size(data)
    if size is not None:  # the exact size, where PIL's guard would give a pixel count
        bounds.check(*size)
    try:
        with warnings.catch_warnings():
            # Decided below, by the bounds, with the image's name in the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        found = _BOMB_PIXELS.search(str(e))
        pixels = f"{found.group(1)} pixels" if found else "more pixels than PIL decodes"
        raise TooLarge(f"it is {pixels}, more than the {bounds.max_pixels} pixels an image may "
                       "have (upstream.imagebounds.MAX_PIXELS)") from None
    try:
        bounds.check(*img.size)
    except TooLarge:
        img.close()
        raise
    return img


def check(data: bytes, bounds: Bounds = CEILING) -> None:
    """Raise :class:`TooLarge` if the header of ``data`` promises more than ``bounds``, PIL's
    errors if PIL does not know it as an image: whatever passes has a size within bounds, for
    any decoder (a PNG is checked from its IHDR alone, ~0.2 µs; others are opened by PIL)."""
    size = png_size(data)
    if size is not None:
        bounds.check(*size)
    else:
        open_image(data, bounds).close()
