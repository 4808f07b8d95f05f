"""Resumable training state: what a pre-training run needs to go on exactly where it stopped.

A state file holds the model, optimizer, scheduler and GradScaler states, the step, the data
position (epoch and batch within it), the RNG states and the MLflow run id. It is a
``torch.save``-d dict of tensors, numbers, strings and lists only, so
``torch.load(weights_only=True)`` reads it.

Layout under a run's output (a folder or an ``s3://`` prefix)::

    state/step-00000040.pt    one object per save
    state/latest              the name of the newest complete one

A save writes the object first and the ``latest`` pointer after it, so a run killed at any
moment leaves a pointer naming a complete object (or no pointer). Older objects beyond
:data:`KEEP` are removed after the pointer moves.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from upstream import models, storage
from upstream.errors import UpstreamError

STATE_FORMAT = "upstream-train-state"
STATE_DIR = "state"
LATEST = "latest"
#: State objects kept: the newest and the one before (in case the newest is being read).
KEEP = 2
#: The only names ``latest`` may hold: a state object in the same folder.
_STATE_NAME = re.compile(r"step-\d{8,}\.pt")


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's generators (CUDA's too when present), as plain values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss,
                  cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def state_dir(output: str) -> str:
    return storage.join(output, STATE_DIR)


def save(output: str, step: int, state: dict[str, Any]) -> str:
    """Write ``state`` as ``state/step-NNNNNNNN.pt``, then point ``latest`` at it."""
    folder = state_dir(output)
    name = f"step-{step:08d}.pt"
    uri = storage.join(folder, name)
    models.save_file({"format": STATE_FORMAT, **state}, uri)
    storage.write_bytes(storage.join(folder, LATEST), name.encode())
    for old in sorted(_state_objects(folder))[:-KEEP]:
        storage.remove_file(old)
    return uri


def _state_objects(folder: str) -> list[str]:
    return [u for u in storage.list_files(folder) if u.rsplit("/", 1)[-1].startswith("step-")]


@dataclass(frozen=True)
class Found:
    uri: str
    state: dict[str, Any]


def find(output: str, resume: str) -> Found | None:
    """The state to resume from: ``resume`` is ``auto`` (the run's ``latest``, if any),
    ``never``, or the URI of a state file; a pointer to a missing object is an error."""
    if resume == "never":
        return None
    if resume != "auto":
        if not storage.exists(resume):
            raise UpstreamError(f"pretrain: resume: {resume} does not exist")
        return Found(resume, load(resume))
    pointer = storage.join(state_dir(output), LATEST)
    if not storage.exists(pointer):
        return None
    name = storage.read_bytes(pointer).decode("utf-8", "replace").strip()
    if name and not _STATE_NAME.fullmatch(name):
        # Checked before the name is used: a pointer edited to "../../x" or "/etc/passwd"
        # must not make the run read (or report on) a file outside its output.
        raise UpstreamError(
            f"pretrain: resume: {pointer} names {name[:80]!r}, which is not a state file of "
            "this output (step-NNNNNNNN.pt; resume=never starts over)"
        )
    uri = storage.join(state_dir(output), name)
    if not name or not storage.exists(uri):
        raise UpstreamError(
            f"pretrain: resume: {pointer} names {name or 'nothing'!r}, which does not exist "
            "(resume=never starts over)"
        )
    return Found(uri, load(uri))


def load(uri: str) -> dict[str, Any]:
    return models.load_file(uri, STATE_FORMAT, "training state")


def check_compatible(found: Found, expected: dict[str, Any]) -> None:
    """Refuse a state from another model, method, batch or data set: one line naming the
    first difference (nothing is written before this check)."""
    for key, want in expected.items():
        got = found.state.get("run", {}).get(key)
        if got != want:
            raise UpstreamError(
                f"pretrain: resume: {found.uri} is from a run with {key}={got!r}, not {want!r}"
            )
