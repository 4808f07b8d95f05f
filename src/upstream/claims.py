"""One writer per output: a stage claims its output before it writes there.

A claim is one small JSON object, ``OUTPUT/.claim.json``, holding the writer's config
fingerprint, its owner (host, pid, the pid's start time, a random token) and ``ttl_s``. It
expires ``ttl_s`` seconds after its last refresh *as the store records it* (a file's mtime,
an S3 object's ``LastModified`` against the server's ``Date``), so the hosts' clocks need not
agree. A heartbeat thread refreshes it every ``ttl_s / 4`` while the stage works, and the
stage removes it when it ends (success or error).

Taking a claim:

- S3: ``PutObject`` with ``If-None-Match: *``; a stale claim is replaced with ``If-Match:
  <its ETag>``, refreshes use ``If-Match`` on our own ETag and the release a ``DeleteObject``
  with ``If-Match``. SeaweedFS 4.48 (the local store) honours all three, and atomically: of 8
  simultaneous conditional PUTs on one key exactly one succeeds, the others get 412.
- A store that ignores these headers is detected when the claim is created (a second
  ``If-None-Match: *`` PUT of the same object succeeds instead of failing): the claim is then
  read back after :data:`SETTLE_S` and is ours only if it still holds our token. That leaves a
  race: a writer whose PUT reaches the store more than ``SETTLE_S`` after a rival's (a rival
  that already read its own token back) overwrites it, and both go on until the rival's next
  heartbeat finds the foreign token and stops it with an error.
- Local folders: ``os.open(O_CREAT | O_EXCL)``. A stale claim is renamed away (atomic: one
  renamer wins), checked to be the very file that was judged stale (same inode), deleted, and
  created anew with ``O_EXCL``; a fresh claim renamed by mistake is linked back. Refreshes
  touch the file's mtime through a descriptor of our own inode, so they never refresh a claim
  that replaced ours.

A claim is stale when its owner ran on this host and that process is gone (a SIGKILLed writer
is taken over at once, not after ``ttl_s``); when its owner ran on another host and it
expired; or when it stayed unreadable (a writer died between creating and filling it) for
:data:`UNREADABLE_GRACE_S`. A live owner on this host keeps its claim however late its
heartbeat (a stopped process would go on writing when continued); a writer whose heartbeat
was late checks, before its next commit, that the claim is still its own.

What a second writer does: another config is refused in one line naming the holder; the same
config waits until the holder's claim is gone (finished, failed or stale) and then goes on as
the stage's resume logic allows (a finished output is a no-op; a half-written one resumes).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upstream import storage
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

CLAIM_FILE = ".claim.json"
CLAIM_FORMAT = 1
#: Seconds a claim lives without a refresh; the heartbeat refreshes it 4 times as often.
TTL_S = 60.0
#: How often a writer of the same config looks again while it waits for the holder.
POLL_S = 1.0
#: Stores without conditional writes: wait this long after writing a claim, then read it back.
SETTLE_S = 2.0
#: A claim file that cannot be parsed is one being written, until it is this old.
UNREADABLE_GRACE_S = 10.0
#: Set by a stage for the processes it starts to do its work (torchrun's): "TOKEN URI".
INHERITED_ENV = "UPSTREAM_CLAIM"

# A fork (a worker pool, a DataLoader) waits for a heartbeat in progress: a child never
# inherits a lock that the heartbeat thread held inside boto3 or logging at that moment.
_fork_lock = threading.Lock()
os.register_at_fork(
    before=_fork_lock.acquire,
    after_in_parent=_fork_lock.release,
    after_in_child=_fork_lock.release,
)


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    #: the process's start time (psutil), to tell it from a later process with the same pid
    started: float
    token: str

    @staticmethod
    def me() -> Owner:
        import psutil

        return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time(),
                     secrets.token_hex(8))

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True)
class Seen:
    """A claim as read from the store."""

    content: dict[str, Any] | None  # None: not (yet) parseable
    #: what a conditional replace or delete names: an ETag, or a file's (device, inode)
    version: Any
    #: seconds since its last refresh, by the store's clock
    age: float

    @property
    def owner(self) -> Owner | None:
        o = (self.content or {}).get("owner")
        try:
            return Owner(str(o["host"]), int(o["pid"]), float(o["started"]), str(o["token"]))
        except (TypeError, KeyError, ValueError):
            return None

    def stale_reason(self) -> str | None:
        if self.content is None:
            return (f"unreadable for {self.age:.0f} s" if self.age > UNREADABLE_GRACE_S
                    else None)
        owner = self.owner
        if owner is not None and owner.host == socket.gethostname():
            # Here the owner's fate is known: a live one (stopped, or stuck) keeps its claim
            # however old, since it would go on writing when it wakes up.
            return None if _alive(owner) else f"its owner, pid {owner.pid} on this host, is gone"
        ttl = float(self.content.get("ttl_s", TTL_S))
        if self.age > ttl:
            return f"not refreshed for {self.age:.0f} s (expires after {ttl:.0f} s)"
        return None

    def describe(self) -> str:
        owner = self.owner
        c = self.content or {}
        who = owner.describe() if owner else "an unknown owner"
        return (f"{c.get('stage', '?')} config {c.get('fingerprint', '?')} by {who}, "
                f"refreshed {self.age:.0f} s ago")


def _alive(owner: Owner) -> bool:
    import psutil

    try:
        p = psutil.Process(owner.pid)
        return abs(p.create_time() - owner.started) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- stores ---------------------------------------------------------------------------------


class _LocalStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        #: folders the claim created, deepest first: removed at the release when still
        #: empty, so that a stage refused or failing before it wrote leaves no output behind
        self.created: list[Path] = []

    def read(self) -> Seen | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        return Seen(_parse(data), (st.st_dev, st.st_ino), time.time() - st.st_mtime)

    def create(self, body: bytes) -> Any:
        while True:
            missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.created = self.created or missing
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                return None
            except FileNotFoundError:
                continue  # a writer that released it removed the empty folder meanwhile
        try:
            os.write(fd, body)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino)

    def replace(self, seen: Seen, body: bytes, token: str) -> Any:
        aside = self.path.with_name(f"{self.path.name}.{token}.taken")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None  # released or taken over meanwhile: look again
        st = os.stat(aside)
        if (st.st_dev, st.st_ino) != seen.version:
            # A claim that replaced the stale one between our read and our rename: put it
            # back (unless yet another appeared; its owner's refresh then finds it gone).
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            return None
        aside.unlink()
        return self.create(body)

    def refresh(self, version: Any, body: bytes) -> Any:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != version:
                return None
            os.utime(fd)  # our inode's mtime: never another writer's claim
        finally:
            os.close(fd)
        return version

    def delete(self, version: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == version:
                self.path.unlink()
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the stage wrote there (or someone else did)
                break


#: (endpoint, bucket) → whether the store honours If-None-Match / If-Match on writes
_conditional: dict[tuple[str | None, str], bool] = {}


@functools.cache
def _client(endpoint: str | None, key_id: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Short timeouts and few attempts: a heartbeat that hangs for minutes would let the
    # claim expire while its writer still works.
    config = Config(connect_timeout=5, read_timeout=15,
                    retries={"mode": "standard", "total_max_attempts": 3},
                    s3={"addressing_style": "path"})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=config,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


#: Answers to a conditional request that mean "someone else's claim is there (or was)".
_LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class _S3Store:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.bucket, self.key = storage.split_s3(uri)
        self.client = _client(storage.endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"))
        self.where = (storage.endpoint_url(), self.bucket)

    def read(self) -> Seen | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey"):
                return None
            raise
        data = r["Body"].read()
        date = r["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return Seen(_parse(data), r["ETag"], now - r["LastModified"].timestamp())

    def _put(self, body: bytes, **condition: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                       ContentType="application/json", **condition)
        except ClientError as e:
            if _code(e) in _LOST:
                return None
            raise
        return r["ETag"]

    def _settled(self, body: bytes) -> Any:
        """Without conditional writes: ours if it still holds our bytes after a while."""
        time.sleep(SETTLE_S)
        seen = self.read()
        return seen.version if seen is not None and _same(seen.content, body) else None

    def create(self, body: bytes) -> Any:
        if not _conditional.get(self.where, False) and self.read() is not None:
            return None  # a store that may ignore If-None-Match would overwrite it
        etag = self._put(body, IfNoneMatch="*")
        if etag is None:
            return None
        if self.where not in _conditional:
            # Ours now, if the store honoured the condition: then the same PUT again fails.
            again = self._put(body, IfNoneMatch="*")
            _conditional[self.where] = again is None
            if again is not None:
                log.warning("S3 at %s ignores If-None-Match: claims of %s are read back "
                            "after %.0f s instead", self.where[0] or "AWS", self.bucket,
                            SETTLE_S)
                etag = again
        return etag if _conditional[self.where] else self._settled(body)

    def replace(self, seen: Seen, body: bytes, token: str) -> Any:
        if _conditional.get(self.where, True):
            return self._put(body, IfMatch=seen.version)
        now = self.read()
        if now is None or now.version != seen.version:
            return None
        self._put(body)
        return self._settled(body)

    def refresh(self, version: Any, body: bytes) -> Any:
        if _conditional.get(self.where, True):
            return self._put(body, IfMatch=version)
        now = self.read()
        if now is None or now.version != version:
            return None
        return self._put(body)

    def delete(self, version: Any) -> None:
        from botocore.exceptions import ClientError

        if not _conditional.get(self.where, True):
            now = self.read()
            if now is None or now.version != version:
                return
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except ClientError as e:
            if _code(e) not in (*_LOST, "404", "NoSuchKey"):
                raise


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        content = json.loads(data)
    except ValueError:
        return None
    return content if isinstance(content, dict) else None


def _same(content: dict[str, Any] | None, body: bytes) -> bool:
    mine = json.loads(body)["owner"]["token"]
    return bool(content) and (content or {}).get("owner", {}).get("token") == mine


def _store(uri: str) -> _LocalStore | _S3Store:
    return _S3Store(uri) if storage.is_s3(uri) else _LocalStore(Path(uri))


# --- the claim ------------------------------------------------------------------------------


@dataclass
class Claim:
    """A held claim: :meth:`check` raises once it is lost (taken over after it went stale)."""

    uri: str
    stage: str
    fingerprint: str
    owner: Owner
    ttl: float = TTL_S
    _store: Any = None
    _version: Any = None
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _refreshing: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _last_ok: float = field(default_factory=time.monotonic)
    #: whether it was taken after waiting for a writer of the same config
    waited: bool = False

    @property
    def token(self) -> str:
        return self.owner.token

    def body(self) -> bytes:
        return json.dumps({
            "format": CLAIM_FORMAT,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "owner": {"host": self.owner.host, "pid": self.owner.pid,
                      "started": self.owner.started, "token": self.owner.token},
            "ttl_s": self.ttl,
            "refreshed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, sort_keys=True).encode() + b"\n"

    def env(self) -> dict[str, str]:
        return {INHERITED_ENV: f"{self.token} {self.uri}"}

    def check(self) -> None:
        if self._lost is None and time.monotonic() - self._last_ok > self.ttl / 2:
            # The heartbeat is late (the process was stopped, or the store is slow): find
            # out now whether the claim is still ours.
            self._refresh()
            if self._lost is None and time.monotonic() - self._last_ok > self.ttl:
                self._lost = f"could not refresh it for {self.ttl:.0f} s"
        if self._lost is not None:
            raise UpstreamError(
                f"{self.stage}: lost the claim on {self.uri} ({self._lost}); another writer "
                "may have taken the output over: stopping"
            )

    def _beat(self) -> None:
        while self._lost is None and not self._stop.wait(self.ttl / 4):
            self._refresh()

    def _refresh(self) -> None:
        with _fork_lock, self._refreshing:
            if self._lost is not None:
                return
            try:
                version = self._store.refresh(self._version, self.body())
            except Exception as e:  # noqa: BLE001 - transient: the next beat tries again
                log.warning("%s: could not refresh the claim on %s: %s",
                            self.stage, self.uri, e)
                return
            if version is None:
                seen = None
                with contextlib.suppress(Exception):
                    seen = self._store.read()
                self._lost = ("replaced by " + seen.describe()) if seen else "removed"
                log.error("%s: the claim on %s was %s", self.stage, self.uri, self._lost)
                return
            self._version = version
            self._last_ok = time.monotonic()

    def _start(self) -> None:
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat",
                                        daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost is None:
            with contextlib.suppress(Exception):  # an expired claim is taken over anyway
                self._store.delete(self._version)


def claim_uri(output: str) -> str:
    return storage.join(output, CLAIM_FILE)


def acquire(output: str, fingerprint: str, stage: str, *, ttl: float = TTL_S) -> Claim:
    """Claim ``output`` for a writer of ``fingerprint``: refused (one line naming the holder)
    while another config holds it; waits while the same config does; takes a stale one over."""
    try:
        return _acquire(output, fingerprint, stage, ttl)
    except UpstreamError:
        raise
    except Exception as e:  # noqa: BLE001 - the store refused or failed: say so in one line
        detail = " ".join(str(e).split())
        raise UpstreamError(f"{stage}: cannot claim {output}: {detail}") from None


def _acquire(output: str, fingerprint: str, stage: str, ttl: float) -> Claim:
    uri = claim_uri(output)
    store = _store(uri)
    held = Claim(uri, stage, fingerprint, Owner.me(), ttl, store)
    waiting = False
    while True:
        body = held.body()
        version = store.create(body)
        if version is None:
            seen = store.read()
            if seen is None:
                continue  # released between our create and our read
            reason = seen.stale_reason()
            if reason is not None:
                log.warning("%s: taking over the stale claim on %s (%s; %s)",
                            stage, output, seen.describe(), reason)
                version = store.replace(seen, body, held.token)
            elif (seen.content or {"fingerprint": fingerprint}).get("fingerprint") != fingerprint:
                raise UpstreamError(
                    f"{stage}: {output} is being written by another config "
                    f"({seen.describe()}; claim {uri}); use another output or wait for it"
                )
            else:
                if not waiting:
                    log.info("%s: waiting for %s to finish with %s", stage, seen.describe(),
                             output)
                    waiting = True
                time.sleep(POLL_S)
        if version is not None:
            held._version = version
            held.waited = waiting
            held._start()
            return held


@dataclass(frozen=True)
class _Inherited:
    """The claim of the process that started this one (torchrun's workers)."""

    uri: str
    stage: str
    token: str
    waited: bool = False

    def check(self) -> None:
        seen = _store(self.uri).read()
        if seen is None or seen.owner is None or seen.owner.token != self.token:
            raise UpstreamError(f"{self.stage}: the claim {self.uri} of the process that "
                                "started this one is gone: stopping")

    def env(self) -> dict[str, str]:
        return {INHERITED_ENV: f"{self.token} {self.uri}"}


@contextlib.contextmanager
def claimed(output: str, fingerprint: str, stage: str) -> Iterator[Claim | _Inherited]:
    """Hold the claim on ``output`` for the block. Call the claim's ``check()`` before each
    write that commits (it raises once the claim is lost); ``env()`` is the environment for
    processes started to do the work, which then check this claim instead of taking one."""
    uri = claim_uri(output)
    token, _, inherited = os.environ.get(INHERITED_ENV, "").partition(" ")
    if inherited == uri:
        yield _Inherited(uri, stage, token)
        return
    held = acquire(output, fingerprint, stage)
    try:
        yield held
    finally:
        held.release()
