"""The delivery engine against the real Pushgateway."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from gateway import Pushgateway, free_port, start, wait_until

import orchestrator_push as op
from orchestrator_push.records import FlowRecord, TaskRecord

NS = "orchestrator"


_engines: list[op.Engine] = []


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while _engines:
        _engines.pop().close(0)


def engine_for(gw_url: str, **kw: object) -> op.Engine:
    kw.setdefault("interval", 0.05)
    e = op.Engine(op.load_config({}, url=gw_url, **kw))
    _engines.append(e)
    return e


def task(status: str, *, flow: str = "nightly", name: str = "load", end: float = 1_700_000_000.0,
         duration: float = 2.5, attempt: int = 1, framework: str = "celery") -> TaskRecord:
    return TaskRecord(framework, flow, name, status, end, duration, attempt)


def test_success_record_sets_every_last_run_series(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("success", end=1_700_000_100.0, duration=3.25, attempt=2))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_duration_seconds", framework="celery") == 3.25
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1_700_000_100.0
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1_700_000_100.0
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics
    assert g.value(f"{NS}_task_last_attempt") == 2
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    for other in ("failed", "retry", "revoked"):
        assert g.value(f"{NS}_task_last_status", status=other) == 0
    assert all(g.types[n] == "GAUGE" for n in g.types
               if n.startswith(NS) and not n.startswith(f"{NS}_push_"))
    assert g.types[f"{NS}_push_records_dropped_total"] == "COUNTER"  # the self-metrics


def test_failure_after_success_keeps_last_success(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("success", end=1000.0))
    assert e.flush(10)
    e.record_task(task("failed", end=2000.0, duration=9.0))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1000.0
    assert g.value(f"{NS}_task_last_failure_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_duration_seconds") == 9.0
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_status", status="success") == 0


def test_success_and_failure_coalesced_in_one_push_keep_both(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, interval=60.0)  # nothing is sent before flush()
    e.record_task(task("success", end=1000.0))
    e.record_task(task("retry", end=1500.0, attempt=1))
    e.record_task(task("failed", end=2000.0, attempt=2))
    before = pushgateway.push_count()
    assert e.flush(10)
    assert pushgateway.push_count() - before == 1
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1000.0
    assert g.value(f"{NS}_task_last_failure_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_attempt") == 2


def test_retry_is_not_a_failure(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("retry", end=1000.0, attempt=1))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_status", status="retry") == 1
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics
    assert g.value(f"{NS}_task_last_attempt") == 1


def test_late_older_record_does_not_hide_newer_outcome(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("failed", end=2000.0))
    assert e.flush(10)
    e.record_task(task("success", end=1000.0))  # finished earlier, reported later
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1000.0


def test_retry_reported_after_its_next_attempt_does_not_hide_it(pushgateway: Pushgateway) -> None:
    # Celery publishes the retry before the first attempt's postrun runs: the
    # second attempt can finish, and be reported, first.
    e = engine_for(pushgateway.url, interval=60.0)
    e.record_task(TaskRecord("celery", "f", "t", "success", 1000.0, 1.0, attempt=2, run_id="id-1"))
    e.record_task(TaskRecord("celery", "f", "t", "retry", 1000.5, 1.0, attempt=1, run_id="id-1"))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="f", task="t")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 2
    # another run of the same task is ordered by time again
    e.record_task(TaskRecord("celery", "f", "t", "failed", 2000.0, 1.0, attempt=1, run_id="id-2"))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="f", task="t")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1


def test_flow_records_and_static_labels(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, job="etl", labels={"env": "prod"})
    e.record_flow(FlowRecord("airflow", "daily_sales", "success", 3000.0, 42.0))
    e.record_flow(FlowRecord("airflow", "daily_sales", "failed", 4000.0, 5.0))
    assert e.flush(10)
    g = pushgateway.group(job="etl", flow="daily_sales", env="prod")
    assert g.value(f"{NS}_flow_last_duration_seconds", framework="airflow") == 5.0
    assert g.value(f"{NS}_flow_last_success_timestamp_seconds") == 3000.0
    assert g.value(f"{NS}_flow_last_failure_timestamp_seconds") == 4000.0
    assert g.value(f"{NS}_flow_last_status", status="failed") == 1


def test_custom_namespace(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, namespace="acme")
    e.record_task(task("success"))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert "acme_task_last_status" in g.metrics and f"{NS}_task_last_status" not in g.metrics


@pytest.mark.parametrize("value", ["a/b/c", "with space", "quote\"and'apostrophe", "ünïcødé ✓",
                                   "", "new\nline", "percent%20", "plus+sign", "x" * 300])
def test_grouping_values_round_trip(pushgateway: Pushgateway, value: str) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("success", flow=value, name=value + "-t"))
    assert e.flush(10)
    # an empty name is sent as "(empty)": empty and absent are one series in Prometheus
    g = pushgateway.group(job="celery", flow=value or "(empty)", task=value + "-t")
    assert g.value(f"{NS}_task_last_status", status="success") == 1


def test_thousand_records_one_group_one_push(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, interval=60.0)
    for i in range(1000):
        e.record_task(task("success", end=1000.0 + i, attempt=1 + i % 3))
    before = pushgateway.push_count()
    assert e.flush(10)
    assert pushgateway.push_count() - before == 1
    assert e.stats().pushes == 1 and e.stats().recorded == 1000
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1999.0


def test_pushes_grow_with_groups_not_records(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, interval=60.0)
    for i in range(500):
        e.record_task(task("success", name=f"t{i % 5}", end=1000.0 + i))
    before = pushgateway.push_count()
    assert e.flush(10)
    assert pushgateway.push_count() - before == 5


def test_cumulative_counts_and_histogram(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    for _ in range(7):
        e.record_task(task("success", duration=0.2), cumulative={"instance": "node1"})
    for _ in range(3):
        e.record_task(task("failed", duration=20.0), cumulative={"instance": "node1"})
    assert e.flush(10)
    e.record_task(task("success", duration=0.2), cumulative={"instance": "node1"})
    assert e.flush(10)
    g = pushgateway.group(job="celery", instance="node1")
    assert g.types[f"{NS}_task_runs_total"] == "COUNTER"
    assert g.types[f"{NS}_task_duration_seconds"] == "HISTOGRAM"
    assert g.value(f"{NS}_task_runs_total", status="success", task="load") == 8
    assert g.value(f"{NS}_task_runs_total", status="failed") == 3
    assert g.value(f"{NS}_task_duration_seconds", status="failed", le="10") == 0
    assert g.value(f"{NS}_task_duration_seconds", status="failed", le="30") == 3
    assert not any(name.endswith("_created") for name in g.metrics)


def test_without_a_thread_the_owner_drives_it(pushgateway: Pushgateway) -> None:
    threads = threading.enumerate()
    e = op.Engine(op.load_config({}, url=pushgateway.url, interval=0.2), thread=False)
    _engines.append(e)
    e.record_start("exec", "nightly", "load", at=1_700_000_000.0)
    first = e.drive()  # the spool's turn: the start waits for its interval
    assert first is not None and 0 < first <= 0.2
    assert pushgateway.groups() == []
    wait_until(lambda: (e.drive() or 0) > 0 and e.pending() == 0 and pushgateway.groups(), 10,
               what="the start, pushed by drive()")
    g = pushgateway.group(job="exec", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == 1_700_000_000.0
    e.record_task(task("success", end=1_700_000_100.0, framework="exec"))
    assert e.flush(10)  # on this thread
    g = pushgateway.group(job="exec", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1_700_000_100.0
    assert threading.enumerate() == threads
    threaded = op.Engine(op.load_config({}, url=pushgateway.url))
    _engines.append(threaded)
    assert threaded.drive() is None
    assert e.close(0) and e.drive() is None


def test_without_a_thread_a_flush_offers_the_spool_only_with_time_left(tmp_path: object) -> None:
    port = free_port()
    config = op.load_config({}, url=f"http://127.0.0.1:{port}", spool_dir=str(tmp_path),
                            interval=0.05, timeout=0.5)
    e = op.Engine(config, thread=False)
    _engines.append(e)
    e.record_task(task("success", end=1234.0))
    assert e.flush(0.3) is True  # not delivered, spooled
    assert len(os.listdir(str(tmp_path))) == 1
    gw = start(port=port)
    try:
        e.record_task(task("success", name="other", end=1300.0))
        assert e.flush(0)  # its own record, on this thread; no replay pass past the deadline
        assert gw.group(job="celery", flow="nightly", task="other")
        assert len(os.listdir(str(tmp_path))) == 1
        assert e.flush(15)  # time left: the spool is offered, as with a thread
        g = gw.group(job="celery", flow="nightly", task="load")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1234.0
        assert e.stats().replayed == 1 and os.listdir(str(tmp_path)) == []
    finally:
        gw.stop()


def test_gateway_down_then_up_delivers_from_memory() -> None:
    port = free_port()
    e = engine_for(f"http://127.0.0.1:{port}", spool_dir=None)
    e.record_task(task("success", end=1234.0))
    wait_until(lambda: e.stats().push_failures["connection"] >= 2, 10, what="failed pushes")
    assert e.flush(0.3) is False  # no spool: still in memory, and flush says so
    assert e.pending() == 1
    gw = start(port=port)
    try:
        assert e.flush(15)
        g = gw.group(job="celery", flow="nightly", task="load")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1234.0
        assert e.pending() == 0
    finally:
        gw.stop()


def test_gateway_down_then_up_delivers_from_the_spool(tmp_path: object) -> None:
    port = free_port()
    e = engine_for(f"http://127.0.0.1:{port}", spool_dir=str(tmp_path))
    e.record_task(task("success", end=1234.0))
    assert e.flush(0.3) is True  # not delivered, but durably spooled
    assert e.pending() == 0 and e.stats().spooled == 1
    assert len(os.listdir(str(tmp_path))) == 1
    gw = start(port=port)
    try:
        assert e.flush(15)  # a flush offers the spool to the gateway
        g = gw.group(job="celery", flow="nightly", task="load")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1234.0
        assert e.stats().replayed == 1 and os.listdir(str(tmp_path)) == []
    finally:
        gw.stop()


def test_flush_with_gateway_down_is_bounded(tmp_path: object) -> None:
    for spool_dir in (None, str(tmp_path)):
        e = engine_for(f"http://127.0.0.1:{free_port()}", timeout=0.5, spool_dir=spool_dir)
        e.record_task(task("success"))
        started = time.monotonic()
        assert e.flush(1.0) is (spool_dir is not None)
        assert time.monotonic() - started < 5.0  # bounded by the timeout, not by retries


def seed_conflicting_type(gw: Pushgateway) -> None:
    body = f"# TYPE {NS}_task_last_attempt counter\n{NS}_task_last_attempt 1\n".encode()
    req = urllib.request.Request(gw.url + "/metrics/job/seed", data=body, method="PUT")
    urllib.request.urlopen(req, timeout=5).read()


def test_4xx_is_not_retried(pushgateway: Pushgateway) -> None:
    seed_conflicting_type(pushgateway)
    e = engine_for(pushgateway.url, interval=0.05)
    e.record_task(task("success"))
    assert e.flush(5) is False
    s = e.stats()
    assert s.rejected == 1 and s.push_failures["http_400"] == 1
    before = pushgateway.push_count()
    # Several intervals pass; no further attempt is made for the refused payload.
    wait_until(lambda: e.pending() == 0, 5, what="settled")
    e.record_flow(FlowRecord("airflow", "other", "success", 1.0, 1.0))
    assert e.flush(5)
    assert pushgateway.push_count() - before == 1  # only the new, valid group
    assert e.stats().push_failures["http_400"] == 1


def test_5xx_is_retried_until_the_gateway_accepts() -> None:
    # A real gateway behind a listener that answers 503 first: the sole fake here
    # is the fault, the delivery is real.
    import http.server
    import threading

    gw = start()
    answered: list[int] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if len(answered) < 2:
                answered.append(503)
                self.send_response(503)
                self.end_headers()
                return
            req = urllib.request.Request(gw.url + self.path, data=body, method="POST",
                                         headers={"Content-Type": self.headers["Content-Type"]})
            status = urllib.request.urlopen(req, timeout=5).status
            answered.append(status)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        e = engine_for(f"http://127.0.0.1:{server.server_address[1]}")
        e.record_task(task("success", end=77.0))
        assert e.flush(15)
        assert answered == [503, 503, 200]
        assert e.stats().push_failures["http_503"] == 2 and e.stats().retries == 2
        g = gw.group(job="celery", flow="nightly", task="load")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 77.0
    finally:
        server.shutdown()
        gw.stop()


def test_forked_child_delivers_its_own_records(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, interval=60.0)
    e.record_task(task("success", name="parent-before-fork"))
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            e.record_task(task("success", name="child"))
            code = 0 if e.flush(10) and e.stats().pushes == 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert e.flush(10)
    assert e.stats().pushes == 1  # the parent sent its own record, once
    names = sorted(g.labels["task"] for g in pushgateway.groups())
    assert names == ["child", "parent-before-fork"]


def test_a_burst_drops_nothing_and_spools_nothing(pushgateway: Pushgateway,
                                                  tmp_path: object) -> None:
    # Folded on the caller's thread: memory follows the groups, not the records.
    e = engine_for(pushgateway.url, interval=60.0, spool_dir=str(tmp_path))
    for i in range(50_000):
        e.record_task(task("success", name=f"t{i % 20}", end=float(i)))
    assert e.pending() == 50_000
    assert e.flush(10) is True
    s = e.stats()
    assert (s.spooled, sum(s.lost.values()), s.recorded) == (0, 0, 50_000)
    assert os.listdir(str(tmp_path)) == []
    for j in range(20):
        g = pushgateway.group(job="celery", flow="nightly", task=f"t{j}")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == float(50_000 - 20 + j)


def test_group_cap_drops_only_when_nothing_can_be_evicted(
        pushgateway: Pushgateway, caplog: pytest.LogCaptureFixture) -> None:
    e = engine_for(pushgateway.url, interval=60.0, max_groups=3)
    with caplog.at_level(logging.WARNING, logger="orchestrator_push"):
        for i in range(10):  # nothing delivered yet: no group can make room
            e.record_task(task("success", name=f"run-{i}"))
        assert e.flush(10) is False
        for i in range(10, 13):  # the first three are delivered: they make room
            e.record_task(task("success", name=f"run-{i}"))
        assert e.flush(10) is True
    assert e.stats().dropped_too_many_groups == 7
    assert {g.labels["task"] for g in pushgateway.groups()} == {
        "run-0", "run-1", "run-2", "run-10", "run-11", "run-12"}
    warnings = [r for r in caplog.records if "ORCHESTRATOR_PUSH_MAX_GROUPS" in r.getMessage()]
    assert len(warnings) == 1  # warned about once; the count says the rest
    g = pushgateway.group(job="celery", flow="nightly", task="run-12")
    assert g.value(f"{NS}_push_records_dropped_total", reason="too_many_groups") == 7


def test_a_long_lived_process_reports_more_groups_than_the_cap(pushgateway: Pushgateway) -> None:
    # A scheduler with more DAGs than the cap: settled groups are evicted, least
    # recently used first, and every DAG's runs keep being delivered.
    e = engine_for(pushgateway.url, interval=60.0, max_groups=10)
    for rnd in range(3):
        for i in range(25):
            e.record_task(task("success", name=f"dag-{i}", end=1000.0 * rnd + i))
            if i % 5 == 4:
                assert e.flush(10) is True
    assert sum(e.stats().lost.values()) == 0
    for i in range(25):
        g = pushgateway.group(job="celery", flow="nightly", task=f"dag-{i}")
        assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 2000.0 + i


def test_disabled_records_nothing(pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url, enabled=False)
    e.record_task(task("success"))
    assert e.flush(1) is True
    assert e.stats().recorded == 0 and pushgateway.groups() == []


def test_global_api(pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", pushgateway.url)
    monkeypatch.setenv("ORCHESTRATOR_PUSH_LABELS", "env=test")
    op.record_task(task("success", framework="exec", flow="f", name="t"))
    assert op.flush(10)
    g = pushgateway.group(job="exec", flow="f", task="t", env="test")
    assert g.value(f"{NS}_task_last_status", status="success") == 1


def test_invalid_environment_never_raises_into_the_caller(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_INTERVAL", "never")
    op.record_task(task("success"))  # must not raise
    assert op.flush(1) is True  # nothing was recorded
    assert any("ORCHESTRATOR_PUSH_INTERVAL" in r.getMessage() for r in caplog.records)
    with pytest.raises(op.ConfigError, match="ORCHESTRATOR_PUSH_INTERVAL"):
        op.configure()


def test_short_lived_process_delivers_at_exit(pushgateway: Pushgateway) -> None:
    script = textwrap.dedent("""
        import orchestrator_push as op
        op.record_task(op.TaskRecord("exec", "script", "main", "success", 42.0, 1.0))
        # no flush: the atexit hook delivers
    """)
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_INTERVAL": "3600"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)
    g = pushgateway.group(job="exec", flow="script", task="main")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 42.0


def test_recording_does_not_wait_for_a_slow_gateway() -> None:
    # A listener that accepts connections and never answers: the sender blocks,
    # the caller must not.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        e = engine_for(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30.0)
        e.record_task(task("success"))
        sock.settimeout(10)
        conn, _ = sock.accept()  # the sender is in its request, waiting for an answer
        started = time.monotonic()
        for _ in range(1000):
            e.record_task(task("success"))
        elapsed = time.monotonic() - started
        assert e.pending() == 1001
        assert elapsed < 5.0, "recording waited on the network"
        conn.close()
    finally:
        sock.close()


def test_a_bad_duration_is_sent_as_zero_and_a_bad_end_time_refused(
        pushgateway: Pushgateway, caplog: pytest.LogCaptureFixture) -> None:
    e = engine_for(pushgateway.url, interval=60.0)
    with caplog.at_level(logging.WARNING, logger="orchestrator_push"):
        for d in (float("nan"), -3.0, float("inf")):
            e.record_task(task("success", duration=d, end=1000.0), cumulative={"instance": "n1"})
        e.record_task(task("failed", end=float("nan")), cumulative={"instance": "n1"})
        assert e.flush(10) is False  # one record was refused, and flush says so
    s = e.stats()
    assert (s.cleaned, s.lost["invalid"], s.recorded) == (3, 1, 3)
    g = pushgateway.group(job="celery", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_duration_seconds") == 0.0
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    c = pushgateway.group(job="celery", instance="n1")
    assert c.value(f"{NS}_task_duration_seconds", status="success", le="0.01") == 3
    assert c.value(f"{NS}_task_runs_total", status="success") == 3
    assert len([r for r in caplog.records if "duration" in r.getMessage()]) == 1  # rate-limited


def test_counters_groups_carry_the_framework_in_their_self_metrics(
        pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_task(task("success"), cumulative={"instance": "n1"})
    assert e.flush(10)
    c = pushgateway.group(job="celery", instance="n1")
    assert c.value(f"{NS}_push_records_dropped_total", framework="celery",
                   reason="too_many_groups") == 0


def test_a_failing_sender_cycle_is_logged_rate_limited(
        pushgateway: Pushgateway, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_push import sender

    def broken(*_: object, **__: object) -> bytes:
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(sender.schema, "encode", broken)
    e = engine_for(pushgateway.url, interval=0.01)
    with caplog.at_level(logging.ERROR, logger="orchestrator_push"):
        e.record_task(task("success"))
        wait_until(lambda: sum(1 for r in caplog.records if "cycle" in r.getMessage()) >= 1, 5,
                   what="the failure logged")
        e.close(0.3)
    assert [r.getMessage() for r in caplog.records].count(
        "orchestrator_push: sender cycle failed") == 1
    assert not any(r.exc_info for r in caplog.records if "cycle" in r.getMessage())
