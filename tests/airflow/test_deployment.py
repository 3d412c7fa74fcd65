"""End to end with a real scheduler.

Airflow 3: api-server, scheduler (LocalExecutor) and dag-processor; the run is
triggered and a state is set by hand through the REST API. Airflow 2.10: the
scheduler (on sqlite it runs the SequentialExecutor; each try is still an
`airflow tasks run` subprocess) and the webserver, whose REST API marks states;
runs are triggered with the CLI.

The task metrics come from the task-runner subprocesses, the DAG run's from the
scheduler.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from airflow_deployment import AIRFLOW_2, API, Deployment, airflow_time, deploy
from gateway import Pushgateway, running, wait_until

NS = "orchestrator"


@pytest.fixture(scope="module")
def gateway_for_deployment() -> Iterator[Pushgateway]:
    yield from running()


@pytest.fixture(scope="module")
def deployment(gateway_for_deployment: Pushgateway) -> Iterator[Deployment]:
    yield from deploy(gateway_for_deployment.url, {},
                      ("e2e", "e2e_wait", "e2e_counts", "e2e_sensor", "e2e_scheduled"))


def _flow_completed_at(gw: Pushgateway) -> float:
    for g in gw.groups():  # (a run in progress has its start and no completion yet)
        if g.labels == {"job": "airflow", "flow": "e2e"} and \
                f"{NS}_flow_last_completion_timestamp_seconds" in g.metrics:
            return g.value(f"{NS}_flow_last_completion_timestamp_seconds")
    return 0.0


def _finished_run(d: Deployment, gw: Pushgateway) -> str:
    """Trigger a run and wait for the scheduler's push of its end."""
    before = _flow_completed_at(gw)
    run_id = d.trigger()

    def pushed() -> bool:
        d.check_alive()
        return _flow_completed_at(gw) > before
    wait_until(pushed, timeout=240, interval=0.5, what="the DAG run's metrics")
    return run_id


def test_task_runners_and_scheduler_push(deployment: Deployment,
                                         gateway_for_deployment: Pushgateway) -> None:
    gw = gateway_for_deployment
    run_id = _finished_run(deployment, gw)
    hello = gw.group(job="airflow", flow="e2e", task="hello")
    assert hello.value(f"{NS}_task_last_status", framework="airflow", status="success") == 1
    assert hello.value(f"{NS}_task_last_attempt") == 1
    assert 0 < hello.value(f"{NS}_task_last_duration_seconds") < 120
    broken = gw.group(job="airflow", flow="e2e", task="broken")
    assert broken.value(f"{NS}_task_last_status", status="failed") == 1
    flow = gw.group(job="airflow", flow="e2e")
    assert flow.value(f"{NS}_flow_last_status", status="failed") == 1
    assert flow.value(f"{NS}_flow_last_duration_seconds") > 0
    # the metrics agree with what Airflow recorded for the run
    assert deployment.task_states(run_id) == {"hello": "success", "broken": "failed"}


# Airflow 2.10's REST API only tries a task instance's mark unless told not to
DRY_RUN = {"dry_run": False} if AIRFLOW_2 else {}


