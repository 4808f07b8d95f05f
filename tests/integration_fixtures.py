"""Fixtures for integration tests against the real local services (SeaweedFS S3 + MLflow).

Load from tests/conftest.py with ``pytest_plugins = ["integration_fixtures"]``. Tests that use
``local_services`` carry ``@pytest.mark.integration``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from upstream import services, storage


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.ServicesInfo]:
    """One SeaweedFS + MLflow pair for the whole test session, in a temporary home, with
    its variables in os.environ (restored afterwards). Starting takes ~6-25 s, mostly MLflow,
    which is why it is shared. Its ports are drawn at random, so it runs next to a user's own
    services without touching them."""
    home = tmp_path_factory.mktemp("services-home")
    info = services.up(home)
    # override=True: the tests must reach these services, whatever the caller's shell points at.
    changes = services.apply_env(info, override=True)
    storage._client.cache_clear()
    try:
        yield info
    finally:
        services.restore_env(changes)
        storage._client.cache_clear()
        services.down(home)
