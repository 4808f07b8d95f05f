"""Ramanujan et al.'s interventions on pre-training data, as a plan of which samples to write.

A :class:`Plan` is decided from labels and captions alone (plus image hashes when
de-duplicating), before any image is encoded, so that every bad value fails before compute
and the manifest records exactly what each step kept. Steps, in order:

1. class selection: ``num_classes`` (each source's first K classes), then ``classes`` (names,
   or ``group:NAME`` for every class the hierarchy puts in superclass NAME);
2. label granularity: ``label_level=coarse`` relabels classes to their superclasses;
3. caption filter: ``caption_require`` / ``caption_exclude`` (whole words, any case);
4. de-duplication: ``dedup`` exact or near, across the whole mixture, first in source order
   kept (the only step that reads images: ``hashes_of``);
5. size: ``samples_per_class`` per source and class, then ``num_samples`` class-balanced
   (split across a mixture's sources by ``proportions`` when given).

Decisions where the issue is silent:

- Generated sources (fractals, shapes) were already made with ``num_classes`` categories and
  ``samples_per_class`` instances each, so those two steps skip them; for every other source
  they cut the data here (``num_classes`` above a source's class count is an error).
- A mixture's classes merge by name. Fine labels keep the sources' class order (first
  appearance, source by source); coarse labels are the superclasses sorted by name (for
  CIFAR-100 that is the dataset's own coarse order). The label space is fixed by steps 1-2:
  a class emptied later (captions, duplicates) keeps its label with a count of 0.
- ``num_samples`` is water-filled: every class gets ``N // C`` or one more, a class with fewer
  gets all it has and the rest is spread over the others. The extra ones go to the classes in
  label order, not a seeded order, so class counts depend on the config but not on the seed.
- Which images a size step keeps: each sample has a seeded random key (from the seed, source
  number and index, not from the other samples), and a class keeps its smallest keys. So the
  samples at N are a subset of those at a larger N (same seed), and removing one sample in
  an earlier step does not reshuffle the choice of the others.
- ``proportions`` with ``num_samples`` N give source s ``N * p_s`` rounded by largest
  remainder (ties to the earlier source) so the total is exactly N; without N, the largest N
  all sources can give at those proportions.
- Unlabelled sources (``has_labels`` False): class-based steps skip them in a mixture and are
  an error when no source has labels; ``num_samples`` over a mixture that includes one needs
  ``proportions`` (balancing "unlabeled" against real classes would be meaningless).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from typing import Any

import numpy as np

from upstream.data.base import Source
from upstream.errors import UpstreamError

#: ``(source number in the mixture, index in that source)``
ItemRef = tuple[int, int]

#: Sources that make their data from ``num_classes`` and ``samples_per_class`` when opened.
GENERATED_KINDS = frozenset({"fractals", "shapes"})
DEDUP_MODES = ("none", "exact", "near")
LABEL_LEVELS = ("fine", "coarse")
#: Near duplicates are at most this many bits apart (the hash has 64).
MAX_DISTANCE = 63
#: Pairs (kept, removed) or removed samples listed per step in the record.
MAX_EXAMPLES = 20
HIERARCHY_SUFFIXES = (".json", ".csv", ".tsv")
_SHIPPED_NAME = re.compile(r"[\w-]+")
_WORD = re.compile(r"\w+")


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
        """Syntax checks needing no data: raises a one-line :class:`UpstreamError`."""
        for name in ("num_samples", "samples_per_class", "num_classes"):
            if getattr(self, name) < 0:
                raise UpstreamError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.proportions:
            parse_proportions(self.proportions, num_sources)
        if self.dedup not in DEDUP_MODES:
            raise UpstreamError(
                f"dedup must be one of {', '.join(DEDUP_MODES)} (got {self.dedup!r})"
            )
        if not 0 <= self.dedup_distance <= MAX_DISTANCE:
            raise UpstreamError(
                f"dedup_distance must be 0..{MAX_DISTANCE} bits (got {self.dedup_distance})"
            )
        if self.label_level not in LABEL_LEVELS:
            raise UpstreamError(f"label_level must be fine or coarse (got {self.label_level!r})")
        if self.hierarchy:
            check_hierarchy_name(self.hierarchy)
        if self.label_level == "coarse" and not self.hierarchy:
            raise UpstreamError("label_level=coarse needs a hierarchy (e.g. hierarchy=cifar100)")
        groups = [value for kind, value in parse_classes(self.classes) if kind == "group"]
        if groups and not self.hierarchy:
            raise UpstreamError(
                f"classes=group:{groups[0]} needs a hierarchy (e.g. hierarchy=cifar100)"
            )
        parse_words(self.caption_require, "caption_require")
        parse_words(self.caption_exclude, "caption_exclude")


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
    #: False when no source has labels (every label 0): the manifest says ``labelled: false``
    labelled: bool = True


# --- parsing (no data) ---------------------------------------------------------------------


def parse_proportions(text: str, num_sources: int) -> list[Fraction]:
    """``"0.7,0.3"`` → exact shares summing to 1 (a sum off by ≤ 1e-6 is normalised)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [Fraction(p) for p in parts]
    except ValueError:
        raise UpstreamError(f"proportions must be numbers (got {text!r})") from None
    if len(values) != num_sources:
        raise UpstreamError(f"proportions has {len(values)} values for {num_sources} source(s)")
    if any(v < 0 for v in values):
        raise UpstreamError(f"proportions must not be negative (got {text!r})")
    total = sum(values, Fraction(0))
    if abs(float(total) - 1.0) > 1e-6:
        raise UpstreamError(f"proportions must sum to 1 (got {float(total):g})")
    return [v / total for v in values]


