"""A process pool that returns results in order, a bounded number of tasks ahead.

Workers are forked (on Linux) holding a job object, so sources are neither pickled nor opened
again; tasks are spans of positions, and results come back in task order. Workers die with
their parent, even when it is killed outright.

Built on :class:`concurrent.futures.ProcessPoolExecutor`, not ``multiprocessing.Pool``: the
latter's worker-handler thread waits on the result pipe too, so it spins while each large
result is read (~0.3 s of CPU per 6000 encoded images here, taken from the workers on a
2-core machine).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
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


def _ready() -> int:
    return os.getpid()


class WorkerPool:
    """``workers`` forked processes holding a job; ``terminate`` stops them at once."""

    def __init__(self, job: Any, workers: int) -> None:
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers, mp_context=_context(), initializer=_init_worker,
            initargs=(job, os.getpid()),
        )
        # Fork every worker now, while this process has no other thread that could hold a
        # lock at that moment (a forked child would inherit it held); with fork the executor
        # starts all of them at the first task.
        self.executor.submit(_ready).result()

    def submit(self, span: tuple[int, int]) -> Future[list[Any]]:
        return self.executor.submit(_run_span, span)

    def terminate(self) -> None:
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()

    def join(self) -> None:
        self.executor.shutdown(wait=True)


def make_pool(job: Any, workers: int) -> WorkerPool | None:
    """A pool of ``workers`` processes holding ``job`` (None for ``workers`` 1: in-process)."""
    if workers <= 1:
        return None
    return WorkerPool(job, workers)


def chunk_size(count: int, workers: int) -> int:
    """Positions per task: ~32 tasks per worker (the last ones end together), 1 to 32."""
    return max(1, min(MAX_CHUNK, count // (max(1, workers) * 32)))


def spans(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(p, min(stop, p + size)) for p in range(start, stop, size)]


def ordered_results(
    pool: WorkerPool | None, job: Any, tasks: Sequence[tuple[int, int]], window: int
) -> contextlib.AbstractContextManager[Iterator[list[Any]]]:
    """Each task's results, in task order; at most ``window`` tasks ahead of the consumer, so
    that a slow consumer (a slow upload) does not pile encoded images up in memory. A context
    manager: leaving it early cancels the tasks not started yet."""
    if pool is None:
        return contextlib.nullcontext(job.encode_span(span) for span in tasks)
    return _ordered(pool, tasks, window)


@contextlib.contextmanager
def _ordered(pool: WorkerPool, tasks: Sequence[tuple[int, int]], window: int) -> Iterator[
    Iterator[list[Any]]
]:
    pending: collections.deque[Future[list[Any]]] = collections.deque()
    todo = iter(tasks)

    def results() -> Iterator[list[Any]]:
        for span in todo:
            pending.append(pool.submit(span))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            span = next(todo, None)
            if span is not None:
                pending.append(pool.submit(span))
            yield result

    try:
        yield results()
    finally:
        for future in pending:
            future.cancel()
