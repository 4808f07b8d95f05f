"""Local scratch folders that a killed process does not leave behind for good.

``tempfile.TemporaryDirectory`` removes its folder when the block ends, but a SIGKILL (the OOM
killer, a pod's hard stop, ``kill -9``) ends the process inside the block: the folder stays, and
for the shard stage it holds a half-written shard of up to ``shard_bytes``. :func:`folder`
makes a folder whose owner holds a lock on a file in it (``flock``: the kernel lets go of it
when the process dies, however it dies, and across PID namespaces) and, before making it,
removes the folders of the same prefix whose lock no live process holds. So a re-run (a resume)
cleans what a killed run left, and a folder in use is never touched.

Only folders of this user are looked at; one without its lock file (made by an older upstream,
or by a process killed between making the folder and locking it) is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOCK = ".owner.lock"


@contextlib.contextmanager
def folder(prefix: str) -> Iterator[Path]:
    """A new folder ``<tmp>/<prefix>XXXXXXXX``, removed at the end; stale ones removed first."""
    remove_stale(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # Locked under another name, then renamed into place: a cleaner that finds the lock file
    # always finds it locked (the lock belongs to the open file, which the rename keeps).
    fd = os.open(path / ".owner.lock.new", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(path / ".owner.lock.new", path / LOCK)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_stale(prefix: str, root: str | None = None) -> list[Path]:
    """Remove the folders ``<root>/<prefix>*`` of this user whose owner is gone; return them."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
            fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or no lock file: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
