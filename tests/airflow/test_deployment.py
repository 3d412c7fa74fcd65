"""End to end with a real scheduler.

Airflow 3: api-server, scheduler (LocalExecutor) and dag-processor; the run is
triggered and a state is set by hand through the REST API. Airflow 2.10: the
scheduler alone (on sqlite it runs the SequentialExecutor; each try is still an
`airflow tasks run` subprocess), triggered with the CLI; 2.10 calls no listener
for a state set by hand, so that test is Airflow 3 only.

The task metrics come from the task-runner subprocesses, the DAG run's from the
scheduler.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from gateway import Pushgateway, free_port, running, wait_until

NS = "orchestrator"
DAGS = os.path.join(os.path.dirname(__file__), "e2e_dags")
AIRFLOW_2 = AIRFLOW_VERSION.startswith("2.")
COMPONENTS = (["scheduler"],) if AIRFLOW_2 else (["api-server"], ["scheduler"], ["dag-processor"])


class Deployment:
    def __init__(self, home: str, port: int, env: dict[str, str],
                 procs: list[subprocess.Popen[bytes]]) -> None:
        self.home, self.port, self.env, self.procs = home, port, env, procs

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([os.path.join(os.path.dirname(sys.executable), "airflow"), *args],
                              env=self.env, capture_output=True, text=True, timeout=120)

    def trigger(self) -> str:
        if AIRFLOW_2:
            run_id = f"e2e_{time.time_ns()}"
            p = self.cli("dags", "trigger", "e2e", "--run-id", run_id)
            assert p.returncode == 0, p.stderr[-3000:]
            return run_id
        return str(self.api("POST", "/dags/e2e/dagRuns", {"logical_date": None})["dag_run_id"])

    def task_states(self, run_id: str) -> dict[str, str]:
        if AIRFLOW_2:
            p = self.cli("tasks", "states-for-dag-run", "e2e", run_id, "-o", "json")
            assert p.returncode == 0, p.stderr[-3000:]
            return {t["task_id"]: t["state"] for t in json.loads(p.stdout)}
        ti = self.api("GET", f"/dags/e2e/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t["state"] for t in ti}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v2{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def log(self, component: str) -> str:
        with open(os.path.join(self.home, f"{component}.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def check_alive(self) -> None:
        for args, proc in zip(COMPONENTS, self.procs, strict=False):
            if proc.poll() is not None:
                raise AssertionError(f"airflow {args[0]} exited ({proc.returncode}):\n"
                                     + self.log(args[0])[-3000:])


def _dag_is_parsed(d: Deployment) -> bool:
    d.check_alive()
    if AIRFLOW_2:
        return d.cli("dags", "details", "e2e").returncode == 0
    try:
        d.api("GET", "/dags/e2e")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def gateway_for_deployment() -> Iterator[Pushgateway]:
    yield from running()


@pytest.fixture(scope="module")
def deployment(gateway_for_deployment: Pushgateway) -> Iterator[Deployment]:
    home = tempfile.mkdtemp(prefix="op-airflow-e2e-")
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_PUSH_", "AIRFLOW"))}
    env.update({
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": DAGS,
        # Airflow 2.10 refuses LocalExecutor on sqlite
        "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor" if AIRFLOW_2 else "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # the REST API without logging in, for the manual state change
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "ORCHESTRATOR_PUSH_URL": gateway_for_deployment.url,
    })
    subprocess.run([os.path.join(bindir, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    procs = []
    for args in COMPONENTS:
        out = open(os.path.join(home, f"{args[0]}.log"), "wb")
        procs.append(subprocess.Popen([os.path.join(bindir, "airflow"), *args], env=env,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    d = Deployment(home, port, env, procs)
    try:
        wait_until(lambda: _dag_is_parsed(d), timeout=240, interval=1, what="DAG e2e parsed")
        yield d
    finally:
        for proc in procs:  # each component and the workers it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _flow_completed_at(gw: Pushgateway) -> float:
    for g in gw.groups():
        if g.labels == {"job": "airflow", "flow": "e2e"}:
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


# Airflow 2.10 calls no listener when a state is set by hand: nothing to test there.
if not AIRFLOW_2:
    def test_state_set_by_hand_is_not_counted(deployment: Deployment,
                                              gateway_for_deployment: Pushgateway) -> None:
        gw = gateway_for_deployment
        run_id = _finished_run(deployment, gw)
        pushes = gw.push_count()
        deployment.api("PATCH", f"/dags/e2e/dagRuns/{run_id}/taskInstances/hello",
                       {"new_state": "failed"})
        # The API server called our listener and it chose not to count the change.
        wait_until(lambda: "e2e.hello set to failed by hand" in deployment.log("api-server"),
                   timeout=60, interval=0.2, what="the listener to see the manual change")
        hello = gw.group(job="airflow", flow="e2e", task="hello")
        assert hello.value(f"{NS}_task_last_status", status="success") == 1
        assert hello.value(f"{NS}_task_last_status", status="failed") == 0
        assert gw.push_count() == pushes
