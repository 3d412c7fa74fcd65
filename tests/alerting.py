"""A real Alertmanager with the shipped routes and inhibit rules, and a webhook
receiver for it (the end-to-end tests' own)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway import Prometheus, free_port, start, wait_ready, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "deploy", "alertmanager", "alertmanager.yml")
#: what the matrix's Prometheus loads: the shipped rules and thresholds, and the
#: matrix's own thresholds for its flows
MATRIX_RULES = [*(os.path.join(ROOT, "deploy", "prometheus", f)
                  for f in ("rules.yml", "thresholds.yml")),
                os.path.join(ROOT, "tests", "matrix_limits.yml")]
PLACEHOLDER = "http://alert-receiver.example:5001"


def binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} not found: install the Debian package prometheus-alertmanager")
    return exe


class Receiver:
    """A webhook receiver: what Alertmanager sent, by path."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        #: each firing alert of each notification: (alertname, sorted labels, path, unix time)
        self.arrivals: list[tuple[str, tuple[tuple[str, str], ...], str, float]] = []
        received, arrivals = self.got, self.arrivals

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, body))
                now = time.time()
                for a in body["alerts"]:
                    if a["status"] == "firing":
                        arrivals.append((a["labels"]["alertname"],
                                         tuple(sorted(a["labels"].items())), self.path, now))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def first(self, since: float = 0.0) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                               tuple[str, float]]:
        """(alertname, sorted labels) -> (path, first arrival firing at or after ``since``)."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]] = {}
        for name, labels, path, at in list(self.arrivals):
            if at >= since:
                out.setdefault((name, labels), (path, at))
        return out

    def alerts(self, path: str) -> set[tuple[str, str]]:
        """(alertname, job) of every firing alert sent to ``path``."""
        return {(a["labels"]["alertname"], a["labels"].get("job", ""))
                for p, body in list(self.got) if p == path
                for a in body["alerts"] if a["status"] == "firing"}


class Alertmanager:
    def __init__(self, receiver_url: str) -> None:
        self.workdir = tempfile.mkdtemp(prefix="op-alertmanager-")
        with open(CONFIG) as f:
            text = f.read()
        assert text.count(PLACEHOLDER) == 2
        text = text.replace(PLACEHOLDER, receiver_url)
        text = text.replace("group_wait: 30s", "group_wait: 1s")
        text = text.replace("group_interval: 5m", "group_interval: 1s")
        config = os.path.join(self.workdir, "alertmanager.yml")
        with open(config, "w") as f:
            f.write(text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.workdir, "alertmanager.log"), "wb")
        self.proc = subprocess.Popen(
            [binary("prometheus-alertmanager"), f"--config.file={config}",
             f"--storage.path={self.workdir}/data", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

        try:
            wait_ready(self.proc, self.log.name, self.url, "alertmanager", 30)
        except BaseException:
            self.stop()
            raise

    def fire(self, *alerts: dict[str, str]) -> None:
        now = datetime.now(timezone.utc)
        body = [{"labels": labels, "annotations": {"summary": labels["alertname"]},
                 "startsAt": now.isoformat(),
                 "endsAt": (now + timedelta(minutes=5)).isoformat()} for labels in alerts]
        req = urllib.request.Request(self.url + "/api/v2/alerts", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def suppressed(self, alertname: str, job: str) -> bool:
        """Held back by an inhibit rule (the status says by which alert)."""
        status = self.state(alertname, job)
        return status["state"] == "suppressed" and bool(status["inhibitedBy"])

    def state(self, alertname: str, job: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/api/v2/alerts", timeout=5) as r:
            alerts = json.loads(r.read())
        (found,) = [a for a in alerts if a["labels"]["alertname"] == alertname
                    and a["labels"].get("job") == job]
        return found["status"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- the detection matrix: cases, their arrival, the table ------------------------------


class AlertStack:
    """A gateway, a Prometheus scraping it every second with the matrix's rules,
    an Alertmanager with the shipped routes, and a receiver."""

    def __init__(self, gateway_args: list[str] | None = None) -> None:
        self.gw = start(extra_args=gateway_args)
        self.receiver = Receiver()
        self.am = Alertmanager(self.receiver.url)
        self.prom = Prometheus(self.gw.url, MATRIX_RULES, alertmanager=self.am.url)

    def explain(self) -> str:
        """What might hold an alert back: the alerts Prometheus has, pending or
        firing; whether it failed to scrape a gateway in the last 10 minutes;
        each alert's state at Alertmanager (suppressed, and by what)."""
        lines = ["Prometheus ALERTS:"]
        for r in self.prom.query("ALERTS"):
            m = r["metric"]
            lines.append(f"  {m.get('alertname')} {m.get('alertstate')} "
                         + " ".join(f"{k}={v}" for k, v in sorted(m.items())
                                    if k not in ("__name__", "alertname", "alertstate")))
        for r in self.prom.query('min_over_time(up{job="pushgateway"}[10m])'):
            lines.append(f"lowest up of {r['metric'].get('instance')} in 10 minutes: "
                         f"{r['value'][1]}")
        lines.append("Alertmanager:")
        with urllib.request.urlopen(self.am.url + "/api/v2/alerts", timeout=5) as r:
            for a in json.loads(r.read()):
                lab = a["labels"]
                lines.append(f"  {lab.get('alertname')} job={lab.get('job')} "
                             f"{a['status']['state']} inhibited by {a['status']['inhibitedBy']}")
        return "\n".join(lines)

    def stop(self) -> None:
        self.prom.stop()
        self.am.stop()
        self.receiver.server.shutdown()
        self.gw.stop()


