from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One real (ephemeral, sqlite) Prefect API server for the session."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90), temporary_settings(
        {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield


@pytest.fixture(autouse=True)
def _plugin_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """instrument() may set Prefect's plugin settings for child processes:
    each test starts, and ends, with the environment it was given."""
    for name in ("PREFECT_PLUGINS_ENABLED", "PREFECT_PLUGINS_ALLOW"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api_url() -> str:
    """The session server's API, for a child process to use instead of starting
    a server of its own (tens of seconds each)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "no Prefect API URL in the session's settings"
    return str(url)