def parse_classes(text: str) -> list[tuple[str, str]]:
    """``"cat, group:flowers"`` → ``[("name", "cat"), ("group", "flowers")]``."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.startswith("group:"):
            group = part[len("group:") :].strip()
            if not group:
                raise UpstreamError("classes: 'group:' needs a superclass name (group:NAME)")
            out.append(("group", group))
        else:
            out.append(("name", part))
    return out


def parse_words(text: str, what: str) -> tuple[list[str], str | None]:
    """A word list's syntax: ``(words, None)`` for ``"a,b"``, ``([], FILE)`` for ``"@FILE"``."""
    text = text.strip()
    if not text:
        return [], None
    if text.startswith("@"):
        path = text[1:].strip()
        if not path:
            raise UpstreamError(f"{what}: '@' needs a file name (@FILE, one word per line)")
        return [], path
    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w.startswith("@")]
    if bad:
        raise UpstreamError(f"{what}: {bad[0]!r} — use @FILE alone, not inside a comma list")
    return words, None


def shipped_hierarchies() -> list[str]:
    """Names of the hierarchies shipped with upstream (``hierarchy=NAME``)."""
    folder = resources.files("upstream.data") / "hierarchies"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def check_hierarchy_name(text: str) -> None:
    """A shipped name, or a path (local or s3://) to a JSON, CSV or TSV file."""
    if _SHIPPED_NAME.fullmatch(text):
        shipped = shipped_hierarchies()
        if text not in shipped:
            raise UpstreamError(
                f"unknown hierarchy {text!r}: shipped ones are {', '.join(shipped)}, or give a "
                "JSON/CSV file"
            )
    elif not text.lower().endswith(HIERARCHY_SUFFIXES):
        raise UpstreamError(f"hierarchy {text!r}: a file must end in .json, .csv or .tsv")


# --- loading (files, no images) --------------------------------------------------------------


