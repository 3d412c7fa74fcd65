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

import os
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest
from airflow_deployment import AIRFLOW_2, COMPONENTS, Deployment, airflow_time, deploy
from alerting import AlertStack, Case, ScheduledFlow, await_cases, kill_at_end, matrix_table
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
    kill_at_end(request, stuck)
    os.kill(stuck, signal.SIGSTOP)
    started = _value(s, "task_last_start_timestamp_seconds", "m_hung", "stuck")
    assert started is not None
    hung = Case("airflow", "hung", {"flow": "m_hung"}, {"OrchestratorTaskHung": "/pager"}, 20,
                at=max(started + 3 + 1, time.time()))  # its limit, then the matrix's grace
    await_cases(s, [failed, vanished, hung], check=d.check_alive)
    ti = d.task_instances(d.api("GET", "/dags/m_hung/dagRuns")["dag_runs"][0]["dag_run_id"],
                          "m_hung")["stuck"]
    assert ti["state"] == "running"  # Airflow's own record: still running past its limit

    scheduler = d.procs[COMPONENTS.index(["scheduler"])]
    every30 = ScheduledFlow(s, "airflow", "airflow", "m_every30", GRACE, d.check_alive)
    late, due, started_late, delay = every30.late(scheduler, "scheduler", 60)
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

    # the scheduler (and its executor's workers) killed between two runs (the
    # next run is pushed with a run's start): the next run is missed
    cases = [failed, vanished, hung, *late,
             *every30.killed(scheduler, "scheduler", {"job": "airflow"}, 60)]
    table = matrix_table(s.receiver, cases)
    with capsys.disabled():
        print("\n" + table)
