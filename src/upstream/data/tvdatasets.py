"""A torchvision dataset (``torchvision:NAME``), downloaded under ``$UPSTREAM_HOME/torchvision``.

The seeds' downstream sets have their splits in :data:`SPLITS` (decisions where torchvision
offers more than train and test):

- CIFAR10, CIFAR100: ``train=True`` / ``train=False``.
- DTD: train = partition 1's train + val (3,760 images, 80 per class), test = its test. The
  usual protocol fits on train+val once the hyper-parameters are chosen; upstream's fine-tune
  stage draws its own validation from the train split when it needs one.
- OxfordIIITPet: ``trainval`` / ``test``, category labels (37 breeds).
- Flowers102: train = train + val (2,040 images, 20 per class), test = test (6,149); as DTD.
- STL10: ``train`` (5,000 labelled) / ``test``; the unlabelled split is not offered.
- Caltech101 (no split of its own; category labels, 101 classes, no background class): per
  class, 30 images drawn with a fixed seed (not the config's: the split must never move) are
  train and the rest test, the common protocol; a class of 30 or fewer keeps one for test.

Any other dataset class with a ``train`` flag or a ``split`` argument is opened as it is.
Labels are read from the dataset's label list (``targets``, ``labels``, ``_labels``, ``y``)
without decoding images; datasets that keep image files (``_image_files``, ``_images``,
``samples``, Caltech101's folders) give them byte for byte through ``raw``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from upstream.data.base import Source, decode_file, raw_file, seed_words
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

#: Caltech101's train images per class.
CALTECH_TRAIN_PER_CLASS = 30


@dataclass(frozen=True)
class SplitRule:
    """How a split is made: the constructor kwargs of each part (joined in order), and for
    sets without a split of their own, the images per class that go to train."""

    train: tuple[dict[str, Any], ...]
    test: tuple[dict[str, Any], ...]
    train_per_class: int = 0


_TRAIN_FLAG = SplitRule(({"train": True},), ({"train": False},))
SPLITS: dict[str, SplitRule] = {
    "CIFAR10": _TRAIN_FLAG,
    "CIFAR100": _TRAIN_FLAG,
    "DTD": SplitRule(
        ({"split": "train", "partition": 1}, {"split": "val", "partition": 1}),
        ({"split": "test", "partition": 1},),
    ),
    "OxfordIIITPet": SplitRule(
        ({"split": "trainval", "target_types": "category"},),
        ({"split": "test", "target_types": "category"},),
    ),
    "Flowers102": SplitRule(({"split": "train"}, {"split": "val"}), ({"split": "test"},)),
    "STL10": SplitRule(({"split": "train"},), ({"split": "test"},)),
    "Caltech101": SplitRule(
        ({"target_type": "category"},),
        ({"target_type": "category"},),
        train_per_class=CALTECH_TRAIN_PER_CLASS,
    ),
}


def dataset_class(name: str) -> type:
    """The torchvision dataset class called ``name``; fails fast on any other name."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)):
        known = ", ".join(SPLITS)
        raise UpstreamError(
            f"unknown torchvision dataset {name!r} (a class in torchvision.datasets, e.g. {known})"
        )
    if name in SPLITS:
        return cls
    params = inspect.signature(cls).parameters
    if "train" not in params and "split" not in params:
        raise UpstreamError(f"torchvision dataset {name} has no train/test split to choose from")
    return cls


def split_rule(name: str) -> SplitRule:
    """The split table's entry for ``name``, or the generic one from its signature."""
    if name in SPLITS:
        return SPLITS[name]
    params = inspect.signature(dataset_class(name)).parameters
    if "train" in params:
        return _TRAIN_FLAG
    return SplitRule(({"split": "train"},), ({"split": "test"},))


def labels_of(dataset: Any) -> list[int] | None:
    """The dataset's label list if it keeps one (no image decoded), else None."""
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            return np.asarray(value).astype(np.int64).reshape(-1).tolist()
    return None


def _paths(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, (str, os.PathLike)) for v in value)
    )


def files_of(dataset: Any) -> list[Path] | None:
    """The image file of each item, for datasets that read images from files."""
    for attr in ("_image_files", "_images"):
        value = getattr(dataset, attr, None)
        if _paths(value, len(dataset)):
            return [Path(v) for v in value]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and all(isinstance(s, tuple) and s for s in samples):
        value = [s[0] for s in samples]
        if _paths(value, len(dataset)):
            return [Path(v) for v in value]
    categories, index, y = (getattr(dataset, a, None) for a in ("categories", "index", "y"))
    if type(dataset).__name__ == "Caltech101" and categories and index and y:
        root = Path(dataset.root, "101_ObjectCategories")
        return [root / categories[c] / f"image_{i:04d}.jpg" for c, i in zip(y, index, strict=True)]
    return None


