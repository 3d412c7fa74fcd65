"""Prefect adapter: real flows on a real (ephemeral) Prefect server, a real Pushgateway."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from gateway import Pushgateway, free_port, start

import orchestrator_push as op
from orchestrator_push.prefect import instrument, uninstrument

NS = "orchestrator"
HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)

import flows  # noqa: E402  (defined before instrument(): must still be reported)


@pytest.fixture
def instrumented(pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", pushgateway.url)
    op.reset()
    instrument()
    instrument()  # idempotent
    yield pushgateway
    uninstrument()


def test_every_task_and_flow_is_reported(instrumented: Pushgateway) -> None:
    gw = instrumented
    flows.calls.clear()
    flows.main_flow(uuid.uuid4().hex)
    assert op.flush(10)
    g = gw.group(job="prefect", flow="main-flow", task="ok_task")
    assert g.value(f"{NS}_task_last_status", framework="prefect", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 1
    g = gw.group(job="prefect", flow="main-flow", task="flaky_task")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 2
    g = gw.group(job="prefect", flow="main-flow", task="bad_task")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert f"{NS}_task_last_failure_timestamp_seconds" in g.metrics
    g = gw.group(job="prefect", flow="main-flow", task="cached_task")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    # the subflow reports as a flow of its own, and its task under its name
    g = gw.group(job="prefect", flow="child-flow", task="ok_task")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    f = gw.group(job="prefect", flow="child-flow")
    assert f.value(f"{NS}_flow_last_status", status="success") == 1
    f = gw.group(job="prefect", flow="main-flow")
    # bad_task's failure was returned as a state, not raised: the flow completed
    assert f.value(f"{NS}_flow_last_status", status="success") == 1
    assert f.value(f"{NS}_flow_last_duration_seconds") > 0
    # users' own hooks still fire
    assert "user:ok_task:Completed" in flows.calls


def test_failing_flow(instrumented: Pushgateway) -> None:
    state = flows.failing_flow(return_state=True)
    assert state.is_failed()
    assert op.flush(10)
    f = instrumented.group(job="prefect", flow="failing-flow")
    assert f.value(f"{NS}_flow_last_status", status="failed") == 1
    assert f.value(f"{NS}_flow_last_failure_timestamp_seconds") > 0
    assert f"{NS}_flow_last_success_timestamp_seconds" not in f.metrics


def test_copies_made_with_with_options_are_reported(instrumented: Pushgateway) -> None:
    flows.calls.clear()
    assert flows.with_options_flow() == 5
    assert op.flush(10)
    g = instrumented.group(job="prefect", flow="with-options-flow", task="renamed_task")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert "user:renamed_task:Completed" in flows.calls  # the copy keeps the user's hook


def test_uninstrument_stops_reporting(instrumented: Pushgateway) -> None:
    uninstrument()
    flows.child_flow()
    assert op.flush(5)
    assert instrumented.groups() == []


def test_gateway_down_leaves_the_flow_state_unchanged(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: object) -> None:
    port = free_port()
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ORCHESTRATOR_PUSH_SPOOL_DIR", str(tmp_path))
    op.reset()
    instrument()
    try:
        state = flows.child_flow(return_state=True)
        assert state.is_completed() and state.result() == 1
        assert op.flush(0.5) is True  # not delivered, but kept in the spool
        assert os.listdir(str(tmp_path))
        gw = start(port=port)
        try:
            assert op.flush(10)  # the next flush offers the spool to the gateway
            f = gw.group(job="prefect", flow="child-flow")
            assert f.value(f"{NS}_flow_last_status", status="success") == 1
            assert os.listdir(str(tmp_path)) == []
        finally:
            gw.stop()
    finally:
        uninstrument()


def test_zero_code_plugin_in_a_subprocess(pushgateway: Pushgateway) -> None:
    script = textwrap.dedent("""
        from prefect import flow, task
        from prefect.testing.utilities import prefect_test_harness

        @task
        def hello() -> str:
            return "hi"

        @flow(name="zero-code")
        def zero() -> None:
            hello()

        with prefect_test_harness(server_startup_timeout=90):
            zero()
    """)
    env = {**os.environ, "PREFECT_PLUGINS_ENABLED": "1", "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": ""}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    g = pushgateway.group(job="prefect", flow="zero-code", task="hello")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    f = pushgateway.group(job="prefect", flow="zero-code")
    assert f.value(f"{NS}_flow_last_status", status="success") == 1
