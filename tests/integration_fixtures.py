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


@pytest.fixture(autouse=True)
def _services_env(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test that uses ``local_services``: the services' variables, whatever an earlier
    test left in this process's environment. Module fixtures save and restore the variables
    they change, and one of them may have been active when the session's services started,
    so that its restore took their values out again; which test comes first depends on how
    pytest-xdist hands the files to its workers."""
    if "local_services" not in request.fixturenames:
        yield
        return
    info = request.getfixturevalue("local_services")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        for name, value in services.env(info).items():
            mp.setenv(name, value)
        storage._client.cache_clear()
        try:
            yield
        finally:
            storage._client.cache_clear()
