"""One record per attempt, checked against Prefect's own state history (read
from its API): a retry carries the failed attempt's number, duration and end,
and is at the gateway before the next attempt starts; the final record has its
own attempt's duration; a crashing task and a task whose upstream failed are
reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gateway import Pushgateway, wait_until
from prefect import flow, get_client, task
from prefect_api import task_run_of

import orchestrator_push as op
from orchestrator_push.prefect import instrument, uninstrument

NS = "orchestrator"
_runs: dict[str, int] = {}


def _fail_first(key: str, path: str) -> None:
    """The first attempt fails after 0.3 s; the next ones wait for ``path``."""
    _runs[key] = _runs.get(key, 0) + 1
    if _runs[key] == 1:
        time.sleep(0.3)
        raise RuntimeError("first attempt fails")
    while not os.path.exists(path):
        time.sleep(0.02)


@task(retries=1, retry_delay_seconds=0)
def retried_now(key: str, path: str) -> None:
    _fail_first(key, path)


@task(retries=1, retry_delay_seconds=2)
def retried_later(key: str, path: str) -> None:
    _fail_first(key, path)


@flow(name="attempts-now")
def attempts_now(key: str, path: str) -> None:
    retried_now(key, path)


@flow(name="attempts-later")
def attempts_later(key: str, path: str) -> None:
    retried_later(key, path)


@flow(name="attempts-flow", retries=1, retry_delay_seconds=2)
def attempts_flow(key: str, path: str) -> None:
    _fail_first(key, path)


@task
def upstream() -> None:
    raise ValueError("upstream fails")


@task
def downstream(x: Any) -> Any:
    return x


@flow(name="attempts-upstream")
def attempts_upstream() -> None:
    downstream.submit(upstream.submit()).wait()


def fail_the_run(flow: Any, flow_run: Any, state: Any) -> None:
    """A hook that decides the run failed after all, through the API."""
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Failed(message="rejected by a hook"), force=True)


@flow(name="attempts-hook-fails", on_completion=[fail_the_run])
def attempts_hook_fails() -> int:
    return 1


@pytest.fixture
def gw(pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pushgateway]:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", pushgateway.url)
    monkeypatch.setenv("ORCHESTRATOR_PUSH_INTERVAL", "0.1")
    op.reset()
    instrument()
    yield pushgateway
    uninstrument()


def value(gw: Pushgateway, name: str, flow: str, task: str | None = None,
          **labels: str) -> float | None:
    try:
        key = {"job": "prefect", "flow": flow, **({"task": task} if task else {})}
        return gw.group(**key).value(f"{NS}_{name}", **labels)
    except KeyError:
        return None


def in_thread(fn: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args, return_state=True)), daemon=True)
    t.start()
    return t, out


def history(run_id: Any, kind: str) -> list[Any]:
    """Prefect's states of a task run or flow run, oldest first."""
    with get_client(sync_client=True) as client:
        states = (client.read_task_run_states(run_id) if kind == "task"
                  else client.read_flow_run_states(run_id))
    return sorted(states, key=lambda s: s.timestamp)


def task_run_id(flow_state: Any, name: str, ended: Any = lambda state: state.is_final()) -> Any:
    return task_run_of(flow_state.state_details.flow_run_id, name, ended).id


def seen_retry(gw: Pushgateway, flow: str, task: str | None) -> dict[str, float]:
    """The retry record, read while the next attempt waits."""
    wait_until(lambda: value(gw, "task_last_status" if task else "flow_last_status", flow, task,
                             status="retry") == 1, 30, interval=0.05, what="the retry record")
    prefix = "task" if task else "flow"
    out = {k: value(gw, f"{prefix}_last_{k}", flow, task)
           for k in ("completion_timestamp_seconds", "duration_seconds")}
    if task:
        out["attempt"] = value(gw, "task_last_attempt", flow, task)
    return {k: float(v) for k, v in out.items() if v is not None}


@pytest.mark.parametrize(("fn", "name", "between"), [
    (attempts_now, "retried_now", "Retrying"),
    (attempts_later, "retried_later", "AwaitingRetry"),
])
def test_a_task_retry_is_the_failed_attempt(gw: Pushgateway, tmp_path: Any, fn: Any,
                                            name: str, between: str) -> None:
    path = str(tmp_path / "release")
    flow_name = fn.name
    t, out = in_thread(fn, name + str(tmp_path), path)
    retry = seen_retry(gw, flow_name, name)
    open(path, "w").close()
    t.join(60)
    assert op.flush(10)
    states = history(task_run_id(out[0], name), "task")
    names = [s.name for s in states]
    first = states[names.index("Running")].timestamp.timestamp()
    failed = states[names.index(between)].timestamp.timestamp()
    second = states[names.index("Retrying")].timestamp.timestamp()
    done = states[names.index("Completed")].timestamp.timestamp()
    assert retry == {"completion_timestamp_seconds": pytest.approx(failed, abs=1e-6),
                     "duration_seconds": pytest.approx(failed - first, abs=1e-5),
                     "attempt": 1}
    assert 0.3 <= retry["duration_seconds"] < 1.5  # the attempt, not the retry delay
    assert value(gw, "task_last_status", flow_name, name, status="success") == 1
    assert value(gw, "task_last_attempt", flow_name, name) == 2
    assert value(gw, "task_last_completion_timestamp_seconds", flow_name, name) == \
        pytest.approx(done, abs=1e-6)
    assert value(gw, "task_last_duration_seconds", flow_name, name) == \
        pytest.approx(done - second, abs=1e-5)


