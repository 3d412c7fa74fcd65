from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import gateway
import proxy as proxy_

# A test run started in the background by a non-interactive shell (`cmd &` in
# a CI script) inherits SIGINT and SIGQUIT ignored, and so does every process
# a test starts: an ignored signal stays ignored across exec. Prefect's worker
# stops on SIGTERM by sending itself SIGINT; ignored, it never stops (seen in
# CI). The processes the tests start get the dispositions a terminal gives.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture
def pushgateway() -> Iterator[gateway.Pushgateway]:
    """A fresh real Pushgateway on a free 127.0.0.1 port, persistence off."""
    try:
        gateway.find_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield from gateway.running()


@pytest.fixture
def proxy(pushgateway: gateway.Pushgateway) -> Iterator[proxy_.Proxy]:
    """A fault-injecting proxy in front of ``pushgateway`` (proxy.py)."""
    p = proxy_.Proxy(pushgateway.port)
    yield p
    p.stop()


@pytest.fixture
def three() -> Iterator[list[gateway.Pushgateway]]:
    """Three fresh real Pushgateways (several gateways: ORCHESTRATOR_PUSH_URL lists them)."""
    try:
        gateway.find_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    gws: list[gateway.Pushgateway] = []
    try:
        for _ in range(3):
            gws.append(gateway.start())
        yield gws
    finally:
        for gw in gws:
            gw.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_PUSH_") and key != "ORCHESTRATOR_PUSH_TEST_PUSHGATEWAY":
            monkeypatch.delenv(key)
    # Every test (and the processes it starts) gets its own spool directory, so
    # no test replays what another one spooled.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    from orchestrator_push import logs

    logs.reset()  # rate-limited warnings start afresh: each test sees its own
    yield
    import orchestrator_push

    orchestrator_push.reset()
