"""End to end with a real deployment: `prefect server start`, a process work
pool, `prefect worker start` with the plugin (`PREFECT_PLUGINS_ENABLED=1`), and
flows deployed from source. Each flow run is a subprocess of the worker.

Values at the gateway are compared with Prefect's own record of the run, read
from its API: states set by the worker (a process that exits non-zero, is
SIGKILLed, a cancel through the API) are reported by the worker, a SIGTERM by
the flow-run process before Prefect re-kills it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from gateway import running, wait_until
from prefect_api import task_runs
from prefect_deployment import FLOWS, POOL, WORKER, Deployment, deploy, hold_pid, released

NS = "orchestrator"
DEPLOYMENTS = {
    "deployed-ok": "deployed_ok",
    "deployed-exit": "deployed_exit",
    "deployed-kill": "deployed_kill",
    "deployed-term": "deployed_term",
    "deployed-cancel": "deployed_cancel",
    "deployed-unsubmittable": "deployed_unsubmittable",
    "deployed-counted": "deployed_counted",
    "deployed-scheduled": "deployed_scheduled",
}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        gw = stack.enter_context(contextlib.contextmanager(running)())
        yield from deploy(gw, tmp, DEPLOYMENTS)


def worker_value(d: Deployment, name: str, worker: str = WORKER,
                 role: str = "prefect-worker") -> float | None:
    try:
        return d.gw.group(job="prefect", instance=worker).value(
            f"{NS}_{name}", framework="prefect", role=role)
    except KeyError:
        return None


@pytest.fixture(scope="module")
def served(deployment: Deployment) -> str:
    """`python served.py` serving two flows, without Prefect's plugin setting:
    it calls instrument() under `__main__` only. The runner's name."""
    env = {k: v for k, v in deployment.env.items() if not k.startswith("PREFECT_PLUGINS_")}
    proc = deployment.start(argv=[sys.executable, os.path.join(FLOWS, "served.py")],
                            env=env, log="served.log")

    def ready() -> bool:
        assert proc.poll() is None, deployment.log("served.log")
        with deployment.client() as client:
            try:
                client.read_deployment_by_name("served-cancel/s")
                return True
            except Exception:
                return False

    wait_until(ready, 120, interval=0.5, what="the served deployments")

    def runner() -> str | None:
        for g in deployment.gw.groups():
            for labels, up in g.metrics.get(f"{NS}_worker_up", []):
                if labels.get("role") == "prefect-runner" and up == 1:
                    return g.labels["instance"]
        return None

    return str(wait_until(runner, 60, interval=0.1, what="the runner's liveness"))


def assert_final(d: Deployment, flow: str, run: Any, status: str) -> None:
    """The gateway has the run's final state with Prefect's own end time."""
    end = run.state.timestamp.timestamp()
    d.wait_value("flow_last_completion_timestamp_seconds", flow, expect=end)
    for s in ("success", "failed", "crashed", "cancelled", "retry"):
        assert d.value("flow_last_status", flow, status=s) == (1 if s == status else 0), s
    assert d.value("flow_last_duration_seconds", flow) == pytest.approx(
        end - run.start_time.timestamp(), abs=1e-5)
    if status in ("failed", "crashed"):
        assert d.value("flow_last_failure_timestamp_seconds", flow) == end


def assert_in_progress(d: Deployment, flow: str, run_id: Any) -> None:
    """The flow run's and its `hold` task's starts are at the gateway while
    they run, with their time limits, and no completion."""
    run = d.read(run_id)
    d.wait_value("flow_last_start_timestamp_seconds", flow, expect=run.start_time.timestamp())
    d.wait_value("task_last_start_timestamp_seconds", flow, "hold")
    assert d.value("task_timeout_seconds", flow, "hold") == 600
    assert d.value("flow_timeout_seconds", flow) == 3600
    assert d.value("flow_last_completion_timestamp_seconds", flow) is None
    assert d.value("task_last_completion_timestamp_seconds", flow, "hold") is None


