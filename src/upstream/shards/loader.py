"""The one reader of shard sets, for every stage (local folders and ``s3://`` alike).

- :func:`load_split`: a whole (small) set as tensors, in key order: fine-tuning and evaluation.
- :class:`Stream` (alias :func:`stream`): shuffled batches of one epoch per iteration, split
  by rank and by DataLoader worker, resampled or not: pre-training.

Images come back as float tensors in [0, 1], CHW by default; normalisation belongs to the
model side. A sample without a ``cls`` member gets the label :data:`UNLABELLED` (-1):
caption-only data. Image members: ``png``, ``jpg``, ``jpeg``, ``webp``.

Decisions the issue leaves open:

- **Tars are read here, not through ``webdataset.WebDataset``.** The format is WebDataset's
  (members grouped by key), and plain webdataset and open_clip read upstream's shards
  (``tests/test_loader_compat.py``), but the loader needs what webdataset's pipeline does not
  give: every worker's exact share of batches (so that DDP ranks never wait for one another),
  errors that name the shard *and* the sample key, no ``{}`` end-of-shard item, and batch
  buffers that are reused (below).
- **Integrity.** Tar headers are checked (checksums, bytes after the end-of-archive marker;
  Python's ``tarfile`` stops quietly at a corrupt header, as if the shard ended there), and
  every shard read to its end against the manifest: its sample count (a tar cut between
  members is a valid, shorter tar) and its sha256. Errors name the shard, the member being
  read and the last complete sample.
- **Bounded decoding.** Every image's size is read from its header before it is decoded and
  checked against what the manifest promises (no side beyond ``image_size`` for ``square``
  and ``max_side`` sets) and against :data:`upstream.imagebounds.MAX_PIXELS` (``keep`` sets
  too): a larger one is an error naming the shard and the key, not a skipped sample. A set
  the shard stage wrote never holds one (it skips or fails on such images by its
  ``on_bad_image``), so one here means the set was altered; and skipping would break the
  batch counts every rank computes from the manifest.
- **Equal batches on every rank.** With ``resampled=True`` (pre-training) every rank and worker
  draws shards with replacement (weighted by their sample counts, so that every sample is
  equally likely; seeded by seed, epoch, rank and worker) and yields a fixed number of full
  batches: ``batches_per_epoch``, by default ``num_samples // (batch_size * world_size)``,
  split over the workers so that the total per rank is exact. Without resampling, shards are
  shuffled by seed and epoch (the same on every rank), dealt to ranks and then to workers, and
  every rank stops at the batch count of the rank that has fewest: the others' surplus is
  dropped (and logged). Every rank computes every rank's share from the manifest, so no
  communication is needed. ``len()`` is exact for the current epoch; without resampling it can
  differ by a few batches between epochs when shards differ in size.
- **Too few shards.** Without resampling, fewer shards than ranks is an error (a rank would
  get nothing); fewer than 8 per reader (ranks × workers) is a warning: readers get unequal
  shares, so whole batches are dropped to keep ranks equal. With resampling there is no limit.
- **Speed.** DataLoader workers persist across epochs (:meth:`Stream.set_epoch`) and write
  their batches into a few shared-memory buffers each, reused once the consumer has dropped a
  batch, instead of a fresh shared-memory segment per batch as torch's default collation
  makes: on small VMs the page faults of fresh memory cost as much as decoding the images. A
  transform that ends in ToTensor finishes straight into the batch buffer. Raw samples are
  shuffled before decoding, so each image is decoded once. The images as stored (the default
  transform) are decoded by torchvision's op straight to uint8 CHW (:func:`decode_chw`) and
  a whole batch made floats at once. A worker sends a reused buffer once; later batches in
  it only name their slot, and labels and tokens travel by value.
- **Training loops** read with :meth:`Stream.epochs`: workers run on from one epoch into the
  next, with no restart at the boundary, and the next epoch's shuffle buffer fills while this
  one drains.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from upstream import imagebounds, storage
from upstream.errors import UpstreamError
from upstream.imagebounds import Bounds
from upstream.shards.tarread import Blocks, TarError, TarMembers, split_name

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Manifest layouts this reader understands (``upstream.shards.stage.FORMAT_VERSION``).
FORMATS = (1,)
#: Members that hold a sample's image, the first present wins.
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
#: The label of a sample without a ``cls`` member (unlabelled caption data).
UNLABELLED = -1
#: The version of the sample order a :class:`Stream` gives for a seed, kept with training
#: state: a run resumed under another order would not end as the uninterrupted one (2: the
#: shuffle buffer is filled before it gives a sample; 1 grew while it gave them).
SAMPLE_ORDER = 2
#: Shards per reader (ranks × workers) below which a warning says shares are unequal.
SHARDS_PER_READER = 8

Transform = Callable[[Image.Image], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
Sample = dict[str, Any]


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset's opener for ``s3://``: a boto3 streaming body (no subprocess, no temp file).

    Registered so that plain ``webdataset.WebDataset("s3://...")`` reads upstream's shards once
    this module is imported; the loader itself opens shards through :mod:`upstream.storage`.
    """
    if mode != "rb":
        raise ValueError(f"s3 shards are read-only here (mode {mode!r})")
    try:
        return storage.open_read(url)
    except Exception as e:  # noqa: BLE001 - whatever boto3 raised, the shard is what matters
        raise UpstreamError(f"cannot open shard {url}: {e}") from None


wds.gopen_schemes["s3"] = _gopen_s3