def load_hierarchy(text: str) -> dict[str, str]:
    """The class → superclass map named by ``hierarchy`` (shipped name, local path or s3://).

    JSON: ``{fine: coarse}`` (or ``{coarse: [fine, ...]}``). CSV/TSV: two columns fine,coarse;
    an optional first row ``fine,coarse`` is a header; blank lines and ``#`` lines are skipped.
    """
    check_hierarchy_name(text)
    if _SHIPPED_NAME.fullmatch(text):
        data = (resources.files("upstream.data") / "hierarchies" / f"{text}.json").read_bytes()
        return _hierarchy_from_json(data, text)
    from upstream import storage

    data = storage.read_bytes(text)
    if text.lower().endswith(".json"):
        return _hierarchy_from_json(data, text)
    return _hierarchy_from_table(data, text, "\t" if text.lower().endswith(".tsv") else ",")


def _hierarchy_from_json(data: bytes, where: str) -> dict[str, str]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UpstreamError(f"hierarchy {where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not obj:
        raise UpstreamError(f"hierarchy {where}: expected a JSON object {{class: superclass}}")
    pairs: list[tuple[str, str]] = []
    for key, value in obj.items():
        if isinstance(value, str):
            pairs.append((key, value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            pairs.extend((fine, key) for fine in value)
        else:
            raise UpstreamError(
                f"hierarchy {where}: {key!r} maps to {value!r}; expected a superclass name "
                "(or, keyed by superclass, a list of class names)"
            )
    return _hierarchy_from_pairs(pairs, where)


def _hierarchy_from_table(data: bytes, where: str, delimiter: str) -> dict[str, str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UpstreamError(f"hierarchy {where}: not UTF-8 text") from None
    pairs: list[tuple[str, str]] = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) != 2 or not all(cells):
            raise UpstreamError(
                f"hierarchy {where} line {line_no}: expected two columns class,superclass "
                f"(got {delimiter.join(row)!r})"
            )
        if not pairs and [c.lower() for c in cells] == ["fine", "coarse"]:
            continue
        pairs.append((cells[0], cells[1]))
    return _hierarchy_from_pairs(pairs, where)


def _hierarchy_from_pairs(pairs: Iterable[tuple[str, str]], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for fine, coarse in pairs:
        if out.setdefault(fine, coarse) != coarse:
            raise UpstreamError(
                f"hierarchy {where}: class {fine!r} maps to both {out[fine]!r} and {coarse!r}"
            )
    if not out:
        raise UpstreamError(f"hierarchy {where} is empty")
    return out


def load_words(text: str, what: str) -> tuple[list[str], dict[str, Any]]:
    """The words of a word list field and how the record describes them."""
    words, path = parse_words(text, what)
    if path is None:
        return words, {"words": words}
    from upstream import storage

    data = storage.read_bytes(path)
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UpstreamError(f"{what}: {path} is not UTF-8 text") from None
    words = [w.strip() for w in lines if w.strip() and not w.strip().startswith("#")]
    if not words:
        raise UpstreamError(f"{what}: {path} has no words (one word per line)")
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
    return words, {"file": path, "count": len(words), "sha256": digest}


class WordMatcher:
    """Whether a caption contains one of ``words`` as a whole word, in any case.

    Single words are looked up in the caption's set of words (fast for long lists); entries
    with other characters ("t-shirt", "new york") by a regex bounded by non-word characters.
    """

    def __init__(self, words: Sequence[str]) -> None:
        folded = {w.casefold() for w in words}
        self.single = {w for w in folded if _WORD.fullmatch(w)}
        phrases = sorted(folded - self.single)
        self.phrases = (
            re.compile("(?<!\\w)(?:" + "|".join(map(re.escape, phrases)) + ")(?!\\w)")
            if phrases
            else None
        )

    def __call__(self, caption: str | None) -> bool:
        if not caption:
            return False
        text = caption.casefold()
        if self.single and not self.single.isdisjoint(_WORD.findall(text)):
            return True
        return bool(self.phrases and self.phrases.search(text))


# --- arithmetic --------------------------------------------------------------------------------


def allocate(total: int, shares: Sequence[Fraction]) -> list[int]:
    """``total`` split by ``shares`` (summing to 1): largest remainder, ties to the first."""
    exact = [total * p for p in shares]
    base = [int(x) for x in exact]  # floor: every x >= 0
    rest = total - sum(base)
    by_remainder = sorted(range(len(shares)), key=lambda s: (-(exact[s] - base[s]), s))
    for s in by_remainder[:rest]:
        base[s] += 1
    return base


def water_fill(available: Sequence[int], total: int) -> list[int]:
    """How many of each class to take for ``total`` in all, as even as ``available`` allows.

    Each class gets ``total // C`` or one more; a class with fewer gets all it has and its
    shortfall is spread over the others. The extra ones go to classes in index order.
    """
    if total > sum(available):
        raise ValueError(f"cannot take {total} from {sum(available)}")
    take = [0] * len(available)
    left = total
    order = sorted(range(len(available)), key=lambda c: (available[c], c))
    for pos, c in enumerate(order):
        share = left // (len(order) - pos)
        if available[c] > share:
            # Every class from here on has more than the share: each takes it, plus one for
            # the first ``extra`` of them in index order.
            rest = sorted(order[pos:])
            extra = left - share * len(rest)
            for k, d in enumerate(rest):
                take[d] = share + (1 if k < extra else 0)
            return take
        take[c] = available[c]
        left -= available[c]
    return take


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (SplitMix64's finaliser), vectorised."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, source_no: int, indices: np.ndarray) -> np.ndarray:
    """The seeded random key of each sample: the size steps keep the smallest keys."""
    base = _splitmix64(np.array([(seed % 2**64) ^ (source_no << 48)], dtype=np.uint64))
    return _splitmix64(indices.astype(np.uint64) ^ base)


# --- the plan ------------------------------------------------------------------------------


@dataclass
class _Part:
    """One source's samples still in the plan: indices (ascending) and current class ids."""

    idx: np.ndarray
    lab: np.ndarray

    def keep(self, mask: np.ndarray) -> _Part:
        return _Part(self.idx[mask], self.lab[mask])


def _few(names: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", … {len(names) - k} more" if len(names) > k else "")


def _unknown(what: str, value: str, valid: Sequence[str]) -> UpstreamError:
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    if not close:
        lower = {v.lower(): v for v in valid}
        close = [lower[value.lower()]] if value.lower() in lower else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UpstreamError(f"unknown {what} {value!r}: {hint}({len(valid)} known: {_few(valid)})")


def _source_name(sources: Sequence[Source], s: int) -> str:
    kind = sources[s].kind or type(sources[s]).__name__
    return f"source {s + 1} ({kind})" if len(sources) > 1 else f"the source ({kind})"


def _is_generated(src: Source) -> bool:
    return bool(getattr(src, "generated", src.kind in GENERATED_KINDS))


def _count(parts: Sequence[_Part]) -> int:
    return sum(len(p.idx) for p in parts)


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
    parallel. Every error that needs only labels, class names, captions or files is raised
    before ``hashes_of`` is called.
    """
    if not sources:
        raise UpstreamError("no sources to plan for")
    iv.check(len(sources))
    if iv.dedup != "none" and hashes_of is None:
        raise ValueError("dedup needs hashes_of")
    labelled = [src.has_labels for src in sources]
    _check_labels_needed(sources, iv, labelled)
    hierarchy = load_hierarchy(iv.hierarchy) if iv.hierarchy else None
    require, require_rec = load_words(iv.caption_require, "caption_require")
    exclude, exclude_rec = load_words(iv.caption_exclude, "caption_exclude")
    steps: list[dict[str, Any]] = []

    # 1-2: the label space, from class names alone.
    kept_local = _select_classes(sources, iv, labelled, hierarchy, steps)
    class_names, luts = _label_space(sources, iv, labelled, hierarchy, kept_local, steps)
    parts: list[_Part] = []
    for src, lut in zip(sources, luts, strict=True):
        mapped = lut[np.asarray(src.labels, dtype=np.int64)] if len(src) else np.zeros(0, int)
        idx = np.flatnonzero(mapped >= 0)
        parts.append(_Part(idx, mapped[idx]))

    # 3: captions.
    if require or exclude:
        parts = _filter_captions(
            parts, caption_of, require, require_rec, exclude, exclude_rec, steps
        )

    # 5 (dry run): a size that cannot be met fails now, before any image is hashed.
    if iv.dedup != "none":
        _size(sources, iv, labelled, parts, len(class_names), [], [s["step"] for s in steps])

    # 4: duplicates.
    unreadable: list[ItemRef] = []
    if iv.dedup != "none":
        assert hashes_of is not None
        parts, unreadable = _dedup(parts, iv, hashes_of, steps)

    # 5: size.
    parts = _size(sources, iv, labelled, parts, len(class_names), steps, [s["step"] for s in steps])

    items = [
        (s, i, c)
        for s, part in enumerate(parts)
        for i, c in zip(part.idx.tolist(), part.lab.tolist(), strict=True)
    ]
    counts = np.bincount(
        np.concatenate([p.lab for p in parts]).astype(np.int64), minlength=len(class_names)
    )
    record = {
        "seed": iv.seed,
        "steps": steps,
        "num_samples": len(items),
        "num_classes": len(class_names),
        "class_counts": {n: int(k) for n, k in zip(class_names, counts, strict=True)},
        "source_counts": [len(p.idx) for p in parts],
    }
    return Plan(items, class_names, record, unreadable, labelled=any(labelled))


def _check_labels_needed(
    sources: Sequence[Source], iv: Interventions, labelled: Sequence[bool]
) -> None:
    needs = [
        name
        for name, on in (
            ("num_classes", iv.num_classes > 0),
            ("classes", bool(iv.classes.strip())),
            ("label_level=coarse", iv.label_level == "coarse"),
            ("samples_per_class", iv.samples_per_class > 0),
        )
        if on
    ]
    if needs and not any(labelled):
        raise UpstreamError(f"{needs[0]} needs labels, but {_source_name(sources, 0)} has none")
    if iv.num_samples and len(sources) > 1 and not iv.proportions and not all(labelled):
        s = labelled.index(False)
        raise UpstreamError(
            f"num_samples without proportions balances classes across the mixture, but "
            f"{_source_name(sources, s)} is unlabelled: give proportions"
        )


def _select_classes(
    sources: Sequence[Source],
    iv: Interventions,
    labelled: Sequence[bool],
    hierarchy: dict[str, str] | None,
    steps: list[dict[str, Any]],
) -> list[list[int]]:
    """Per source, the local class ids kept by ``num_classes`` and ``classes``."""
    counts = [
        np.bincount(np.asarray(src.labels, dtype=np.int64), minlength=len(src.class_names))
        for src in sources
    ]
    kept = [list(range(len(src.class_names))) for src in sources]

    def total() -> int:
        return sum(int(c[k].sum()) for c, k in zip(counts, kept, strict=True))

    if iv.num_classes:
        n_in, generated = total(), []
        for s, src in enumerate(sources):
            if not labelled[s]:
                continue
            if _is_generated(src):
                generated.append(s)
                continue
            if iv.num_classes > len(src.class_names):
                raise UpstreamError(
                    f"{_source_name(sources, s)} has {len(src.class_names)} classes; "
                    f"num_classes={iv.num_classes} asks for more"
                )
            kept[s] = kept[s][: iv.num_classes]
        steps.append(
            {
                "step": "num_classes",
                "num_classes": iv.num_classes,
                "made_by_source": generated,
                "unlabelled_sources": [s for s in range(len(sources)) if not labelled[s]],
                "in": n_in,
                "out": total(),
            }
        )

    tokens = parse_classes(iv.classes)
    if tokens:
        n_in = total()
        available = _ordered_names(
            sources[s].class_names[c] for s in range(len(sources)) if labelled[s] for c in kept[s]
        )
        everything = _ordered_names(
            n for s, src in enumerate(sources) if labelled[s] for n in src.class_names
        )
        wanted: set[str] = set()
        for kind, value in tokens:
            if kind == "name":
                if value not in available:
                    if value in everything:
                        raise UpstreamError(
                            f"class {value!r} is not among the first num_classes="
                            f"{iv.num_classes} classes"
                        )
                    raise _unknown("class", value, available)
                wanted.add(value)
            else:
                assert hierarchy is not None  # check() requires one with group:
                members = [f for f, g in hierarchy.items() if g == value]
                if not members:
                    raise _unknown("superclass", value, _ordered_names(hierarchy.values()))
                present = [f for f in members if f in available]
                if not present:
                    raise UpstreamError(
                        f"superclass {value!r} has no class in the data (its classes: "
                        f"{_few(members)})"
                    )
                wanted.update(present)
        for s, src in enumerate(sources):
            if labelled[s]:
                kept[s] = [c for c in kept[s] if src.class_names[c] in wanted]
        steps.append(
            {
                "step": "classes",
                "classes": [v if k == "name" else f"group:{v}" for k, v in tokens],
                "selected": [n for n in available if n in wanted],
                "in": n_in,
                "out": total(),
            }
        )
    return kept


def _ordered_names(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _label_space(
    sources: Sequence[Source],
    iv: Interventions,
    labelled: Sequence[bool],
    hierarchy: dict[str, str] | None,
    kept_local: Sequence[Sequence[int]],
    steps: list[dict[str, Any]],
) -> tuple[list[str], list[np.ndarray]]:
    """Final class names, and per source a table local class id → final id (-1: dropped)."""
    fine = _ordered_names(
        sources[s].class_names[c] for s in range(len(sources)) for c in kept_local[s]
    )
    rename = {n: n for n in fine}
    if iv.label_level == "coarse":
        assert hierarchy is not None  # check() requires one
        labelled_fine = _ordered_names(
            sources[s].class_names[c]
            for s in range(len(sources))
            if labelled[s]
            for c in kept_local[s]
        )
        unmapped = [n for n in labelled_fine if n not in hierarchy]
        if unmapped:
            raise UpstreamError(
                f"hierarchy {iv.hierarchy} leaves {len(unmapped)} class(es) unmapped: "
                f"{_few(unmapped)}"
            )
        rename.update({n: hierarchy[n] for n in labelled_fine})
        coarse = sorted({hierarchy[n] for n in labelled_fine})
        passing = [n for n in fine if n not in labelled_fine and n not in coarse]
        names = coarse + passing
        groups: dict[str, list[str]] = {g: [] for g in coarse}
        for n in labelled_fine:
            groups[hierarchy[n]].append(n)
        n_all = sum(int(np.isin(src.labels, kept_local[s]).sum()) for s, src in enumerate(sources))
        steps.append(
            {
                "step": "label_level",
                "level": "coarse",
                "hierarchy": iv.hierarchy,
                "classes_in": len(fine),
                "classes_out": len(names),
                "map": groups,
                "in": n_all,
                "out": n_all,
            }
        )
    else:
        names = fine
    final = {n: i for i, n in enumerate(names)}
    luts = []
    for s, src in enumerate(sources):
        lut = np.full(len(src.class_names), -1, dtype=np.int64)
        for c in kept_local[s]:
            lut[c] = final[rename[src.class_names[c]]]
        luts.append(lut)
    return names, luts


def _filter_captions(
    parts: list[_Part],
    caption_of: Callable[[int, int], str],
    require: Sequence[str],
    require_rec: dict[str, Any],
    exclude: Sequence[str],
    exclude_rec: dict[str, Any],
    steps: list[dict[str, Any]],
) -> list[_Part]:
    has_required = WordMatcher(require) if require else None
    has_excluded = WordMatcher(exclude) if exclude else None
    n_in = _count(parts)
    out: list[_Part] = []
    missing = excluded = 0
    examples: list[list[int]] = []
    for s, part in enumerate(parts):
        mask = np.ones(len(part.idx), dtype=bool)
        for k, i in enumerate(part.idx):
            caption = caption_of(s, int(i))
            if has_required is not None and not has_required(caption):
                mask[k] = False
                missing += 1
            elif has_excluded is not None and has_excluded(caption):
                mask[k] = False
                excluded += 1
            else:
                continue
            if len(examples) < MAX_EXAMPLES:
                examples.append([s, int(i)])
        out.append(part.keep(mask))
    record: dict[str, Any] = {"step": "caption_filter", "in": n_in, "out": _count(out)}
    if require:
        record.update(require=require_rec, removed_without_required=missing)
    if exclude:
        record.update(exclude=exclude_rec, removed_with_excluded=excluded)
    record.update(removed=missing + excluded, examples=examples)
    steps.append(record)
    return out


def _dedup(
    parts: list[_Part],
    iv: Interventions,
    hashes_of: Callable[[list[ItemRef], str], list[int | None]],
    steps: list[dict[str, Any]],
) -> tuple[list[_Part], list[ItemRef]]:
    from upstream.data.dedup import exact_duplicate_pairs, near_duplicate_pairs

    refs: list[ItemRef] = [(s, int(i)) for s, part in enumerate(parts) for i in part.idx]
    hashes = list(hashes_of(refs, iv.dedup))
    if len(hashes) != len(refs):
        raise ValueError(f"hashes_of gave {len(hashes)} hashes for {len(refs)} images")
    pairs = (
        exact_duplicate_pairs(hashes)
        if iv.dedup == "exact"
        else near_duplicate_pairs(hashes, iv.dedup_distance)
    )
    unreadable = [refs[k] for k, h in enumerate(hashes) if h is None]
    keep = np.ones(len(refs), dtype=bool)
    keep[[d for _, d in pairs]] = False
    keep[[k for k, h in enumerate(hashes) if h is None]] = False
    out, start = [], 0
    for part in parts:
        out.append(part.keep(keep[start : start + len(part.idx)]))
        start += len(part.idx)
    record: dict[str, Any] = {"step": "dedup", "mode": iv.dedup}
    if iv.dedup == "near":
        record["distance"] = iv.dedup_distance
    record.update(
        {
            "in": len(refs),
            "out": _count(out),
            "removed": len(pairs),
            "unreadable": len(unreadable),
            "examples": [[list(refs[k]), list(refs[d])] for k, d in pairs[:MAX_EXAMPLES]],
        }
    )
    steps.append(record)
    return out, unreadable


def _size(
    sources: Sequence[Source],
    iv: Interventions,
    labelled: Sequence[bool],
    parts: list[_Part],
    num_classes: int,
    steps: list[dict[str, Any]],
    applied: list[str],
) -> list[_Part]:
    """``samples_per_class`` per source and class, then ``num_samples`` / ``proportions``.

    The cap comes first so that it limits what the balanced choice can take, and N is met
    exactly whenever the capped data allow it. Appends records to ``steps``; raises when the
    size cannot be met (``applied``: the earlier steps, named in the message).
    """
    keys = [sample_keys(iv.seed, s, p.idx) for s, p in enumerate(parts)]

    if iv.samples_per_class:
        n_in, skipped, out = _count(parts), [], []
        for s, (src, part) in enumerate(zip(sources, parts, strict=True)):
            if not labelled[s] or _is_generated(src):
                skipped.append(s)
                out.append(part)
                continue
            quota = np.full(num_classes, iv.samples_per_class, dtype=np.int64)
            out.append(_take(part, keys[s], quota))
        parts = out
        applied = [*applied, "samples_per_class"]
        keys = [sample_keys(iv.seed, s, p.idx) for s, p in enumerate(parts)]
        steps.append(
            {
                "step": "samples_per_class",
                "samples_per_class": iv.samples_per_class,
                "skipped_sources": skipped,
                "in": n_in,
                "out": _count(parts),
            }
        )

    after = f" after {', '.join(applied)}" if applied else ""
    if iv.proportions:
        shares = parse_proportions(iv.proportions, len(sources))
        available = [len(p.idx) for p in parts]
        most = _most_at(shares, available)
        if iv.num_samples:
            wanted = allocate(iv.num_samples, shares)
            for s, (want, have) in enumerate(zip(wanted, available, strict=True)):
                if want > have:
                    raise UpstreamError(
                        f"num_samples={iv.num_samples} at proportion {float(shares[s]):g} asks "
                        f"{_source_name(sources, s)} for {want} images but it has {have}{after}; "
                        f"at these proportions at most {most} are available"
                    )
        else:
            wanted = allocate(most, shares)
        n_in = _count(parts)
        parts = [
            _balanced(part, key, want, num_classes)
            for part, key, want in zip(parts, keys, wanted, strict=True)
        ]
        steps.append(
            {
                "step": "proportions",
                "proportions": [float(p) for p in shares],
                "num_samples": iv.num_samples or most,
                "per_source": [
                    {"source": s, "available": a, "taken": len(p.idx)}
                    for s, (a, p) in enumerate(zip(available, parts, strict=True))
                ],
                "in": n_in,
                "out": _count(parts),
            }
        )
    elif iv.num_samples:
        n_in = _count(parts)
        if iv.num_samples > n_in:
            raise UpstreamError(
                f"num_samples={iv.num_samples} but only {n_in} images are left{after}"
            )
        labels = np.concatenate([p.lab for p in parts])
        quota = np.asarray(
            water_fill(np.bincount(labels, minlength=num_classes).tolist(), iv.num_samples)
        )
        parts = _take_across(parts, keys, quota)
        steps.append(
            {"step": "num_samples", "num_samples": iv.num_samples, "in": n_in, "out": _count(parts)}
        )
    return parts


def _most_at(shares: Sequence[Fraction], available: Sequence[int]) -> int:
    """The largest N whose allocation at ``shares`` no source falls short of."""
    limits = [int(a / p) for p, a in zip(shares, available, strict=True) if p > 0]
    n = min(limits) if limits else 0
    # Rounding can give a source one more than N * p: step down until every source can give.
    while n > 0 and any(w > a for w, a in zip(allocate(n, shares), available, strict=True)):
        n -= 1
    return n


def _take(part: _Part, key: np.ndarray, quota: np.ndarray) -> _Part:
    """The ``quota[c]`` samples of each class c with the smallest keys, in index order."""
    order = np.lexsort((part.idx, key, part.lab))  # by class, then key
    lab_sorted = part.lab[order]
    starts = np.searchsorted(lab_sorted, lab_sorted, side="left")
    rank = np.arange(len(order)) - starts
    chosen = order[rank < quota[lab_sorted]]
    return part.keep(np.sort(chosen))


def _balanced(part: _Part, key: np.ndarray, total: int, num_classes: int) -> _Part:
    quota = water_fill(np.bincount(part.lab, minlength=num_classes).tolist(), total)
    return _take(part, key, np.asarray(quota, dtype=np.int64))


def _take_across(
    parts: Sequence[_Part], keys: Sequence[np.ndarray], quota: np.ndarray
) -> list[_Part]:
    """:func:`_take` over the samples of all sources pooled, split back per source."""
    labels = np.concatenate([p.lab for p in parts]).astype(np.int64)
    # Pooled positions as indices: ties of keys (vanishingly rare) go to the earlier source.
    chosen = _take(_Part(np.arange(len(labels)), labels), np.concatenate(keys), quota).idx
    keep = np.zeros(len(labels), dtype=bool)
    keep[chosen] = True
    out, start = [], 0
    for p in parts:
        out.append(p.keep(keep[start : start + len(p.idx)]))
        start += len(p.idx)
    return out
