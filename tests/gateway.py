"""A real Pushgateway for tests: the Debian ``prometheus-pushgateway`` binary on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

INSTALL_HINT = (
    "the Pushgateway binary was not found. Install it with "
    "`apt-get install -y --no-install-recommends prometheus-pushgateway` "
    "or point ORCHESTRATOR_PUSH_TEST_PUSHGATEWAY at a pushgateway executable."
)


def find_binary() -> str:
    explicit = os.environ.get("ORCHESTRATOR_PUSH_TEST_PUSHGATEWAY")
    if explicit:
        return explicit
    for name in ("prometheus-pushgateway", "pushgateway"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    raise RuntimeError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Group:
    labels: dict[str, str]
    metrics: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        matches = [v for lab, v in self.metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
        if len(matches) != 1:
            raise KeyError(f"{name}{labels}: {len(matches)} samples in group {self.labels}")
        return matches[0]

    def histogram(self, name: str) -> dict[tuple[tuple[str, str], ...], dict[str, float]]:
        """A histogram's series by their labels: each ``le`` bound, ``count`` and ``sum``."""
        out: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
        for labels, v in self.metrics.get(name, []):
            key = tuple(sorted((k, x) for k, x in labels.items()
                               if k not in ("le", "__count__", "__sum__")))
            part = labels.get("le", "count" if "__count__" in labels else "sum")
            out.setdefault(key, {})[part] = v
        return out


