"""A process pool that returns results in order, a bounded number of tasks ahead.

Workers are forked (on Linux) holding a job object, so sources are neither pickled nor opened
again; tasks are spans of positions, and results come back in task order. Workers die with
their parent, even when it is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from upstream import storage

#: Positions per task, at most: small enough that the last tasks end together.
MAX_CHUNK = 32

_JOB: Any = None


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when its parent dies, even by SIGKILL: an orphaned pool
    worker would otherwise wait on its task queue for ever."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(job: Any, parent: int) -> None:
    global _JOB
    _JOB = job
    _die_with_parent(parent)
    # A boto3 client inherited across fork shares its connection pool with the parent.
    storage._client.cache_clear()


def _run_span(span: tuple[int, int]) -> list[Any]:
    return _JOB.encode_span(span)


def _context() -> Any:
    # fork: workers inherit the sources as they are (no pickling, no re-opening).
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def make_pool(job: Any, workers: int) -> Any:
    """A pool of ``workers`` processes holding ``job`` (None for ``workers`` 1: in-process)."""
    if workers <= 1:
        return None
    return _context().Pool(workers, initializer=_init_worker, initargs=(job, os.getpid()))


def chunk_size(count: int, workers: int) -> int:
    """Positions per task: ~32 tasks per worker (the last ones end together), 1 to 32."""
    return max(1, min(MAX_CHUNK, count // (max(1, workers) * 32)))


def spans(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(p, min(stop, p + size)) for p in range(start, stop, size)]


@contextlib.contextmanager
def ordered_results(
    pool: Any, job: Any, tasks: Sequence[tuple[int, int]], window: int
) -> Iterator[Iterator[list[Any]]]:
    """Each task's results, in task order; at most ``window`` tasks ahead of the consumer, so
    that a slow consumer (a slow upload) does not pile encoded images up in memory.

    A context manager: leaving it, however, unblocks the pool's task feeder, which
    ``pool.terminate()`` waits for.
    """
    if pool is None:
        yield (job.encode_span(span) for span in tasks)
        return
    room = threading.Semaphore(window)
    stop = threading.Event()

    def feed() -> Iterator[tuple[int, int]]:
        for span in tasks:
            room.acquire()
            if stop.is_set():
                return
            yield span

    def results() -> Iterator[list[Any]]:
        for result in pool.imap(_run_span, feed()):
            room.release()
            yield result

    try:
        yield results()
    finally:
        stop.set()
        room.release()
