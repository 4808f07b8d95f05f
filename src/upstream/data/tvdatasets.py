"""A torchvision dataset (``torchvision:NAME``), downloaded under ``$UPSTREAM_HOME/torchvision``."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
from PIL import Image

from upstream.data.base import Source
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)


def dataset_class(name: str) -> type:
    """The torchvision dataset class called ``name``; fails fast on any other name."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)):
        raise UpstreamError(
            f"unknown torchvision dataset {name!r} (a class in torchvision.datasets, "
            "e.g. CIFAR10, MNIST, SVHN)"
        )
    params = inspect.signature(cls).parameters
    if "train" not in params and "split" not in params:
        raise UpstreamError(f"torchvision dataset {name} has no train/test split to choose from")
    return cls


def open_dataset(name: str, split: str) -> Any:
    from upstream.tracking import home

    cls = dataset_class(name)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"root": str(home() / "torchvision" / name)}
    if "download" in params:
        kwargs["download"] = True
    if "train" in params:
        kwargs["train"] = split == "train"
    else:
        kwargs["split"] = split
    log.info("opening torchvision %s (%s) under %s", name, split, kwargs["root"])
    try:
        return cls(**kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        raise UpstreamError(f"torchvision dataset {name} ({split}) is unavailable: {e}") from None


def _to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    import torch
    from torchvision.transforms.functional import to_pil_image

    if isinstance(img, torch.Tensor):
        return to_pil_image(img).convert("RGB")
    return Image.fromarray(np.asarray(img)).convert("RGB")


class TorchvisionSource(Source):
    """Wraps a torchvision dataset object whose items are ``(image, int label)``."""

    kind = "torchvision"

    def __init__(self, dataset: Any, name: str, split: str) -> None:
        labels = None
        for attr in ("targets", "labels", "_labels"):
            value = getattr(dataset, attr, None)
            if value is not None and len(value) == len(dataset):
                labels = [int(v) for v in value]
                break
        if labels is None:
            # No label list: reading every item is slow (it decodes the images) but correct.
            log.warning("torchvision %s lists no labels; reading every item for them", name)
            labels = [int(dataset[i][1]) for i in range(len(dataset))]
        if not labels:
            raise UpstreamError(f"torchvision dataset {name} ({split}) is empty")
        classes = getattr(dataset, "classes", None)
        if not classes or len(classes) <= max(labels):
            classes = [str(c) for c in range(max(labels) + 1)]
        super().__init__([str(c) for c in classes], labels, split)
        self.dataset = dataset
        self.name = name

    def image(self, index: int) -> Image.Image:
        return _to_pil(self.dataset[index][0])

    def meta(self, index: int) -> dict[str, str]:
        return {"dataset": self.name}