@dataclass
class Case:
    """One failure made to happen, and the alerts it must raise."""

    framework: str
    failure: str
    labels: dict[str, str]  # what the alerts of this case carry (job, flow, task, ...)
    expected: dict[str, str]  # alertname -> receiver path
    bound: float  # seconds from when the alert could first fire to its arrival
    at: float = 0.0  # when it could first fire (unix time)
    since: float = 0.0  # alerts that arrived before this are another case's


def arrived(receiver: Receiver, case: Case) -> dict[str, float]:
    """The case's alerts at the receiver: alertname -> first arrival, checked for
    the receiver they were routed to."""
    out = {}
    for (name, labels), (path, at) in receiver.first(case.since).items():
        lab = dict(labels)
        if all(lab.get(k) == v for k, v in case.labels.items()):
            assert case.expected.get(name) in (None, path), (name, path, case)
            out[name] = at
    return out


def await_cases(stack: AlertStack, cases: list[Case], check: Any = None) -> None:
    """Wait for each case's expected alerts, up to its bound (and 5 s) past ``at``.
    ``check`` (a function) is called while waiting: a component that died says so.
    A case that times out says what Prometheus and Alertmanager held then."""
    for case in cases:
        def done(case: Case = case) -> bool:
            if check is not None:
                check()
            return set(arrived(stack.receiver, case)) >= set(case.expected)

        try:
            wait_until(done, case.at - time.time() + case.bound + 5, interval=0.5,
                       what=f"{case.framework} {case.failure}: {sorted(case.expected)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stack.explain()}") from None


def matrix_table(receiver: Receiver, cases: list[Case]) -> str:
    """Assert that every alert at the receiver is one a case expects, that each
    case got exactly its alerts within its bound; the table of failure x
    framework -> alert and seconds to arrive."""
    for (name, labels) in receiver.first():
        lab = dict(labels)
        assert any(name in c.expected and all(lab.get(k) == v for k, v in c.labels.items())
                   for c in cases), f"unexpected alert {name} {lab}"
    lines = ["| failure | framework | alert (receiver) | seconds to arrive, from when "
             "it could first fire |", "|---|---|---|---|"]
    for case in cases:
        got = arrived(receiver, case)
        assert set(got) == set(case.expected), (case.framework, case.failure, got)
        for name, path in case.expected.items():
            seconds = got[name] - case.at
            assert seconds <= case.bound, (case.framework, case.failure, name, seconds)
            lines.append(f"| {case.failure} | {case.framework} | {name} ({path.strip('/')}) "
                         f"| {seconds:.1f} |")
    return "\n".join(lines)


