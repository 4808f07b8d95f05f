"""The k-shot training sample and the validation split of one (k, seed).

Decision, for every k including k = 1: the training sample is ``k`` examples per class drawn
with the seed (:func:`upstream.shards.loader.kshot_indices`, the same lists the shard stage stores
beside a manifest), and the validation split is ``val_per_class`` *other* examples per class of
the same training data, drawn with the same seed. Learning rates and the probe's C are chosen
on it; no test set is ever looked at. So at k = 1 a model trains on one image per class and is
selected on ``val_per_class`` others: selection uses more labelled images than training does,
as in Kumar et al. (a held-out ID validation split) and Entezari et al. (a validation split of
the downstream training set), rather than cross-validating within the k shots, which one shot
per class cannot do. The split is the same for every mode, tower and pre-training source at a
given (k, seed), so their comparisons are paired. At k = 0 (all), training takes every example
that is not in the validation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from upstream.errors import UpstreamError


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # positions in the data set, sorted
    val: np.ndarray


def smallest_class(counts: dict[str, int]) -> tuple[str, int]:
    return min(counts.items(), key=lambda kv: kv[1])


def check_sizes(counts: dict[str, int], shots: Sequence[int], val_per_class: int,
                data: str) -> None:
    """Raise when a k (plus the validation examples) exceeds the smallest class."""
    if not counts:
        return
    name, n = smallest_class(counts)
    for k in shots:
        need = k + val_per_class if k else val_per_class + 1
        if need > n:
            what = f"k={k} shots" if k else "full-shot training"
            raise UpstreamError(
                f"finetune: {what} + {val_per_class} validation examples per class need "
                f"{need} images of each class, but class {name!r} of {data} has only {n}"
            )


def draw(labels: np.ndarray, k: int, seed: int, val_per_class: int,
         stored_train: Sequence[int] | None = None) -> Split:
    """The split of one (k, seed); ``stored_train``: the shard stage's stored k-shot list."""
    from upstream.shards.loader import kshot_indices

    labels = np.asarray(labels, dtype=np.int64)
    if k and stored_train is not None:
        train = np.asarray(sorted(int(i) for i in stored_train), dtype=np.int64)
    elif k:
        train = np.asarray(kshot_indices(labels, k, seed), dtype=np.int64)
    else:
        train = np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed) % 2**63, k, 0x7A1])  # not the k-shot draw's stream
    taken = np.zeros(len(labels), dtype=bool)
    taken[train] = True
    val: list[int] = []
    for c in np.unique(labels):
        rest = np.flatnonzero((labels == c) & ~taken)
        if val_per_class > len(rest):
            raise UpstreamError(f"finetune: class {int(c)} has {len(rest)} images left for "
                                f"{val_per_class} validation examples")
        val.extend(int(i) for i in rng.choice(rest, size=val_per_class, replace=False))
    val_arr = np.asarray(sorted(val), dtype=np.int64)
    if not k:
        keep = np.ones(len(labels), dtype=bool)
        keep[val_arr] = False
        train = np.flatnonzero(keep)
    return Split(train=train, val=val_arr)
