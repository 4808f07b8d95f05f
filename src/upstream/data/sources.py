"""``ShardConfig.source`` strings → :class:`Source` objects.

``digits``, ``fractals``, ``shapes``, ``clutter``, ``imagefolder:DIR``, ``captions:TABLE``,
``wds:SHARDS`` or ``torchvision:NAME``. Checking a string happens in three steps, each as
early as it can be: its syntax when the config is parsed (:func:`parse_source`), what needs
no data before any other work (:func:`check_source`: a torchvision name exists, a table or
local shards exist), and everything about the data itself when it is opened
(:func:`open_source`: columns, files, tar headers, classes), still before a single image is
written.
"""

from __future__ import annotations

from dataclasses import dataclass

from upstream.data.base import Source, subset
from upstream.errors import UpstreamError

SYNTHETIC = ("digits", "fractals", "shapes", "clutter")
#: Kinds made from ``num_classes`` × ``samples_per_class`` when opened, so that the plan does
#: not cut them again (it knows clutter by the source's ``generated`` attribute).
GENERATED = frozenset({"fractals", "shapes", "clutter"})
#: Each kind that takes an argument, and what the argument is called in messages.
WITH_ARGUMENT = {"imagefolder": "DIR", "captions": "TABLE", "wds": "SHARDS", "torchvision": "NAME"}
KINDS = SYNTHETIC + tuple(WITH_ARGUMENT)


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_source(text: str) -> SourceSpec:
    """The syntax of a source string (no file system or import): raises :class:`UpstreamError`."""
    kind, sep, arg = text.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        usage = ", ".join([*SYNTHETIC, *(f"{k}:{v}" for k, v in WITH_ARGUMENT.items())])
        raise UpstreamError(f"unknown source {text!r}: use one of {usage}")
    if kind in WITH_ARGUMENT and not arg.strip():
        what = WITH_ARGUMENT[kind]
        raise UpstreamError(f"source {kind} needs a {what}: {kind}:{what}")
    if kind in SYNTHETIC and sep:
        raise UpstreamError(f"source {kind} takes no argument (got {text!r})")
    return SourceSpec(kind, arg.strip())


def parse_sources(text: str) -> list[SourceSpec]:
    """A source string that may be a mixture (``fractals+shapes``): one spec per source."""
    parts = [p.strip() for p in text.split("+")]
    if any(not p for p in parts):
        raise UpstreamError(f"empty source in mixture {text!r} (sources are joined with '+')")
    return [parse_source(p) for p in parts]


def check_source(spec: SourceSpec) -> None:
    """The checks that need no data: a torchvision name exists; a caption table is a local
    .csv/.tsv/.parquet file that exists; local shards exist (no network, nothing read)."""
    if spec.kind == "torchvision":
        from upstream.data.tvdatasets import dataset_class

        dataset_class(spec.arg)
    elif spec.kind == "captions":
        from upstream.data.captions import check_table

        check_table(spec.arg)
    elif spec.kind == "wds":
        from upstream.data.wds import check_shards

        check_shards(spec.arg)


def open_source(
    spec: SourceSpec | str,
    split: str,
    *,
    num_classes: int = 0,
    samples_per_class: int = 0,
    image_size: int = 32,
    seed: int = 0,
    allow_outside_paths: bool = False,
) -> Source:
    """The samples the shard stage will write, validated (class counts, folders, ...).

    For synthetic sources ``num_classes`` and ``samples_per_class`` say how much to make
    (0 = the source's default); for fixed data they cut it down (0 = all).
    ``allow_outside_paths``: a caption table may name images outside its folder.
    """
    if isinstance(spec, str):
        spec = parse_source(spec)
    if split not in ("train", "test"):
        raise UpstreamError(f"unknown split {split!r} (train or test)")
    check_source(spec)
    if spec.kind == "fractals":
        from upstream.data.fractals import FractalSource

        return FractalSource(
            split,
            num_categories=num_classes,
            instances=samples_per_class,
            image_size=image_size,
            seed=seed,
        )
    if spec.kind in ("shapes", "clutter"):
        from upstream.data.clutter import ClutterSource
        from upstream.data.shapes import ShapeSource

        generator = {"shapes": ShapeSource, "clutter": ClutterSource}[spec.kind]
        return generator(
            split,
            num_classes=num_classes,
            instances=samples_per_class,
            image_size=image_size,
            seed=seed,
        )
    base: Source
    if spec.kind == "digits":
        from upstream.data.digits import DigitsSource

        base = DigitsSource(split)
    elif spec.kind == "imagefolder":
        from upstream.data.imagefolder import ImageFolderSource

        base = ImageFolderSource(spec.arg, split)
    elif spec.kind == "captions":
        from upstream.data.captions import CaptionTableSource

        base = CaptionTableSource(spec.arg, split, allow_outside=allow_outside_paths)
    elif spec.kind == "wds":
        from upstream.data.wds import WebDatasetSource

        base = WebDatasetSource(spec.arg, split)
    else:
        from upstream.data.tvdatasets import TorchvisionSource, open_dataset

        base = TorchvisionSource(open_dataset(spec.arg, split), spec.arg, split)
    return subset(
        base,
        num_classes=num_classes,
        samples_per_class=samples_per_class,
        seed=seed,
        what=str(spec),
    )