def test_a_flow_retry_is_the_failed_attempt(gw: Pushgateway, tmp_path: Any) -> None:
    path = str(tmp_path / "release")
    t, out = in_thread(attempts_flow, "flow" + str(tmp_path), path)
    retry = seen_retry(gw, "attempts-flow", None)
    open(path, "w").close()
    t.join(60)
    assert op.flush(10) and out[0].is_completed()
    states = history(out[0].state_details.flow_run_id, "flow")
    names = [s.name for s in states]
    first = states[names.index("Running")].timestamp.timestamp()
    failed = states[names.index("AwaitingRetry")].timestamp.timestamp()
    second = [s for s in states if s.is_running()][-1].timestamp.timestamp()
    done = states[names.index("Completed")].timestamp.timestamp()
    assert retry == {"completion_timestamp_seconds": pytest.approx(failed, abs=1e-6),
                     "duration_seconds": pytest.approx(failed - first, abs=1e-5)}
    assert value(gw, "flow_last_status", "attempts-flow", status="success") == 1
    assert value(gw, "flow_last_duration_seconds", "attempts-flow") == \
        pytest.approx(done - second, abs=1e-5)


def test_a_task_whose_upstream_failed_is_upstream_failed(gw: Pushgateway) -> None:
    state = attempts_upstream(return_state=True)
    assert state.is_completed()  # the flow returns normally: .wait() does not raise
    assert op.flush(10)
    run_id = task_run_id(state, "downstream", lambda s: s.name == "NotReady")
    (not_ready,) = [s for s in history(run_id, "task")
                    if s.name == "NotReady"]
    assert value(gw, "task_last_status", "attempts-upstream", "downstream",
                 status="upstream_failed") == 1
    assert value(gw, "task_last_status", "attempts-upstream", "downstream",
                 status="failed") == 0
    assert value(gw, "task_last_attempt", "attempts-upstream", "downstream") == 0
    assert value(gw, "task_last_completion_timestamp_seconds", "attempts-upstream",
                 "downstream") == pytest.approx(not_ready.timestamp.timestamp(), abs=1e-6)
    assert value(gw, "task_last_status", "attempts-upstream", "upstream", status="failed") == 1


CRASH = textwrap.dedent("""
    import json, sys, time
    from prefect import flow, get_client, task
    from prefect.testing.utilities import prefect_test_harness
    from orchestrator_push.prefect import instrument

    instrument()

    @task
    def exits() -> None:
        sys.exit(2)

    @flow(name="attempts-crash")
    def crashing() -> None:
        exits()

    with prefect_test_harness(server_startup_timeout=90):
        try:
            crashing()
        except SystemExit:
            pass
        with get_client(sync_client=True) as client:
            for _ in range(300):  # task runs are recorded from events, in the background
                runs = [r for r in client.read_task_runs() if r.name.startswith("exits")]
                if runs and runs[0].state is not None and runs[0].state.is_final():
                    break
                time.sleep(0.1)
            (run,) = runs
            print(json.dumps({"type": run.state.type.value,
                              "end": run.state.timestamp.timestamp()}))
""")


def test_a_task_that_exits_is_crashed(pushgateway: Pushgateway) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    p = subprocess.run([sys.executable, "-c", CRASH], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    api = json.loads(p.stdout.strip().splitlines()[-1])
    assert api["type"] == "CRASHED"
    assert value(pushgateway, "task_last_status", "attempts-crash", "exits",
                 status="crashed") == 1
    assert value(pushgateway, "task_last_completion_timestamp_seconds", "attempts-crash",
                 "exits") == pytest.approx(api["end"], abs=1e-6)
    assert value(pushgateway, "flow_last_status", "attempts-crash", status="crashed") == 1


def test_a_hook_that_fails_the_run_is_followed(gw: Pushgateway) -> None:
    state = attempts_hook_fails(return_state=True)
    assert op.flush(10)
    with get_client(sync_client=True) as client:
        api = client.read_flow_run(state.state_details.flow_run_id).state
    assert api.is_failed() and api.message == "rejected by a hook"
    end = api.timestamp.timestamp()
    assert value(gw, "flow_last_status", "attempts-hook-fails", status="failed") == 1
    assert value(gw, "flow_last_status", "attempts-hook-fails", status="success") == 0
    assert value(gw, "flow_last_completion_timestamp_seconds", "attempts-hook-fails") == \
        pytest.approx(end, abs=1e-6)
    assert value(gw, "flow_last_failure_timestamp_seconds", "attempts-hook-fails") == \
        pytest.approx(end, abs=1e-6)
