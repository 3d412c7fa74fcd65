"""Faults of a real Pushgateway: down, killed, slow, answering 500, refusing with 400.

For each: the caller never waits, retries are bounded and back off, and once the
gateway behaves, exactly the newest value of every group reaches it (what a
gateway restart without persistence loses is its own, docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from gateway import Pushgateway, free_port, start, wait_until
from proxy import Proxy

import orchestrator_push as op
from orchestrator_push.records import TaskRecord

NS = "orchestrator"
GROUPS = 10


def engine(url: str, **kw: object) -> op.Engine:
    kw.setdefault("interval", 0.05)
    kw.setdefault("spool_dir", None)  # these tests are about retrying from memory
    return op.Engine(op.load_config({}, url=url, **kw))


def burst(e: op.Engine, n: int = 200, start_at: float = 1000.0) -> dict[str, float]:
    """n records over GROUPS groups; the newest end time per task."""
    newest: dict[str, float] = {}
    for i in range(n):
        task, end = f"t{i % GROUPS}", start_at + i
        e.record_task(TaskRecord("celery", "faults", task, "success", end, 0.5))
        newest[task] = end
    return newest


def at_gateway(gw: Pushgateway) -> dict[str, float]:
    return {g.labels["task"]: g.value(f"{NS}_task_last_completion_timestamp_seconds")
            for g in gw.groups() if "task" in g.labels}


def attempts_in(e: op.Engine, seconds: float) -> int:
    before = sum(e.stats().push_failures.values())
    time.sleep(seconds)  # an observation window, not a synchronisation
    return sum(e.stats().push_failures.values()) - before


def test_down_for_the_whole_run_then_started() -> None:
    port = free_port()
    e = engine(f"http://127.0.0.1:{port}")
    newest = burst(e)
    wait_until(lambda: e.stats().push_failures["connection"] >= GROUPS, 10, what="attempts")
    # backoff: each group doubles its wait (0.25 s up to 30 s), so 2 s hold a few
    # attempts per group, not one every 50 ms interval (which would be 400)
    assert attempts_in(e, 2.0) <= GROUPS * 5
    gw = start(port=port)
    try:
        assert e.flush(30)
        assert at_gateway(gw) == newest
        assert e.stats().pushes == GROUPS  # 200 records, coalesced into one push per group
    finally:
        e.close(0)
        gw.stop()


def test_killed_mid_run_and_restarted(tmp_path: object) -> None:
    port = free_port()
    gw = start(port=port)
    e = engine(gw.url)
    try:
        burst(e, 20, start_at=1000.0)
        assert e.flush(10)
        gw.proc.send_signal(signal.SIGKILL)  # no persistence: what it held is gone
        gw.proc.wait(10)
        newer = burst(e, 5, start_at=5000.0)  # t0..t4, recorded while it is dead
        wait_until(lambda: e.stats().push_failures["connection"] >= 1, 10, what="a failure")
        gw = start(port=port)
        assert e.flush(30)
        # exactly what was recorded since the kill; the rest died with the gateway
        assert at_gateway(gw) == newer
    finally:
        e.close(0)
        gw.stop()


def test_answering_slowly(pushgateway: Pushgateway, proxy: Proxy) -> None:
    proxy.delay = 1.5  # every answer later than the client's 0.5 s timeout
    e = engine(proxy.url, timeout=0.5)
    try:
        newest = burst(e)
        wait_until(lambda: e.stats().push_failures["timeout"] >= 3, 20, what="timeouts")
        assert e.flush(0.2) is False  # still retrying, not lost
        proxy.delay = 0.0
        assert e.flush(30)
        assert at_gateway(pushgateway) == newest
    finally:
        e.close(0)


def test_answering_500(pushgateway: Pushgateway, proxy: Proxy) -> None:
    proxy.fail_status = 500
    e = engine(proxy.url)
    try:
        newest = burst(e)
        wait_until(lambda: e.stats().push_failures["http_500"] >= GROUPS, 10, what="500s")
        assert attempts_in(e, 2.0) <= GROUPS * 5  # backoff, not a retry storm
        assert at_gateway(pushgateway) == {}
        proxy.fail_status = None
        assert e.flush(30)
        assert at_gateway(pushgateway) == newest
    finally:
        e.close(0)
    # and a command's outcome does not change: exit code kept, record spooled
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": proxy.url,
           "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "1"}
    proxy.fail_status = 500
    p = subprocess.run([sys.executable, "-m", "orchestrator_push", "exec", "--job", "j", "--",
                        "sh", "-c", "exit 7"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 7 and "http_500" in p.stderr and "spooled to" in p.stderr


def test_the_caller_never_waits_for_the_network(pushgateway: Pushgateway, proxy: Proxy,
                                                tmp_path: object) -> None:
    proxy.hold.set()  # the gateway accepts the connection and never answers
    e = engine(proxy.url, timeout=30, spool_dir=str(tmp_path))
    try:
        e.record_task(TaskRecord("celery", "faults", "t0", "success", 1.0, 0.5))
        wait_until(lambda: proxy.held == 1, 10, what="the sender stuck in a request")
        newest = burst(e, 3000, start_at=2000.0)  # returns while the sender is stuck...
        assert proxy.held == 1  # ...which it still is: recording did not wait for it
        s = e.stats()
        assert (s.spooled, sum(s.lost.values())) == (0, 0)  # folded in memory, nothing lost
        assert e.pending() == 3001
        proxy.hold.clear()  # the held request gets an error answer, then all goes through
        assert e.flush(60)
        assert os.listdir(str(tmp_path)) == []
        assert at_gateway(pushgateway) == newest
    finally:
        e.close(0)


def test_refused_with_400(pushgateway: Pushgateway) -> None:
    body = f"# TYPE {NS}_task_last_attempt counter\n{NS}_task_last_attempt 1\n".encode()
    req = urllib.request.Request(pushgateway.url + "/metrics/job/seed", data=body, method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    e = engine(pushgateway.url)
    try:
        e.record_task(TaskRecord("celery", "faults", "t0", "success", 1.0, 0.5))
        assert e.flush(10) is False  # refused: counted, said, not retried
        assert e.stats().rejected == 1 and e.stats().push_failures["http_400"] == 1
        assert attempts_in(e, 0.5) == 0
        e.record_flow(op.FlowRecord("celery", "faults", "success", 2.0, 1.0))
        assert e.flush(10)
        flow = pushgateway.group(job="celery", flow="faults")
        assert flow.value(f"{NS}_push_records_dropped_total", reason="rejected") == 1
        assert flow.value(f"{NS}_push_failures_total", reason="http_400") == 1
    finally:
        e.close(0)


def test_a_record_folded_while_its_group_is_being_pushed_is_not_cleared(
        pushgateway: Pushgateway, proxy: Proxy) -> None:
    proxy.fail_status, proxy.hold = 200, proxy.hold  # answer 200 once released
    proxy.hold.set()
    e = engine(proxy.url, interval=60.0)
    try:
        e.record_task(TaskRecord("celery", "race", "t", "success", 1000.0, 0.5))
        assert e.flush(0.05) is False  # the sender pushes at once, and is held at the proxy
        wait_until(lambda: proxy.held == 1, 10, what="the push in flight")
        e.record_task(TaskRecord("celery", "race", "t", "failed", 2000.0, 0.5))
        proxy.hold.clear()  # the first push succeeds: it must commit only what it sent
        wait_until(lambda: e.stats().pushes == 1, 10, what="the first push answered")
        assert e.pending() == 1
        proxy.fail_status = None  # now to the real gateway
        assert e.flush(10)
        g = pushgateway.group(job="celery", flow="race", task="t")
        assert g.value(f"{NS}_task_last_status", status="failed") == 1
        assert g.value(f"{NS}_task_last_failure_timestamp_seconds") == 2000.0
    finally:
        e.close(0)


def test_replay_keeps_the_spool_when_credentials_are_refused(
        pushgateway: Pushgateway, proxy: Proxy, tmp_path: object) -> None:
    spool = str(tmp_path)
    down = op.Engine(op.load_config({}, url=f"http://127.0.0.1:{free_port()}", spool_dir=spool,
                                    timeout=0.3))
    down.record_task(TaskRecord("exec", "creds", "t", "success", 1000.0, 1.0))
    assert down.close(0.5)
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": proxy.url, "ORCHESTRATOR_PUSH_SPOOL_DIR": spool}
    cmd = [sys.executable, "-m", "orchestrator_push", "replay"]
    for status in (401, 403):
        proxy.fail_status = status
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and f"HTTP {status}" in p.stderr, p.stdout + p.stderr
        assert len([n for n in os.listdir(spool) if n.endswith(".spool")]) == 1
    proxy.fail_status = None
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and os.listdir(spool) == [], p.stdout + p.stderr
    assert pushgateway.group(job="exec", flow="creds", task="t").value(
        f"{NS}_task_last_status", status="success") == 1


# -- the transport's one keep-alive connection ------------------------------------------


def test_the_transport_keeps_one_connection_alive_for_every_request(
        pushgateway: Pushgateway) -> None:
    from orchestrator_push.transport import HttpTransport

    proxy = Proxy(pushgateway.port)
    t = HttpTransport(op.load_config({}, url=proxy.url))
    try:
        for i in range(20):
            assert t.request("PUT", f"/metrics/job/keepalive{i % 3}", b"x 1\n").ok
        assert proxy.requests == 20 and proxy.connections == 1
    finally:
        t.close()
        proxy.stop()


def test_a_connection_the_gateway_dropped_is_opened_again_for_the_next_request() -> None:
    from orchestrator_push.transport import HttpTransport

    gw = start()
    t = HttpTransport(op.load_config({}, url=gw.url))
    try:
        assert t.request("PUT", "/metrics/job/before", b"x 1\n").ok
        port = gw.port
        gw.stop()  # the kept-alive connection dies with it
        gw = start(port=port)
        outcome = t.request("PUT", "/metrics/job/after", b"x 2\n")
        assert outcome.ok, outcome
        assert gw.group(job="after").value("x") == 2
        gw.stop()
        down = t.request("PUT", "/metrics/job/after", b"x 3\n")
        assert (down.status, down.reason.value, down.error) == (
            0, "connection", "connection refused or unreachable")
    finally:
        t.close()
        gw.stop()
