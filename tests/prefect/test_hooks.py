"""The per-flow form (Prefect's own state-hook arguments, no instrument()):
the same records, checked against Prefect's state history; with instrument()
active the hooks leave the recording to it. And the version check."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from gateway import Pushgateway
from prefect import flow, get_client, task
from prefect_api import task_run_of

import orchestrator_push as op
from orchestrator_push import prefect as adapter
from orchestrator_push.prefect import instrument, on_flow_state, on_task_state, uninstrument

NS = "orchestrator"
FLOW_HOOKS = [on_flow_state]
TASK_HOOKS = [on_task_state]
_runs: dict[str, int] = {}


@task(retries=1, retry_delay_seconds=0, on_running=TASK_HOOKS, on_completion=TASK_HOOKS,
      on_failure=TASK_HOOKS)
def hooked_task(key: str) -> int:
    _runs[key] = _runs.get(key, 0) + 1
    if _runs[key] == 1:
        raise RuntimeError("first attempt fails")
    return 1


@flow(name="hooked-flow", timeout_seconds=900, on_running=FLOW_HOOKS, on_completion=FLOW_HOOKS,
      on_failure=FLOW_HOOKS, on_crashed=FLOW_HOOKS, on_cancellation=FLOW_HOOKS)
def hooked_flow(key: str) -> int:
    return hooked_task(key)


@flow(name="hooked-failing", on_running=FLOW_HOOKS, on_failure=FLOW_HOOKS)
def hooked_failing() -> None:
    raise ValueError("fails")


@pytest.fixture
def gw(pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pushgateway]:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", pushgateway.url)
    op.reset()
    uninstrument()
    yield pushgateway


def states(run_id: Any, kind: str) -> dict[str, float]:
    with get_client(sync_client=True) as client:
        found = (client.read_task_run_states(run_id) if kind == "task"
                 else client.read_flow_run_states(run_id))
    return {s.name: s.timestamp.timestamp() for s in found}


def test_hooks_record_runs_without_instrument(gw: Pushgateway, tmp_path: Any) -> None:
    state = hooked_flow(str(tmp_path), return_state=True)
    assert state.is_completed()
    assert op.flush(10)
    flow_run_id = state.state_details.flow_run_id
    task_run = task_run_of(flow_run_id, "hooked_task")
    f, t = states(flow_run_id, "flow"), states(task_run.id, "task")
    g = gw.group(job="prefect", flow="hooked-flow")
    assert g.value(f"{NS}_flow_last_status", status="success") == 1
    assert g.value(f"{NS}_flow_last_start_timestamp_seconds") == pytest.approx(f["Running"], abs=1e-6)
    assert g.value(f"{NS}_flow_timeout_seconds") == 900
    assert g.value(f"{NS}_flow_last_completion_timestamp_seconds") == pytest.approx(
        f["Completed"], abs=1e-6)
    assert g.value(f"{NS}_flow_last_duration_seconds") == pytest.approx(
        f["Completed"] - f["Running"], abs=1e-5)
    g = gw.group(job="prefect", flow="hooked-flow", task="hooked_task")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 2
    assert g.value(f"{NS}_task_last_duration_seconds") == pytest.approx(
        t["Completed"] - t["Retrying"], abs=1e-5)


def test_a_failing_flow_through_hooks(gw: Pushgateway) -> None:
    assert hooked_failing(return_state=True).is_failed()
    assert op.flush(10)
    g = gw.group(job="prefect", flow="hooked-failing")
    assert g.value(f"{NS}_flow_last_status", status="failed") == 1
    assert g.value(f"{NS}_flow_last_failure_timestamp_seconds") > 0


def test_hooks_do_nothing_while_instrument_records(gw: Pushgateway, tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[str] = []
    monkeypatch.setattr(adapter, "_flow_hook", lambda *a: recorded.append("flow"))
    monkeypatch.setattr(adapter, "_task_hook", lambda *a: recorded.append("task"))
    instrument()
    try:
        assert hooked_flow(str(tmp_path), return_state=True).is_completed()
    finally:
        uninstrument()
    assert op.flush(10)
    assert recorded == []
    g = gw.group(job="prefect", flow="hooked-flow", task="hooked_task")
    assert g.value(f"{NS}_task_last_attempt") == 2  # recorded by instrument()


def test_an_untested_prefect_version_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator_push"):
        adapter._check_version("3.9.1")
        assert caplog.records == []
        adapter._check_version("3.5.2")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Prefect 3.5.2 is not a tested version (tested: 3.8, 3.9)" in line


def test_child_processes_get_our_plugin_unless_the_user_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    adapter._instrument_children()
    assert os.environ["PREFECT_PLUGINS_ENABLED"] == "1"
    assert os.environ["PREFECT_PLUGINS_ALLOW"] == "orchestrator_push"
    adapter._uninstrument_children()
    assert "PREFECT_PLUGINS_ENABLED" not in os.environ
    assert "PREFECT_PLUGINS_ALLOW" not in os.environ
    # the user's own settings are never changed, nor removed
    monkeypatch.setenv("PREFECT_PLUGINS_ENABLED", "1")
    adapter._instrument_children()
    assert "PREFECT_PLUGINS_ALLOW" not in os.environ
    adapter._uninstrument_children()
    assert os.environ["PREFECT_PLUGINS_ENABLED"] == "1"
