"""A real Airflow deployment for the tests: Airflow 3's api-server, scheduler
(LocalExecutor) and dag-processor; Airflow 2.10's scheduler (SequentialExecutor
on sqlite) and webserver. Each pushes to a given gateway; the REST API is open
without logging in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from airflow import __version__ as AIRFLOW_VERSION
from gateway import free_port, wait_until

DAGS = os.path.join(os.path.dirname(__file__), "e2e_dags")
AIRFLOW_2 = AIRFLOW_VERSION.startswith("2.")
COMPONENTS = ((["scheduler"], ["webserver"]) if AIRFLOW_2
              else (["api-server"], ["scheduler"], ["dag-processor"]))
API = "webserver" if AIRFLOW_2 else "api-server"  # the REST API's component


class Deployment:
    def __init__(self, home: str, port: int, env: dict[str, str],
                 procs: list[subprocess.Popen[bytes]]) -> None:
        self.home, self.port, self.env, self.procs = home, port, env, procs

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([os.path.join(os.path.dirname(sys.executable), "airflow"), *args],
                              env=self.env, capture_output=True, text=True, timeout=120)

    def trigger(self, dag_id: str = "e2e") -> str:
        if AIRFLOW_2:
            run_id = f"e2e_{time.time_ns()}"
            p = self.cli("dags", "trigger", dag_id, "--run-id", run_id)
            assert p.returncode == 0, p.stderr[-3000:]
            return run_id
        return str(self.api("POST", f"/dags/{dag_id}/dagRuns",
                            {"logical_date": None})["dag_run_id"])

    def task_instances(self, run_id: str, dag_id: str = "e2e") -> dict[str, dict[str, Any]]:
        """Airflow's own record of the run's task instances, by task id."""
        ti = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t for t in ti}

    def task_states(self, run_id: str) -> dict[str, str]:
        return {k: t["state"] for k, t in self.task_instances(run_id).items()}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{'v1' if AIRFLOW_2 else 'v2'}{path}",
            method=method,
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


def _dag_is_parsed(d: Deployment, dag_id: str) -> bool:
    d.check_alive()
    try:
        d.api("GET", f"/dags/{dag_id}")
        return True
    except OSError:
        return False


def deploy(url: str, extra: dict[str, str], dag_ids: tuple[str, ...],
           dags: str = DAGS) -> Iterator[Deployment]:
    """Airflow's components pushing to ``url``, until the DAGs ``dag_ids`` of the
    folder ``dags`` are parsed; stopped (with what they started) at the end."""
    home = tempfile.mkdtemp(prefix="op-airflow-e2e-")
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_PUSH_", "AIRFLOW"))}
    env.update({
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": dags,
        # Airflow 2.10 refuses LocalExecutor on sqlite
        "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor" if AIRFLOW_2 else "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # the REST API without logging in, for the manual state change
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__AUTH_BACKENDS": "airflow.api.auth.backend.default",  # (2.10)
        "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(port),
        "AIRFLOW__WEBSERVER__WORKERS": "1",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "ORCHESTRATOR_PUSH_URL": url,
        # the host's count store of this deployment only (never the user's own)
        "ORCHESTRATOR_PUSH_SPOOL_DIR": os.path.join(home, "spool"),
        "E2E_RELEASE": os.path.join(home, "release"),  # e2e_wait's task ends once it exists
    })
    # a try whose supervising process dies is failed after this long without a
    # heartbeat (default 5 minutes); heartbeats come every 5 s
    if AIRFLOW_2:
        env.update({"AIRFLOW__SCHEDULER__SCHEDULER_ZOMBIE_TASK_THRESHOLD": "30",
                    "AIRFLOW__SCHEDULER__ZOMBIE_DETECTION_INTERVAL": "2"})
    else:
        env.update({"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2"})
    env.update(extra)
    if AIRFLOW_2:  # its REST API, without logging in (Airflow 3: the env above)
        with open(os.path.join(home, "webserver_config.py"), "w") as f:
            f.write('AUTH_ROLE_PUBLIC = "Admin"\n')
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
        for dag_id in dag_ids:
            wait_until(lambda: _dag_is_parsed(d, dag_id), timeout=240, interval=1,  # noqa: B023
                       what=f"DAG {dag_id} parsed")
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
        shutil.rmtree(home, ignore_errors=True)


def airflow_time(text: str) -> float:
    """A time as Airflow's REST API gives it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
