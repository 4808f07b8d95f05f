"""scikit-learn's 8×8 handwritten digits (1,797 images, shipped with the package)."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from upstream.data.base import Source

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Fixed, not the config's seed: the test split must never overlap any train split.
SPLIT_SEED = 20240611
TEST_FRACTION = 0.2


@functools.cache
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train, test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


@functools.cache
def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are ink intensities 0..16; ink is drawn bright on a dark ground.
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsSource(Source):
    """One split of the digits: a stratified 80/20 split made with a fixed seed."""

    kind = "digits"
    caption_template = "a photo of the digit {label}."

    def __init__(self, split: str) -> None:
        images, targets = _data()
        self._ids = _split_indices()[split]
        super().__init__(CLASS_NAMES, targets[self._ids], split)
        self._images = images

    def image(self, index: int) -> Image.Image:
        # 8×8 here; the writer upscales it (bilinear) to the configured size.
        return Image.fromarray(self._images[self._ids[index]]).convert("RGB")

    def meta(self, index: int) -> dict[str, int]:
        return {"sklearn_index": int(self._ids[index])}