def to_tensor(img: Image.Image) -> torch.Tensor:
    """The default transform: an RGB image as a float CHW tensor in [0, 1]."""
    arr = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


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


# --- one shard ---------------------------------------------------------------------------------


def _open_shard(url: str) -> IO[bytes]:
    try:
        return storage.open_read(url)
    except FileNotFoundError:
        raise UpstreamError(f"shard {url} is missing (listed in the manifest)") from None
    except Exception as e:  # noqa: BLE001 - boto3's errors have no common "not found" type
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise UpstreamError(f"shard {url} is missing (listed in the manifest)") from None
        raise UpstreamError(f"cannot open shard {url}: {e}") from None


def _has_image(sample: Sample) -> bool:
    return any(k in sample for k in IMAGE_KEYS)


def read_shard(url: str, expected: dict[str, Any] | None = None) -> Iterator[Sample]:
    """The samples of one shard, in order: ``{"__key__", "__url__", ext: bytes, ...}``.

    Streams the tar (S3 objects are not downloaded first). Samples without an image, and
    webdataset's meta members (``__name__.ext``), are skipped. With ``expected`` (the
    manifest's entry for the shard), a shard read to its end must hold ``num_samples`` samples
    and match ``sha256``. Every failure is an :class:`UpstreamError` naming the shard and where
    in it the reading stopped: the member being read and the last complete sample.
    """
    expected = expected or {}
    raw = _open_shard(url)
    blocks = Blocks(raw)
    members = TarMembers(blocks)
    last: str | None = None  # the last complete sample
    count = 0

    def where() -> str:
        reading = f"reading {members.member}, " if members.member else ""
        return f"{reading}after sample {last}" if last is not None else f"{reading}at its start"

    try:
        try:
            current: Sample | None = None
            for name, data in members:
                split = split_name(name)
                if split is None or split[0].rpartition("/")[2].startswith("__"):
                    continue
                key, ext = split
                if current is not None and current["__key__"] != key:
                    if _has_image(current):
                        count += 1
                        yield current
                    last = current["__key__"]
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    raise TarError(f"member {name} appears twice")
                current[ext] = data
            if current is not None and _has_image(current):
                count += 1
                yield current
            if current is not None:
                last = current["__key__"]
        except TarError as e:
            raise UpstreamError(f"shard {url} is corrupt or truncated ({where()}): {e}") from None
        except UpstreamError:
            raise
        except Exception as e:  # noqa: BLE001 - a network error while streaming, most likely
            raise UpstreamError(f"shard {url} could not be read ({where()}): {e}") from None
        want = expected.get("num_samples")
        if want is not None and count != int(want):
            raise UpstreamError(
                f"shard {url} is corrupt or truncated: it ends after sample {last} with "
                f"{count} samples; the manifest says {want}"
            )
        if expected.get("sha256") and blocks.sha256.hexdigest() != expected["sha256"]:
            raise UpstreamError(
                f"shard {url} is corrupt: its sha256 differs from the manifest's ({blocks.size} "
                f"bytes read, manifest says {expected.get('size')}); samples up to {last} "
                "were read"
            )
    finally:
        raw.close()


def decode_image(data: bytes, where: str, bounds: Bounds = imagebounds.CEILING) -> Image.Image:
    """Image bytes → an RGB PIL image; unreadable data, or an image whose header promises more
    pixels than ``bounds`` (checked before decoding), is an :class:`UpstreamError`."""
    try:
        img = imagebounds.open_image(data, bounds)
        img.load()
        # An RGB image is used as it is: ``convert`` would copy it.
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several types for bad data
        raise UpstreamError(f"cannot decode image {where}: {e}") from None


#: torchvision's ``ImageReadMode.RGB``.
_RGB = 3


@functools.cache
def _native_decoder() -> Callable[..., torch.Tensor] | None:
    """torchvision's image-decoding op, or None where it is missing (PIL decodes then).

    The op itself rather than ``torchvision.io.decode_image``: that wrapper adds ~8 µs a call
    (API-usage logging, a deprecation warning: torchvision 0.29 deprecates its decoders in
    favour of TorchCodec, a dependency upstream does not take on for this). Same numbers.
    """
    try:
        import torchvision.io  # noqa: F401 - loads the image extension that registers the op

        return torch.ops.image.decode_image  # type: ignore[no-any-return]
    except (ImportError, AttributeError, RuntimeError):
        return None


def decode_chw(data: bytes, where: str, bounds: Bounds = imagebounds.CEILING) -> torch.Tensor:
    """Image bytes → an RGB uint8 CHW tensor: the pixels :func:`decode_image` and
    :func:`to_tensor` give, without a PIL image in between.

    torchvision's decoders (libpng, libjpeg-turbo, libwebp, as PIL's) give the same numbers
    as PIL's ``convert("RGB")`` for 8-bit PNG (grey, palette, alpha), JPEG (grey, CMYK) and
    WebP, at about half the CPU for small images; anything they refuse or give as more than
    8 bits (16-bit PNG) goes through PIL, and so do its errors. The header is checked against
    ``bounds`` first, as in :func:`decode_image`: torchvision's decoders have no pixel limit.
    """
    decode = _native_decoder()
    x = None
    if decode is not None:
        try:
            imagebounds.check(data, bounds)
        except Exception as e:  # noqa: BLE001 - too large, or PIL raised for bad data
            raise UpstreamError(f"cannot decode image {where}: {e}") from None
        try:
            x = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB, False)
        except Exception:  # noqa: BLE001 - PIL decides, and names the problem
            x = None
    if x is None or x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
        return torch.from_numpy(np.array(decode_image(data, where, bounds))).permute(2, 0, 1)
    return x


