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

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest
from alerting import AlertStack, Case, await_cases, matrix_table
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
    request.addfinalizer(lambda: _kill(stuck))
    os.kill(stuck, signal.SIGSTOP)  # before its 3 s: nothing in it can stop it now
    hung = Case("prefect", "hung", {"flow": "m-prefect-hung"}, {"OrchestratorFlowHung": "/pager"},
                20, at=max(started + 3 + 1, time.time()))  # its limit, then the matrix's grace
    await_cases(s.receiver, [failed, vanished, hung], check=alive)
    assert d.read(run_id).state.is_running()  # Prefect's own record: still running

    def between_runs() -> float | None:
        """m-prefect-every60's next run, once it is at the gateway after the
        last start and more than 5 s ahead."""
        alive()
        due, _ = s.gw.next_run("prefect", "m-prefect-every60")
        start = d.value("flow_last_start_timestamp_seconds", "m-prefect-every60")
        ok = due is not None and start is not None and due > start and time.time() < due - 5
        return due if ok else None

    # late: the worker stopped (SIGSTOP) across a due time until the run is
    # missed, then resumed: the run starts late, and is no longer missed
    due = wait_until(between_runs, 120, interval=0.2, what="m-prefect-every60 between two runs")
    os.kill(worker.pid, signal.SIGSTOP)
    stopped = time.time()
    missed_late = Case("prefect", "late: missed while the worker is stopped",
                       {"flow": "m-prefect-every60", "alertname": "OrchestratorFlowMissed"},
                       {"OrchestratorFlowMissed": "/pager"}, 20, at=due + GRACE, since=stopped)
    try:
        await_cases(s.receiver, [missed_late])
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # it can fire once the late run's start, and how late, is at the gateway
    # (the deployment runs every 60 s: the next run starts long after it)
    def late_start() -> tuple[float, float] | None:  # one read: the same push's values
        alive()
        try:
            g = s.gw.group(job="prefect", flow="m-prefect-every60")
            start = g.value("orchestrator_flow_last_start_timestamp_seconds")
            delay = g.value("orchestrator_flow_last_start_delay_seconds")
        except KeyError:
            return None
        return (start, delay) if start > due else None

    started_late, delay = wait_until(late_start, 60, interval=0.1, what="the late run's start")
    late = Case("prefect", "late: started once the worker resumed",
                {"flow": "m-prefect-every60", "alertname": "OrchestratorFlowLate"},
                {"OrchestratorFlowLate": "/chat"}, 20, at=started_late, since=stopped)
    await_cases(s.receiver, [late], check=alive)
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

    # the worker killed between two runs (its next run at the gateway): the
    # next run is missed, and the worker is gone
    due = wait_until(between_runs, 120, interval=0.2, what="m-prefect-every60 between two runs")
    os.killpg(worker.pid, signal.SIGKILL)  # and its flow-run processes
    worker.wait(10)
    killed = time.time()
    assert s.gw.next_run("prefect", "m-prefect-every60") == (due, GRACE)
    missed = Case("prefect", "missed (worker killed)",
                  {"flow": "m-prefect-every60", "alertname": "OrchestratorFlowMissed"},
                  {"OrchestratorFlowMissed": "/pager"}, 20, at=due + GRACE, since=killed)
    gone = Case("prefect", "worker gone", {"job": "prefect", "instance": WORKER,
                                           "alertname": "OrchestratorWorkerDown"},
                {"OrchestratorWorkerDown": "/pager"}, 40, at=killed + 120)
    cases = [failed, vanished, cancelled, hung, missed_late, late, missed, gone]
    await_cases(s.receiver, [missed, gone])
    table = matrix_table(s.receiver, cases)
    with capsys.disabled():
        print("\n" + table)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
