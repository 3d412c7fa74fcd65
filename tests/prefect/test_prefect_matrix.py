"""The detection matrix, Prefect's row: a real `prefect server`, a process work
pool and `prefect worker start` with the plugin, the shipped rules on a real
Prometheus (1 s scrape and evaluation) and a real Alertmanager with the shipped
routes, and a webhook receiver. Each failure is made to happen for real and
exactly its alerts must arrive, within a stated time:

- failed: a flow raises;
- vanished: the flow-run process is SIGKILLed: the worker crashes the run, which
  is reported as crashed (a failure): nothing vanishes;
- ended from outside: a cancel through the API: the flow run is reported
  cancelled (no alert), and its task in progress crashed, as Prefect records
  it (the termination signal the cancel sends aborts it): a task alert;
- hung: the flow-run process is stopped (SIGSTOP) past the flow's timeout;
- late: the worker is stopped (SIGSTOP) across a due time of a deployment that
  runs every 60 s until the run is missed, then resumed: the run starts late;
- missed and worker gone: the worker is SIGKILLed: the deployment's next run
  is missed, and the worker is not seen for 2 minutes.

The table of failure -> alert and seconds to arrive is printed (`pytest -s`).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest
from alerting import AlertStack, Case, ScheduledFlow, await_cases, kill_at_end, matrix_table
from gateway import wait_until
from prefect_api import task_runs
from prefect_deployment import WORKER, Deployment, deploy, hold_pid, released

GRACE = 15.0  # the schedule grace the worker pushes (a run starts a few seconds after it is due)
DEPLOYMENTS = {
    "m-prefect-failed": "m_prefect_failed",
    "m-prefect-hung": "m_prefect_hung",
    "m-prefect-vanish": "m_prefect_vanish",
    "m-prefect-cancel": "m_prefect_cancel",
    "m-prefect-every60": "m_prefect_every60@60",
}

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[AlertStack, Deployment]]:
    try:
        alerts = AlertStack()
    except RuntimeError as exc:  # a missing binary: an error that says what to install
        pytest.fail(str(exc), pytrace=False)
    try:
        with tempfile.TemporaryDirectory(prefix="op-prefect-matrix-") as tmp:
            for d in deploy(alerts.gw, tmp, DEPLOYMENTS,
                            {"ORCHESTRATOR_PUSH_SCHEDULE_GRACE": f"{GRACE:g}s"}):
                yield alerts, d
    finally:
        alerts.stop()


def test_each_prefect_failure_raises_exactly_its_alert(
        stack: tuple[AlertStack, Deployment], capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest) -> None:
    s, d = stack
    worker = d.procs[-1]  # the server, then the worker

    def alive() -> None:
        assert worker.poll() is None, d.log("worker.log")

    # the scheduled deployment has run at least once
    wait_until(lambda: alive() or d.value("flow_last_success_timestamp_seconds",
                                          "m-prefect-every60"), 120, interval=0.5,
               what=f"a run of m-prefect-every60; worker log:\n{d.log('worker.log')}")

    run = d.final(d.run("m-prefect-failed"))
    assert run.state.is_failed()  # Prefect's own record
    d.wait_value("flow_last_completion_timestamp_seconds", "m-prefect-failed",
                 expect=run.state.timestamp.timestamp())
    failed = Case("prefect", "failed", {"flow": "m-prefect-failed"},
                  {"OrchestratorFlowFailed": "/chat"}, 20, at=time.time())

    path, pid_file = released(d)
    run_id = d.run("m-prefect-vanish", path=path)
    os.kill(hold_pid(pid_file), signal.SIGKILL)
    killed = time.time()
    run = d.final(run_id)
    assert run.state.is_crashed()
    vanished = Case("prefect", "vanished (flow-run process SIGKILLed)",
                    {"flow": "m-prefect-vanish"}, {"OrchestratorFlowFailed": "/chat"}, 30,
                    at=killed)

    path, pid_file = released(d)
    run_id = d.run("m-prefect-cancel", path=path)
    hold_pid(pid_file)
    d.wait_value("task_last_start_timestamp_seconds", "m-prefect-cancel", "hold")
    from prefect.states import Cancelling

    with d.client() as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
    cancelled_at = time.time()
    run = d.final(run_id)
    assert run.state.is_cancelled()
    with d.client() as client:  # Prefect's own record of the task in progress
        assert {t.name.rsplit("-", 1)[0]: t.state.type.value
                for t in task_runs(client, [run_id])} == {"hold": "CRASHED"}
    d.wait_value("flow_last_status", "m-prefect-cancel", expect=1, status="cancelled")
    d.wait_value("task_last_status", "m-prefect-cancel", "hold", expect=1, status="crashed")
    cancelled = Case("prefect", "ended from outside (API cancel)", {"flow": "m-prefect-cancel"},
                     {"OrchestratorTaskFailed": "/chat"}, 30, at=cancelled_at)

    path, pid_file = released(d)
    run_id = d.run("m-prefect-hung", path=path)
    stuck = hold_pid(pid_file)
    started = d.wait_value("flow_last_start_timestamp_seconds", "m-prefect-hung",
                           expect=d.read(run_id).start_time.timestamp())
    assert d.value("flow_timeout_seconds", "m-prefect-hung") == 3
    # stopped, it lives in a session of its own: killed at the end, whatever happens
    kill_at_end(request, stuck)
    os.kill(stuck, signal.SIGSTOP)  # before its 3 s: nothing in it can stop it now
    hung = Case("prefect", "hung", {"flow": "m-prefect-hung"}, {"OrchestratorFlowHung": "/pager"},
                20, at=max(started + 3 + 1, time.time()))  # its limit, then the matrix's grace
    await_cases(s, [failed, vanished, hung], check=alive)
    assert d.read(run_id).state.is_running()  # Prefect's own record: still running

    # (every 60 s: the run after the late one starts long after it)
    every60 = ScheduledFlow(s, "prefect", "prefect", "m-prefect-every60", GRACE, alive,
                            lead=20)
    late, due, started_late, delay = every60.late(worker, "worker", 120)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with d.client() as client:  # Prefect's own record of the run that was due
        dep = client.read_deployment_by_name("m-prefect-every60/d")
        (run,) = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])))
            if r.expected_start_time.timestamp() == pytest.approx(due, abs=1e-3)]
    assert run.start_time.timestamp() == pytest.approx(started_late, abs=1e-3)
    assert delay == pytest.approx(
        run.start_time.timestamp() - run.expected_start_time.timestamp(), abs=1e-3)
    assert delay > GRACE

    # the worker killed between two runs (its flow-run processes live in
    # sessions of their own; none is running then): the next run is missed
    cases = [failed, vanished, cancelled, hung, *late,
             *every60.killed(worker, "worker", {"job": "prefect", "instance": WORKER}, 120)]
    table = matrix_table(s.receiver, cases)
    with capsys.disabled():
        print("\n" + table)
