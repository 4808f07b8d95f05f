"""One storage layer for ``s3://`` URIs and local paths.

S3 settings come from the environment, as for every AWS client: ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``; nothing here takes
credentials as arguments, so they never reach a config, a compiled pipeline or MLflow.
Local writes are atomic (temporary file, then rename), so a reader never sees half an object.

Every S3 request is retried by botocore (``standard`` mode, 5 attempts: throttling, 5xx and
dropped connections); ``AWS_RETRY_MODE`` (``standard`` or ``adaptive``) and ``AWS_MAX_ATTEMPTS``
change that, as for any AWS client. A request waits :data:`CONNECT_TIMEOUT` to connect and
:data:`READ_TIMEOUT` for each answer, so a dead endpoint ends a stage in seconds (refused
connections) or ~2 minutes (an endpoint that never answers) rather than 10.
:func:`check_reachable` makes one try with short timeouts: the pre-flight check of a stage.
Files are uploaded in parts of :data:`MULTIPART_SIZE` above that size, so a failed part is
retried alone and large shards need no single huge PUT.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from upstream.errors import UpstreamError

#: Files above this size go to S3 in parts of this size (S3 allows 5 MiB to 5 GiB a part).
MULTIPART_SIZE = 64 * 1024**2
#: Parts of one file uploaded at once.
UPLOAD_CONCURRENCY = 4
DEFAULT_RETRY_MODE = "standard"
DEFAULT_MAX_ATTEMPTS = 5
#: Seconds to connect, and to wait for each answer (between bytes, not for a whole body).
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 20
#: The pre-flight probe's timeouts: one try, no retries.
PROBE_CONNECT_TIMEOUT = 3
PROBE_READ_TIMEOUT = 5


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UpstreamError(f"invalid S3 URI {uri!r}: no bucket")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base, *parts))


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def retry_settings() -> dict[str, Any]:
    """botocore's ``retries`` setting: the environment's, else standard mode, 5 attempts."""
    mode = os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE
    if mode not in ("standard", "adaptive", "legacy"):
        raise UpstreamError(f"AWS_RETRY_MODE must be standard, adaptive or legacy (got {mode!r})")
    attempts_text = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
    if not attempts_text.isdigit() or int(attempts_text) < 1:
        raise UpstreamError(f"AWS_MAX_ATTEMPTS must be a positive integer (got {attempts_text!r})")
    return {"mode": mode, "total_max_attempts": int(attempts_text)}


@functools.cache
def _client(endpoint: str | None, key_id: str | None, retries: tuple[str, int],
            probe: bool = False) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=PROBE_CONNECT_TIMEOUT if probe else CONNECT_TIMEOUT,
        read_timeout=PROBE_READ_TIMEOUT if probe else READ_TIMEOUT,
        retries={"mode": retries[0], "total_max_attempts": 1 if probe else retries[1]},
        s3={"addressing_style": "path"},
        # One connection per upload thread and part, so that parallel parts do not queue.
        max_pool_connections=max(10, 2 * UPLOAD_CONCURRENCY),
    )
    # A session of its own: boto3's default session resolves credentials once per process,
    # so a later change of keys in the environment would be ignored.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=config,
                          region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def s3_client() -> Any:
    """A boto3 S3 client for the current environment (cached per endpoint, key and retries)."""
    retries = retry_settings()
    return _client(
        endpoint_url(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        (retries["mode"], retries["total_max_attempts"]),
    )


def check_reachable(uri: str) -> None:
    """Fail fast, in one line, when the S3 endpoint or bucket behind ``uri`` is unusable."""
    if not is_s3(uri):
        return
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    bucket, _ = split_s3(uri)
    retry_settings()  # a bad AWS_MAX_ATTEMPTS is an error here already, before any compute
    # One try with short timeouts: the point is to fail before any compute, in seconds.
    client = _client(endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"), ("standard", 1),
                     probe=True)
    where = endpoint_url() or "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except ConnectTimeoutError:
        raise UpstreamError(f"S3 endpoint {where} is unreachable: no connection within "
                            f"{PROBE_CONNECT_TIMEOUT} s (for {uri})") from None
    except ReadTimeoutError:
        raise UpstreamError(f"S3 endpoint {where} is unreachable: no answer within "
                            f"{PROBE_READ_TIMEOUT} s (for {uri})") from None
    except EndpointConnectionError:
        raise UpstreamError(f"S3 endpoint {where} is unreachable (for {uri})") from None
    except NoCredentialsError:
        raise UpstreamError(f"no S3 credentials in the environment (for {uri})") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise UpstreamError(f"S3 bucket {bucket!r} does not exist at {where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UpstreamError(f"S3 at {where} refused access to bucket {bucket!r}") from None
        raise UpstreamError(f"S3 error for {uri}: {code or e}") from None
    except Exception as e:  # noqa: BLE001 - any other transport failure is "unreachable"
        raise UpstreamError(f"S3 endpoint {where} is unreachable (for {uri}): {e}") from None


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise UpstreamError(f"{uri} does not exist") from None
            raise
    path = Path(uri)
    if not path.exists():
        raise UpstreamError(f"{uri} does not exist")
    return path.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp(path: Path) -> tuple[int, str]:
    """A new file ``.{name}.{random}`` beside ``path``, with the mode a plain ``open`` gives
    (0666 less the umask). ``tempfile.mkstemp`` makes it 0600, so a manifest would end up
    unreadable to another user who can read the shards beside it."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise UpstreamError(f"cannot make a temporary file beside {path}")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def size(uri: str) -> int | None:
    """The size in bytes of the object or file at ``uri``; None when there is none."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
    path = Path(uri)
    return path.stat().st_size if path.is_file() else None


def upload_file(local: str | Path, uri: str, *, part_size: int = MULTIPART_SIZE) -> None:
    """Copy a local file to ``uri``: on S3 in parts of ``part_size`` above that size, each
    request retried by the client (see the module's notes)."""
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=UPLOAD_CONCURRENCY,
        )
        try:
            s3_client().upload_file(str(local), bucket, key, Config=transfer)
        except Exception as e:  # noqa: BLE001 - boto3 wraps transport and S3 errors alike
            raise UpstreamError(f"upload of {local} to {uri} failed: {e}") from None
        return
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def download_file(uri: str, local: str | Path) -> Path:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        if not exists(uri):
            raise UpstreamError(f"{uri} does not exist")
        bucket, key = split_s3(uri)
        s3_client().download_file(bucket, key, str(local))
    else:
        if not Path(uri).exists():
            raise UpstreamError(f"{uri} does not exist")
        shutil.copyfile(uri, local)
    return local