def class_names_of(dataset: Any, labels: Sequence[int]) -> list[str]:
    for attr in ("classes", "categories"):
        names = getattr(dataset, attr, None)
        if names and len(names) > max(labels):
            return [str(c) for c in names]
    return [str(c) for c in range(max(labels) + 1)]


class Joined:
    """Several dataset objects as one (torchvision's train + val as one split), kept to
    ``keep`` (positions in the joined order) when given."""

    def __init__(self, parts: Sequence[Any], keep: Sequence[int] | None = None) -> None:
        self.parts = list(parts)
        self.refs = [(p, i) for p, part in enumerate(self.parts) for i in range(len(part))]
        labels = [labels_of(part) for part in self.parts]
        files = [files_of(part) for part in self.parts]
        self.labels = None if any(v is None for v in labels) else [x for v in labels for x in v]
        self.files = None if any(v is None for v in files) else [x for v in files for x in v]
        if keep is not None:
            self.refs = [self.refs[i] for i in keep]
            if self.labels is not None:
                self.labels = [self.labels[i] for i in keep]
            if self.files is not None:
                self.files = [self.files[i] for i in keep]
        first = self.parts[0]
        self.classes = getattr(first, "classes", None) or getattr(first, "categories", None)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Any:
        p, i = self.refs[index]
        return self.parts[p][i]


def hold_out(
    labels: Sequence[int], classes: Sequence[str], name: str, per_class: int
) -> dict[str, list[int]]:
    """Per class, ``per_class`` positions for train (at most all but one) and the rest for
    test, drawn with a seed made from the dataset's and the class's names alone."""
    arr = np.asarray(labels, dtype=np.int64)
    out: dict[str, list[int]] = {"train": [], "test": []}
    for c in sorted(set(arr.tolist())):
        members = np.flatnonzero(arr == c)
        rng = np.random.default_rng(seed_words("torchvision-split", name, classes[c]))
        order = rng.permutation(members)
        n_train = min(per_class, max(len(members) - 1, 0))
        out["train"].extend(int(i) for i in order[:n_train])
        out["test"].extend(int(i) for i in order[n_train:])
    return {k: sorted(v) for k, v in out.items()}


def open_dataset(name: str, split: str) -> Any:
    """The dataset object(s) of ``name``'s ``split``, downloading on first use."""
    from upstream.tracking import home

    cls = dataset_class(name)
    rule = split_rule(name)
    params = inspect.signature(cls).parameters
    base: dict[str, Any] = {"root": str(home() / "torchvision" / name)}
    if "download" in params:
        base["download"] = True
    parts = []
    for kwargs in rule.train if split == "train" else rule.test:
        log.info("opening torchvision %s (%s) under %s", name, kwargs, base["root"])
        try:
            parts.append(cls(**base, **kwargs))
        except (RuntimeError, ValueError, OSError) as e:
            raise UpstreamError(
                f"torchvision dataset {name} ({split}) is unavailable: {e}"
            ) from None
    if not rule.train_per_class:
        return parts[0] if len(parts) == 1 else Joined(parts)
    whole = Joined(parts)
    labels = whole.labels if whole.labels is not None else _read_labels(whole, name)
    classes = class_names_of(whole, labels)
    keep = hold_out(labels, classes, name, rule.train_per_class)[split]
    return Joined(parts, keep)


def _read_labels(dataset: Any, name: str) -> list[int]:
    # No label list: reading every item is slow (it decodes the images) but correct.
    log.warning("torchvision %s lists no labels; reading every item for them", name)
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    import torch
    from torchvision.transforms.functional import to_pil_image

    if isinstance(img, torch.Tensor):
        return to_pil_image(img).convert("RGB")
    return Image.fromarray(np.asarray(img)).convert("RGB")


class TorchvisionSource(Source):
    """Wraps a torchvision dataset object (or a :class:`Joined` one) of ``(image, label)``."""

    kind = "torchvision"

    def __init__(self, dataset: Any, name: str, split: str) -> None:
        labels = dataset.labels if isinstance(dataset, Joined) else labels_of(dataset)
        if labels is None:
            labels = _read_labels(dataset, name)
        if not labels:
            raise UpstreamError(f"torchvision dataset {name} ({split}) is empty")
        super().__init__(class_names_of(dataset, labels), labels, split)
        self.dataset = dataset
        self.name = name
        self.files = dataset.files if isinstance(dataset, Joined) else files_of(dataset)

    def image(self, index: int) -> Image.Image:
        if self.files is not None:
            return decode_file(self.files[index])
        return _to_pil(self.dataset[index][0])

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return None if self.files is None else raw_file(self.files[index])

    def meta(self, index: int) -> dict[str, str]:
        if self.files is None:
            return {"dataset": self.name}
        return {"dataset": self.name, "file": self.files[index].name}