def _image_bytes(sample: Sample) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _where(sample: Sample) -> str:
    return f"{sample.get('__key__')} in {sample.get('__url__')}"


def _label(sample: Sample) -> int:
    raw = sample.get("cls")
    if raw is None:
        return UNLABELLED
    try:
        return int(raw)
    except ValueError:
        raise UpstreamError(f"sample {_where(sample)} has a label {raw[:20]!r} that is not an "
                            "integer") from None


def _caption(sample: Sample) -> str:
    raw = sample.get("txt")
    return raw.decode("utf-8", errors="replace") if raw is not None else ""


# --- load_split --------------------------------------------------------------------------------


def load_split(
    uri: str,
    transform: Transform | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every sample of the set at ``uri`` in key order: ``(images, labels, captions)``.

    ``images`` is N×C×H×W (``transform`` maps a PIL image to a tensor; default: [0, 1] floats),
    ``labels`` an int64 tensor (-1 where a sample has no ``cls``). ``indices`` keeps those
    positions only (in the order given), e.g. from :func:`kshot_indices`; only their images
    are decoded. Shards are checked against the manifest (sample count, hash), so a damaged
    one is named, not half-read.
    """
    manifest = read_manifest(uri)
    transform = transform or to_tensor
    total = int(manifest["num_samples"])
    if indices is not None:
        wanted = [int(i) for i in indices]
        bad = [i for i in wanted if not 0 <= i < total]
        if bad:
            raise UpstreamError(f"index {bad[0]} is out of range for {uri} ({total} samples)")
    samples = _all_samples(uri, manifest)
    chosen = wanted if indices is not None else range(total)
    bounds = imagebounds.for_manifest(manifest)
    images, labels, captions = [], [], []
    for i in chosen:
        s = samples[i]
        data = _image_bytes(s) or b""
        images.append(decode_chw(data, _where(s), bounds).float().div_(255)
                      if transform is to_tensor
                      else transform(decode_image(data, _where(s), bounds)))
        labels.append(_label(s))
        captions.append(_caption(s))
    if not images:
        return torch.empty(0), torch.empty(0, dtype=torch.long), []
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), captions


def _all_samples(uri: str, manifest: dict[str, Any]) -> list[Sample]:
    """Every sample of the set (undecoded), in key order, checked against the manifest."""
    samples: list[Sample] = []
    for url, info in zip(shard_urls(uri, manifest), manifest["shards"], strict=True):
        samples.extend(read_shard(url, info))
    samples.sort(key=lambda s: s["__key__"])
    total = int(manifest["num_samples"])
    if len(samples) != total:
        raise UpstreamError(f"{uri} holds {len(samples)} samples; the manifest says {total}")
    return samples


def load_labels(uri: str) -> torch.Tensor:
    """The labels of every sample of the set at ``uri``, in key order, without decoding a
    single image (what :func:`load_split` returns as its second item)."""
    samples = _all_samples(uri, read_manifest(uri))
    return torch.tensor([_label(s) for s in samples], dtype=torch.long)


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


# --- Stream: the plan ------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, rank, worker, purpose)."""
    words = [int(p) % 2**63 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


_SHARD_ORDER, _RESAMPLE, _BUFFER, _AUGMENT = 1, 2, 3, 4  # purposes of the seeds above


def _batch_sizes(samples: int, batch_size: int, drop_last: bool) -> list[int]:
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def _delivery_order(batches: Sequence[int]) -> list[int]:
    """The worker of each batch, in the order torch's DataLoader yields them (round robin,
    skipping workers that have finished), for workers giving ``batches`` batches each."""
    return _interleave([[w] * n for w, n in enumerate(batches)])


def skips_per_worker(batches: Sequence[int], start: int) -> list[int]:
    """How many of its batches each worker skips so that the first delivered batch is the
    one at position ``start`` of the epoch's delivery order."""
    skips = [0] * len(batches)
    for w in _delivery_order(batches)[:start]:
        skips[w] += 1
    return skips


def _interleave(per_worker: Sequence[Sequence[int]]) -> list[int]:
    """Worker outputs in the order torch's DataLoader yields them: round robin, skipping
    workers that have finished."""
    out: list[int] = []
    for i in range(max((len(p) for p in per_worker), default=0)):
        out.extend(p[i] for p in per_worker if i < len(p))
    return out


@dataclass(frozen=True)
class Plan:
    """What this process reads in one epoch: per DataLoader worker, its shards (positions in
    the manifest; empty when resampling) and the batches it yields; the total this rank
    yields (after truncation to the rank with fewest) and the samples in them."""

    shards: tuple[tuple[int, ...], ...]
    batches: tuple[int, ...]
    num_batches: int
    num_samples: int
    #: Batches this rank's readers would give beyond ``num_batches`` (dropped).
    dropped: int = 0


def plan_epoch(
    counts: Sequence[int],
    *,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
    epoch: int,
    shuffle_seed: int | None,
    drop_last: bool,
    resampled: bool,
    batches_per_epoch: int | None,
) -> Plan:
    """The deterministic split of one epoch (every rank computes every rank's share, so all
    agree on the batch count without talking to each other)."""
    readers = max(1, workers)
    if resampled:
        total = batches_per_epoch or sum(counts) // (batch_size * world_size)
        quotas = tuple(total // readers + (w < total % readers) for w in range(readers))
        return Plan(((),) * readers, quotas, total, total * batch_size)
    order = list(range(len(counts)))
    if shuffle_seed is not None:
        order = np.random.default_rng(_seed(shuffle_seed, epoch, _SHARD_ORDER)).permutation(
            len(counts)
        ).tolist()
    per_rank = []
    for r in range(world_size):
        mine = order[r::world_size]
        shards = tuple(tuple(mine[w::readers]) for w in range(readers))
        sizes = [_batch_sizes(sum(counts[i] for i in s), batch_size, drop_last) for s in shards]
        per_rank.append((shards, sizes))
    fewest = min(sum(len(s) for s in sizes) for _, sizes in per_rank)
    shards, sizes = per_rank[rank]
    in_order = _interleave(sizes)
    return Plan(
        shards,
        tuple(len(s) for s in sizes),
        fewest,
        sum(in_order[:fewest]),
        dropped=len(in_order) - fewest,
    )


# --- Stream: the workers ---------------------------------------------------------------------


class _Failure(str):
    """An :class:`UpstreamError`'s message, sent from a worker as its last item, so that the
    consumer raises it as one line (a DataLoader re-raise adds a traceback to the message)."""


def _identity(item: Any) -> Any:
    return item


class _WorkerInit:
    """Run in each DataLoader worker as it starts (a class, so that ``spawn`` can pickle it)."""

    def __init__(self, reads_s3: bool) -> None:
        self.reads_s3 = reads_s3

    def __call__(self, _: int) -> None:
        if not self.reads_s3:
            return
        # The boto3 client inherited across fork shares its pooled connections with the
        # parent: drop them, keep the client (a new one costs 0.1-0.5 s of CPU per worker).
        try:
            storage.s3_client()._endpoint.http_session.close()
        except AttributeError:  # botocore moved its internals: start from a new client
            storage._client.cache_clear()


#: Reusable batch buffers per worker: torch's DataLoader keeps at most ``prefetch_factor`` (2)
#: batches per worker in flight, plus the one the consumer holds and the one being filled.
SLOTS_PER_WORKER = 4
_FREE, _BUSY = 0, 1


@dataclass(frozen=True)
class _Settings:
    """What every reader needs to plan and read its share of an epoch."""

    urls: list[str]
    infos: list[dict[str, Any]]
    counts: list[int]
    batch_size: int
    workers: int
    rank: int
    world_size: int
    shuffle_seed: int | None
    drop_last: bool
    resampled: bool
    batches_per_epoch: int | None
    shuffle_buffer: int
    transform: Transform
    with_captions: bool
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    #: What the manifest promises about image sizes (checked before decoding).
    bounds: Bounds = imagebounds.CEILING

    def plan(self, epoch: int) -> Plan:
        return plan_epoch(
            self.counts,
            batch_size=self.batch_size,
            workers=self.workers,
            rank=self.rank,
            world_size=self.world_size,
            epoch=epoch,
            shuffle_seed=self.shuffle_seed,
            drop_last=self.drop_last,
            resampled=self.resampled,
            batches_per_epoch=self.batches_per_epoch,
        )


class _EpochSamples:
    """One reader's samples of one epoch, shuffled through a buffer that is filled with the
    epoch's first ``size`` samples and then swaps one in for each one out.

    The shard stage shuffles samples across shards already; the buffer gives each epoch its
    own order. That order depends only on the raw order and ``rng``, not on when the reading
    happens, which lets :meth:`Stream.epochs` have the previous epoch fill this buffer while
    it drains its own (``upcoming``): one raw sample read per sample given, at epoch
    boundaries too, instead of a burst of reading at each epoch's start.
    """

    def __init__(self, raw: Iterator[Sample], size: int, rng: random.Random | None) -> None:
        self.raw, self.size, self.rng = raw, size, rng
        self.buf: list[Sample] = []
        self.exhausted = False
        self.upcoming: _EpochSamples | None = None

    def read_one(self) -> None:
        """Read one more raw sample into the buffer, if it has room and the epoch has any."""
        if self.exhausted or len(self.buf) >= self.size:
            return
        sample = next(self.raw, None)
        if sample is None:
            self.exhausted = True
        else:
            self.buf.append(sample)

    def __iter__(self) -> Iterator[Sample]:
        if self.rng is None:  # unshuffled: the raw order, no buffer
            yield from self.raw
            return
        while not self.exhausted and len(self.buf) < self.size:
            self.read_one()
        buf, rng = self.buf, self.rng
        while buf:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            sample = buf.pop()
            if not self.exhausted:
                self.read_one()
            elif self.upcoming is not None:
                self.upcoming.read_one()
            yield sample


class _Reader(torch.utils.data.IterableDataset):
    """One rank's epoch as ``(worker, slot, images, rows, labels, text)`` items, per
    DataLoader worker.

    The epoch is read from ``epoch_box`` (shared memory) at each iteration, so that persistent
    workers follow :meth:`Stream.set_epoch`. ``slot`` is the index of the reused buffer that
    holds the batch's ``rows`` images (-1 for a fresh one, sent as ``images``); the consumer
    sets ``flags[slot]`` back to free once nothing references the batch any more. A slot's
    buffer is sent once, the first time it is filled (``images`` is None afterwards): the
    consumer keeps it mapped, rather than receiving it anew, a descriptor over a socket, with
    every batch.
    """

    def __init__(
        self, settings: _Settings, epoch_box: torch.Tensor, flags: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.epoch_box = epoch_box
        self.flags = flags
        # Per worker: buffers kept across epochs (the worker's own copy of this object).
        self.pool: list[torch.Tensor | None] = [None] * SLOTS_PER_WORKER
        self.sent = [False] * SLOTS_PER_WORKER  # the consumer has that buffer already

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch_box[0])
        continuous = bool(self.epoch_box[1])
        skips = self.epoch_box[2:].tolist()
        try:
            if not continuous:
                yield from self._batches(worker, epoch, self.settings.plan(epoch), skips[worker])
                return
            # Epoch after epoch without end. Every worker gives every epoch the same number of
            # items (its batches, then markers), so that DataLoader's strict round robin
            # never gets ahead of what the consumer needs by more than an epoch's imbalance.
            upcoming: _EpochSamples | None = None
            while True:
                plan = self.settings.plan(epoch)
                items = max(b - k for b, k in zip(plan.batches, skips, strict=True))
                samples = upcoming or self._epoch_samples(worker, epoch, plan)
                upcoming = self._epoch_samples(worker, epoch + 1, self.settings.plan(epoch + 1))
                samples.upcoming = upcoming
                given = 0
                for item in self._batches(worker, epoch, plan, skips[worker], iter(samples)):
                    given += 1
                    yield item
                for _ in range(items - given):
                    yield (worker, epoch, -1, None, 0, None, None)  # a marker: no batch
                epoch, skips = epoch + 1, [0] * len(skips)
        except UpstreamError as e:
            yield _Failure(str(e))

    def _epoch_samples(self, worker: int, epoch: int, plan: Plan) -> _EpochSamples:
        st = self.settings
        raw = self._raw_samples(worker, epoch, plan)  # a generator: reads nothing yet
        if st.shuffle_seed is None or st.shuffle_buffer <= 1:
            return _EpochSamples(raw, 0, None)
        rng = random.Random(_seed(st.shuffle_seed, epoch, st.rank, worker, _BUFFER))
        return _EpochSamples(raw, st.shuffle_buffer, rng)

    def _raw_samples(self, worker: int, epoch: int, plan: Plan) -> Iterator[Sample]:
        st = self.settings
        if not st.resampled:
            for i in plan.shards[worker]:
                yield from read_shard(st.urls[i], st.infos[i])
            return
        assert st.shuffle_seed is not None  # Stream refuses resampling without a seed
        rng = np.random.default_rng(_seed(st.shuffle_seed, epoch, st.rank, worker, _RESAMPLE))
        weights = np.asarray(st.counts, dtype=np.float64)
        weights /= weights.sum()
        while True:
            i = int(rng.choice(len(weights), p=weights))
            yield from read_shard(st.urls[i], st.infos[i])

    def _buffer(
        self, worker: int, item_shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[int, torch.Tensor]:
        shape = (self.settings.batch_size, *item_shape)
        if self.flags is not None:
            flags = self.flags.numpy()  # numpy's item access: ~50× cheaper than a tensor's
            base = worker * SLOTS_PER_WORKER
            for k in range(SLOTS_PER_WORKER):
                if flags[base + k] != _FREE:
                    continue
                slot = self.pool[k]
                if slot is None or slot.shape != shape or slot.dtype != dtype:
                    slot = self.pool[k] = _shared_empty(shape, dtype)
                    self.sent[k] = False
                flags[base + k] = _BUSY
                return base + k, slot
            # All in use (the consumer keeps batches): a fresh one, in shared memory already,
            # as torch's default_collate does, so that it travels without a copy.
            return -1, _shared_empty(shape, dtype)
        return -1, torch.empty(shape, dtype=dtype)

    def _batches(
        self, worker: int, epoch: int, plan: Plan, skip: int = 0,
        shuffled: Iterator[Sample] | None = None,
    ) -> Iterator[tuple[int, int, int, torch.Tensor | None, int, np.ndarray, Any]]:
        st = self.settings
        quota = plan.batches[worker] if st.resampled else None
        if quota == 0:
            return
        before, last, fused = _split_to_tensor(st.transform)
        direct = fused and before is None
        pixels: list[torch.Tensor] = []  # the batch's decoded images so far (direct)
        float_dtype = torch.get_default_dtype()
        size = st.batch_size
        slot, images = -1, None
        labels: list[int] = []
        captions: list[str] = []
        done = 0
        samples = shuffled if shuffled is not None else iter(
            self._epoch_samples(worker, epoch, plan))
        # Skipped batches (a resumed epoch) are read and shuffled, not decoded: the samples
        # after them come out as in an epoch read from its start.
        for _ in range(skip):
            if sum(1 for _ in itertools.islice(samples, size)) < size:
                return
            done += 1
            if quota is not None and done == quota:
                return
        rng_saved: torch.Tensor | None = None
        for sample in samples:
            if not labels and st.shuffle_seed is not None and not direct:
                # Random transforms draw from torch's generator, seeded per batch: a batch is
                # transformed the same way whether its epoch started at batch 0 or resumed
                # later. In-process, the training's own generator is restored after it.
                rng_saved = torch.get_rng_state()
                # The CPU generator only: torch.manual_seed also queues seeds for every other
                # device type, capturing a stack trace each time (~1.5 ms a call here).
                torch.default_generator.manual_seed(
                    _seed(st.shuffle_seed, epoch, st.rank, worker, done, _AUGMENT)
                )
            where = _where(sample)
            try:
                if direct:  # the stored image as it is: uint8 CHW, made floats per batch
                    x = decode_chw(_image_bytes(sample) or b"", where, st.bounds)
                    scale = True
                else:
                    img: Any = decode_image(_image_bytes(sample) or b"", where, st.bounds)
                    if before is not None:
                        img = before(img)
                    scale = fused and isinstance(img, Image.Image) and img.mode == "RGB"
                    # ToTensor's work done into the batch (below). A large image goes band by
                    # band (PIL's bands are the CHW planes: no HWC → CHW transpose, ToTensor's
                    # costliest part); a small one in one strided pass (fewer calls).
                    x = (_planes(img) if img.width * img.height > _PLANES_ABOVE
                         else torch.from_numpy(np.array(img)).permute(2, 0, 1)
                         ) if scale else last(img)
            except UpstreamError:
                raise
            except Exception as e:
                e.add_note(f"while transforming sample {where}")
                raise
            if not isinstance(x, torch.Tensor):
                raise UpstreamError(
                    f"the transform gave sample {where} a {type(x).__name__}; it must return a "
                    "tensor (end it with ToTensor)"
                )
            if images is None:
                slot, images = self._buffer(worker, tuple(x.shape),
                                            float_dtype if scale else x.dtype)
            elif x.shape != images.shape[1:]:
                raise UpstreamError(
                    f"the transform gave sample {where} the shape {tuple(x.shape)} but an "
                    f"earlier one {tuple(images.shape[1:])}; a batch needs one size (crop or "
                    "resize to a fixed size)"
                )
            if direct:  # kept as uint8; the whole batch becomes floats when it is full
                pixels.append(x)
            elif scale:  # uint8 → float / 255: the numbers ToTensor gives
                row = images[len(labels)]
                if x.is_contiguous():
                    row.copy_(x)
                    row.div_(255)
                else:
                    torch.div(x, 255, out=row)
            else:
                images[len(labels)].copy_(x)
            labels.append(_label(sample))
            captions.append(_caption(sample) if st.with_captions else "")
            if len(labels) == size:
                if rng_saved is not None:
                    torch.set_rng_state(rng_saved)
                if direct:
                    # One stack per batch: a copy into a row per image costs ~1 µs each.
                    torch.div(torch.stack(pixels), 255, out=images)
                    pixels = []
                yield self._item(worker, epoch, slot, images, labels, captions)
                slot, images, labels, captions = -1, None, [], []
                done += 1
                if quota is not None and done == quota:
                    return
        if rng_saved is not None:
            torch.set_rng_state(rng_saved)
        if labels and not st.drop_last and images is not None:
            if direct and pixels:
                torch.div(torch.stack(pixels), 255, out=images[: len(labels)])
            yield self._item(worker, epoch, slot, images, labels, captions)

    def _item(
        self, worker: int, epoch: int, slot: int, images: torch.Tensor, labels: list[int],
        captions: list[str],
    ) -> tuple[int, int, int, torch.Tensor | None, int, np.ndarray, Any]:
        """What a worker sends (see the class). Labels and tokens go as numpy arrays, which
        travel pickled by value: a tensor travels as a new shared-memory segment whose
        descriptor is passed over a socket, ~0.5 ms of the consumer's time each."""
        tokenizer = self.settings.tokenizer
        text = captions if tokenizer is None else tokenizer(captions).numpy()
        rows = len(labels)
        sent: torch.Tensor | None = images if slot >= 0 else images[:rows]
        if slot >= 0:
            k = slot % SLOTS_PER_WORKER
            sent, self.sent[k] = (None if self.sent[k] else images), True
        return worker, epoch, slot, sent, rows, np.asarray(labels, dtype=np.int64), text


#: Pixels above which an image is converted band by band (measured: faster from ~112² on).
_PLANES_ABOVE = 112 * 112


def _planes(img: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 CHW tensor, one band at a time (three contiguous copies)."""
    w, h = img.size
    planes = b"".join(band.tobytes() for band in img.split())
    return torch.frombuffer(bytearray(planes), dtype=torch.uint8).view(3, h, w)


def _split_to_tensor(
    transform: Transform,
) -> tuple[Callable[[Any], Any] | None, Callable[[Any], Any], bool]:
    """``(before, last, fused)``: a transform that ends with ToTensor (torchvision's, in a
    Compose or alone, or :func:`to_tensor`) is run as ``before`` and then, for RGB images,
    ToTensor's conversion straight into the batch buffer (``fused``): the same numbers without
    ToTensor's intermediate tensors and the copy into the batch. Anything else runs as is."""
    if transform is to_tensor:
        return None, transform, True
    tv = sys.modules.get("torchvision.transforms")  # not imported: not a torchvision transform
    if tv is None:
        return None, transform, False
    if type(transform) is tv.ToTensor:
        return None, transform, True
    if type(transform) is tv.Compose and transform.transforms and (
        type(transform.transforms[-1]) is tv.ToTensor
    ):
        steps = transform.transforms[:-1]
        return (tv.Compose(steps) if steps else None), transform.transforms[-1], True
    return None, transform, False


def _alias(buffer: torch.Tensor) -> torch.Tensor:
    """A tensor over ``buffer``'s memory with a storage of its own (that keeps ``buffer``)."""
    raw = buffer.view(-1).view(torch.uint8).numpy()
    return torch.frombuffer(raw, dtype=torch.uint8).view(buffer.dtype).view(buffer.shape)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (``share_memory_()`` on a new tensor would copy
    it there, touching every page twice)."""
    numel = math.prod(shape)
    storage_ = torch.UntypedStorage._new_shared(numel * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage_, 0, shape)


# --- Stream ------------------------------------------------------------------------------------


class Stream:
    """Epochs of batches ``(images, labels, captions)`` over the shard set at ``uri``.

    Iterating gives one epoch; iterating again repeats it (same order); :meth:`set_epoch`
    moves to another. ``len()`` is the exact number of batches of the current epoch for this
    process, the same on every rank. ``shuffle_seed`` and ``epoch`` together fix the shard
    order and the sample shuffle (a ``shuffle_buffer`` of raw samples), so every epoch has its
    own, reproducible order; ``shuffle_seed=None`` reads in key order (resampling needs a seed).

    ``resampled=True`` (pre-training): shards drawn with replacement, a fixed
    ``batches_per_epoch`` of full batches per rank (default ``num_samples // (batch_size ×
    world_size)``). Otherwise each rank reads its own shards once and all ranks stop at the
    same count (see the module notes); every rank must use the same ``batch_size``,
    ``num_workers`` and ``drop_last``, as DDP ranks do. ``rank`` and ``world_size`` default to
    ``torch.distributed``'s. ``transform`` maps a PIL RGB image to a tensor of one fixed shape
    (default: :func:`to_tensor`). Captions are empty strings unless ``with_captions``; with a
    ``tokenizer`` (captions → token tensor, e.g. open_clip's), each batch carries the tokens
    instead, made in the data workers rather than the training process.

    DataLoader workers start at the first iteration and stay for the next epochs (reusing
    their batch buffers); :meth:`close` (or dropping the stream) stops them.
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
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise UpstreamError(f"batch_size must be ≥ 1 (got {batch_size})")
        if num_workers < 0:
            raise UpstreamError(f"num_workers must be ≥ 0 (got {num_workers})")
        if batches_per_epoch is not None and not resampled:
            raise UpstreamError("batches_per_epoch needs resampled=True (without resampling "
                                "an epoch is one pass over the shards)")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise UpstreamError(f"batches_per_epoch must be ≥ 1 (got {batches_per_epoch})")
        if resampled and shuffle_seed is None:
            raise UpstreamError("resampled=True draws shards at random: give a shuffle_seed")
        default_rank, default_world = _rank_and_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise UpstreamError(f"rank {rank} is outside world size {world_size}")
        self.uri = uri
        self.manifest = read_manifest(uri)
        urls = shard_urls(uri, self.manifest)
        if not resampled and len(urls) < world_size:
            raise UpstreamError(
                f"{uri} has {len(urls)} shard(s), too few for {world_size} ranks "
                "(use resampled=True, or write more shards)"
            )
        self.settings = _Settings(
            urls=urls,
            infos=list(self.manifest["shards"]),
            counts=[int(s["num_samples"]) for s in self.manifest["shards"]],
            batch_size=batch_size,
            workers=num_workers,
            rank=rank,
            world_size=world_size,
            shuffle_seed=shuffle_seed,
            drop_last=drop_last,
            resampled=resampled,
            batches_per_epoch=batches_per_epoch,
            shuffle_buffer=shuffle_buffer,
            transform=transform or to_tensor,
            with_captions=with_captions,
            tokenizer=tokenizer,
            bounds=imagebounds.for_manifest(self.manifest),
        )
        self.num_workers = num_workers
        # [epoch, continuous, batches to skip per worker...]: read by persistent workers at
        # each iteration.
        self._epoch_box = torch.zeros(2 + max(1, num_workers), dtype=torch.int64)
        self._flags: torch.Tensor | None = None
        if num_workers > 0:
            self._epoch_box.share_memory_()
            self._flags = torch.zeros(num_workers * SLOTS_PER_WORKER, dtype=torch.int32)
            self._flags.share_memory_()
        self._reader = _Reader(self.settings, self._epoch_box, self._flags)
        self._loader: torch.utils.data.DataLoader[Any] | None = None
        self._held: dict[int, Any] = {}  # slot → StorageWeakRef of the batch handed out
        self._slots: dict[int, torch.Tensor] = {}  # slot → its buffer, as the workers sent it
        self.set_epoch(epoch)
        readers = max(1, num_workers) * world_size
        if not resampled and readers > 1 and len(urls) < SHARDS_PER_READER * readers:
            log.warning(
                "%s: %d shard(s) for %d rank(s) × %d worker(s), fewer than %d per reader: "
                "readers get unequal shares (%d batch(es) dropped on this rank in epoch %d to "
                "keep ranks equal); write more shards (shard min_shards) or read with "
                "resampled=True",
                uri, len(urls), world_size, max(1, num_workers), SHARDS_PER_READER,
                self.plan.dropped, epoch,
            )

    @property
    def urls(self) -> list[str]:
        return self.settings.urls

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def world_size(self) -> int:
        return self.settings.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch ``epoch`` from the next iteration on (its own shard order and shuffle),
        from its batch ``start`` on (a resumed run): the batches after it are the ones, and
        transformed the same way, as in the epoch read from its start."""
        plan = self.settings.plan(epoch)
        if not 0 <= start < max(1, plan.num_batches):
            raise UpstreamError(
                f"{self.uri}: epoch {epoch} has {plan.num_batches} batches; cannot start at "
                f"batch {start}"
            )
        if plan.num_batches < 1:
            raise UpstreamError(
                f"{self.uri} ({sum(self.settings.counts)} samples) gives no batch of "
                f"{self.settings.batch_size} to each of {self.world_size} rank(s)"
            )
        if plan.dropped:
            log.info("%s: rank %d drops %d batch(es) in epoch %d to match the other ranks",
                     self.uri, self.rank, plan.dropped, epoch)
        self.epoch, self.plan, self.start = epoch, plan, start
        self._epoch_box[0] = epoch
        self._epoch_box[2:] = torch.tensor(skips_per_worker(plan.batches, start)) if start else 0

    @property
    def num_samples(self) -> int:
        """Samples this process gets in the current epoch (in ``len(self)`` batches)."""
        return self.plan.num_samples

    def __len__(self) -> int:
        """Batches the next iteration gives (the epoch's, less those before ``start``)."""
        return self.plan.num_batches - self.start

    def close(self) -> None:
        """Stop the DataLoader workers (they stop with the stream otherwise)."""
        self._loader = None

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_box[1] = 0
        for _, _, batch in self._deliver(self._source(), self.epoch, self.start, False):
            yield batch

    def epochs(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Epoch ``epoch`` from its batch ``start`` on, then every epoch after it, without
        end, as ``(epoch, batch index in the epoch, batch)``: the same batches as
        :meth:`set_epoch` and iterating, epoch by epoch, for the same seed.

        For training loops: the readers go on into the next epoch while this one is being
        consumed, so an epoch boundary costs no restart of the DataLoader workers, and each
        epoch's shuffle buffer is filled while the previous one drains (an even load on the
        CPU rather than a burst of reading at each epoch's start). Resuming at ``(epoch,
        start)`` gives the batches an uninterrupted ``epochs()`` gave from there.
        """
        self.set_epoch(epoch, start)
        self._epoch_box[1] = 1
        yield from self._deliver(self._source(), epoch, start, True)

    def _source(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return iter(self._reader)
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._reader,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                worker_init_fn=_WorkerInit(storage.is_s3(self.uri)),
                persistent_workers=True,
            )
            self._slots.clear()  # new workers, new buffers
        # Buffers not held by the consumer are free again: a batch that a previous,
        # abandoned iteration filled but never handed out is discarded when the
        # DataLoader restarts its workers' iteration (below), before they fill new ones.
        assert self._flags is not None
        self._release_dropped()
        flags = self._flags.numpy()
        for slot in range(len(flags)):
            if slot not in self._held:
                flags[slot] = _FREE
        return iter(self._loader)

    def _release_dropped(self) -> None:
        for slot, ref in list(self._held.items()):
            if ref.expired():  # the consumer dropped that batch: its worker may reuse it
                assert self._flags is not None
                self._flags.numpy()[slot] = _FREE
                del self._held[slot]

    def _deliver(
        self, source: Iterator[Any], epoch: int, start: int, continuous: bool
    ) -> Iterator[tuple[int, int, Batch]]:
        from torch.multiprocessing.reductions import StorageWeakRef

        # Per worker, its items in the order it gave them (DataLoader yields them round robin).
        waiting: dict[int, collections.deque[Any]] = collections.defaultdict(collections.deque)
        while True:
            plan = self.settings.plan(epoch)
            # Batches go out in the epoch's delivery order. From batch 0 that is the order the
            # DataLoader yields them; an epoch resumed at batch k needs worker (k mod W)'s
            # batch first, and DataLoader always starts with worker 0: later workers' batches
            # wait here.
            order = _delivery_order(plan.batches)[start : plan.num_batches]
            for index, worker in enumerate(order, start):
                self._release_dropped()
                _, _, slot, sent, rows, label_array, text = self._next_item(
                    source, waiting, worker, epoch, plan)
                labels = torch.from_numpy(label_array)
                captions = torch.from_numpy(text) if isinstance(text, np.ndarray) else text
                if slot >= 0:
                    if sent is not None:
                        self._slots[slot] = sent
                    # A storage of its own over the slot's memory: it dies when the consumer
                    # drops the batch (whatever views it made), while the slot stays mapped.
                    images = _alias(self._slots[slot])[:rows]
                    self._held[slot] = StorageWeakRef(images.untyped_storage())
                else:
                    assert sent is not None
                    images = sent
                batch = (images, labels, captions)
                del images, labels, captions
                yield epoch, index, batch
                del batch
            if not continuous:
                if not plan.dropped:
                    # The readers' last checks (sample counts, hashes) run after their last
                    # batch.
                    extra = next(source, None)
                    if isinstance(extra, _Failure):
                        raise UpstreamError(str(extra))
                return
            epoch, start = epoch + 1, 0

    def _next_item(
        self, source: Iterator[Any], waiting: dict[int, collections.deque[Any]], worker: int,
        epoch: int, plan: Plan,
    ) -> Any:
        """``worker``'s next batch of ``epoch``, pulling items from ``source`` until it comes;
        a worker's surplus batches and markers of earlier epochs are dropped on the way."""
        queue = waiting[worker]
        while True:
            while queue and queue[0][1] < epoch:
                self._drop(queue.popleft())
            if queue:
                return queue.popleft()
            item = next(source, None)
            if item is None:
                raise UpstreamError(
                    f"{self.uri}: the readers stopped before {plan.num_batches} batches "
                    "(is the manifest out of date?)"
                )
            if isinstance(item, _Failure):
                raise UpstreamError(str(item))
            waiting[item[0]].append(item)

    def _drop(self, item: Any) -> None:
        """Discard an item that is never handed out: its slot is free at once."""
        _, _, slot, sent, _, _, _ = item
        if slot >= 0:
            if sent is not None:
                self._slots[slot] = sent
            assert self._flags is not None
            self._flags.numpy()[slot] = _FREE


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


#: Batches ``(images, labels, captions)`` for one epoch of a shard set (see :class:`Stream`).
stream = Stream
