"""Shared test fixtures."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# `make test` runs the files on 2 pytest-xdist workers (one a core). torch's default, a thread
# per core in each worker and in every stage subprocess they start, would put 4 spinning
# OpenMP threads on 2 cores: a worker and what it starts get one thread each. Set before
# anything imports torch; a value the caller exported is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# The real local services (SeaweedFS + MLflow) for integration and end-to-end tests.
pytest_plugins = ["integration_fixtures"]

# --- moto S3 (unit tests of the s3:// code paths) ---------------------------------------------
# One in-memory moto server per session (it starts in ~0.5 s); each test gets its own bucket and
# the environment pointing at it. moto is a mock: it checks no credentials and keeps nothing.

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_s3(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh, empty bucket on a moto S3 server that boto3 is pointed at."""
    from upstream import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _moto_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._client.cache_clear()
    bucket = f"test-bucket-{next(_bucket_numbers)}"
    storage.s3_client().create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        storage._client.cache_clear()


# --- end of moto S3 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """UPSTREAM_HOME in a temporary folder, so MLflow runs go to a throwaway SQLite store
    there (created once for the module)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPSTREAM_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("UPSTREAM_RUN_GROUP", raising=False)
        yield home



# --- order: the longest files first -----------------------------------------------------------
# Under `--dist loadfile` xdist hands whole files to whichever worker is free, in collection
# order; the files that run for minutes go first, so that neither worker is left running one
# of them alone at the end (longest-first scheduling). Within a file the order is unchanged.
LONG_FILES = (
    "test_study_e2e.py", "test_e2e.py", "test_cli.py", "test_pretrain_scale.py",
    "test_faults.py", "test_claims.py", "test_finetune.py", "test_sources_hard.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