class Pushgateway:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], args: list[str],
                 context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
                 ) -> None:
        self.port = port
        self.proc = proc
        self.args = args
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
        self.context = context  # how the test itself reaches a TLS gateway
        self.headers = headers or {}  # ... and one with basic auth

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=5, context=self.context) as r:
            return r.read()  # type: ignore[no-any-return]

    def next_run(self, job: str, flow: str) -> tuple[float | None, float | None]:
        """A flow's next run and schedule grace, as Prometheus scrapes them from
        ``/metrics`` (a removed next run is absent there)."""
        due = grace = None
        for line in self.get("/metrics").decode().splitlines():
            if f'flow="{flow}"' in line and f'job="{job}"' in line:
                if line.startswith("orchestrator_flow_next_run_timestamp_seconds{"):
                    due = float(line.rsplit(" ", 1)[1])
                elif line.startswith("orchestrator_flow_schedule_grace_seconds{"):
                    grace = float(line.rsplit(" ", 1)[1])
        return due, grace

    def groups(self) -> list[Group]:
        """Every group the gateway holds, from ``/api/v1/metrics``."""
        data = json.loads(self.get("/api/v1/metrics"))["data"]
        out = []
        for entry in data:
            g = Group(labels=dict(entry["labels"]))
            for name, fam in entry.items():
                if not isinstance(fam, dict) or "metrics" not in fam:
                    continue
                g.types[name] = fam["type"]
                g.helps[name] = fam.get("help", "")
                samples: list[tuple[dict[str, str], float]] = []
                for m in fam["metrics"]:
                    labels = dict(m.get("labels", {}))
                    if "value" in m:
                        samples.append((labels, float(m["value"])))
                    else:  # histogram / summary
                        samples.append(({**labels, "__count__": "1"}, float(m["count"])))
                        samples.append(({**labels, "__sum__": "1"}, float(m["sum"])))
                        for le, count in m.get("buckets", {}).items():
                            samples.append(({**labels, "le": le}, float(count)))
                g.metrics[name] = samples
            out.append(g)
        return out

    def group(self, **labels: str) -> Group:
        found = [g for g in self.groups() if all(g.labels.get(k) == v for k, v in labels.items())
                 and set(g.labels) == set(labels)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} groups match {labels}: {[g.labels for g in self.groups()]}")
        return found[0]

    def push_count(self) -> int:
        """Pushes the gateway has handled, from its own request counter."""
        total = 0
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith("pushgateway_http_requests_total{") and 'handler="push"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def runs_by_status(self, task: str | None = None) -> dict[str, float]:
        """orchestrator_task_runs_total summed over every group, by status."""
        out: dict[str, float] = {}
        for g in self.groups():
            for labels, value in g.metrics.get("orchestrator_task_runs_total", []):
                if task is None or labels.get("task") == task:
                    out[labels["status"]] = out.get(labels["status"], 0) + value
        return out

    def counted(self, flow: str | None = None
                ) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
        """Task attempts by (task, status) and flow runs by status, of ``flow``
        (default: every flow), summed over every group."""
        tasks: dict[tuple[str, str], float] = {}
        flows: dict[str, float] = {}
        for g in self.groups():
            for labels, v in g.metrics.get("orchestrator_task_runs_total", []):
                if flow is None or labels["flow"] == flow:
                    key = (labels["task"], labels["status"])
                    tasks[key] = tasks.get(key, 0) + v
            for labels, v in g.metrics.get("orchestrator_flow_runs_total", []):
                if flow is None or labels["flow"] == flow:
                    flows[labels["status"]] = flows.get(labels["status"], 0) + v
        return tasks, flows

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def start(port: int | None = None, extra_args: list[str] | None = None,
          ready_timeout: float = 10.0, context: ssl.SSLContext | None = None,
          headers: dict[str, str] | None = None) -> Pushgateway:
    binary = find_binary()
    port = port or free_port()
    extra = extra_args or []
    # persistence off unless the caller gives a file (the flag cannot be repeated)
    persistence = [] if any(a.startswith("--persistence.file") for a in extra) \
        else ["--persistence.file="]
    args = [binary, f"--web.listen-address=127.0.0.1:{port}", *persistence,
            "--log.level=warn", *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    gw = Pushgateway(port, proc, args, context, headers)

    def ready() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"pushgateway exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            return gw.get("/-/ready") is not None
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    try:
        wait_until(ready, ready_timeout, what="pushgateway /-/ready")
    except BaseException:
        gw.stop()
        raise
    return gw


def running(extra_args: list[str] | None = None) -> Iterator[Pushgateway]:
    gw = start(extra_args=extra_args)
    try:
        yield gw
    finally:
        gw.stop()


class RedisServer:
    """A real ``redis-server`` on a free 127.0.0.1 port, no persistence."""

    def __init__(self, prefix: list[str] | None = None) -> None:
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if binary is None:
            raise RuntimeError("redis-server not found: "
                               "apt-get install -y --no-install-recommends redis-server")
        self.port = port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="op-redis-")
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = subprocess.Popen(
            [*(prefix or []), binary, "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_until(self.ping, 10, what="redis ping")
        except BaseException:
            self.stop()
            raise

    def ping(self) -> bool:
        # the protocol by hand: the demo drives Redis from a venv without redis-py
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
rule_files: {rule_files}
scrape_configs:
  - job_name: pushgateway
    honor_labels: {honor_labels}
    static_configs:
      - targets: {targets}
    relabel_configs:  # as deploy/prometheus/scrape.yml: each gateway's copy apart
      - source_labels: [__address__]
        target_label: pushgateway
"""
ALERTING = """alerting:
  alertmanagers:
    - static_configs:
        - targets: ["{target}"]
"""


def wait_ready(proc: subprocess.Popen[bytes], log: str, url: str, name: str,
               timeout: float) -> None:
    """Until ``url``/-/ready answers 200 (Prometheus, Alertmanager); the log's
    end in the error if the process exits first."""
    def ready() -> bool:
        if proc.poll() is not None:
            with open(log, "rb") as f:
                raise RuntimeError(f"{name} exited: {f.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                return r.status == 200  # type: ignore[no-any-return]
        except OSError:
            return False

    wait_until(ready, timeout, interval=0.1, what=f"{name} /-/ready")


class Prometheus:
    """A real ``prometheus`` on a free 127.0.0.1 port scraping one Pushgateway,
    or several (``gateway_url`` lists them, comma-separated)."""

    def __init__(self, gateway_url: str, rule_files: list[str] | None = None,
                 honor_labels: bool = True, interval: str = "1s",
                 alertmanager: str | None = None) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: "
                               "apt-get install -y --no-install-recommends prometheus")
        self.workdir = tempfile.mkdtemp(prefix="op-prometheus-")
        config = os.path.join(self.workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(PROMETHEUS_CONFIG.format(
                interval=interval, rule_files=json.dumps(rule_files or []),
                honor_labels=str(honor_labels).lower(),
                targets=json.dumps([u.split("://", 1)[1].rstrip("/")
                                    for u in gateway_url.split(",")])))
            if alertmanager is not None:  # where firing alerts go
                f.write(ALERTING.format(target=alertmanager.split("://", 1)[1].rstrip("/")))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.workdir, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

        try:
            wait_ready(self.proc, self.log.name, self.url, "prometheus", 60)
        except BaseException:
            self.stop()
            raise

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def rule_groups(self) -> list[dict[str, Any]]:
        """``/api/v1/rules``: each rule group with its rules and last evaluation."""
        with urllib.request.urlopen(self.url + "/api/v1/rules", timeout=10) as r:
            return json.loads(r.read())["data"]["groups"]  # type: ignore[no-any-return]

    def evaluated_since(self, t: float) -> bool:
        """Every rule group evaluated after ``t`` (unix time): with what was scraped by then."""
        stamps = [re.sub(r"(\.\d{6})\d*", r"\1", g["lastEvaluation"]).replace("Z", "+00:00")
                  for g in self.rule_groups()]
        return bool(stamps) and all(datetime.fromisoformat(s).timestamp() > t for s in stamps)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