def test_the_worker_pushes_its_liveness(deployment: Deployment) -> None:
    first = wait_until(lambda: worker_value(deployment, "worker_last_seen_timestamp_seconds"),
                       120, interval=0.1, what="the worker's liveness")
    assert worker_value(deployment, "worker_up") == 1
    wait_until(lambda: (worker_value(deployment, "worker_last_seen_timestamp_seconds") or 0)
               > first, 10, interval=0.1, what="a newer last-seen time")
    # The worker is the only node: Prefect 3.8's process worker starts a runner of its
    # own (a new runner-<uuid> each time), which must not be a node beside it.
    nodes = [g.labels for g in deployment.gw.groups() if f"{NS}_worker_up" in g.metrics]
    assert nodes == [{"job": "prefect", "instance": WORKER}], nodes


def test_the_worker_pushes_the_next_scheduled_run_and_removes_it_while_paused(
        deployment: Deployment) -> None:
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.schedules import IntervalSchedule

    d = deployment
    anchor = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
    with d.client() as client:
        dep = client.read_deployment_by_name("deployed-scheduled/d")
        client.create_deployment_schedules(
            dep.id, [(IntervalSchedule(interval=timedelta(days=1), anchor_date=anchor), True)])

    expected = wait_until(lambda: d.earliest_scheduled("deployed-scheduled/d"), 60, interval=0.5,
                          what=f"Prefect to schedule the run; server log:\n{d.log('server.log')}")
    assert expected == anchor.timestamp()  # Prefect's own record: the schedule's first date
    next_run = functools.partial(d.gw.next_run, "prefect", "deployed-scheduled")
    wait_until(lambda: next_run()[0] is not None, 60, interval=0.5,
               what="the next run at the gateway")
    assert next_run() == (expected, 300.0)

    with d.client() as client:
        client.pause_deployment(dep.id)
    try:
        wait_until(lambda: next_run()[0] is None, 60, interval=0.5,
                   what="the paused deployment's next run gone")
        assert next_run() == (None, 300.0)  # the grace stays: it has a schedule
    finally:
        with d.client() as client:
            client.resume_deployment(dep.id)
    wait_until(lambda: next_run()[0] is not None, 60, interval=0.5,
               what="the next run back after resuming")
    assert next_run() == (expected, 300.0)


