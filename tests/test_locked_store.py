"""The local SeaweedFS is reachable through S3 alone: plain, unauthenticated HTTP requests to
its filer, master and volume ports are refused, against the real running services."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

import psutil
import pytest

from upstream import services, storage

pytestmark = pytest.mark.integration


def _request(method: str, url: str, data: bytes | None = None) -> int:
    """The HTTP status of one request without credentials (no retry, no redirect)."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_filer_master_and_volume_refuse_unauthenticated_requests(
    local_services: services.ServicesInfo,
) -> None:
    key = f"locked-{uuid.uuid4().hex[:8]}/shard-000000.tar"
    uri = f"{local_services.data_root}/{key}"
    storage.write_bytes(uri, b"the real shard")
    ports = local_services.ports
    filer = f"http://127.0.0.1:{ports['filer']}/buckets/{services.DATA_BUCKET}/{key}"
    master = f"http://127.0.0.1:{ports['master']}"
    volume = f"http://127.0.0.1:{ports['volume']}"
    refused = {401, 403, 404, 405}
    attempts = {
        # The filer's HTTP API served any bucket's files to anyone on the machine.
        ("GET", filer, None),
        ("PUT", filer, b"a replaced shard"),
        ("POST", filer, b"a replaced shard"),
        ("DELETE", filer, None),
        # The master's handed out volume write tokens and dropped whole collections (buckets).
        ("GET", f"{master}/dir/assign", None),
        ("GET", f"{master}/col/delete?collection={services.DATA_BUCKET}", None),
    }
    for method, url, data in sorted(attempts, key=str):
        assert _request(method, url, data) in refused, (method, url)
    # The volume server must keep its HTTP port (it carries the data): it checks a token first.
    for volume_id in range(1, 8):
        fid = f"{volume_id},01637037d6"
        for method, data in (("POST", b"x"), ("PUT", b"x"), ("DELETE", None), ("GET", None)):
            assert _request(method, f"{volume}/{fid}", data) == 401, (method, fid)
    # S3, with the credentials, still reads, replaces and deletes.
    assert storage.read_bytes(uri) == b"the real shard"
    storage.write_bytes(uri, b"a new version")
    assert storage.read_bytes(uri) == b"a new version"
    storage.remove_file(uri)
    assert not storage.exists(uri)


def test_signing_keys_stay_off_the_command_line(local_services: services.ServicesInfo) -> None:
    weed = psutil.Process(local_services.s3_pid)
    environ = weed.environ()
    keys = [environ.get(name, "") for name in services.WEED_JWT_KEYS]
    assert all(len(k) >= 32 for k in keys) and len(set(keys)) == len(keys)
    command = " ".join(weed.cmdline())
    assert "-disableHttp" in command
    state = (local_services.services_dir / "state.json").read_text()
    assert not any(k in command or k in state for k in keys)
