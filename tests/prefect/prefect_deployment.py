"""A real Prefect deployment for the tests: `prefect server start`, a process
work pool, flows of deployed/deployed_flows.py deployed from source, and
`prefect worker start` with the plugin (`PREFECT_PLUGINS_ENABLED=1`), pushing
to a given gateway."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

from gateway import Pushgateway, free_port, wait_until

NS = "orchestrator"
FLOWS = os.path.join(os.path.dirname(__file__), "deployed")
POOL = "orchestrator-tests"
WORKER = "orchestrator-test-worker"
SETUP = textwrap.dedent("""
    import sys
    from prefect import flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=sys.argv[1], type="process"))
    for name, spec in (pair.split("=") for pair in sys.argv[3:]):
        attr, _, every = spec.partition("@")
        broken = {"command": "/nonexistent/orchestrator-push-test"}  # the worker cannot start it
        flow.from_source(source=sys.argv[2], entrypoint=f"deployed_flows.py:{attr}").deploy(
            name="d", work_pool_name=sys.argv[1], print_next_steps=False,
            interval=float(every) if every else None,
            job_variables=broken if attr == "deployed_unsubmittable" else {})
""")


class Deployment:
    def __init__(self, api: str, env: dict[str, str], gw: Pushgateway, tmp: str) -> None:
        self.api, self.env, self.gw, self.tmp = api, env, gw, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: str, env: dict[str, str] | None = None,
              argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        """``prefect *args`` (or ``argv``), in its own session, output to ``log``."""
        command = argv or [os.path.join(os.path.dirname(sys.executable), "prefect"), *args]
        with open(os.path.join(self.tmp, log), "wb") as out:
            proc = subprocess.Popen(command, env=env or self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_exit(self, proc: subprocess.Popen[bytes], log: str, timeout: float) -> int:
        """``proc``'s exit code; if it has not exited after ``timeout`` s, its
        threads' stacks (faulthandler, on SIGABRT) in the error."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with open(f"/proc/{proc.pid}/status") as f:  # its signals: pending, blocked, ...
                sigs = "".join(line for line in f if line.startswith(("Sig", "Shd")))
            proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            raise AssertionError(f"{log}: no exit within {timeout} s; {sigs}its log and stacks:\n"
                                 + self.log(log, 20000)) from None

    def log(self, name: str, tail: int = 4000) -> str:
        with open(os.path.join(self.tmp, name), errors="replace") as f:
            return f.read()[-tail:]

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        # the deployment's storage: where `task.delay()` leaves a task's parameters
        storage = os.path.join(self.env["PREFECT_HOME"], "storage")
        with temporary_settings({PREFECT_API_URL: self.api, PREFECT_LOCAL_STORAGE_PATH: storage}), \
                get_client(sync_client=True) as client:
            yield client

    def run(self, flow: str, deployment: str = "d", **parameters: Any) -> Any:
        """A new flow run of the flow's deployment; its id."""
        with self.client() as client:
            found = client.read_deployment_by_name(f"{flow}/{deployment}")
            return client.create_flow_run_from_deployment(found.id, parameters=parameters).id

    def earliest_scheduled(self, deployment: str) -> float | None:
        """Prefect's own record: the expected start of the deployment's earliest
        run in a SCHEDULED state (``flow/deployment``); None while there is none."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        with self.client() as client:
            dep = client.read_deployment_by_name(deployment)
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
        return runs[0].expected_start_time.timestamp() if runs else None

    def read(self, run_id: Any) -> Any:
        with self.client() as client:
            return client.read_flow_run(run_id)

    def final(self, run_id: Any) -> Any:
        """The run once Prefect says it is final."""
        def done() -> Any:
            run = self.read(run_id)
            return run if run.state is not None and run.state.is_final() else None

        return wait_until(done, 180, interval=0.25,
                          what=f"a final state; worker log:\n{self.log('worker.log')}")

    def value(self, name: str, flow: str, task: str | None = None, **labels: str) -> float | None:
        key = {"job": "prefect", "flow": flow, **({"task": task} if task else {})}
        try:
            return self.gw.group(**key).value(f"{NS}_{name}", **labels)
        except KeyError:
            return None

    def wait_value(self, name: str, flow: str, task: str | None = None,
                   expect: float | None = None, **labels: str) -> float:
        def seen() -> float | None:
            v = self.value(name, flow, task, **labels)
            return v if v is not None and (expect is None or v == expect) else None

        return float(wait_until(seen, 60, interval=0.1, what=f"{name} of {flow}"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def released(d: Deployment) -> tuple[str, str]:
    """A path for a `hold` task to wait for, and where it says its pid."""
    path = os.path.join(d.tmp, uuid.uuid4().hex)
    return path, path + ".pid"


def hold_pid(pid_file: str) -> int:
    def written() -> int | None:
        try:
            with open(pid_file) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    return int(wait_until(written, 180, interval=0.1, what="the flow-run process"))


def deploy(gw: Pushgateway, tmp: str, deployments: dict[str, str],
           extra_env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """The server, the deployments (flow name -> function in deployed_flows.py;
    ``name@seconds`` for an interval schedule) and the worker, pushing to ``gw``;
    stopped, with what they started, at the end. Files under ``tmp``."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "ORCHESTRATOR_PUSH_"))}
    env.update({
        "PREFECT_HOME": os.path.join(tmp, "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # scheduled runs are created within 2 s of a schedule (default 60)
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_PLUGINS_ENABLED": "1",
        "ORCHESTRATOR_PUSH_URL": gw.url,
        "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
        "XDG_CACHE_HOME": os.path.join(tmp, "cache"),
        # a process that hangs dumps every thread's stack on SIGABRT (wait_exit)
        "PYTHONFAULTHANDLER": "1",
    })
    env.update(extra_env or {})
    d = Deployment(api, env, gw, tmp)
    try:
        yield from _start(d, deployments)
    finally:
        d.stop()


def _start(d: Deployment, deployments: dict[str, str]) -> Iterator[Deployment]:
    api, env = d.api, d.env
    server = d.start("server", "start", log="server.log")

    def healthy() -> bool:
        assert server.poll() is None, d.log("server.log")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_until(healthy, 120, interval=0.5, what="the Prefect server")
    setup = subprocess.run(
        [sys.executable, "-c", SETUP, POOL, FLOWS,
         *(f"{k}={v}" for k, v in deployments.items())],
        env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-3000:]
    d.start("worker", "start", "--pool", POOL, "--name", WORKER, log="worker.log")
    yield d


