"""The detection matrix, Airflow's row: a real deployment (api-server,
scheduler with the LocalExecutor, dag-processor), the shipped rules on a real
Prometheus (1 s scrape and evaluation) and a real Alertmanager with the shipped
routes, and a webhook receiver. Each failure is made to happen for real and
exactly its alerts must arrive, within a stated time:

- failed: a task raises (no retries): the task and its DAG run failed;
- vanished: the task's process is SIGKILLed (an OOM kill): Airflow's
  supervisor fails the try, which is reported as failed: nothing vanishes;
- hung: the task's process is stopped (SIGSTOP: it hangs where its own time
  limit cannot reach it) past its execution_timeout;
- late: the scheduler is stopped (SIGSTOP) across a due time of a DAG that runs
  every 30 s until the run is missed, then resumed: the run starts late;
- missed and scheduler gone: the scheduler is SIGKILLed: the DAG's next run is
  missed, and the scheduler is not seen for 2 minutes.

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
from airflow_deployment import AIRFLOW_2, COMPONENTS, Deployment, airflow_time, deploy
from alerting import AlertStack, Case, await_cases, matrix_table
from gateway import wait_until

NS = "orchestrator"
DAGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "matrix_dags")
GRACE = 10.0  # the schedule grace the scheduler pushes

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(AIRFLOW_2, reason="Airflow 2.10 on sqlite runs the SequentialExecutor: one "
                       "task at a time, in the scheduler's loop, so a hung task stops the "
                       "scheduler and every other row with it"),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[AlertStack, Deployment, str]]:
    try:
        alerts = AlertStack()
    except RuntimeError as exc:  # a missing binary: an error that says what to install
        pytest.fail(str(exc), pytrace=False)
    try:
        with tempfile.TemporaryDirectory(prefix="op-airflow-matrix-") as pids:
            extra = {"MATRIX_PIDS": pids, "ORCHESTRATOR_PUSH_SCHEDULE_GRACE": f"{GRACE:g}s"}
            for d in deploy(alerts.gw.url, extra, ("m_failed", "m_hung", "m_vanish", "m_every30"),
                            dags=DAGS):
                yield alerts, d, pids
    finally:
        alerts.stop()


def _value(s: AlertStack, name: str, flow: str, task: str | None = None) -> float | None:
    key = {"job": "airflow", "flow": flow, **({"task": task} if task else {})}
    try:
        return s.gw.group(**key).value(f"{NS}_{name}")
    except KeyError:
        return None


def _pid(d: Deployment, pids: str, dag_id: str) -> int:
    path = os.path.join(pids, dag_id)

    def written() -> bool:
        d.check_alive()
        return os.path.exists(path) and os.path.getsize(path) > 0
    wait_until(written, 120, interval=0.2, what=f"{dag_id}'s task running")
    with open(path) as f:
        return int(f.read())


def test_each_airflow_failure_raises_exactly_its_alert(
        stack: tuple[AlertStack, Deployment, str], capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest) -> None:
    s, d, pids = stack
    # the scheduled DAG runs at least once, and its next run is at the gateway
    wait_until(lambda: d.check_alive() or _value(s, "flow_last_success_timestamp_seconds",
                                                 "m_every30"), 120, interval=0.5,
               what="a run of m_every30")
    for dag_id in ("m_failed", "m_vanish", "m_hung"):
        d.trigger(dag_id)

    def status_at_gateway(flow: str, task: str, status: str) -> bool:
        d.check_alive()
        try:
            g = s.gw.group(job="airflow", flow=flow, task=task)
            return g.value(f"{NS}_task_last_status", status=status) == 1
        except KeyError:
            return False

    wait_until(lambda: status_at_gateway("m_failed", "boom", "failed"), 120, interval=0.2,
               what="m_failed's failure at the gateway")
    failed = Case("airflow", "failed", {"flow": "m_failed"},
                  {"OrchestratorTaskFailed": "/chat", "OrchestratorFlowFailed": "/chat"}, 20,
                  at=time.time())

    victim = _pid(d, pids, "m_vanish")
    os.kill(victim, signal.SIGKILL)  # the task's process (OOM): its supervisor lives on
    vanished = Case("airflow", "vanished (task process SIGKILLed)", {"flow": "m_vanish"},
                    {"OrchestratorTaskFailed": "/chat", "OrchestratorFlowFailed": "/chat"}, 30,
                    at=time.time())

    stuck = _pid(d, pids, "m_hung")
    wait_until(lambda: _value(s, "task_timeout_seconds", "m_hung", "stuck") == 3, 60,
               interval=0.2, what="m_hung's start and time limit at the gateway")
    # stopped, it lives in a session of its own: killed at the end, whatever happens
    request.addfinalizer(lambda: _kill(stuck))
    os.kill(stuck, signal.SIGSTOP)
    started = _value(s, "task_last_start_timestamp_seconds", "m_hung", "stuck")
    assert started is not None
    hung = Case("airflow", "hung", {"flow": "m_hung"}, {"OrchestratorTaskHung": "/pager"}, 20,
                at=max(started + 3 + 1, time.time()))  # its limit, then the matrix's grace
    await_cases(s.receiver, [failed, vanished, hung], check=d.check_alive)
    ti = d.task_instances(d.api("GET", "/dags/m_hung/dagRuns")["dag_runs"][0]["dag_run_id"],
                          "m_hung")["stuck"]
    assert ti["state"] == "running"  # Airflow's own record: still running past its limit

    scheduler = d.procs[COMPONENTS.index(["scheduler"])]

    def between_runs() -> float | None:
        """m_every30's next run, once it is at the gateway after the last start
        and more than 5 s ahead (the scheduler pushes it as a run starts)."""
        d.check_alive()
        due, _ = s.gw.next_run("airflow", "m_every30")
        start = _value(s, "flow_last_start_timestamp_seconds", "m_every30")
        ok = due is not None and start is not None and due > start and time.time() < due - 5
        return due if ok else None

    # late: the scheduler stopped (SIGSTOP) across a due time until the run is
    # missed, then resumed: the run starts late, and is no longer missed
    due = wait_until(between_runs, 60, interval=0.2, what="m_every30 between two runs")
    os.kill(scheduler.pid, signal.SIGSTOP)
    stopped = time.time()
    missed_late = Case("airflow", "late: missed while the scheduler is stopped",
                       {"flow": "m_every30", "alertname": "OrchestratorFlowMissed"},
                       {"OrchestratorFlowMissed": "/pager"}, 20, at=due + GRACE, since=stopped)
    try:
        await_cases(s.receiver, [missed_late])
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)
    # it can fire once the late run's start, and how late, is at the gateway
    def late_start() -> tuple[float, float] | None:  # one read: the same push's values
        d.check_alive()
        try:
            g = s.gw.group(job="airflow", flow="m_every30")
            start = g.value("orchestrator_flow_last_start_timestamp_seconds")
            delay = g.value("orchestrator_flow_last_start_delay_seconds")
        except KeyError:
            return None
        return (start, delay) if start > due else None

    started_late, delay = wait_until(late_start, 60, interval=0.1, what="the late run's start")
    late = Case("airflow", "late: started once the scheduler resumed",
                {"flow": "m_every30", "alertname": "OrchestratorFlowLate"},
                {"OrchestratorFlowLate": "/chat"}, 20, at=started_late, since=stopped)
    await_cases(s.receiver, [late], check=d.check_alive)
    # Airflow's own record of the run that started then
    (run,) = [r for r in d.api("GET", "/dags/m_every30/dagRuns?limit=100")["dag_runs"]
              if r["start_date"] and airflow_time(r["start_date"]) == pytest.approx(
                  started_late, abs=1e-3)]
    assert delay == pytest.approx(airflow_time(run["start_date"]) - airflow_time(run["run_after"]),
                                  abs=1e-3)
    assert delay > GRACE
    # the run of the due time that was pushed (a run created late was seen with
    # a run_after 0.4 s after the DAG's next_dagrun_create_after, read before)
    assert abs(airflow_time(run["run_after"]) - due) < 1

    # the scheduler killed between two runs of m_every30 (its next run pushed
    # with the start): the next run is missed, and the scheduler is gone
    due = wait_until(between_runs, 60, interval=0.2, what="m_every30 between two runs")
    os.killpg(scheduler.pid, signal.SIGKILL)  # and its executor's workers
    scheduler.wait(10)
    killed = time.time()
    assert s.gw.next_run("airflow", "m_every30") == (due, GRACE)
    missed = Case("airflow", "missed (scheduler killed)",
                  {"flow": "m_every30", "alertname": "OrchestratorFlowMissed"},
                  {"OrchestratorFlowMissed": "/pager"}, 20, at=due + GRACE, since=killed)
    gone = Case("airflow", "scheduler gone", {"job": "airflow",
                                              "alertname": "OrchestratorWorkerDown"},
                {"OrchestratorWorkerDown": "/pager"}, 40, at=killed + 120)
    cases = [failed, vanished, hung, missed_late, late, missed, gone]
    await_cases(s.receiver, [missed, gone])
    table = matrix_table(s.receiver, cases)
    with capsys.disabled():
        print("\n" + table)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
