"""The evaluation sets of a call, and how their classes map onto a model's.

Sets: one in-distribution (ID) set and any number of out-of-distribution (OOD) ones, given as
a comma list of shard folders, each optionally named (``rotated=s3://.../digits-rot``). A
corruption suite's folder (its ``suite.json``, :mod:`upstream.evaluate.suite`) stands for all
of its sets, named ``<corruption>-<severity>``. An unnamed set is named after its corruption
and severity when it has one (``mixed-3``), else after its folder.

Classes are matched by name, never by position: a set listing the model's classes in another
order (an ImageFolder sorts its folders alphabetically; scikit-learn's digits count "zero" to
"nine") is aligned; a set holding a class the model does not know is refused; a set holding a
subset of the model's classes is scored on that subset, with the logits of the other classes
left out (as ImageNet-R and ImageNet-A are scored), and the result says so.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from upstream.errors import UpstreamError

SUITE_FILE = "suite.json"
SUITE_FORMAT = "upstream-corruption-suite"
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One evaluation set: where it is, what it is called, what it holds."""

    name: str
    uri: str
    manifest: dict[str, Any]
    #: "id" or "ood"
    role: str
    #: The suite it belongs to ("" for a set given on its own), and its corruption/severity.
    suite: str = ""
    corruption: str = ""
    severity: int = 0
    family: str = ""

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.manifest.get("class_names", [])]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint", ""))


@dataclasses.dataclass(frozen=True)
class Alignment:
    """How a set's label indices map onto a model's classes."""

    #: model class index of each of the set's label indices
    to_model: np.ndarray
    #: model class indices scored (all of them, or the set's subset), ascending
    scored: np.ndarray
    subset: bool

    def describe(self, num_model_classes: int) -> str:
        if not self.subset:
            return f"all {num_model_classes} classes"
        return (f"{len(self.scored)} of {num_model_classes} classes (a subset: the other "
                "classes' logits are left out)")


def _short(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"


def align(model_classes: list[str], evalset: EvalSet) -> Alignment:
    """Map ``evalset``'s classes onto ``model_classes`` by name (see the module docstring)."""
    theirs = evalset.class_names
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [c for c in theirs if c not in index]
    if unknown:
        raise UpstreamError(
            f"evaluate: {evalset.role} set {evalset.name!r} ({evalset.uri}) has classes "
            f"{_short(theirs)} but the model predicts {_short(model_classes)}; "
            f"{len(unknown)} unknown to it, e.g. {unknown[0]!r}"
        )
    to_model = np.asarray([index[c] for c in theirs], dtype=np.int64)
    subset = len(set(theirs)) < len(model_classes)
    scored = np.sort(to_model) if subset else np.arange(len(model_classes))
    return Alignment(to_model=to_model, scored=scored, subset=subset)


def parse_entries(text: str) -> list[tuple[str, str]]:
    """``"a=s3://x, s3://y"`` → ``[("a", "s3://x"), ("", "s3://y")]``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, uri = part.partition("=")
        if sep and "://" not in name and "/" not in name:
            if not _NAME.match(name.strip()):
                raise UpstreamError(f"evaluate: set name {name!r} may hold letters, digits and "
                                    "_ . + - only")
            out.append((name.strip(), uri.strip()))
        else:
            out.append(("", part))
    return out


def _default_name(uri: str, manifest: dict[str, Any]) -> str:
    config = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
    corruption = config.get("corruption", "none")
    if corruption and corruption != "none":
        return f"{corruption}-{config.get('severity', '')}".rstrip("-")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1]) or "ood"


def read_suite(uri: str) -> dict[str, Any] | None:
    """The corruption suite at ``uri``, or None when ``uri`` is not one."""
    from upstream import storage

    path = storage.join(uri, SUITE_FILE)
    if not storage.exists(path):
        return None
    suite = storage.read_json(path)
    if not isinstance(suite, dict) or suite.get("format") != SUITE_FORMAT:
        raise UpstreamError(f"evaluate: {path} is not an {SUITE_FORMAT} file")
    return suite


def resolve(id_data: str, ood_data: str) -> list[EvalSet]:
    """The ID set, then every OOD set (suites expanded), manifests read; names unique."""
    from upstream.shards import loader

    def manifest_of(uri: str, what: str) -> dict[str, Any]:
        m = loader.read_manifest(uri)
        if m.get("labelled") is False:
            raise UpstreamError(f"evaluate: {what} set {uri} has no labels to evaluate against")
        return m

    sets = [EvalSet("id", id_data, manifest_of(id_data, "id"), "id")]
    for name, uri in parse_entries(ood_data):
        suite = read_suite(uri)
        if suite is None:
            m = manifest_of(uri, "ood")
            sets.append(EvalSet(name or _default_name(uri, m), uri, m, "ood"))
            continue
        suite_name = name or "corruptions"
        for entry in suite["sets"]:
            m = manifest_of(entry["uri"], "ood")
            sets.append(EvalSet(entry["name"], entry["uri"], m, "ood", suite=suite_name,
                                corruption=entry["corruption"], severity=int(entry["severity"]),
                                family=entry.get("family", "")))
    seen: set[str] = set()
    for s in sets:
        if s.name in seen:
            raise UpstreamError(f"evaluate: two evaluation sets are named {s.name!r}; name them "
                                "(name=URI)")
        seen.add(s.name)
    return sets