def kill_at_end(request: Any, pid: int) -> None:
    """SIGKILL ``pid`` when the test ends, whatever happens (a stopped process in
    a session of its own outlives the process group the test stops)."""
    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    request.addfinalizer(kill)


@dataclass
class ScheduledFlow:
    """A flow that a framework's scheduler or worker process runs every few
    seconds, its next run and start delay pushed to the stack's gateway, and the
    late and missed runs made by stopping and killing that process."""

    stack: AlertStack
    framework: str
    job: str
    flow: str
    grace: float
    check: Callable[[], None]  # raises when a component died
    #: how long before a due time the process may start its run (Prefect's
    #: worker submits runs up to PREFECT_WORKER_PREFETCH_SECONDS, 10 s, early):
    #: it is stopped or killed before that
    lead: float = 5.0

    def _values(self, *names: str) -> tuple[float, ...] | None:
        try:  # one read: the values of one push
            g = self.stack.gw.group(job=self.job, flow=self.flow)
            return tuple(g.value(f"orchestrator_{n}") for n in names)
        except KeyError:
            return None

    def between_runs(self, timeout: float) -> float:
        """The next run, once it is at the gateway after the last start and more
        than ``lead`` seconds ahead."""
        def due() -> float | None:
            self.check()
            next_run, _ = self.stack.gw.next_run(self.job, self.flow)
            start = self._values("flow_last_start_timestamp_seconds")
            ok = (next_run is not None and start is not None and next_run > start[0]
                  and time.time() < next_run - self.lead)
            return next_run if ok else None

        return float(wait_until(due, timeout, interval=0.2, what=f"{self.flow} between two runs"))

    def late(self, proc: subprocess.Popen[bytes], who: str,
             timeout: float) -> tuple[list[Case], float, float, float]:
        """``proc`` stopped (SIGSTOP) across a due time until the run is missed,
        then resumed: the run starts late. The cases (missed while stopped, late
        once started), the due time, and the late run's start and delay as the
        gateway had them."""
        due = self.between_runs(timeout)
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.time()
        missed = Case(self.framework, f"late: missed while the {who} is stopped",
                      {"flow": self.flow, "alertname": "OrchestratorFlowMissed"},
                      {"OrchestratorFlowMissed": "/pager"}, 20, at=due + self.grace,
                      since=stopped)
        try:
            await_cases(self.stack, [missed])
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        # it can fire once the late run's start, and how late, is at the gateway
        def late_start() -> tuple[float, ...] | None:
            self.check()
            got = self._values("flow_last_start_timestamp_seconds",
                               "flow_last_start_delay_seconds")
            return got if got is not None and got[0] > due else None

        started, delay = wait_until(late_start, 60, interval=0.1, what="the late run's start")
        late = Case(self.framework, f"late: started once the {who} resumed",
                    {"flow": self.flow, "alertname": "OrchestratorFlowLate"},
                    {"OrchestratorFlowLate": "/chat"}, 20, at=started, since=stopped)
        await_cases(self.stack, [late], check=self.check)
        return [missed, late], due, started, delay

    def killed(self, proc: subprocess.Popen[bytes], who: str, node: dict[str, str],
               timeout: float) -> list[Case]:
        """``proc`` SIGKILLed (with its process group) between two runs: the next
        run is missed, and the node (its liveness labels) is gone."""
        due = self.between_runs(timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.time()
        assert self.stack.gw.next_run(self.job, self.flow) == (due, self.grace)
        missed = Case(self.framework, f"missed ({who} killed)",
                      {"flow": self.flow, "alertname": "OrchestratorFlowMissed"},
                      {"OrchestratorFlowMissed": "/pager"}, 20, at=due + self.grace,
                      since=killed)
        gone = Case(self.framework, f"{who} gone", {**node, "alertname": "OrchestratorWorkerDown"},
                    {"OrchestratorWorkerDown": "/pager"}, 40, at=killed + 120)
        await_cases(self.stack, [missed, gone])
        return [missed, gone]
