"""Existing WebDataset tars (``wds:SHARDS``), e.g. made by img2dataset or by upstream itself.

``SHARDS`` is a folder (every ``*.tar`` directly in it), a brace pattern
(``dir/part-{00000..00009}.tar``), one ``.tar`` file, or the same on ``s3://``. Opening reads
every shard's tar headers once and keeps an index (key, where the image member lies, ``cls``,
``txt``); images are then read one at a time by offset, never all held in memory. Shards on
S3 are first copied to a temporary folder (``TMPDIR``) that lives as long as the source.

Decisions (the issue leaves them open):

- Samples are consecutive members sharing a key, as webdataset groups them: the key is the
  member name up to the first dot of its base name, the extension (lower-cased) the rest.
  webdataset's meta members (``__name__``), non-files, and samples without an image
  (``jpg jpeg png webp bmp ppm pgm tif tiff``, first found in that order) are skipped; the last
  are counted in a warning.
- Labels: ``cls`` (an integer) when every sample has one, else the set is unlabelled (one
  class ``unlabeled``, every label 0; an upstream manifest saying ``"labelled": false`` too).
  Class names come from an upstream ``manifest.json`` beside the tars when it names enough
  classes; otherwise the distinct ``cls`` values, sorted, are the classes, named by their
  digits. Captions are the ``txt`` members.
- Splits: a folder holding no tars but ``train/`` and ``test/`` sub-folders of tars serves
  each split from its own; an upstream ``manifest.json`` says which split its tars are;
  tars with neither are train, and asking them for test is an error (no silent reuse of
  training data as test data).
- A truncated or corrupt tar (bad header, data cut short, no end-of-archive block) fails
  when the source is opened, naming the shard and the last complete sample's key.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from upstream import storage
from upstream.data.base import Source, decode, raw_key
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
MANIFEST = "manifest.json"
UNLABELED = "unlabeled"
_BLOCK = 512
#: webdataset's split of a member name into key and extensions (``tariterators.base_plus_ext``).
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    try:
        return list(braceexpand(pattern))
    except Exception as e:  # noqa: BLE001 - braceexpand raises several types on bad patterns
        raise UpstreamError(f"wds: bad brace pattern {pattern!r}: {e}") from None


def check_shards(arg: str) -> None:
    """The data-free checks: the pattern expands; local shards or the folder exist."""
    if storage.is_s3(arg):
        storage.split_s3(arg)
        if _is_pattern(arg):
            _expand(arg)
        return
    if _is_pattern(arg):
        names = _expand(arg)
        missing = [n for n in names if not Path(n).expanduser().is_file()]
        if missing:
            raise UpstreamError(
                f"wds: {len(missing)} of the {len(names)} shards of {arg} do not exist, "
                f"e.g. {missing[0]}"
            )
        return
    path = Path(arg).expanduser()
    if not path.exists():
        raise UpstreamError(f"wds: {arg} does not exist")


def _tars_in(listing: list[str], folder: str) -> list[str]:
    """The ``*.tar`` files directly in ``folder`` among ``listing`` (full URIs or paths)."""
    base = folder.rstrip("/") + "/"
    out = []
    for uri in listing:
        rel = uri[len(base) :] if uri.startswith(base) else None
        if rel and "/" not in rel and rel.endswith(".tar") and not rel.startswith("."):
            out.append(uri)
    return sorted(out)


def _list(folder: str) -> list[str]:
    if storage.is_s3(folder):
        return list(storage.list_files(folder))
    root = Path(folder)
    return [str(p) for p in sorted(root.iterdir())] + [
        str(p) for sub in ("train", "test") if (root / sub).is_dir() for p in (root / sub).iterdir()
    ]


def resolve(arg: str, split: str) -> tuple[list[str], str, bool]:
    """``(shard URIs, the folder they are in, whether that folder is the split's own)``."""
    check_shards(arg)
    storage.check_reachable(arg)
    if _is_pattern(arg) or arg.endswith(".tar"):
        shards = _expand(arg) if _is_pattern(arg) else [arg]
        if storage.is_s3(arg):
            return shards, shards[0].rsplit("/", 1)[0], False
        shards = [str(Path(s).expanduser()) for s in shards]
        return shards, str(Path(shards[0]).parent), False
    folder = arg.rstrip("/") if storage.is_s3(arg) else str(Path(arg).expanduser())
    if not storage.is_s3(folder) and not Path(folder).is_dir():
        raise UpstreamError(f"wds: {arg} is neither a folder nor a .tar file")
    listing = _list(folder)
    shards = _tars_in(listing, folder)
    if shards:
        return shards, folder, False
    own = storage.join(folder, split)
    shards = _tars_in(listing, own)
    if shards:
        return shards, own, True
    other = "test" if split == "train" else "train"
    if _tars_in(listing, storage.join(folder, other)):
        raise UpstreamError(f"wds: {arg} has a {other}/ folder of shards but no {split}/")
    raise UpstreamError(f"wds: no .tar files in {arg}")


@dataclass
class _Sample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def scan(path: Path, name: str) -> list[_Sample]:
    """The samples of one tar, in order; UpstreamError naming ``name`` if it is damaged."""
    samples: list[_Sample] = []
    current: _Sample | None = None
    end_of_data = 0  # where the data of the current sample's last member ends

    def damaged(detail: str) -> UpstreamError:
        # The damage comes after the current sample's members when their data is all there;
        # otherwise it cuts the current sample short.
        good = samples
        if current is not None and end_of_data <= os.path.getsize(path):
            good = [*samples, current]
        where = (
            f"after sample {good[-1].key} (the last complete one)"
            if good
            else "before its first complete sample"
        )
        return UpstreamError(f"wds: shard {name} is truncated or corrupt {where}: {detail}")

    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    if (
                        "/" not in info.name
                        and info.name.startswith("__")
                        and info.name.endswith("__")
                    ):
                        continue
                    match = _NAME.match(info.name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if current is None or key != current.key:
                        if current is not None:
                            samples.append(current)
                        current = _Sample(key)
                    current.members[ext] = (info.offset_data, info.size)
                    end_of_data = info.offset_data + info.size
                end = tar.offset
        except tarfile.TarError as e:
            raise damaged(str(e)) from None
        # tarfile ends quietly at a bad or cut-off header; a whole tar ends with a zero block.
        f.seek(end)
        block = f.read(_BLOCK)
        if len(block) < _BLOCK or block.count(0) != _BLOCK:
            raise damaged("no end-of-archive block after the last member")
    if current is not None:
        samples.append(current)
    return samples


def _read(path: str | Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _remove_cache(folder: str, owner: int) -> None:
    # Forked worker processes inherit the source: only the process that made the copies
    # deletes them.
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


class WebDatasetSource(Source):
    """The samples of existing WebDataset tars, with random access by tar offset."""

    kind = "wds"

    def __init__(self, shards: str, split: str) -> None:
        self.spec = shards
        urls, folder, own_split = resolve(shards, split)
        manifest = self._manifest(folder)
        self._check_split(manifest, split, own_split)
        self.shard_names = [u.rsplit("/", 1)[-1] for u in urls]
        self.paths = self._local_copies(urls)

        self.keys: list[str] = []
        self._where: list[tuple[int, int, int, str]] = []  # shard, offset, size, extension
        self.captions: list[str | None] = []
        cls_values: list[int | None] = []
        skipped: list[str] = []
        for s, (path, name) in enumerate(zip(self.paths, self.shard_names, strict=True)):
            with open(path, "rb") as f:
                for sample in scan(path, name):
                    ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                    if ext is None:
                        skipped.append(f"sample {sample.key} in {name} has no image")
                        continue
                    offset, size = sample.members[ext]
                    self.keys.append(sample.key)
                    self._where.append((s, offset, size, ext))
                    txt = self._member(f, sample, "txt")
                    self.captions.append(None if txt is None else txt.decode("utf-8", "replace"))
                    cls_values.append(self._cls(f, sample, name))
        if skipped:
            log.warning("wds: skipped %d samples of %s that have no image", len(skipped), shards)
        self.without_image = skipped
        if not self.keys:
            raise UpstreamError(
                f"wds: no samples with an image ({', '.join(IMAGE_EXTS)}) in {shards}"
            )
        names, labels, labelled = self._labels(cls_values, manifest)
        self.has_labels = labelled
        super().__init__(names, labels, split)

    # --- opening --------------------------------------------------------------------------

    @staticmethod
    def _manifest(folder: str) -> dict[str, Any] | None:
        uri = storage.join(folder, MANIFEST)
        if not storage.exists(uri):
            return None
        try:
            manifest = storage.read_json(uri)
        except ValueError as e:
            raise UpstreamError(f"wds: {uri} is not valid JSON: {e}") from None
        return manifest if isinstance(manifest, dict) else None

    def _check_split(self, manifest: dict[str, Any] | None, split: str, own: bool) -> None:
        said = manifest.get("split") if manifest else None
        if said is not None and said != split:
            raise UpstreamError(
                f"wds: the shards of {self.spec} are the {said} split (manifest.json), not {split}"
            )
        if said is None and not own and split != "train":
            raise UpstreamError(
                f"wds: {self.spec} does not say which split it is, so it serves train only; "
                f"put {split} shards in a {split}/ sub-folder"
            )

    def _local_copies(self, urls: list[str]) -> list[Path]:
        if not storage.is_s3(urls[0]):
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise UpstreamError(f"wds: shard {missing[0]} does not exist")
            return [Path(u) for u in urls]
        cache = tempfile.mkdtemp(prefix="upstream-wds-")
        self._cleanup = weakref.finalize(self, _remove_cache, cache, os.getpid())
        local = [Path(cache, f"{i:06d}-{name}") for i, name in enumerate(self.shard_names)]
        log.info("wds: copying %d shards of %s to %s", len(urls), self.spec, cache)
        with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
            list(pool.map(storage.download_file, urls, local))
        return local

    @staticmethod
    def _member(f: Any, sample: _Sample, ext: str) -> bytes | None:
        if ext not in sample.members:
            return None
        offset, size = sample.members[ext]
        f.seek(offset)
        return f.read(size)

    def _cls(self, f: Any, sample: _Sample, shard: str) -> int | None:
        data = self._member(f, sample, "cls")
        if data is None:
            return None
        try:
            return int(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise UpstreamError(
                f"wds: sample {sample.key} in {shard} has a cls that is not an integer: "
                f"{data[:20]!r}"
            ) from None

    def _labels(
        self, values: list[int | None], manifest: dict[str, Any] | None
    ) -> tuple[list[str], list[int], bool]:
        unlabelled = ([UNLABELED], [0] * len(values), False)
        if manifest is not None and manifest.get("labelled") is False:
            return unlabelled
        missing = sum(v is None for v in values)
        if missing:
            if missing < len(values):
                log.warning(
                    "wds: %d of %d samples of %s have no cls; reading the set as unlabelled",
                    missing,
                    len(values),
                    self.spec,
                )
            return unlabelled
        labels = [int(v) for v in values if v is not None]
        named = manifest.get("class_names") if manifest else None
        if isinstance(named, list) and min(labels) >= 0 and max(labels) < len(named):
            return [str(n) for n in named], labels, True
        distinct = sorted(set(labels))
        position = {c: i for i, c in enumerate(distinct)}
        return [str(c) for c in distinct], [position[v] for v in labels], True

    # --- samples ----------------------------------------------------------------------------

    def _bytes(self, index: int) -> bytes:
        shard, offset, size, _ = self._where[index]
        return _read(self.paths[shard], offset, size)

    def image(self, index: int) -> Image.Image:
        shard = self.shard_names[self._where[index][0]]
        return decode(self._bytes(index), f"{self.keys[index]} in {shard}")

    def raw(self, index: int) -> tuple[bytes, str] | None:
        key = raw_key(self._where[index][3])
        return None if key is None else (self._bytes(index), key)

    def caption(self, index: int) -> str | None:
        return self.captions[index]

    def meta(self, index: int) -> dict[str, Any]:
        return {"key": self.keys[index], "shard": self.shard_names[self._where[index][0]]}

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to another process reads the same files but does not own them.
        state = self.__dict__.copy()
        state.pop("_cleanup", None)
        return state
