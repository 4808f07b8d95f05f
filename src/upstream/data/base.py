"""What every source gives the shard writer: labelled RGB images with random access.

A source knows its samples (a label per index) before producing any image, so the writer can
subset and shuffle indices first and render or decode one image at a time afterwards.
"""

from __future__ import annotations

import abc
import os
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from upstream import imagebounds
from upstream.errors import UpstreamError

#: ``SPLIT_IDS[split]`` feeds the seeds of synthetic sources, so splits never share instances.
SPLIT_IDS = {"train": 0, "test": 1}


def seed_words(*parts: int | str) -> list[int]:
    """Entropy for ``np.random.default_rng``: strings hashed, ints made non-negative."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(zlib.crc32(p.encode()))
        else:
            out.append(int(p) % (2**63))
    return out


class BadImage(UpstreamError):
    """An image that cannot be read or decoded: the shard stage skips or fails by policy."""


#: Image file extensions (lower case) → the shard key a byte-for-byte copy is stored under.
#: Only these formats are copied as they are: every WebDataset reader (open_clip's included)
#: decodes them; images in other formats (bmp, tiff, ...) are decoded and re-encoded.
RAW_KEYS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}


def raw_key(ext_or_name: str) -> str | None:
    """The shard key for copying a file with this extension (or name) as is, else None."""
    ext = ext_or_name.rsplit(".", 1)[-1].lower()
    return RAW_KEYS.get(ext)


#: An object's default repr (``<_io.BytesIO object at 0x7f…>``), which PIL puts in messages.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*? at 0x[0-9a-fA-F]+>")


def describe_error(e: BaseException) -> str:
    """``Type: message`` without memory addresses, so that the same bad image gets the same
    reason in every run (the reason is written into the manifest)."""
    return f"{type(e).__name__}: {_OBJECT_REPR.sub('', str(e))}".rstrip(": ")


def decode(data: bytes, where: str) -> Image.Image:
    """``data`` decoded as an RGB image; :class:`BadImage` naming ``where`` if it is not one,
    or if its header promises more than :data:`upstream.imagebounds.MAX_PIXELS` pixels
    (checked before decoding)."""
    try:
        with imagebounds.open_image(data) as img:
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        raise BadImage(f"cannot read image {where}: {describe_error(e)}") from None


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file; :class:`BadImage` naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"cannot read image {path}: {e.strerror or e}") from None


def decode_file(path: str | os.PathLike[str]) -> Image.Image:
    return decode(read_file(path), str(path))


def raw_file(path: str | os.PathLike[str]) -> tuple[bytes, str] | None:
    """``(bytes, shard key)`` of an image file in a format shards carry as is, else None."""
    key = raw_key(os.fspath(path))
    return None if key is None else (read_file(path), key)


class Source(abc.ABC):
    """Labelled images: ``labels[i]`` is known up front, ``image(i)`` makes the picture."""

    #: Short name recorded in each sample's metadata.
    kind: str = ""
    #: A caption template that reads better for this source than the generic default.
    caption_template: str | None = None
    #: False for unlabelled data (a caption table without labels): every label is 0 and
    #: interventions that need classes refuse it.
    has_labels: bool = True
    #: Samples the source holds but cannot offer, found when it was opened (a WebDataset
    #: sample with no image member), each described in a few words: the shard stage counts
    #: and lists them among the skipped, since they never get an index here.
    without_image: Sequence[str] = ()

    def __init__(self, class_names: Sequence[str], labels: Sequence[int], split: str) -> None:
        self.class_names = list(class_names)
        self.labels = [int(v) for v in labels]
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index`` (any size: the writer resizes)."""

    def meta(self, index: int) -> dict[str, Any]:
        """Source-specific facts about sample ``index`` for its metadata (e.g. a file name)."""
        return {}

    def caption(self, index: int) -> str | None:
        """The source's own caption of sample ``index`` (cheap, no image read), if it has one."""
        return None

    def raw(self, index: int) -> tuple[bytes, str] | None:
        """The encoded image file of sample ``index`` and its extension (jpg, png, webp), for
        copying byte for byte; None when the image is not a file (rendered, decoded arrays)."""
        return None

    def sample(self, index: int) -> tuple[Image.Image, int, dict[str, Any]]:
        """``(image, label, meta)`` for sample ``index``."""
        meta = {
            "source": self.kind,
            "split": self.split,
            "index": index,
            "class_name": self.class_names[self.labels[index]],
            **self.meta(index),
        }
        return self.image(index), self.labels[index], meta


