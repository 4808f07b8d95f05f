"""A folder of images with ``torchvision.datasets.ImageFolder`` semantics.

``DIR/<class>/**/<image>``: classes are the sub-folder names in sorted order, images are the
files with an image extension under each, in sorted order. If ``DIR`` has a sub-folder named
after the split (``DIR/train``, ``DIR/test``), that sub-folder is the root of the split.
``raw`` gives jpg, png and webp files byte for byte; other formats are decoded by the writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from upstream.data.base import Source, decode_file, raw_file
from upstream.errors import UpstreamError

#: torchvision's ``IMG_EXTENSIONS``.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def split_root(folder: str, split: str) -> Path:
    root = Path(folder).expanduser()
    if not root.exists():
        raise UpstreamError(f"imagefolder: {folder} does not exist")
    if not root.is_dir():
        raise UpstreamError(f"imagefolder: {folder} is not a folder")
    if (root / split).is_dir():
        return root / split
    others = [s for s in ("train", "test") if s != split and (root / s).is_dir()]
    if others:
        raise UpstreamError(f"imagefolder: {folder} has a {others[0]}/ folder but no {split}/")
    return root


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UpstreamError(f"imagefolder: {root} has no class sub-folders")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found.extend(
                Path(dirpath, f)
                for f in sorted(filenames)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
            )
        if not found:
            raise UpstreamError(f"imagefolder: class folder {root / name} has no images")
        items.extend((p, label) for p in found)
    return classes, items


class ImageFolderSource(Source):
    kind = "imagefolder"

    def __init__(self, folder: str, split: str) -> None:
        self.root = split_root(folder, split)
        classes, self.items = find_images(self.root)
        super().__init__(classes, [label for _, label in self.items], split)

    def image(self, index: int) -> Image.Image:
        return decode_file(self.items[index][0])

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return raw_file(self.items[index][0])

    def meta(self, index: int) -> dict[str, Any]:
        return {"file": self.items[index][0].relative_to(self.root).as_posix()}