def open_read(uri: str) -> IO[bytes]:
    """A readable binary stream (S3 objects are streamed, not downloaded first).

    An S3 object is fetched with a plain HTTP GET of a presigned URL rather than boto3's
    ``get_object``: the same request, signed by the same client, at half the CPU (boto3's
    request pipeline costs ~1.4 ms a call here, which a loader opening a shard every ~100
    images notices). A missing object is a :class:`FileNotFoundError`; other refusals are an
    :class:`OSError` with the HTTP status and S3's error code. Connection failures and 5xx
    answers are retried as boto3 would (:func:`retry_settings`' attempts).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        url = s3_client().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
        )
        response = _http().request("GET", url, preload_content=False, retries=_get_retries())
        if response.status == 200:
            return response  # type: ignore[no-any-return]
        body = response.read(4096)
        response.release_conn()
        code = _s3_error_code(body)
        if response.status == 404 or code == "NoSuchKey":
            raise FileNotFoundError(f"{uri} does not exist")
        raise OSError(f"GET {uri}: HTTP {response.status} {code}".rstrip())
    return open(uri, "rb")  # noqa: SIM115 - the caller closes it


def _s3_error_code(body: bytes) -> str:
    start = body.find(b"<Code>")
    end = body.find(b"</Code>", start)
    return body[start + 6 : end].decode("utf-8", "replace") if 0 <= start < end else ""


_pools: dict[int, Any] = {}  # pid → urllib3.PoolManager: a forked child must not share sockets


def _http() -> Any:
    import urllib3

    pool = _pools.get(os.getpid())
    if pool is None:
        _pools.clear()
        pool = _pools[os.getpid()] = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120)
        )
    return pool


def _get_retries() -> Any:
    import urllib3

    again = retry_settings()["total_max_attempts"] - 1
    return urllib3.Retry(
        total=again, connect=again, read=again, status=again, redirect=0,
        status_forcelist=(500, 502, 503, 504), backoff_factor=0.2, raise_on_status=False,
    )


def list_files(prefix: str) -> Iterator[str]:
    """Every object under ``prefix`` (a folder), as full URIs, in sorted order."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"
        return
    root = Path(prefix)
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                yield str(p)


def remove(prefix: str) -> None:
    """Delete everything under ``prefix`` (used to clear a half-written output)."""
    if is_s3(prefix):
        bucket, _ = split_s3(prefix)
        keys = [split_s3(u)[1] for u in list_files(prefix)]
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": chunk})
        return
    path = Path(prefix)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def remove_file(uri: str) -> None:
    """Delete one object or file if it is there (a completion marker, before a rewrite)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(uri).unlink(missing_ok=True)
