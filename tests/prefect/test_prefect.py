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
            assert os.listdir(str(tmp_path)) == ["counts"]  # no spool file; the host count store
        finally:
            gw.stop()
    finally:
        uninstrument()


def zero_code(script: str, gw: Pushgateway, api_url: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with Prefect's plugins switched on."""
    env = {**os.environ, "PREFECT_PLUGINS_ENABLED": "1", "ORCHESTRATOR_PUSH_URL": gw.url,
           "PREFECT_API_URL": api_url}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_zero_code_plugin_in_a_subprocess(pushgateway: Pushgateway, api_url: str) -> None:
    script = textwrap.dedent("""
        from prefect import flow, task

        @task
        def hello() -> str:
            return "hi"

        @flow(name="zero-code")
        def zero() -> None:
            hello()

        zero()
    """)
    zero_code(script, pushgateway, api_url)
    g = pushgateway.group(job="prefect", flow="zero-code", task="hello")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    f = pushgateway.group(job="prefect", flow="zero-code")
    assert f.value(f"{NS}_flow_last_status", status="success") == 1


def test_zero_code_when_prefect_is_first_imported_inside_an_event_loop(
        pushgateway: Pushgateway, api_url: str) -> None:
    # Prefect's loader runs plugins with anyio.run, which fails in a running loop;
    # orchestrator_push.pth instruments after the import instead.
    script = textwrap.dedent("""
        import asyncio

        async def main() -> None:
            from prefect import flow, task  # the first import of prefect

            @task
            def hello() -> str:
                return "hi"

            @flow(name="in-a-loop")
            async def looped() -> None:
                hello()

            await looped()

        asyncio.run(main())
    """)
    p = zero_code(script, pushgateway, api_url)
    assert "Failed to initialize plugins" in p.stderr  # Prefect's loader did fail
    assert "instrumented after the import instead" in p.stderr
    g = pushgateway.group(job="prefect", flow="in-a-loop", task="hello")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    f = pushgateway.group(job="prefect", flow="in-a-loop")
    assert f.value(f"{NS}_flow_last_status", status="success") == 1


@pytest.mark.parametrize(("settings", "on"), [
    ({"enabled": True}, True),
    ({"enabled": False}, False),
    ({"enabled": True, "safe_mode": True}, False),
    ({"enabled": True, "allow": {"orchestrator_push", "other"}}, True),
    ({"enabled": True, "allow": {"other"}}, False),
    ({"enabled": True, "deny": {"orchestrator_push"}}, False),
])
def test_the_start_up_hook_follows_prefects_plugin_settings(settings: dict, on: bool) -> None:  # type: ignore[type-arg]
    from types import SimpleNamespace

    from orchestrator_push.prefect_startup import switched_on

    assert switched_on(SimpleNamespace(**settings)) is on