def test_a_state_set_by_hand_is_the_last_status_and_not_counted(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    """The rule: what Airflow shows after a mark, the gateway shows, for the
    DAG's newest run; a mark is not a run and is not counted. Airflow 3's API
    server calls the listener; Airflow 2.10's webserver calls none, and its
    marking functions are wrapped instead."""
    gw = gateway_for_deployment
    older = _finished_run(deployment, gw)
    run_id = _finished_run(deployment, gw)
    # Counted when the run ends, pushed just after its flow group: wait for
    # every run Airflow has ended (this module's earlier ones too).
    def every_run_counted() -> bool:
        runs = deployment.api("GET", "/dags/e2e/dagRuns")["dag_runs"]
        ended = sum(r["state"] in ("success", "failed") for r in runs)
        return sum(gw.counted("e2e")[1].values()) == ended
    wait_until(every_run_counted, timeout=30, interval=0.2, what="the counts of every run")
    counts = gw.counted("e2e")
    hello = deployment.task_instances(run_id)["hello"]  # its task runner's success
    # A mark in an older run is not reported: the newest run's outcome stands.
    deployment.api("PATCH", f"/dags/e2e/dagRuns/{older}/taskInstances/hello",
                   {"new_state": "failed", **DRY_RUN})
    wait_until(lambda: "e2e.hello set to failed by hand in an older run"
               in deployment.log(API), timeout=60, interval=0.2,
               what="the listener to see the older mark")
    # The newest DAG run marked success. The API server's sender pushes its
    # groups in the order they were recorded: once this push is at the
    # gateway, one for the older mark would have been too.
    deployment.api("PATCH", f"/dags/e2e/dagRuns/{run_id}", {"state": "success"})
    wait_until(lambda: gw.group(job="airflow", flow="e2e").value(
        f"{NS}_flow_last_status", status="success") == 1, timeout=30, interval=0.2,
        what="the DAG run's mark at the gateway")
    run = deployment.api("GET", f"/dags/e2e/dagRuns/{run_id}")
    assert run["state"] == "success"
    assert gw.group(job="airflow", flow="e2e").value(
        f"{NS}_flow_last_completion_timestamp_seconds") == pytest.approx(
        airflow_time(run["end_date"]), abs=1e-3)
    g = gw.group(job="airflow", flow="e2e", task="hello")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == pytest.approx(
        airflow_time(hello["end_date"]), abs=10)  # (the runner's own clock)
    # A task instance of the newest run marked failed.
    deployment.api("PATCH", f"/dags/e2e/dagRuns/{run_id}/taskInstances/hello",
                   {"new_state": "failed", **DRY_RUN})
    wait_until(lambda: "e2e.hello set to failed by hand: now its last status"
               in deployment.log(API), timeout=60, interval=0.2,
               what="the listener to see the mark")
    hello = deployment.task_instances(run_id)["hello"]  # Airflow's own record
    assert hello["state"] == "failed"
    wait_until(lambda: gw.group(job="airflow", flow="e2e", task="hello").value(
        f"{NS}_task_last_status", status="failed") == 1, timeout=30, interval=0.2,
        what="the mark at the gateway")
    g = gw.group(job="airflow", flow="e2e", task="hello")
    assert g.value(f"{NS}_task_last_attempt") == hello["try_number"]
    for name in ("completion", "failure"):
        assert g.value(f"{NS}_task_last_{name}_timestamp_seconds") == pytest.approx(
            airflow_time(hello["end_date"]), abs=1e-3)
    assert gw.counted("e2e") == counts  # nothing counted for any mark


def _db_time(text: str) -> float:
    """A time as Airflow's sqlite database keeps it (UTC)."""
    t = datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def test_a_running_task_and_dag_run_are_at_the_gateway_before_they_end(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    gw = gateway_for_deployment
    run_id = deployment.trigger("e2e_wait")

    def value(name: str, **key: str) -> float | None:
        try:
            return gw.group(job="airflow", flow="e2e_wait", **key).value(f"{NS}_{name}")
        except KeyError:
            return None

    def task_started() -> float | None:
        deployment.check_alive()
        return value("task_last_start_timestamp_seconds", task="wait")

    start = wait_until(task_started, timeout=240, interval=0.5, what="the task's start")
    # in progress: the task runner pushed its start while the task runs
    task = gw.group(job="airflow", flow="e2e_wait", task="wait")
    assert f"{NS}_task_last_completion_timestamp_seconds" not in task.metrics
    assert task.value(f"{NS}_task_timeout_seconds", framework="airflow") == 600
    flow_start = value("flow_last_start_timestamp_seconds")
    assert flow_start is not None and flow_start <= start
    assert value("flow_timeout_seconds") == 3600
    assert value("flow_last_completion_timestamp_seconds") is None
    ti = deployment.task_instances(run_id, "e2e_wait")["wait"]
    assert ti["state"] == "running"
    # Airflow 3's database keeps the start sent to its API, the runner its own
    # (seconds apart on 3.3); Airflow 2's are the same
    assert abs(airflow_time(ti["start_date"]) - start) <= 10
    queued = value("task_last_queued_duration_seconds", task="wait")
    if AIRFLOW_2:  # the scheduler's own record: queued to started
        with contextlib.closing(sqlite3.connect(os.path.join(deployment.home, "airflow.db"))) as db:
            (queued_at, started_at), = db.execute(
                "SELECT queued_dttm, start_date FROM task_instance WHERE dag_id = 'e2e_wait'"
                " AND task_id = 'wait' AND run_id = ?", (run_id,)).fetchall()
        assert queued == pytest.approx(_db_time(started_at) - _db_time(queued_at), abs=1e-3)
    else:  # the task runner is not told when it was queued
        assert queued is None
    delay = value("flow_last_start_delay_seconds")
    if AIRFLOW_2:  # a manual run: its data interval ends at its logical date (the trigger)
        assert delay is not None and 0 <= delay < 240
    else:  # Airflow's own record: the run's start after its run_after
        run = deployment.api("GET", f"/dags/e2e_wait/dagRuns/{run_id}")
        assert delay == pytest.approx(
            airflow_time(run["start_date"]) - airflow_time(run["run_after"]), abs=1e-3)
    open(deployment.env["E2E_RELEASE"], "w").close()
    wait_until(lambda: value("flow_last_completion_timestamp_seconds") is not None, timeout=240,
               interval=0.5, what="the DAG run's end")
    assert value("task_last_completion_timestamp_seconds", task="wait") >= start
    assert value("task_last_start_timestamp_seconds", task="wait") == start


def test_the_scheduler_pushes_its_liveness(deployment: Deployment,
                                           gateway_for_deployment: Pushgateway) -> None:
    gw = gateway_for_deployment

    def seen() -> float | None:
        deployment.check_alive()
        for g in gw.groups():
            if g.labels.get("job") == "airflow" and f"{NS}_worker_up" in g.metrics:
                return g.value(f"{NS}_worker_last_seen_timestamp_seconds", role="airflow-scheduler")
        return None

    first = wait_until(seen, timeout=60, interval=0.5, what="the scheduler's liveness")
    # (the host's count group has an instance too: user@host)
    node = next(g for g in gw.groups()
                if g.labels.get("job") == "airflow" and f"{NS}_worker_up" in g.metrics)
    assert node.value(f"{NS}_worker_up", framework="airflow", role="airflow-scheduler") == 1
    # the host name Airflow itself records for the scheduler's job
    if AIRFLOW_2:
        from airflow.utils.net import get_hostname
        assert node.labels["instance"] == get_hostname()
    else:
        jobs = deployment.api("GET", "/jobs?job_type=SchedulerJob&is_alive=true")["jobs"]
        assert node.labels["instance"] in {j["hostname"] for j in jobs}
    wait_until(lambda: (seen() or 0) > first, timeout=30, interval=0.5, what="a later heartbeat")


def test_the_scheduler_pushes_each_dags_next_run_and_removes_it_while_paused(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    d, gw = deployment, gateway_for_deployment
    dag = d.api("GET", "/dags/e2e_scheduled")
    expected = airflow_time(dag["next_dagrun_create_after" if AIRFLOW_2
                                 else "next_dagrun_run_after"])
    # Airflow 2.10: the first data interval's end; 3: its start (a trigger timetable)
    assert expected == datetime(2030, 1, 1, 1 if AIRFLOW_2 else 0, tzinfo=timezone.utc).timestamp()
    next_run = functools.partial(gw.next_run, "airflow", "e2e_scheduled")
    wait_until(lambda: next_run()[0] is not None, 60, interval=0.5,
               what="e2e_scheduled's next run at the gateway")
    assert next_run() == (expected, 300.0)

    d.api("PATCH", "/dags/e2e_scheduled", {"is_paused": True})
    try:
        wait_until(lambda: next_run()[0] is None, 60, interval=0.5,
                   what="the paused DAG's next run gone")
        assert next_run() == (None, 300.0)  # the grace stays: it has a schedule
    finally:
        d.api("PATCH", "/dags/e2e_scheduled", {"is_paused": False})
    wait_until(lambda: next_run()[0] is not None, 60, interval=0.5,
               what="the next run back after unpausing")
    assert next_run() == (expected, 300.0)
    # the reads woken by the runs the tests before started (one DAG's row each) worked
    assert "could not read the airflow schedules" not in d.log("scheduler")


def _trigger_wait(d: Deployment, gw: Pushgateway) -> tuple[float | None, str]:
    """A run of e2e_wait whose task waits to be released (or killed): the last
    completion of that DAG before it, and the run's id."""
    release = d.env["E2E_RELEASE"]
    for path in (release, release + ".pid"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    before = _completed(gw, "e2e_wait")
    return before, d.trigger("e2e_wait")


def _try_in_db(d: Deployment, run_id: str, n: int) -> tuple[str | None, float, float]:
    """Airflow's own record of try ``n`` of e2e_wait's task: (state, start, end).
    The last try is in task_instance; Airflow 3 keeps earlier ones in
    task_instance_history, Airflow 2 the times of failed ones in task_fail."""
    with contextlib.closing(sqlite3.connect(os.path.join(d.home, "airflow.db"))) as db:
        where = "WHERE dag_id = 'e2e_wait' AND task_id = 'wait' AND run_id = ?"
        rows = db.execute(f"SELECT state, start_date, end_date FROM task_instance {where}"
                          " AND try_number = ?", (run_id, n)).fetchall()
        if not rows and AIRFLOW_2:
            rows = [(None, s, e) for s, e in db.execute(
                f"SELECT start_date, end_date FROM task_fail {where} ORDER BY start_date",
                (run_id,)).fetchall()[n - 1:n]]
        elif not rows:
            rows = db.execute(f"SELECT state, start_date, end_date FROM task_instance_history"
                              f" {where} AND try_number = ?", (run_id, n)).fetchall()
    [(state, start, end)] = rows
    return state, _db_time(start), _db_time(end)


def _ended_try_in_db(d: Deployment, run_id: str, n: int) -> tuple[str | None, float, float]:
    """The same once Airflow has committed the try's end (a process that fails
    a try can report it before its transaction commits)."""
    def ended() -> tuple[str | None, float, float] | None:
        with contextlib.suppress(TypeError, ValueError):  # no end yet, or no row
            return _try_in_db(d, run_id, n)
        return None
    return wait_until(ended, timeout=30, interval=0.2, what=f"try {n}'s end in the database")


@pytest.mark.timeout(400)
def test_a_sigkilled_task_process_is_reported_by_the_process_that_fails_it(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    """kill -9 of each of the two tries (as an OOM kill): no listener runs in
    the killed process. Airflow 3's supervisor fails the try through the API
    server; Airflow 2's scheduler finds a zombie and its DAG file processor
    fails it. Either reports it: retry (attempt 1), then failed (attempt 2)."""
    gw = gateway_for_deployment
    release = deployment.env["E2E_RELEASE"]
    before, run_id = _trigger_wait(deployment, gw)
    seen: list[tuple[float, float, float]] = []  # per try: start, completion, duration
    killed: list[int] = []
    for attempt, status in ((1, "retry"), (2, "failed")):
        def new_pid() -> int | None:
            deployment.check_alive()
            pid = _read(release + ".pid")
            return int(pid) if pid and int(pid) not in killed else None

        pid = wait_until(new_pid, timeout=240, interval=0.2, what=f"try {attempt}'s process")
        floor = max([before or 0] + [c for _, c, _ in seen])

        def started() -> float | None:
            s = _started(gw)
            return s if s is not None and s > floor else None  # noqa: B023

        start = wait_until(started, timeout=60, interval=0.2,
                           what=f"try {attempt}'s start at the gateway")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

        def reported() -> tuple[float, float, float] | None:
            deployment.check_alive()
            task = gw.group(job="airflow", flow="e2e_wait", task="wait")
            done = task.metrics.get(f"{NS}_task_last_completion_timestamp_seconds")
            if not done or done[0][1] < start:  # noqa: B023
                return None
            assert task.value(f"{NS}_task_last_status", status=status) == 1  # noqa: B023
            assert task.value(f"{NS}_task_last_attempt") == attempt  # noqa: B023
            return (start, done[0][1],  # noqa: B023
                    task.value(f"{NS}_task_last_duration_seconds"))
        try:
            seen.append(wait_until(reported, timeout=120, interval=0.2,
                                   what=f"try {attempt} reported {status}"))
        except AssertionError:
            raise AssertionError(deployment.log("scheduler")[-4000:]) from None
    wait_until(lambda: (_completed(gw, "e2e_wait") or 0) > (before or 0), timeout=120,
               interval=0.5, what="the DAG run's end")
    assert gw.group(job="airflow", flow="e2e_wait").value(
        f"{NS}_flow_last_status", status="failed") == 1
    assert deployment.task_instances(run_id, "e2e_wait")["wait"]["state"] == "failed"
    # Airflow's own record of each try: its end, and its span. Airflow 2's DAG
    # file processor reports from the task instance itself (exact for the last
    # try; the earlier one's task_fail row is written a few ms before the task
    # instance's end is set). Airflow 3's supervisor reports when the API server
    # has taken the state (its clock, just after the end it sent).
    for n, (_, completed, duration) in enumerate(seen, 1):
        state, db_start, db_end = _ended_try_in_db(deployment, run_id, n)
        if AIRFLOW_2:
            tolerance = 1e-3 if n == len(seen) else 0.5
            assert completed == pytest.approx(db_end, abs=tolerance)
            assert duration == pytest.approx(db_end - db_start, abs=tolerance)
        else:  # (the history keeps a retried try as failed)
            assert state == "failed"
            # the supervisor's clock at its report, against the end date the API
            # server kept: a fraction of a second apart (within 0.5 s seen)
            assert abs(completed - db_end) < 5, (n, completed, db_end)
            assert abs(duration - (db_end - db_start)) < 5, (n, duration, db_start, db_end)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.timeout(400)
def test_a_try_whose_supervising_process_is_killed_is_reported_when_airflow_fails_it(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    """A zombie: the process supervising the try (Airflow 3's supervisor, in a
    LocalExecutor worker; 2.10's `airflow tasks run --local`) is SIGKILLed, the
    try's heartbeats stop, and after the heartbeat timeout Airflow fails it
    (3.x: the scheduler; 2.10: the scheduler finds it, the DAG file processor
    fails it). That process reports it: retry, attempt 1, Airflow's end date.
    The second try is let finish: success, attempt 2."""
    gw = gateway_for_deployment
    release = deployment.env["E2E_RELEASE"]
    before, run_id = _trigger_wait(deployment, gw)
    pid = int(wait_until(lambda: _read(release + ".pid"), timeout=240, interval=0.2,
                         what="the task process"))
    start = wait_until(lambda: (s := _started(gw)) is not None and s > (before or 0) and s,
                       timeout=60, interval=0.2, what="the try's start at the gateway")
    os.kill(_parent(pid), signal.SIGKILL)  # the task itself runs on, unsupervised

    def reported() -> float | None:
        deployment.check_alive()
        task = gw.group(job="airflow", flow="e2e_wait", task="wait")
        done = task.metrics.get(f"{NS}_task_last_completion_timestamp_seconds")
        return done[0][1] if done and done[0][1] >= start else None
    try:
        completed = wait_until(reported, timeout=150, interval=0.5,
                               what="the zombie's failure at the gateway")
    except AssertionError:
        raise AssertionError(deployment.log("scheduler")[-4000:]) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the orphaned task process
    task = gw.group(job="airflow", flow="e2e_wait", task="wait")
    assert task.value(f"{NS}_task_last_status", status="retry") == 1
    assert task.value(f"{NS}_task_last_attempt") == 1
    _, db_start, db_end = _ended_try_in_db(deployment, run_id, 1)  # Airflow's own record
    assert completed == pytest.approx(db_end, abs=0.5)
    assert task.value(f"{NS}_task_last_duration_seconds") == pytest.approx(
        db_end - db_start, abs=0.5)
    # the second try runs and is let finish
    wait_until(lambda: (p := _read(release + ".pid")) and int(p) != pid, timeout=240,
               interval=0.2, what="the second try's process")
    open(release, "w").close()
    wait_until(lambda: (_completed(gw, "e2e_wait") or 0) > (before or 0), timeout=120,
               interval=0.5, what="the DAG run's end")
    assert deployment.task_instances(run_id, "e2e_wait")["wait"]["state"] == "success"
    task = gw.group(job="airflow", flow="e2e_wait", task="wait")
    assert task.value(f"{NS}_task_last_status", status="success") == 1
    assert task.value(f"{NS}_task_last_attempt") == 2


def _first_poke_in_db(d: Deployment, run_id: str) -> float | None:
    """Airflow's record of when e2e_sensor's try first poked: its first
    reschedule's start (Airflow 3 links it to the task instance by id)."""
    join = ("r.dag_id = ti.dag_id AND r.task_id = ti.task_id AND r.run_id = ti.run_id"
            if AIRFLOW_2 else "r.ti_id = ti.id")
    with contextlib.closing(sqlite3.connect(os.path.join(d.home, "airflow.db"))) as db:
        (first,) = db.execute(
            f"SELECT MIN(r.start_date) FROM task_reschedule r JOIN task_instance ti ON {join}"
            " WHERE ti.dag_id = 'e2e_sensor' AND ti.run_id = ?", (run_id,)).fetchone()
    return _db_time(first) if first else None


@pytest.mark.timeout(400)
def test_a_reschedule_mode_sensor_is_in_progress_from_its_first_poke(
        deployment: Deployment, gateway_for_deployment: Pushgateway) -> None:
    """Each poke is a try of its own that gives its slot back. Between pokes the
    sensor still waits: its start is the first poke's (as Airflow records it)
    and its time limit the sensor's timeout (600 s), not a poke's
    execution_timeout (30 s), so the Hung alert does not fire between pokes."""
    gw = gateway_for_deployment
    base = deployment.env["E2E_RELEASE"]
    for path in (base + ".pokes", base + ".sensor"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    before = _completed(gw, "e2e_sensor")
    run_id = deployment.trigger("e2e_sensor")

    def pokes() -> int:
        deployment.check_alive()
        return len((_read(base + ".pokes") or "").split())

    wait_until(lambda: pokes() >= 2, timeout=240, interval=0.2, what="two pokes")
    first = _first_poke_in_db(deployment, run_id)
    assert first is not None

    def start() -> float | None:
        try:
            return gw.group(job="airflow", flow="e2e_sensor", task="wait").value(
                f"{NS}_task_last_start_timestamp_seconds")
        except KeyError:
            return None

    try:
        wait_until(lambda: start() == pytest.approx(first, abs=1e-3), timeout=60, interval=0.2,
                   what="the first poke's start at the gateway")
    except AssertionError:
        raise AssertionError((start(), first, _read(base + ".pokes"))) from None
    task = gw.group(job="airflow", flow="e2e_sensor", task="wait")
    assert task.value(f"{NS}_task_timeout_seconds") == 600
    assert f"{NS}_task_last_completion_timestamp_seconds" not in task.metrics  # in progress
    open(base + ".sensor", "w").close()
    wait_until(lambda: (_completed(gw, "e2e_sensor") or 0) > (before or 0), timeout=120,
               interval=0.5, what="the DAG run's end")
    ti = deployment.task_instances(run_id, "e2e_sensor")["wait"]  # Airflow's own record
    assert ti["state"] == "success"
    task = gw.group(job="airflow", flow="e2e_sensor", task="wait")
    assert task.value(f"{NS}_task_last_status", status="success") == 1
    assert task.value(f"{NS}_task_last_start_timestamp_seconds") == pytest.approx(first, abs=1e-3)
    done = task.value(f"{NS}_task_last_completion_timestamp_seconds")
    assert done > first
    # the duration Airflow records: 2.10 from the first poke, 3.x the last poke
    # (the runner's clock on 3.x: its start can be seconds after the database's)
    assert task.value(f"{NS}_task_last_duration_seconds") == pytest.approx(
        airflow_time(ti["end_date"]) - airflow_time(ti["start_date"]),
        abs=1e-3 if AIRFLOW_2 else 10)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _started(gw: Pushgateway) -> float | None:
    try:
        g = gw.group(job="airflow", flow="e2e_wait", task="wait")
        return g.value(f"{NS}_task_last_start_timestamp_seconds")
    except KeyError:
        return None


def _completed(gw: Pushgateway, dag_id: str) -> float | None:
    try:
        return gw.group(job="airflow", flow=dag_id).value(
            f"{NS}_flow_last_completion_timestamp_seconds")
    except KeyError:
        return None


_STATUS = {"success": "success", "failed": "failed", "skipped": "skipped",
           "upstream_failed": "upstream_failed"}


@pytest.mark.timeout(400)
def test_counts_equal_airflows_record_of_every_try(deployment: Deployment,
                                                   gateway_for_deployment: Pushgateway) -> None:
    """Runs in parallel (Airflow 3's LocalExecutor; 2.10's SequentialExecutor
    runs one try at a time, so one run there), with a retry, a failure, an
    upstream failure and a skipping branch: the scheduler counts every try
    when each run ends."""
    gw = gateway_for_deployment
    runs = [deployment.trigger("e2e_counts") for _ in range(1 if AIRFLOW_2 else 2)]

    db_path = os.path.join(deployment.home, "airflow.db")

    def ended() -> dict[str, str] | None:
        deployment.check_alive()
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            states = dict(db.execute("SELECT run_id, state FROM dag_run"
                                     " WHERE dag_id = 'e2e_counts'").fetchall())
        done = set(runs) <= set(states) and all(states[r] in ("success", "failed") for r in runs)
        return states if done else None

    states = wait_until(ended, timeout=400, interval=1, what="both DAG runs to end")
    expected_tasks: dict[tuple[str, str], float] = {}
    # Airflow's own record: each task instance's state and try number, in its database
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance"
                          " WHERE dag_id = 'e2e_counts'").fetchall()
    assert len(rows) == 10 * len(runs)
    for task_id, state, try_number in rows:
        key = (task_id, _STATUS[state])
        expected_tasks[key] = expected_tasks.get(key, 0) + 1
        for _ in range(int(try_number or 0) - 1):  # earlier tries: retries here
            expected_tasks[(task_id, "retry")] = expected_tasks.get((task_id, "retry"), 0) + 1
    expected_runs: dict[str, float] = {}
    for run_id in runs:
        expected_runs[states[run_id]] = expected_runs.get(states[run_id], 0) + 1
    # what the DAG is written to do, so Airflow's record above is the one we mean
    n = len(runs)
    assert expected_tasks == {("flaky", "retry"): n, ("flaky", "success"): n,
                              ("boom", "failed"): n, ("after_boom", "upstream_failed"): n,
                              ("pick", "success"): n, ("chosen", "success"): n,
                              ("not_chosen", "skipped"): n, ("marker", "success"): n,
                              ("gate", "success"): n, ("gated", "skipped"): n,
                              ("on_failure", "skipped"): n}
    assert expected_runs == {"failed": n}
    try:
        wait_until(lambda: gw.counted("e2e_counts") == (expected_tasks, expected_runs),
                   timeout=60, interval=0.5, what="the counts")
    except AssertionError:
        raise AssertionError(f"{gw.counted('e2e_counts')}\n"
                             + deployment.log("scheduler")[-3000:]) from None
    # one count group: the scheduler's host
    groups = [g.labels for g in gw.groups() if f"{NS}_flow_runs_total" in g.metrics]
    assert len(groups) == 1 and groups[0]["job"] == "airflow" and "@" in groups[0]["instance"]
    # The counted durations are Airflow's: each final try's end_date - start_date
    # in its database, added up in the histogram's sum (a succeeding task here).
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        spans = db.execute("SELECT start_date, end_date FROM task_instance"
                           " WHERE dag_id = 'e2e_counts' AND task_id = 'chosen'").fetchall()
    [host] = [g for g in gw.groups() if f"{NS}_flow_runs_total" in g.metrics]
    assert host.value(f"{NS}_task_duration_seconds", flow="e2e_counts", task="chosen",
                      status="success", __sum__="1") == pytest.approx(
        sum(_db_time(end) - _db_time(start) for start, end in spans), abs=1e-4)
    # Task instances no task runner ran (try number 0) have last-run series too,
    # from the scheduler, as Airflow's database holds them: status, attempt 0, end.
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        never = db.execute("SELECT task_id, state, end_date FROM task_instance"
                           " WHERE dag_id = 'e2e_counts' AND try_number = 0").fetchall()
    skipped_or_not_run = [("after_boom", "upstream_failed"), ("gated", "skipped"),
                          ("not_chosen", "skipped"), ("on_failure", "skipped")]
    assert sorted({(t, s) for t, s, _ in never}) == skipped_or_not_run
    for task_id, state in skipped_or_not_run:  # upstream, short-circuit, branch, trigger rule
        ends = [_db_time(e) for t, _, e in never if t == task_id]
        assert len(ends) == n
        wait_until(lambda: any(g.labels.get("task") == task_id for g in gw.groups()),  # noqa: B023
                   timeout=30, interval=0.5, what=f"{task_id}'s group")
        g = gw.group(job="airflow", flow="e2e_counts", task=task_id)
        assert g.value(f"{NS}_task_last_status", framework="airflow", status=state) == 1
        assert g.value(f"{NS}_task_last_attempt") == 0
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == \
            pytest.approx(max(ends), abs=1e-3)
    # The EmptyOperator the scheduler set to success (no host ran it), as the
    # database holds it: success, its try number, its end.
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        markers = db.execute("SELECT state, try_number, end_date, hostname FROM task_instance"
                             " WHERE dag_id = 'e2e_counts' AND task_id = 'marker'"
                             " ORDER BY end_date").fetchall()
    assert len(markers) == n and {(s, h or "") for s, _, _, h in markers} == {("success", "")}
    wait_until(lambda: any(g.labels.get("task") == "marker" for g in gw.groups()),
               timeout=30, interval=0.5, what="the marker's group")
    g = gw.group(job="airflow", flow="e2e_counts", task="marker")
    assert g.value(f"{NS}_task_last_status", framework="airflow", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == markers[-1][1]
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == \
        pytest.approx(_db_time(markers[-1][2]), abs=1e-3)
    assert g.value(f"{NS}_task_last_duration_seconds") == pytest.approx(0.0, abs=1e-3)


# long beside Airflow's own exit time (up to ~5 s, more on a loaded machine), so
# that one flush timeout and two cannot be mistaken for each other
FLUSH_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def blackholed() -> Iterator[Deployment]:
    """A deployment whose gateway accepts connections and never answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)  # the kernel completes the handshakes; nobody reads
    try:
        yield from deploy(f"http://127.0.0.1:{hole.getsockname()[1]}",
                           {"ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": str(FLUSH_TIMEOUT)}, ("e2e_wait",))
    finally:
        hole.close()


@pytest.mark.timeout(400)
def test_a_gateway_that_never_answers_holds_a_task_process_one_flush_timeout(
        blackholed: Deployment) -> None:
    """The task's process, from its task's end to its exit: one flush timeout
    (20 s here) and Airflow's own exit time, never two flush timeouts; what it
    could not deliver is in the spool."""
    d = blackholed
    release = d.env["E2E_RELEASE"]
    run_id = d.trigger("e2e_wait")
    pid = int(wait_until(lambda: d.check_alive() or _read(release + ".pid"), timeout=240,
                         interval=0.2, what="the task process"))
    open(release, "w").close()
    released = time.monotonic()
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=120, interval=0.05,
               what="the task process to exit")
    took = time.monotonic() - released
    # (Airflow 3.3's task runners often take ~5 s to exit of their own, more on a
    # loaded machine: anything short of a second flush timeout is one)
    assert FLUSH_TIMEOUT - 1 <= took < 2 * FLUSH_TIMEOUT, took
    wait_until(lambda: d.task_instances(run_id, "e2e_wait")["wait"]["state"] == "success",
               timeout=120, interval=0.5, what="Airflow's record of the success")
    spool = os.path.join(d.home, "spool")
    # (another process may hold it claimed for a replay, which puts it back)
    assert any(".spool" in n for n in os.listdir(spool)), os.listdir(spool)