def test_a_serve_runner_pushes_its_next_run_and_removes_it_when_it_stops(
        deployment: Deployment) -> None:
    """`serve()` schedules its flow; stopped with SIGTERM it pauses the schedule
    (Prefect's pause_on_shutdown): its next run leaves the gateway, the grace
    stays, and no missed run is alerted for a runner stopped on purpose."""

    env = {k: v for k, v in deployment.env.items() if not k.startswith("PREFECT_PLUGINS_")}
    proc = deployment.start(argv=[sys.executable, os.path.join(FLOWS, "served_scheduled.py")],
                            env=env, log="served_scheduled.log")

    def first_scheduled() -> float | None:  # Prefect's own record
        assert proc.poll() is None, deployment.log("served_scheduled.log")
        try:
            return deployment.earliest_scheduled("served-scheduled/s")
        except Exception:  # not deployed yet
            return None

    expected = wait_until(first_scheduled, 120, interval=0.5,
                          what=f"the served schedule's runs; log:\n"
                               f"{deployment.log('served_scheduled.log')}")
    next_run = functools.partial(deployment.gw.next_run, "prefect", "served-scheduled")
    wait_until(lambda: next_run()[0] is not None, 60, interval=0.2,
               what="the runner's push of the next run")
    assert next_run() == (expected, 300.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, deployment.log("served_scheduled.log")
    with deployment.client() as client:  # Prefect paused it
        dep = client.read_deployment_by_name("served-scheduled/s")
        assert dep.paused or not any(s.active for s in dep.schedules)
    assert next_run() == (None, 300.0)


def test_a_deployment_run_reports_its_lateness(deployment: Deployment) -> None:
    run = deployment.final(deployment.run("deployed-ok"))
    assert run.state.is_completed()
    assert_final(deployment, "deployed-ok", run, "success")
    start = run.start_time.timestamp()
    assert deployment.value("flow_last_start_timestamp_seconds", "deployed-ok") == start
    assert deployment.value("flow_last_start_delay_seconds", "deployed-ok") == pytest.approx(
        start - run.expected_start_time.timestamp(), abs=1e-3)


def test_a_run_whose_process_exits_non_zero_is_crashed_by_the_worker(
        deployment: Deployment) -> None:
    run = deployment.final(deployment.run("deployed-exit"))
    assert run.state.is_crashed() and "status code: 3" in run.state.message
    assert_final(deployment, "deployed-exit", run, "crashed")


def test_a_run_the_worker_cannot_start_is_crashed_by_the_worker(deployment: Deployment) -> None:
    flow = "deployed-unsubmittable"
    run = deployment.final(deployment.run(flow))
    # Prefect 3.9: "Flow run could not start: ...", proposed in the worker's process
    assert run.state.is_crashed(), run.state
    assert_final(deployment, flow, run, "crashed")


def ended_from_outside(d: Deployment, flow: str, how: str,
                       deployment: str = "d") -> tuple[Any, float]:
    """A run of ``flow`` held in its ``hold`` task, in progress at the gateway,
    then ended by ``how`` ("SIGKILL", "SIGTERM": to its process; "cancel":
    through the API). Prefect's final record of it, and the task's start as the
    gateway had it before."""
    path, pid_file = released(d)
    run_id = d.run(flow, deployment=deployment, path=path)
    pid = hold_pid(pid_file)
    assert_in_progress(d, flow, run_id)
    task_start = d.value("task_last_start_timestamp_seconds", flow, "hold")
    assert task_start is not None
    if how == "cancel":
        from prefect.states import Cancelling

        with d.client() as client:
            client.set_flow_run_state(run_id, Cancelling(), force=True)
    else:
        os.kill(pid, getattr(signal, how))
    return d.final(run_id), task_start


def test_a_sigkilled_run_is_crashed_by_the_worker_and_its_task_stays_started(
        deployment: Deployment) -> None:
    run, task_start = ended_from_outside(deployment, "deployed-kill", "SIGKILL")
    assert run.state.is_crashed() and "-9" in run.state.message
    assert_final(deployment, "deployed-kill", run, "crashed")
    # The task attempt never ended: its start stays, without a completion.
    assert deployment.value("task_last_start_timestamp_seconds", "deployed-kill",
                            "hold") == task_start
    assert deployment.value("task_last_completion_timestamp_seconds", "deployed-kill",
                            "hold") is None


def test_a_sigtermed_run_delivers_its_crash_before_prefect_kills_it(
        deployment: Deployment) -> None:
    run, _ = ended_from_outside(deployment, "deployed-term", "SIGTERM")
    # Set by the flow-run process itself; the worker's own proposal is rejected.
    assert run.state.is_crashed() and "termination signal" in run.state.message
    assert_final(deployment, "deployed-term", run, "crashed")


def test_a_run_cancelled_through_the_api_is_reported_cancelled(deployment: Deployment) -> None:
    run, _ = ended_from_outside(deployment, "deployed-cancel", "cancel")
    assert run.state.is_cancelled()
    assert_final(deployment, "deployed-cancel", run, "cancelled")


def test_a_worker_stopped_with_sigterm_says_it_is_down(deployment: Deployment) -> None:
    name = "orchestrator-test-worker-2"
    proc = deployment.start("worker", "start", "--pool", POOL, "--name", name, log="worker2.log")
    wait_until(lambda: worker_value(deployment, "worker_up", name) == 1, 120, interval=0.1,
               what=f"the second worker's liveness; log:\n{deployment.log('worker2.log')}")
    proc.send_signal(signal.SIGTERM)
    assert deployment.wait_exit(proc, "worker2.log", 60) == 0, deployment.log("worker2.log")
    assert worker_value(deployment, "worker_up", name) == 0
    assert worker_value(deployment, "worker_up") == 1  # the first worker is untouched


def test_served_runs_are_reported_when_instrument_is_called_under_main(
        deployment: Deployment, served: str) -> None:
    assert served.startswith("runner-")
    assert worker_value(deployment, "worker_up", served, role="prefect-runner") == 1
    run = deployment.final(deployment.run("served-ok", deployment="s"))
    assert run.state.is_completed()
    assert_final(deployment, "served-ok", run, "success")
    assert deployment.value("task_last_status", "served-ok", "step", status="success") == 1


def test_a_sigkilled_served_run_is_crashed_by_the_runner(deployment: Deployment,
                                                         served: str) -> None:
    run, _ = ended_from_outside(deployment, "served-kill", "SIGKILL", deployment="s")
    assert run.state.is_crashed() and "-9" in run.state.message
    assert_final(deployment, "served-kill", run, "crashed")


def test_a_sigtermed_served_run_delivers_its_crash(deployment: Deployment, served: str) -> None:
    run, _ = ended_from_outside(deployment, "served-term", "SIGTERM", deployment="s")
    assert run.state.is_crashed() and "termination signal" in run.state.message
    assert_final(deployment, "served-term", run, "crashed")


def test_a_served_run_whose_process_exits_non_zero_is_crashed_by_the_runner(
        deployment: Deployment, served: str) -> None:
    run = deployment.final(deployment.run("served-exit", deployment="s"))
    assert run.state.is_crashed() and "status code: 3" in run.state.message
    assert_final(deployment, "served-exit", run, "crashed")


def test_a_served_run_cancelled_through_the_api_is_reported_cancelled(
        deployment: Deployment, served: str) -> None:
    run, _ = ended_from_outside(deployment, "served-cancel", "cancel", deployment="s")
    assert run.state.is_cancelled()
    assert_final(deployment, "served-cancel", run, "cancelled")


@pytest.fixture(scope="module")
def task_worker(deployment: Deployment) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in deployment.env.items() if not k.startswith("PREFECT_PLUGINS_")}
    proc = deployment.start(argv=[sys.executable, os.path.join(FLOWS, "task_worker.py")],
                            env=env, log="task_worker.log")
    wait_until(lambda: proc.poll() is not None or b"Subscribing to runs of task" in open(
        os.path.join(deployment.tmp, "task_worker.log"), "rb").read(), 120, interval=0.2,
        what="the task worker")
    assert proc.poll() is None, deployment.log("task_worker.log")
    # Its subscription opens after that line: a run submitted before is not
    # delivered. Submit until one is.
    for _ in range(10):
        if task_run_final(deployment, submit(deployment, "tw_ok", 0), 10) is not None:
            return proc
    raise AssertionError("the task worker never ran a task: " + deployment.log("task_worker.log"))


