"""Ramanujan et al.'s interventions on pre-training data, as a plan of which samples to write.

INTERFACE STUB: the helper that owns this module replaces the bodies; the signatures are fixed.

A :class:`Plan` is decided from labels and captions alone (plus image hashes when
de-duplicating), before any image is encoded, so that every bad value fails before compute
and the manifest records exactly what each step kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from upstream.data.base import Source
from upstream.errors import UpstreamError

#: ``(source number in the mixture, index in that source)``
ItemRef = tuple[int, int]


@dataclass(frozen=True)
class Interventions:
    num_samples: int = 0
    classes: str = ""
    hierarchy: str = ""
    label_level: str = "fine"
    proportions: str = ""
    samples_per_class: int = 0
    num_classes: int = 0
    dedup: str = "none"
    dedup_distance: int = 4
    caption_require: str = ""
    caption_exclude: str = ""
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any) -> Interventions:
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(config, n) for n in names})

    def check(self, num_sources: int) -> None:
        """Syntax checks needing no data (proportions count and sum, ...): UpstreamError."""
        if self.proportions:
            try:
                values = [float(p) for p in self.proportions.split(",") if p.strip()]
            except ValueError:
                raise UpstreamError(
                    f"proportions must be numbers (got {self.proportions!r})"
                ) from None
            if len(values) != num_sources:
                raise UpstreamError(
                    f"proportions has {len(values)} values for {num_sources} source(s)"
                )
            if abs(sum(values) - 1.0) > 1e-6:
                raise UpstreamError(f"proportions must sum to 1 (got {sum(values):g})")


@dataclass
class Plan:
    """Which samples to write, with their final labels, and what each step did."""

    #: ``(source number, index in source, final label)`` in a canonical (unshuffled) order
    items: list[tuple[int, int, int]]
    class_names: list[str]
    #: for the manifest's ``interventions`` section: steps applied, counts in and out
    record: dict[str, Any] = field(default_factory=dict)
    #: ``(source number, index)`` of images found unreadable while hashing
    unreadable: list[ItemRef] = field(default_factory=list)


def plan(
    sources: Sequence[Source],
    iv: Interventions,
    *,
    caption_of: Callable[[int, int], str],
    hashes_of: Callable[[list[ItemRef], str], list[int | None]] | None = None,
) -> Plan:
    """The plan for ``sources`` (one, or a mixture) under ``iv``.

    ``caption_of(source number, index)`` gives the caption a sample will get (for caption
    filters); ``hashes_of(refs, mode)`` gives each image's hash (``mode`` exact: a content hash
    as int; near: 64-bit pHash), None for an unreadable image; computed by the caller in
    parallel.
    """
    items: list[tuple[int, int, int]] = []
    names: list[str] = []
    for s, src in enumerate(sources):
        offset = len(names)
        names.extend(src.class_names)
        items.extend((s, i, offset + label) for i, label in enumerate(src.labels))
    return Plan(items, names, {"steps": []})
