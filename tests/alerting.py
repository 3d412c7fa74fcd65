"""A real Alertmanager with the shipped routes and inhibit rules, and a webhook
receiver for it (the end-to-end tests' own)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
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


def await_cases(receiver: Receiver, cases: list[Case], check: Any = None) -> None:
    """Wait for each case's expected alerts, up to its bound (and 5 s) past ``at``.
    ``check`` (a function) is called while waiting: a component that died says so."""
    for case in cases:
        def done(case: Case = case) -> bool:
            if check is not None:
                check()
            return set(arrived(receiver, case)) >= set(case.expected)

        wait_until(done, case.at - time.time() + case.bound + 5, interval=0.5,
                   what=f"{case.framework} {case.failure}: {sorted(case.expected)}")


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