def submit(d: Deployment, name: str, *args: Any) -> Any:
    """``task.delay(*args)`` for a task the task worker serves; the run's id."""
    sys.path.insert(0, FLOWS)
    import deployed_flows

    with d.client():
        return getattr(deployed_flows, name).delay(*args).task_run_id


def task_run_final(d: Deployment, run_id: Any, timeout: float) -> Any:
    """Prefect's task run once final; None if it is not within ``timeout``."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with d.client() as client:
            try:
                run = client.read_task_run(run_id)
            except ObjectNotFound:  # `delay` creates the run in the background
                run = None
        if run is not None and run.state is not None and run.state.is_final():
            return run
        time.sleep(0.25)
    return None


@pytest.mark.parametrize(("name", "status"), [("tw_ok", "success"), ("tw_fail", "failed")])
def test_a_task_worker_reports_the_runs_it_executes(deployment: Deployment, task_worker: Any,
                                                     name: str, status: str) -> None:
    run = task_run_final(deployment, submit(deployment, name, *([1] if name == "tw_ok" else [])),
                         120)
    assert run is not None, deployment.log("task_worker.log")
    end = run.state.timestamp.timestamp()
    d = deployment
    d.wait_value("task_last_completion_timestamp_seconds", "none", name, expect=end)
    assert d.value("task_last_status", "none", name, status=status) == 1
    assert d.value("task_last_attempt", "none", name) == 1
    assert d.value("task_last_duration_seconds", "none", name) == pytest.approx(
        end - run.start_time.timestamp(), abs=1e-5)


_PREFECT_STATUS = {"COMPLETED": "success", "FAILED": "failed", "CRASHED": "crashed"}


def _prefect_counts(d: Deployment, run_ids: list[Any]
                    ) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """Prefect's own record of the runs: each finished task run by its final
    state, its earlier attempts as retries (run count - 1), each flow run's
    state. A task run that never finished (held when its process was killed)
    is no attempt that finished."""
    with d.client() as client:
        runs = task_runs(client, run_ids)
        flow_states = [client.read_flow_run(r).state.type.value for r in run_ids]
    tasks: dict[tuple[str, str], float] = {}
    for r in runs:
        if r.state is None or not r.state.is_final():
            continue
        name = r.name.rsplit("-", 1)[0]
        key = (name, _PREFECT_STATUS[r.state.type.value])
        tasks[key] = tasks.get(key, 0) + 1
        if r.run_count > 1:
            tasks[(name, "retry")] = tasks.get((name, "retry"), 0) + r.run_count - 1
    flows: dict[str, float] = {}
    for state in flow_states:
        if state in _PREFECT_STATUS:  # final
            flows[_PREFECT_STATUS[state]] = flows.get(_PREFECT_STATUS[state], 0) + 1
    return tasks, flows


def _finished(counts: tuple[dict[tuple[str, str], float], dict[str, float]]) -> float:
    """Task runs of the counted flow that finished (retries are earlier attempts)."""
    return sum(n for (t, s), n in counts[0].items() if t.startswith("counted_") and s != "retry")


def test_counts_under_the_worker_equal_prefects_record(deployment: Deployment) -> None:
    """Three flow runs of a deployment, each a process the worker started: one
    SIGKILLed once its .map() of 200 and its retried task were counted (the
    worker reports the crash and counts it), then two at once. The gateway's
    sums equal Prefect's API, in one group (one host and user)."""
    d, flow = deployment, "deployed-counted"
    path, pid_file = released(d)
    killed = d.run(flow, mark=os.path.join(d.tmp, uuid.uuid4().hex), path=path)
    pid = hold_pid(pid_file)
    # Its attempts so far reach the host's store within a push interval, and
    # Prefect's API (from the run's events, sent in the background: a kill
    # before they are sent loses them from Prefect's own record); then the kill.
    wait_until(lambda: sum(n for (t, _), n in d.gw.counted(flow)[0].items()
                           if t == "counted_square") == 200
               and (("counted_flaky", "success") in d.gw.counted(flow)[0]),
               60, interval=0.1, what="the killed run's counts before the kill")
    wait_until(lambda: _finished(_prefect_counts(d, [killed])) == 201, 60, interval=0.5,
               what="the killed run's task runs in the API before the kill")
    os.kill(pid, signal.SIGKILL)
    assert d.final(killed).state.is_crashed()
    runs = [d.run(flow, mark=os.path.join(d.tmp, uuid.uuid4().hex)) for _ in range(2)]
    for run in runs:
        assert d.final(run).state.is_final()
    ids = [killed, *runs]

    seen: list[Any] = []

    def task_runs_final() -> Any:  # Prefect records task runs from events, in the background
        seen[:] = [_prefect_counts(d, ids)]
        return seen[0] if _finished(seen[0]) == 3 * 201 else None

    try:
        expected = wait_until(task_runs_final, 60, interval=0.5, what="the task runs")
    except AssertionError:
        raise AssertionError(f"every task run in the API: {seen}") from None
    # what the flow is written to do, so Prefect's record above is the one we mean
    assert expected[0] == {("counted_square", "success"): 3 * 192,
                           ("counted_square", "failed"): 3 * 8,
                           ("counted_flaky", "retry"): 3, ("counted_flaky", "success"): 3}
    assert expected[1]["crashed"] == 1 and sum(expected[1].values()) == 3
    wait_until(lambda: d.gw.counted(flow) == expected, 60, interval=0.2,
               what=f"the counts; worker log:\n{d.log('worker.log')}")
    groups = {tuple(sorted(g.labels.items())) for g in d.gw.groups()
              if any(labels["flow"] == flow
                     for labels, _ in g.metrics.get(f"{NS}_task_runs_total", []))}
    assert len(groups) == 1
