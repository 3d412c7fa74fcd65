"""deploy/alertmanager: a real Alertmanager with the shipped routes and inhibitions,
sending to a webhook receiver inside the test.

The shipped file is used as it is, with two changes: the receivers' URL points
at this test's receiver, and the grouping waits are 1 s instead of 30 s / 5 min
(the routes and inhibit rules are the shipped ones)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from gateway import free_port, wait_ready, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = os.path.join(ROOT, "deploy", "alertmanager", "alertmanager.yml")
PLACEHOLDER = "http://alert-receiver.example:5001"


def binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found: install the Debian package prometheus-alertmanager",
                    pytrace=False)
    return exe


class Receiver:
    """A webhook receiver: what Alertmanager sent, by path."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        received = self.got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def alertmanager(receiver: Receiver) -> Iterator[Alertmanager]:
    am = Alertmanager(receiver.url)
    yield am
    am.stop()


def test_the_shipped_config_is_valid() -> None:
    p = subprocess.run([binary("amtool"), "check-config", CONFIG], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 inhibit rules" in p.stdout and "3 receivers" in p.stdout


def alert(name: str, severity: str, job: str, **labels: str) -> dict[str, str]:
    return {"alertname": name, "severity": severity, "job": job, **labels}


def test_an_outage_of_our_delivery_is_one_alert_and_holds_back_the_runs_it_hid(
    alertmanager: Alertmanager, receiver: Receiver
) -> None:
    alertmanager.fire(
        alert("OrchestratorPushRecovering", "none", "pushgateway", instance="pgw:9091"),
        alert("OrchestratorPushOutage", "critical", "pushgateway", instance="pgw:9091"),
        alert("OrchestratorFlowMissed", "critical", "airflow", flow="nightly"),
        alert("OrchestratorTaskHung", "critical", "exec", flow="backup", task="main"),
        alert("OrchestratorWorkerDown", "critical", "celery", instance="w1@host"),
        alert("OrchestratorFlowLate", "warning", "prefect", flow="sync"),
        alert("OrchestratorPushFailing", "warning", "airflow"),
        # a failure that did arrive is real, outage or not
        alert("OrchestratorTaskFailed", "warning", "airflow", flow="etl", task="load"),
    )
    held = [("OrchestratorFlowMissed", "airflow"), ("OrchestratorTaskHung", "exec"),
            ("OrchestratorWorkerDown", "celery"), ("OrchestratorFlowLate", "prefect"),
            ("OrchestratorPushFailing", "airflow")]
    wait_until(lambda: all(alertmanager.suppressed(name, job) for name, job in held), 30,
               what="the alerts about runs that did not arrive held back")
    wait_until(lambda: receiver.alerts("/pager") and receiver.alerts("/chat"), 30,
               what="both receivers to be sent something")
    assert alertmanager.state("OrchestratorPushRecovering", "pushgateway")["state"] == "active"
    assert receiver.alerts("/pager") == {("OrchestratorPushOutage", "pushgateway")}
    assert receiver.alerts("/chat") == {("OrchestratorTaskFailed", "airflow")}


def test_a_job_whose_pushes_fail_holds_back_only_its_own_absence_alerts(
    alertmanager: Alertmanager, receiver: Receiver
) -> None:
    alertmanager.fire(
        alert("OrchestratorPushFailing", "warning", "backup"),
        alert("OrchestratorTaskMissed", "critical", "backup", flow="backup", task="main"),
        alert("OrchestratorTaskMissed", "critical", "reports", flow="reports", task="main"),
    )
    wait_until(lambda: alertmanager.suppressed("OrchestratorTaskMissed", "backup"), 30,
               what="the missed run of job backup held back")
    wait_until(lambda: receiver.alerts("/pager") and receiver.alerts("/chat"), 30,
               what="both receivers to be sent something")
    assert receiver.alerts("/pager") == {("OrchestratorTaskMissed", "reports")}
    assert receiver.alerts("/chat") == {("OrchestratorPushFailing", "backup")}
