"""A flow run and its task run in progress, in a real flow-run process of its own
(with its own Prefect server): their starts and time limits are at the gateway
while they run, and stay without a completion when the process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from gateway import Pushgateway, wait_until

NS = "orchestrator"
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from prefect import flow, get_client, task
    from prefect.testing.utilities import prefect_test_harness
    from orchestrator_push.prefect import instrument

    instrument()

    @task(timeout_seconds=600)
    def wait(path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.1)

    @flow(name="waiting-flow", timeout_seconds=3600)
    def waiting(path: str) -> None:
        wait(path)

    with prefect_test_harness(server_startup_timeout=90):
        state = waiting(sys.argv[1], return_state=True)
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
            for _ in range(300):  # task runs are recorded from events, in the background
                task_runs = client.read_task_runs()
                if task_runs and task_runs[0].start_time is not None:
                    break
                time.sleep(0.1)
            task_run = task_runs[0]
        print("starts", run.start_time.timestamp(), task_run.start_time.timestamp(),
              run.expected_start_time.timestamp(), task_run.expected_start_time.timestamp(),
              flush=True)
""")


def run_flow(gw: Pushgateway, release: str) -> subprocess.Popen[str]:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": gw.url, "ORCHESTRATOR_PUSH_INTERVAL": "0.2"}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, release], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def value(gw: Pushgateway, name: str, **key: str) -> float | None:
    try:
        return gw.group(job="prefect", flow="waiting-flow", **key).value(f"{NS}_{name}")
    except KeyError:
        return None


def wait_for_starts(gw: Pushgateway, proc: subprocess.Popen[str]) -> tuple[float, float]:
    def started() -> float | None:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:] if proc.stderr else "exited")
        return value(gw, "task_last_start_timestamp_seconds", task="wait")

    task_start = wait_until(started, 180, interval=0.2, what="the task run's start")
    flow_start = value(gw, "flow_last_start_timestamp_seconds")
    assert flow_start is not None and flow_start <= task_start
    assert value(gw, "task_timeout_seconds", task="wait") == 600
    assert value(gw, "flow_timeout_seconds") == 3600
    assert value(gw, "task_last_completion_timestamp_seconds", task="wait") is None
    assert value(gw, "flow_last_completion_timestamp_seconds") is None
    return flow_start, task_start


def test_starts_are_pushed_while_the_runs_are_in_progress(pushgateway: Pushgateway,
                                                          tmp_path: object) -> None:
    release = os.path.join(str(tmp_path), "release")
    proc = run_flow(pushgateway, release)
    try:
        flow_start, task_start = wait_for_starts(pushgateway, proc)
        open(release, "w").close()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("starts "))
    flow_started, task_started, flow_expected, task_expected = (float(x) for x in line.split()[1:])
    # Prefect's own record of when the runs started and were expected to (its API)
    assert flow_start == flow_started
    assert task_start == task_started
    assert value(pushgateway, "flow_last_start_delay_seconds") == pytest.approx(
        flow_started - flow_expected, abs=1e-6)
    assert value(pushgateway, "task_last_queued_duration_seconds", task="wait") == pytest.approx(
        task_started - task_expected, abs=1e-6)
    assert value(pushgateway, "task_last_completion_timestamp_seconds", task="wait") > task_start
    assert value(pushgateway, "flow_last_completion_timestamp_seconds") > flow_start


def test_a_killed_flow_run_process_leaves_its_starts_without_completions(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    proc = run_flow(pushgateway, os.path.join(str(tmp_path), "never"))
    try:
        wait_for_starts(pushgateway, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as an OOM kill: nothing of ours runs after it
        proc.wait(30)
    assert value(pushgateway, "task_last_start_timestamp_seconds", task="wait") is not None
    assert value(pushgateway, "task_last_completion_timestamp_seconds", task="wait") is None
    assert value(pushgateway, "flow_last_completion_timestamp_seconds") is None
