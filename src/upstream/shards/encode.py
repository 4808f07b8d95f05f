"""What each image becomes in a shard: resize, corruption, encoding, caption and metadata.

:class:`EncodeJob` turns a position of the written order into a sample's bytes; worker
processes run it (:mod:`upstream.shards.workerpool`), the shard writer numbers and stores the
results. A position's sample depends on nothing but the position, so the shards are the same
bytes whatever the number of workers.

Decisions where the issue is silent:

- ``resize=keep`` without corruption copies a source's file (:meth:`Source.raw`) as it is,
  under its own key (jpg, png or webp); the copy is still decoded once, so that no reader ever
  meets an image it cannot decode, but never re-encoded.
- ``max_side`` only shrinks; ``square`` scales the shorter side to the size and centre-crops
  (the foundation's :func:`upstream.data.fit`); both resample bilinearly.
- An unreadable image is one whose source raises :class:`BadImage` or whose decoding raises
  what PIL raises for bad data (``OSError``, ``SyntaxError``, ``ValueError``, ``EOFError``, a
  decompression bomb), or whose header promises more than
  :data:`upstream.imagebounds.MAX_PIXELS` (a ``ValueError``, raised before decoding: the
  readers refuse such images in a set); any other exception is a bug and stops the stage.
- A sample's metadata is the source's (kind, split, index, its own facts) with the final class
  name; a mixture adds ``source_no``, a relabelled sample its ``source_class_name``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image

from upstream import imagebounds
from upstream.data import Source, corrupt, fit
from upstream.data.base import BadImage, describe_error
from upstream.shards import tars
from upstream.shards.captioning import Captioner

#: Extensions a copied file may keep as its shard key: every WebDataset reader decodes them.
RAW_KEYS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
#: Errors that mean "this image cannot be decoded" (see the module's notes).
DECODE_ERRORS = (BadImage, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
#: Longest reason kept for a skipped image.
MAX_REASON = 300


@dataclass(frozen=True)
class Encoding:
    """How every image is turned into bytes (the decisive image settings of a config)."""

    resize: str
    image_size: int
    image_format: str
    jpeg_quality: int
    corruption: str
    severity: int
    seed: int

    @property
    def copies_files(self) -> bool:
        return self.resize == "keep" and self.corruption == "none"


def resize_image(img: Image.Image, mode: str, size: int) -> Image.Image:
    """``img`` (RGB) resized by ``mode``: square, max_side or keep (see the module's notes)."""
    if mode == "square":
        return fit(img, size)
    img = img.convert("RGB")
    if mode == "keep":
        return img
    w, h = img.size
    if max(w, h) <= size:
        return img
    scale = size / max(w, h)
    return img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )


def encode_image(img: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def check_decodes(data: bytes) -> None:
    """Raise one of :data:`DECODE_ERRORS` unless ``data`` decodes as a whole image within
    :data:`upstream.imagebounds.MAX_PIXELS` (checked from its header, before decoding): the
    ceiling the readers of ``keep`` sets hold it to."""
    with imagebounds.open_image(data) as img:
        img.load()


class Encoded(NamedTuple):
    position: int
    label: int
    image_key: str
    image: bytes
    txt: bytes
    json: bytes
    #: the sample's tar members with a placeholder key, when the job has a ``key_width``
    #: (then ``image``, ``txt`` and ``json`` are empty: the bytes travel once, in here)
    template: tars.SampleTemplate | None = None

    def members(self, key: str) -> bytes:
        """The sample's members in the tar under ``key``."""
        if self.template is not None:
            return tars.with_key(self.template, key)
        return tars.encode_sample(
            {"__key__": key, self.image_key: self.image, "cls": str(self.label).encode(),
             "txt": self.txt, "json": self.json}
        )

    def image_bytes(self) -> bytes:
        if self.template is None:
            return self.image
        # The image is the first member with that extension; its data follows its header.
        for offset, _ in self.template.headers:
            head = self.template.data[offset : offset + tars.BLOCK]
            if head.split(b"\0", 1)[0].endswith(b"." + self.image_key.encode()):
                size = int(head[124:135], 8)
                start = offset + tars.BLOCK
                return self.template.data[start : start + size]
        raise AssertionError("a template without its image")


class Unreadable(NamedTuple):
    position: int
    source_no: int
    index: int
    reason: str


@dataclass
class EncodeJob:
    """Everything a worker needs, inherited by fork (or pickled once per worker by spawn)."""

    sources: list[Source]
    #: ``(source number, index, final label)`` in written order
    sequence: list[tuple[int, int, int]]
    class_names: list[str]
    captioner: Captioner
    encoding: Encoding
    #: Add the source number to the metadata (mixtures only, so single sources keep theirs).
    mixture: bool = False
    #: Digits of the sample keys: the workers then make the tar members themselves, with a
    #: placeholder key that the writer patches (0: the writer makes them).
    key_width: int = 0

    def encode(self, position: int) -> Encoded | Unreadable:
        s, i, label = self.sequence[position]
        src = self.sources[s]
        enc = self.encoding
        meta: dict[str, Any] = {
            "source": src.kind,
            "split": src.split,
            "index": i,
            "class_name": self.class_names[label],
        }
        try:
            meta.update(src.meta(i))
            copied = src.raw(i) if enc.copies_files else None
            key = RAW_KEYS.get(copied[1].lower().lstrip(".")) if copied else None
            img = None
            if copied is not None and key is not None:
                check_decodes(copied[0])
                data, used = copied[0], "none"
            else:
                img = src.image(i)
                img.load()
        except DECODE_ERRORS as e:
            # PIL's own messages name a BytesIO, not the image: say which file or key it was.
            where = meta.get("file") or meta.get("key")
            detail = str(e) if isinstance(e, BadImage) else describe_error(e)
            if where and not isinstance(e, BadImage):
                detail = f"{where}: {detail}"
            reason = " ".join(detail.split())[:MAX_REASON]
            return Unreadable(position, s, i, reason)
        if img is not None:
            img = resize_image(img, enc.resize, enc.image_size)
            # Keyed by the source's own index: the same image gets the same corruption in
            # every subset of its source.
            img, used = corrupt(img, enc.corruption, enc.severity, enc.seed, meta["index"])
            key = enc.image_format
            data = encode_image(img, enc.image_format, enc.jpeg_quality)
        meta.update(corruption=used, severity=enc.severity if used != "none" else 0)
        if self.mixture:
            meta["source_no"] = s
        source_class = src.class_names[src.labels[i]]
        if source_class != meta["class_name"]:
            meta["source_class_name"] = source_class
        assert key is not None
        txt = self.captioner.caption(s, i).encode()
        meta_json = json.dumps(meta, sort_keys=True).encode()
        if self.key_width:
            template = tars.sample_template(
                self.key_width,
                {key: data, "cls": str(label).encode(), "txt": txt, "json": meta_json},
            )
            if template is not None:
                return Encoded(position, label, key, b"", b"", b"", template)
        return Encoded(position, label, key, data, txt, meta_json)

    def encode_span(self, span: tuple[int, int]) -> list[Encoded | Unreadable]:
        return [self.encode(p) for p in range(*span)]
