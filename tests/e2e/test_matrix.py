"""The detection matrix: each failure made to happen for real, and exactly the
expected alert reaching a webhook receiver, through a real Prometheus (the
shipped rules, 1 s scrape and evaluation) and a real Alertmanager (the shipped
routes and inhibit rules; group waits of 1 s), within a stated time.

Rows: `exec` (failed, missed, late, hung, vanished) and Celery on a real Redis
(a task that fails; a pool process SIGKILLed with a task in progress: reported
failed by the main process; beat stopped: missed; a worker SIGKILLed with a
task in progress past its time limit: hung, and the worker gone), then a single
failed scrape of the gateway (it holds nothing back), then our own outage:
the gateway stopped for 40 s while an `exec` loop keeps running, then started
again with its persistence file: one alert about the outage, none about the
runs it hid. Schedules are compressed to seconds; the thresholds of the matrix's
flows are in tests/matrix_limits.yml. The table of failure x framework -> alert and
seconds to arrive is printed at the end (`pytest -s` shows it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from alerting import AlertStack, Case, arrived, await_cases, matrix_table
from gateway import Pushgateway, RedisServer, start, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import story  # noqa: E402

NS = "orchestrator"

pytestmark = pytest.mark.timeout(900)


class Stack(AlertStack):
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.persistence = os.path.join(tmp, "pushgateway.data")
        super().__init__([f"--persistence.file={self.persistence}"])
        self.redis = RedisServer()
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")}
        env.update({"ORCHESTRATOR_PUSH_URL": self.gw.url, "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
                    "ORCHESTRATOR_PUSH_SPOOL_DIR": os.path.join(self.tmp, "spool"),
                    "MATRIX_REDIS_URL": self.redis.url,
                    "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")})
        env.update(extra)
        return env

    def popen(self, args: list[str], log: str, **env: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.tmp, log), "wb") as out:
            p = subprocess.Popen(args, env=self.env(**env), cwd=HERE, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        with open(os.path.join(self.tmp, name), errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        super().stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="op-matrix-") as tmp:
        try:
            s = Stack(tmp)
        except RuntimeError as exc:  # a missing binary: an error that says what to install
            pytest.fail(str(exc), pytrace=False)
        try:
            yield s
        finally:
            s.stop()


def exec_cmd(job: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator_push", "exec", "--job", job, *args]


def gateway_value(gw: Pushgateway, name: str, **group: str) -> float | None:
    try:
        return gw.group(**group).value(f"{NS}_{name}")
    except KeyError:
        return None


def started(gw: Pushgateway, job: str) -> bool:
    return gateway_value(gw, "task_last_start_timestamp_seconds",
                         job=job, flow=job, task="main") is not None


def kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process the test started, and what it started."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)


def exec_cases(s: Stack) -> list[Case]:
    run = s.env()
    failed = Case("exec", "failed", {"job": "m-failed"}, {"OrchestratorTaskFailed": "/chat"}, 20)
    failed.at = time.time()
    assert subprocess.run(exec_cmd("m-failed", "--", "false"), env=run, timeout=60).returncode == 1

    missed = Case("exec", "missed", {"job": "m-missed"}, {"OrchestratorTaskMissed": "/pager"}, 20)
    assert subprocess.run(exec_cmd("m-missed", "--every", "3s", "--grace", "1s", "--", "true"),
                          env=run, timeout=60).returncode == 0
    missed.at = time.time() + 3 + 1  # due 3 s after it ended, then its grace

    # its tick was on 1 January: months late, never missed this year
    late = Case("exec", "late", {"job": "m-late"}, {"OrchestratorFlowLate": "/chat"}, 20)
    late.at = time.time()
    assert subprocess.run(exec_cmd("m-late", "--schedule", "0 0 1 1 *", "--tz", "UTC",
                                   "--grace", "1s", "--", "true"),
                          env=run, timeout=60).returncode == 0

    hung = Case("exec", "hung", {"job": "m-hung"}, {"OrchestratorTaskHung": "/pager"}, 20)
    p = s.popen(exec_cmd("m-hung", "--timeout", "2s", "--", "sleep", "600"), "m-hung.log")
    wait_until(lambda: started(s.gw, "m-hung"), 30, what="m-hung's start at the gateway")
    kill_group(p)  # exec and its command: nobody stops it at its limit now
    hung.at = float(gateway_value(s.gw, "task_last_start_timestamp_seconds", job="m-hung",
                                  flow="m-hung", task="main") or 0) + 2 + 1

    vanished = Case("exec", "vanished", {"job": "m-vanished"},
                    {"OrchestratorTaskVanished": "/chat"}, 20)
    p = s.popen(exec_cmd("m-vanished", "--", "sleep", "600"), "m-vanished.log")
    wait_until(lambda: started(s.gw, "m-vanished"), 30, what="m-vanished's start at the gateway")
    kill_group(p)
    vanished.at = float(gateway_value(s.gw, "task_last_start_timestamp_seconds",
                                      job="m-vanished", flow="m-vanished", task="main") or 0) + 3
    return [failed, missed, late, hung, vanished]


def celery_cases(s: Stack) -> list[Case]:
    python = story.framework_python("celery")
    celery = [python, "-m", "celery", "-A", "matrix_celery"]
    quiet = ["-l", "warning", "--without-heartbeat", "--without-gossip", "--without-mingle"]
    # the worker that will be killed with a task in progress: its own job and queue
    doomed = s.popen([*celery, "worker", *quiet, "-Q", "doomed", "-n", "doomed@%h", "-c", "1"],
                     "doomed.log", ORCHESTRATOR_PUSH_JOB="m-celery-dead")
    worker = s.popen([*celery, "worker", *quiet, "-n", "main@%h", "-c", "2"], "worker.log",
                     ORCHESTRATOR_PUSH_JOB="m-celery")
    beat = s.popen([*celery, "beat", "-l", "info", "-s", os.path.join(s.tmp, "beat-schedule"),
                    "--max-interval", "1"], "beat.log",
                   ORCHESTRATOR_PUSH_JOB="m-celery", ORCHESTRATOR_PUSH_SCHEDULE_GRACE="3s")
    send = [python, "-c", "import sys, matrix_celery as m; "
            "m.app.send_task(sys.argv[1], queue=sys.argv[2])"]

    running = {"doomed": doomed, "worker": worker, "beat": beat}

    def alive() -> None:
        for name, p in running.items():
            assert p.poll() is None, f"celery {name} exited:\n{s.log(name + '.log')}"

    def worker_seen(job: str) -> bool:
        alive()
        return any(g.labels.get("job") == job and f"{NS}_worker_up" in g.metrics
                   for g in s.gw.groups())

    wait_until(lambda: worker_seen("m-celery") and worker_seen("m-celery-dead"), 120,
               what="both Celery workers up at the gateway")

    assert subprocess.run([*send, "matrix.stuck", "doomed"], env=s.env(), cwd=HERE,
                          timeout=60).returncode == 0
    wait_until(lambda: gateway_value(s.gw, "task_last_start_timestamp_seconds", job="m-celery-dead",
                                     flow="matrix", task="matrix.stuck") is not None,
               60, what="matrix.stuck's start at the gateway")
    kill_group(running.pop("doomed"))  # its main process and pool child, the task in progress
    killed = time.time()
    hung = Case("celery", "hung", {"job": "m-celery-dead", "task": "matrix.stuck"},
                {"OrchestratorTaskHung": "/pager"}, 25)
    start_at = gateway_value(s.gw, "task_last_start_timestamp_seconds", job="m-celery-dead",
                             flow="matrix", task="matrix.stuck")
    hung.at = max(float(start_at or 0) + 3 + 1, killed)
    gone = Case("celery", "worker gone", {"job": "m-celery-dead", "alertname":
                                          "OrchestratorWorkerDown"},
                {"OrchestratorWorkerDown": "/pager"}, 40)
    gone.at = killed + 120  # not seen for 2 minutes

    failed = Case("celery", "failed", {"job": "m-celery", "task": "matrix.fail"},
                  {"OrchestratorTaskFailed": "/chat"}, 20)
    failed.at = time.time()
    assert subprocess.run([*send, "matrix.fail", "celery"], env=s.env(), cwd=HERE,
                          timeout=60).returncode == 0

    # a pool process SIGKILLed (an OOM kill) with a task in progress: the main
    # process reports the task failed (WorkerLostError); nothing vanishes
    pid_file = os.path.join(s.tmp, "victim.pid")
    assert subprocess.run([python, "-c", "import sys, matrix_celery as m; "
                           "m.victim.apply_async((sys.argv[1],), queue='celery')", pid_file],
                          env=s.env(), cwd=HERE, timeout=60).returncode == 0
    def victim_pid() -> int | None:
        alive()
        try:
            with open(pid_file) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    pid = wait_until(victim_pid, 60, what="matrix.victim running in a pool process")
    os.kill(pid, signal.SIGKILL)
    lost = Case("celery", "vanished (its pool process SIGKILLed)",
                {"job": "m-celery", "task": "matrix.victim"},
                {"OrchestratorTaskFailed": "/chat"}, 20, at=time.time())

    def ticked() -> bool:
        alive()
        return (gateway_value(s.gw, "task_last_start_timestamp_seconds", job="m-celery",
                              flow="matrix", task="matrix.tick") is not None
                and beat_log_sent(s) >= 2)

    wait_until(ticked, 60, what="beat's entry run twice by the worker")
    beat.send_signal(signal.SIGTERM)  # beat stops: the next tick never comes
    beat.wait(30)
    due = max(v for _, v in s.gw.group(job="m-celery", flow="matrix", task="matrix.tick")
              .metrics[f"{NS}_task_next_run_timestamp_seconds"])
    missed = Case("celery", "missed", {"job": "m-celery", "task": "matrix.tick"},
                  {"OrchestratorTaskMissed": "/pager"}, 20)
    missed.at = due + 3
    return [hung, gone, failed, lost, missed]


def beat_log_sent(s: Stack) -> int:
    with open(os.path.join(s.tmp, "beat.log"), errors="replace") as f:
        return f.read().count("Sending due task tick-every-3s")


def one_failed_scrape(s: Stack) -> None:
    """The gateway stopped (SIGSTOP) until one scrape of it has failed (1 s
    timeout), then resumed: not an outage. OrchestratorPushRecovering holds the
    absence alerts back while the gateway's series are stale, and no longer
    once a scrape succeeded (held back for 10 minutes, an alert would wait with
    no page about why)."""
    os.kill(s.gw.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: s.prom.query('up{job="pushgateway"} == 0'), 30,
                   interval=0.2, what="a failed scrape of the stopped gateway")
        held = time.time()
        wait_until(lambda: s.prom.evaluated_since(held), 30, interval=0.2,
                   what="the rules evaluated with the failed scrape")
        assert s.prom.query('ALERTS{alertname="OrchestratorPushRecovering",alertstate="firing"}')
    finally:
        os.kill(s.gw.proc.pid, signal.SIGCONT)
    wait_until(lambda: s.prom.query('up{job="pushgateway"} == 1'), 30, interval=0.2,
               what="a scrape of the resumed gateway")
    scraped = time.time()
    wait_until(lambda: s.prom.evaluated_since(scraped), 30, interval=0.2,
               what="the rules evaluated with the gateway scraped again")
    assert s.prom.query('min_over_time(up{job="pushgateway"}[1m]) == 0')
    assert not s.prom.query('ALERTS{alertname=~"OrchestratorPush(Recovering|Outage|Failing)"}')


def outage(s: Stack) -> tuple[Case, Callable[[], None]]:
    """Stop the gateway for 40 s while an exec loop runs every 2 s, then start it
    again from its persistence file. Returns the case and a function that stops
    the loop."""
    stop = threading.Event()
    env = s.env()

    def loop() -> None:
        while not stop.is_set():
            # 5 s of grace: a run starts ~2.3 s after the last one ended (the loop's
            # wait, the interpreter's start), and Prometheus sees it a second later
            subprocess.run(exec_cmd("m-outage", "--every", "2s", "--grace", "5s", "--", "true"),
                           env=env, timeout=60, capture_output=True)
            stop.wait(2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    wait_until(lambda: started(s.gw, "m-outage"), 30, what="the loop at the gateway")
    port = s.gw.port
    case = Case("gateway", "our outage", {"job": "pushgateway"},
                {"OrchestratorPushOutage": "/pager"}, 45)
    s.gw.stop()  # SIGTERM: it writes its persistence file
    case.at = time.time() + 30  # Prometheus has not scraped it for 30 s
    wait_until(lambda: "OrchestratorPushOutage" in arrived(s.receiver, case), 90,
               what="the outage alert")
    s.gw = start(port, [f"--persistence.file={s.persistence}"])

    def done() -> None:
        stop.set()
        t.join(60)

    return case, done


def test_each_failure_raises_exactly_its_alert(stack: Stack,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    s = stack
    cases = celery_cases(s) + exec_cases(s)
    await_cases(s, cases)
    one_failed_scrape(s)
    out, finish = outage(s)
    try:
        # back with what it held before; the loop's runs replay the spool and push
        # their starts and next runs again: the missed condition ends
        def settled() -> bool:
            g = s.gw.group(job="m-outage", flow="m-outage", task="main")
            return (g.value(f"{NS}_task_last_start_timestamp_seconds") > out.at
                    and not s.prom.query('ALERTS{alertname="OrchestratorTaskMissed",'
                                         'job="m-outage"}'))

        wait_until(settled, 60, interval=0.5, what="m-outage running again, nothing missed")
        held = s.prom.query('ALERTS{alertstate="firing",alertname="OrchestratorPushRecovering"}')
        assert held, "OrchestratorPushRecovering holds back what the outage hid"
    finally:
        finish()
    cases.append(out)

    # Nothing else arrived (the outage's recovery took over a minute after the
    # last expected alert)
    table = matrix_table(s.receiver, cases)
    assert arrived(s.receiver, Case("exec", "outage's loop", {"job": "m-outage"}, {}, 0)) == {}
    with capsys.disabled():
        print("\n" + table)