class GeneratedSource(Source):
    """The first ``num_classes`` of a generator's :attr:`names` × ``instances`` images each.

    Each image is drawn from its own seed (:attr:`seed_tag`, split, seed, class, instance),
    so the splits never share an image and the same seed makes the same images. ``generated``:
    made at exactly num_classes × samples_per_class, so the plan does not cut it again.
    """

    #: The class names in order; ``num_classes`` takes the first ones.
    names: Sequence[str] = ()
    default_instances: int = 100
    #: The first word of every image's seed: changing it changes every image.
    seed_tag: str = ""
    generated = True

    def __init__(
        self, split: str, *, num_classes: int, instances: int, image_size: int, seed: int
    ) -> None:
        if num_classes > len(self.names):
            raise UpstreamError(
                f"{self.kind} has {len(self.names)} classes; num_classes={num_classes} asks "
                "for more"
            )
        chosen = list(self.names[: num_classes or len(self.names)])
        instances = instances or self.default_instances
        super().__init__(chosen, np.repeat(np.arange(len(chosen)), instances), split)
        self.instances = instances
        self.image_size = image_size
        self.seed = seed

    @abc.abstractmethod
    def draw(self, name: str, rng: np.random.Generator) -> Image.Image:
        """One image of class ``name`` at :attr:`image_size`, every random choice from ``rng``."""

    def image(self, index: int) -> Image.Image:
        label, instance = divmod(index, self.instances)
        rng = np.random.default_rng(
            seed_words(self.seed_tag, SPLIT_IDS[self.split], self.seed, label, instance)
        )
        return self.draw(self.class_names[label], rng)

    def meta(self, index: int) -> dict[str, int]:
        return {"instance": index % self.instances}


def select(
    labels: Sequence[int],
    num_classes_available: int,
    *,
    num_classes: int,
    samples_per_class: int,
    seed: int,
    what: str,
) -> tuple[list[int], list[int]]:
    """Which samples of a fixed dataset to keep: ``(kept indices, kept classes)``.

    The first ``num_classes`` classes (not a seeded choice, so that the train and test shards
    of a source always agree on the classes), then a seeded choice of at most
    ``samples_per_class`` samples of each, kept in source order.
    """
    if num_classes > num_classes_available:
        raise UpstreamError(
            f"{what} has {num_classes_available} classes; num_classes={num_classes} asks for more"
        )
    classes = list(range(num_classes or num_classes_available))
    labels_arr = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed_words("select", seed))
    kept: list[int] = []
    for c in classes:
        members = np.flatnonzero(labels_arr == c)
        if samples_per_class and len(members) > samples_per_class:
            members = np.sort(rng.choice(members, size=samples_per_class, replace=False))
        kept.extend(int(i) for i in members)
    return sorted(kept), classes


class Subset(Source):
    """Some samples of another source, relabelled to ``0..len(classes)-1``."""

    def __init__(self, base: Source, indices: Sequence[int], classes: Sequence[int]) -> None:
        remap = {c: i for i, c in enumerate(classes)}
        super().__init__(
            [base.class_names[c] for c in classes],
            [remap[base.labels[i]] for i in indices],
            base.split,
        )
        self.base = base
        self.indices = list(indices)
        self.kind = base.kind
        self.caption_template = base.caption_template
        self.has_labels = base.has_labels
        self.without_image = base.without_image

    def image(self, index: int) -> Image.Image:
        return self.base.image(self.indices[index])

    def caption(self, index: int) -> str | None:
        return self.base.caption(self.indices[index])

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return self.base.raw(self.indices[index])

    def meta(self, index: int) -> dict[str, Any]:
        # The base source's index, so that a sample is recognisable across subsets.
        return {**self.base.meta(self.indices[index]), "index": self.indices[index]}

    def sample(self, index: int) -> tuple[Image.Image, int, dict[str, Any]]:
        img, _, meta = self.base.sample(self.indices[index])
        return img, self.labels[index], meta


def subset(
    base: Source, *, num_classes: int, samples_per_class: int, seed: int, what: str
) -> Source:
    """``base`` cut down to the first ``num_classes`` classes and ``samples_per_class`` each."""
    if not num_classes and not samples_per_class:
        return base
    indices, classes = select(
        base.labels,
        len(base.class_names),
        num_classes=num_classes,
        samples_per_class=samples_per_class,
        seed=seed,
        what=what,
    )
    return Subset(base, indices, classes)


def fit(img: Image.Image, size: int) -> Image.Image:
    """``img`` as a ``size``×``size`` RGB image: shorter side resized, then centre-cropped."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
