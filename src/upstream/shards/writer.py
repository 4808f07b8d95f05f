"""The shard writer: encoded samples into tar shards, in order, uploaded behind.

The main process takes the workers' samples in order (:mod:`upstream.shards.workerpool`),
numbers them, and writes them into tar shards (the bytes ``webdataset.TarWriter`` writes, made
faster: :mod:`upstream.shards.tars`), cutting them by count and by bytes; an uploader thread
uploads each finished shard while the next one is written. A local output gets its shards
written in place, as ``.shard-NNNNNN.tar.TAG.part`` renamed when complete (``TAG`` is drawn per
writer, so that two writers never write into one file, even when one of them should not be
writing at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upstream import scratch, storage
from upstream.errors import UpstreamError
from upstream.shards import tars
from upstream.shards.encode import Encoded, EncodeJob, Unreadable
from upstream.shards.workerpool import chunk_size, ordered_results, spans


@dataclass
class FinishedShard:
    """A shard file written locally, to be uploaded."""

    path: Path
    name: str
    num_samples: int
    #: the position after the last one this shard accounts for (its samples and skips)
    next_position: int
    keys: list[str]
    skipped: list[dict[str, Any]]


@dataclass
class ShardCutter:
    """Writes samples into ``shard-NNNNNN.tar`` files in ``folder``, cutting at ``per_shard``
    samples or ``max_bytes`` bytes (the file's size, tar headers and padding included; a shard
    holds one sample at least); calls ``finished`` with each finished shard."""

    folder: Path
    first_shard: int
    first_key: int
    key_width: int
    per_shard: int
    max_bytes: int
    finished: Callable[[FinishedShard], None]
    shard_no: int = field(init=False)
    written: int = field(init=False)
    _file: Any = field(default=None, init=False)
    _writer: Any = field(default=None, init=False)
    _count: int = field(default=0, init=False)
    _bytes: int = field(default=0, init=False)
    _next: int = field(default=0, init=False)
    _keys: set[str] = field(default_factory=set, init=False)
    _skipped: list[dict[str, Any]] = field(default_factory=list, init=False)
    _tag: str = field(default_factory=lambda: secrets.token_hex(4), init=False)

    def __post_init__(self) -> None:
        self.shard_no = self.first_shard
        self.written = self.first_key

    @property
    def name(self) -> str:
        return f"shard-{self.shard_no:06d}.tar"

    @property
    def _path(self) -> Path:
        # A name that readers and listings of shards skip until the shard is complete.
        return self.folder / f".{self.name}.{self._tag}.part"

    def add(self, sample: Encoded) -> None:
        members = sample.members(f"{self.written:0{self.key_width}d}")
        if (
            self._count
            and self.max_bytes
            and tars.file_size(self._bytes + len(members)) > self.max_bytes
        ):
            self._finish()
        if self._writer is None:
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in _finish
            self._writer = tars.TarWriter(self._file)
        self._writer.write_encoded(members)
        self.written += 1
        self._count += 1
        self._bytes += len(members)
        self._next = sample.position + 1
        self._keys.add(sample.image_key)
        if self._count >= self.per_shard:
            self._finish()

    def skip(self, item: dict[str, Any]) -> None:
        """Record a skipped image with the shard that its position falls in."""
        self._skipped.append(item)
        self._next = item["position"] + 1

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; return the skips after it (no shard accounts for them)."""
        if self._writer is not None:
            self._finish()
        return self._skipped

    def _finish(self) -> None:
        self._writer.close()
        self._file.close()
        done = FinishedShard(
            self._path,
            self.name,
            self._count,
            self._next,
            sorted(self._keys),
            self._skipped,
        )
        self._writer = self._file = None
        self._count = self._bytes = 0
        self._keys = set()
        self._skipped = []
        self.shard_no += 1
        self.finished(done)


# --- uploads --------------------------------------------------------------------------------


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


