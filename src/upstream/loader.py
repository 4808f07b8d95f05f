"""The one reader of shard sets, for every stage (local folders and ``s3://`` alike).

- :func:`load_split`: a whole (small) set as tensors, in key order: fine-tuning and evaluation.
- :func:`stream`: shuffled batches, one epoch per call, through ``webdataset``: pre-training.

Images come back as float tensors in [0, 1], CHW; normalisation belongs to the model side.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from upstream import storage
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Manifest layouts this reader understands (``upstream.shard.FORMAT_VERSION``).
FORMATS = (1,)
IMAGE_KEYS = ("png", "jpg", "jpeg")

Transform = Callable[[Image.Image], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset's opener for ``s3://``: a boto3 streaming body (no subprocess, no temp file)."""
    if mode != "rb":
        raise ValueError(f"s3 shards are read-only here (mode {mode!r})")
    try:
        return storage.open_read(url)
    except Exception as e:  # noqa: BLE001 - whatever boto3 raised, the shard is what matters
        raise UpstreamError(f"cannot open shard {url}: {e}") from None


wds.gopen_schemes["s3"] = _gopen_s3


def to_tensor(img: Image.Image) -> torch.Tensor:
    """The default transform: an RGB image as a float CHW tensor in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the shard set at ``uri`` (its presence means the set is complete)."""
    manifest_uri = storage.join(uri, MANIFEST)
    storage.check_reachable(uri)
    if not storage.exists(manifest_uri):
        raise UpstreamError(f"no shards at {uri} (manifest.json missing)")
    try:
        manifest = storage.read_json(manifest_uri)
    except json.JSONDecodeError as e:
        raise UpstreamError(f"{manifest_uri} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UpstreamError(f"{manifest_uri} has an unknown format {got!r} (expected {FORMATS})")
    return manifest


def shard_urls(uri: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Where each shard of the set at ``uri`` is, in order."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    return [storage.join(uri, s["name"]) for s in manifest["shards"]]


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _decode_image(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several types for bad data
        raise UpstreamError(f"cannot decode image {where}: {e}") from None


def _read_shard(url: str, expected: dict[str, Any]) -> list[dict[str, bytes]]:
    """The samples of one shard, checked against the manifest's size and hash."""
    try:
        data = storage.read_bytes(url)
    except UpstreamError:
        raise UpstreamError(f"shard {url} is missing (listed in the manifest)") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected.get("sha256") and digest != expected["sha256"]:
        raise UpstreamError(
            f"shard {url} is corrupt or truncated ({len(data)} bytes, manifest says "
            f"{expected.get('size')}; sha256 differs)"
        )
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                assert f is not None
                samples.setdefault(key, {})[ext] = f.read()
    except tarfile.TarError as e:
        raise UpstreamError(f"shard {url} is not a readable tar file: {e}") from None
    out = []
    for key in sorted(samples):
        sample = samples[key]
        sample["__key__"] = key.encode()
        out.append(sample)
    if len(out) != expected.get("num_samples", len(out)):
        raise UpstreamError(
            f"shard {url} holds {len(out)} samples; the manifest says {expected['num_samples']}"
        )
    return out


def load_split(
    uri: str,
    transform: Transform | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every sample of the set at ``uri`` in key order: ``(images, labels, captions)``.

    ``images`` is N×C×H×W (``transform`` maps a PIL image to a tensor; default: [0, 1] floats),
    ``labels`` an int64 tensor. ``indices`` keeps those positions only (in the order given),
    e.g. from :func:`kshot_indices`; only their images are decoded. Shards are checked
    against the manifest (hash, sample count), so a damaged one is named, not half-read.
    """
    manifest = read_manifest(uri)
    transform = transform or to_tensor
    total = int(manifest["num_samples"])
    if indices is not None:
        wanted = [int(i) for i in indices]
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise UpstreamError(f"index {bad[0]} is out of range for {uri} ({total} samples)")
    samples: list[dict[str, bytes]] = []
    for url, info in zip(shard_urls(uri, manifest), manifest["shards"], strict=True):
        samples.extend(_read_shard(url, info))
    samples.sort(key=lambda s: s["__key__"])
    if len(samples) != total:
        raise UpstreamError(f"{uri} holds {len(samples)} samples; the manifest says {total}")
    chosen = wanted if indices is not None else range(total)
    images, labels, captions = [], [], []
    for i in chosen:
        s = samples[i]
        where = f"{s['__key__'].decode()} in {uri}"
        data = _image_bytes(s)
        if data is None or "cls" not in s:
            raise UpstreamError(f"sample {where} has no image or no label")
        images.append(transform(_decode_image(data, where)))
        labels.append(int(s["cls"]))
        captions.append(s["txt"].decode() if "txt" in s else "")
    if not images:
        return torch.empty(0), torch.empty(0, dtype=torch.long), []
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), captions


def kshot_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    k: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """``k`` positions per class drawn with ``seed``, sorted; ``k=0`` means every position.

    With ``class_names``, a class that has no sample at all also counts as too small.
    """
    arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if k < 0:
        raise UpstreamError(f"shots per class must be ≥ 0 (got {k})")
    if k == 0:
        return list(range(len(arr)))
    classes = sorted(set(arr.tolist()))
    if class_names is not None:
        classes = sorted(set(classes) | set(range(len(class_names))))
    rng = np.random.default_rng([int(seed) % 2**63, k])
    chosen: list[int] = []
    for c in classes:
        members = np.flatnonzero(arr == c)
        if k > len(members):
            name = f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c)
            raise UpstreamError(
                f"k={k} shots per class, but class {name} has only {len(members)} samples"
            )
        chosen.extend(int(i) for i in rng.choice(members, size=k, replace=False))
    return sorted(chosen)


class _ShardCheck:
    """A pipeline stage that drops empty samples and checks each shard's sample count.

    webdataset yields an empty ``{}`` at every shard end and stops quietly at a tar that
    ends cleanly between members; counting against the manifest turns that into an error.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def _check(self, url: str | None, seen: int) -> None:
        if url is not None and url in self.counts and seen != self.counts[url]:
            raise UpstreamError(
                f"shard {url} gave {seen} samples; the manifest says {self.counts[url]} "
                "(truncated?)"
            )

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        url, seen = None, 0
        for sample in samples:
            if _image_bytes(sample) is None:
                continue
            if sample.get("__url__") != url:
                self._check(url, seen)
                url, seen = sample.get("__url__"), 0
            seen += 1
            yield sample
        self._check(url, seen)


class _NameTheShard:
    """webdataset's error handler: re-raise as an :class:`UpstreamError` naming the shard.

    A class, not a closure, so that DataLoader workers started by ``spawn`` can pickle it.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.known = set(urls)

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, UpstreamError):
            raise exn
        candidates = [*exn.args, getattr(exn, "filename", None)]  # OSError: the local path
        url = next((a for a in candidates if isinstance(a, str) and a in self.known), None)
        if url is None:
            # webdataset adds the shard's URL one level up: let it, then name the shard.
            raise exn
        if isinstance(exn, FileNotFoundError):
            raise UpstreamError(f"shard {url} is missing (listed in the manifest)") from exn
        raise UpstreamError(f"shard {url} is corrupt or unreadable: {exn.args[0]}") from exn


class _Decode:
    """A raw sample → ``(image tensor, label, caption)``."""

    def __init__(self, transform: Transform, with_captions: bool) -> None:
        self.transform = transform
        self.with_captions = with_captions

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, str]:
        where = f"{sample.get('__key__')} in {sample.get('__url__')}"
        image = self.transform(_decode_image(_image_bytes(sample) or b"", where))
        caption = sample["txt"].decode() if self.with_captions and "txt" in sample else ""
        return image, int(sample["cls"]), caption


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> Batch:
    images, labels, captions = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(captions)


def _worker_init(_: int) -> None:
    # A boto3 client inherited across fork shares its connection pool with the parent.
    storage._client.cache_clear()


class Stream:
    """One epoch of batches ``(images, labels, captions)`` over the shard set at ``uri``.

    Iterate it once per epoch (each iteration reads the shards again, in the same order for
    the same seed and epoch). ``len()`` is the exact number of batches this process gets.
    Shards and samples (through a ``shuffle_buffer``) are shuffled by ``shuffle_seed`` and
    ``epoch`` together, so every epoch has its own, reproducible order; ``shuffle_seed=None``
    reads in key order. Under ``torch.distributed`` each rank reads its own shards. Captions
    are empty strings unless ``with_captions``.
    """

    def __init__(
        self,
        uri: str,
        *,
        batch_size: int,
        shuffle_seed: int | None = 0,
        epoch: int = 0,
        transform: Transform | None = None,
        with_captions: bool = True,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UpstreamError(f"batch_size must be ≥ 1 (got {batch_size})")
        if num_workers < 0:
            raise UpstreamError(f"num_workers must be ≥ 0 (got {num_workers})")
        self.uri = uri
        self.manifest = read_manifest(uri)
        self.urls = shard_urls(uri, self.manifest)
        self.counts = {
            url: int(s["num_samples"])
            for url, s in zip(self.urls, self.manifest["shards"], strict=True)
        }
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.epoch = epoch
        self.transform = transform or to_tensor
        self.with_captions = with_captions
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        rank, world = _rank_and_world()
        self.node_urls = self.urls[rank::world] if world > 1 else list(self.urls)
        if len(self.node_urls) < max(1, num_workers):
            log.warning(
                "%s: %d shard(s) for this process but %d data workers: some workers idle",
                uri,
                len(self.node_urls),
                num_workers,
            )
        if not self.node_urls:
            raise UpstreamError(
                f"{uri} has {len(self.urls)} shard(s), too few for {world} processes"
            )

    @property
    def num_samples(self) -> int:
        """Samples this process reads per epoch (all of them on a single process)."""
        return sum(self.counts[u] for u in self.node_urls)

    def __len__(self) -> int:
        per_worker = [
            self.node_urls[w :: max(1, self.num_workers)] for w in range(max(1, self.num_workers))
        ]
        rounding = math.floor if self.drop_last else math.ceil
        return sum(
            int(rounding(sum(self.counts[u] for u in urls) / self.batch_size))
            for urls in per_worker
        )

    def _pipeline(self) -> Any:
        seed = None
        if self.shuffle_seed is not None:
            seed = int(
                np.random.SeedSequence([self.shuffle_seed % 2**63, self.epoch]).generate_state(1)[0]
            )
        ds = wds.WebDataset(
            self.node_urls,
            handler=_NameTheShard(self.node_urls),
            shardshuffle=len(self.node_urls) if seed is not None else False,
            seed=seed if seed is not None else 0,
            # Ranks are split above, so webdataset sees this process's shards only.
            nodesplitter=None,
            empty_check=False,
        )
        ds = ds.compose(_ShardCheck(self.counts))
        if seed is not None and self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed + 1)
        ds = ds.map(_Decode(self.transform, self.with_captions))
        return ds.batched(self.batch_size, collation_fn=_collate, partial=not self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        pipeline = self._pipeline()
        if self.num_workers == 0:
            yield from pipeline
            return
        loader = torch.utils.data.DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init,
            persistent_workers=False,
        )
        yield from loader


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


#: Batches ``(images, labels, captions)`` for one epoch of a shard set (see :class:`Stream`).
stream = Stream