class Uploader:
    """Uploads finished shards on a thread of its own, one at a time and in order, while the
    main process writes the next; ``uploaded`` is called (on that thread) after each."""

    def __init__(
        self, output: str, uploaded: Callable[[FinishedShard, int, str], None]
    ) -> None:
        self.output = output
        self.uploaded = uploaded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
        self._pending: Future[None] | None = None

    def submit(self, shard: FinishedShard) -> None:
        # At most one shard waits while the next is written: the local disk holds two.
        self.wait()
        self._pending = self._pool.submit(self._upload, shard)

    def _upload(self, shard: FinishedShard) -> None:
        size, sha = file_digest(shard.path)
        uri = storage.join(self.output, shard.name)
        if storage.is_s3(uri) or shard.path.parent != Path(uri).parent:
            storage.upload_file(shard.path, uri)
            shard.path.unlink()
        else:
            os.replace(shard.path, uri)  # written in place: no second copy of every byte
        self.uploaded(shard, size, sha)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


# --- the write loop -------------------------------------------------------------------------


@dataclass
class WriteResult:
    #: images encoded (or found unreadable) in this call, and how long that took
    encoded: int = 0
    seconds: float = 0.0
    #: skipped images past the last shard (every other skip is recorded with its shard)
    trailing_skipped: list[dict[str, Any]] = field(default_factory=list)
    #: image bytes of the first samples written in this call (for a preview)
    examples: list[bytes] = field(default_factory=list)


@dataclass
class ShardWriting:
    """One pass of the stage over positions ``start`` … end of ``job.sequence``."""

    job: EncodeJob
    pool: Any
    workers: int
    start: int
    #: :class:`ShardCutter` settings: first_shard, first_key, key_width, per_shard, max_bytes
    layout: dict[str, Any]
    uploader: Uploader
    on_bad_image: str
    #: a source number → its name in messages and the manifest
    describe: Callable[[int], str]
    progress: Any
    num_examples: int = 32

    def run(self) -> WriteResult:
        result = WriteResult()
        began = time.perf_counter()
        output = self.uploader.output
        with contextlib.ExitStack() as stack:
            if storage.is_s3(output):
                # A killed run's scratch folder (its half-written shard) goes on the next run.
                folder = stack.enter_context(scratch.folder("upstream-shard-"))
            else:
                folder = Path(output)
                folder.mkdir(parents=True, exist_ok=True)
            try:
                self._write(folder, result)
            except BaseException:
                # The shard being uploaded is complete: let it finish (and be recorded),
                # but report the error that stopped the writing.
                with contextlib.suppress(Exception):
                    self.uploader.close()
                raise
            self.uploader.close()
        result.seconds = time.perf_counter() - began
        return result

    def _write(self, folder: Path, result: WriteResult) -> None:
        cutter = ShardCutter(folder, finished=self.uploader.submit, **self.layout)
        stop = len(self.job.sequence)
        tasks = spans(self.start, stop, chunk_size(stop - self.start, self.workers))
        window = 4 * max(1, self.workers)
        with ordered_results(self.pool, self.job, tasks, window) as results:
            for batch in results:
                for item in batch:
                    if isinstance(item, Unreadable):
                        cutter.skip(self._skipped(item))
                        continue
                    cutter.add(item)
                    if len(result.examples) < self.num_examples:
                        result.examples.append(item.image_bytes())
                result.encoded += len(batch)
                self.progress.update(len(batch))
        result.trailing_skipped = cutter.close()

    def _skipped(self, item: Unreadable) -> dict[str, Any]:
        what = self.describe(item.source_no)
        if self.on_bad_image == "fail":
            raise UpstreamError(
                f"shard: cannot read image {item.index} of {what}: {item.reason} "
                "(on_bad_image=skip skips such images)"
            )
        return {"position": item.position, "source": what, "index": item.index,
                "reason": item.reason}
