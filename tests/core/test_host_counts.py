"""Counts of `exec` runs added up per host (host_counts.py): real processes,
a real gateway, the store's file lock held by this test where it says so."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess

import pytest
from gateway import Pushgateway, free_port
from test_exec import cli

from orchestrator_push import host_counts, schema
from orchestrator_push.records import TaskRecord

NS = "orchestrator"


def run_exec(url: str, spool: str, code: int = 0, job: str = "cron", script: str | None = None,
             verbose: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """``exec`` of ``sh -c script`` (default: ``exit code``)."""
    full = {**os.environ, "ORCHESTRATOR_PUSH_URL": url, "ORCHESTRATOR_PUSH_SPOOL_DIR": spool,
            **env}
    args = [*cli(), "exec", *(["--verbose"] if verbose else []), "--job", job]
    return subprocess.run([*args, "--", "sh", "-c", script or f"exit {code}"],
                          env=full, capture_output=True, text=True, timeout=60)


def host_group(gw: Pushgateway, job: str = "cron") -> dict[str, float]:
    g = gw.group(job=job, instance=host_counts.instance())
    return {labels["status"]: v for labels, v in g.metrics[f"{NS}_task_runs_total"]}


def store_of(spool: str, job: str = "cron") -> host_counts.HostCounts:
    return host_counts.HostCounts(spool, host_counts.group_key(job, {}))


def test_runs_of_separate_processes_add_up_in_one_group(pushgateway: Pushgateway,
                                                        tmp_path: object) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    for code in (0, 0, 3):
        assert run_exec(pushgateway.url, spool, code).returncode == code
    assert host_group(pushgateway) == {"success": 2, "failed": 1}
    g = pushgateway.group(job="cron", instance=host_counts.instance())
    assert g.value(f"{NS}_task_duration_seconds", __count__="1", status="success",
                   framework="exec", flow="cron", task="main") == 2
    # the last run's own group is as before
    last = pushgateway.group(job="cron", flow="cron", task="main")
    assert last.value(f"{NS}_task_last_exit_code") == 3


def test_counts_wait_on_the_host_while_the_gateway_is_down(tmp_path: object) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    port = free_port()
    p = run_exec(f"http://127.0.0.1:{port}", spool, 0, ORCHESTRATOR_PUSH_FLUSH_TIMEOUT="1")
    assert p.returncode == 0
    assert os.path.exists(store_of(spool).store)
    from gateway import start
    gw = start(port=port)
    try:
        assert run_exec(gw.url, spool, 4).returncode == 4
        assert host_group(gw) == {"success": 1, "failed": 1}  # the earlier run too
    finally:
        gw.stop()


def test_a_gateway_restarted_without_persistence_gets_the_hosts_whole_counts_back(
        tmp_path: object) -> None:
    """The counts live on the host, not at the gateway: after a restart that lost
    every group, the next run's push carries the totals (a gap, no reset)."""
    spool = os.path.join(str(tmp_path), "spool")
    from gateway import start
    gw = start()
    try:
        for code in (0, 5, 0):
            assert run_exec(gw.url, spool, code).returncode == code
        assert host_group(gw) == {"success": 2, "failed": 1}
        port = gw.port
        gw.stop()
        gw = start(port=port)  # persistence off: every group is gone
        assert [g.labels for g in gw.groups()] == []
        assert run_exec(gw.url, spool, 0).returncode == 0
        assert host_group(gw) == {"success": 3, "failed": 1}
    finally:
        gw.stop()


def test_a_locked_store_leaves_the_counts_for_the_next_run(pushgateway: Pushgateway,
                                                          tmp_path: object) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    assert run_exec(pushgateway.url, spool, 0).returncode == 0
    lock = store_of(spool).store[: -len(".json")] + ".lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a process stuck while holding it
        p = run_exec(pushgateway.url, spool, 0, ORCHESTRATOR_PUSH_FLUSH_TIMEOUT="0.5")
        assert p.returncode == 0
        pending = [n for n in os.listdir(os.path.dirname(lock)) if n.startswith("pending-")]
        assert len(pending) == 1
        assert host_group(pushgateway) == {"success": 1}
    finally:
        os.close(fd)
    assert run_exec(pushgateway.url, spool, 0).returncode == 0
    assert host_group(pushgateway) == {"success": 3}
    assert not [n for n in os.listdir(os.path.dirname(lock)) if n.startswith("pending-")]


def test_a_damaged_store_starts_again_and_is_kept(pushgateway: Pushgateway,
                                                 tmp_path: object) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    assert run_exec(pushgateway.url, spool, 0).returncode == 0
    store = store_of(spool).store
    with open(store, "w") as f:
        f.write("{not json")
    p = run_exec(pushgateway.url, spool, 0)
    assert p.returncode == 0
    assert host_group(pushgateway) == {"success": 1}  # a reset Prometheus reads as one
    assert [n for n in os.listdir(os.path.dirname(store)) if ".bad-" in n]


def test_an_unwritable_store_is_counted_as_lost_and_the_run_keeps_its_code(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    if os.geteuid() == 0:
        spool = "/proc/orchestrator-push-not-writable"  # not even root writes there
    else:
        spool = os.path.join(str(tmp_path), "ro")
        os.makedirs(spool)
        os.chmod(spool, 0o500)
    p = run_exec(pushgateway.url, spool, 5)
    assert p.returncode == 5
    assert "given up on (host_counts_error;" in p.stderr
    last = pushgateway.group(job="cron", flow="cron", task="main")
    assert last.value(f"{NS}_task_last_exit_code") == 5  # the run itself is reported


def test_spool_off_means_no_host_counts(pushgateway: Pushgateway) -> None:
    assert run_exec(pushgateway.url, "off", 0).returncode == 0
    assert pushgateway.group(job="cron", flow="cron", task="main")
    with pytest.raises(KeyError):
        pushgateway.group(job="cron", instance=host_counts.instance())


def test_dump_and_absorb_round_trip_and_refuse_another_layout() -> None:
    a = schema.Cumulative()
    for status, d in (("success", 0.2), ("success", 40.0), ("failed", 1.0)):
        a.add(TaskRecord("exec", "f", "t", status, end_time=1.0, duration=d))
    b = schema.Cumulative()
    b.absorb(a.dump())
    b.absorb(a.dump())
    assert len(b) == 6
    assert schema.encode(b.families(NS)).count(b"\n") == schema.encode(a.families(NS)).count(b"\n")
    rows = a.dump()
    rows[1] = {**rows[1], "buckets": [0, 1]}
    with pytest.raises(ValueError):
        b.absorb(rows)
    assert len(b) == 6  # nothing of the refused call added


def test_a_long_lived_process_pushes_its_host_counts_every_cycle(pushgateway: Pushgateway,
                                                                 tmp_path: object) -> None:
    """A scheduler or worker never exits: its counts go after each sender cycle,
    flows and tasks in the one host group."""
    from gateway import wait_until

    import orchestrator_push as op
    from orchestrator_push.records import FlowRecord

    spool = os.path.join(str(tmp_path), "spool")
    e = op.Engine(op.load_config({}, url=pushgateway.url, job="sched", interval=0.1,
                                 spool_dir=spool))
    try:
        e.start()
        for status in ("success", "failed"):
            e.count(FlowRecord("airflow", "etl", status, end_time=2.0, duration=30.0))
        e.count(TaskRecord("airflow", "etl", "load", "upstream_failed", end_time=2.0,
                           duration=0.0))

        def counted() -> dict[str, float] | None:
            try:
                g = pushgateway.group(job="sched", instance=host_counts.instance())
            except KeyError:
                return None
            flows = {lb["status"]: v for lb, v in g.metrics.get(f"{NS}_flow_runs_total", [])}
            return flows if flows == {"success": 1, "failed": 1} else None

        wait_until(counted, 10, what="the host group, without a flush")
        g = pushgateway.group(job="sched", instance=host_counts.instance())
        assert g.value(f"{NS}_task_runs_total", status="upstream_failed", task="load") == 1
        assert g.value(f"{NS}_flow_duration_seconds", __sum__="1", status="failed") == 30.0
        # counted only: no last-run group of its own
        assert [g.labels for g in pushgateway.groups()] == [
            {"job": "sched", "instance": host_counts.instance()}]
    finally:
        e.close(1)


def test_a_child_forked_while_the_store_is_locked_does_not_keep_the_lock(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    """An executor that forks a task runner while our thread pushes the host's
    totals: the child shares the locked open file; the lock must still go
    with our push."""
    import time

    from orchestrator_push.config import load_config
    from orchestrator_push.ledger import Ledger
    from orchestrator_push.transport import HttpTransport, Outcome

    children: list[int] = []

    class ForkingTransport(HttpTransport):
        def request(self, method: str, path: str, body: bytes = b"") -> Outcome:
            pid = os.fork()
            if pid == 0:  # the child lives on for a while, as a task runner would
                time.sleep(5)
                os._exit(0)
            children.append(pid)
            return super().request(method, path, body)

    spool = os.path.join(str(tmp_path), "spool")
    h = store_of(spool)
    h.add(TaskRecord("exec", "cron", "main", "success", end_time=1.0, duration=0.1))
    config = load_config({}, url=pushgateway.url)
    try:
        forking = ForkingTransport(config)
        assert h.deliver(lambda: forking, NS, time.monotonic() + 5, Ledger(),
                         exiting=True)
        assert len(children) == 1 and os.waitpid(children[0], os.WNOHANG) == (0, 0)  # alive
        fd = os.open(h.store[: -len(".json")] + ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the child kept it
        finally:
            os.close(fd)
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert host_group(pushgateway) == {"success": 1}


def test_chosen_buckets_reach_the_gateway_and_a_change_keeps_the_counts(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    """Runs of one host with the default bounds, then 0.5,5 (some of them: the
    counts move exactly), then none: the count, the sum and every bound kept
    stay as they were, the gateway holds only the bounds of the newest run."""
    spool = os.path.join(str(tmp_path), "spool")

    def run(cmd: str, **env: str) -> subprocess.CompletedProcess[str]:
        p = run_exec(pushgateway.url, spool, script=cmd, verbose=True, **env)
        assert p.returncode == 0, p.stderr
        return p

    def buckets() -> tuple[dict[str, float], float, float]:
        g = pushgateway.group(job="cron", instance=host_counts.instance())
        [series] = g.histogram(f"{NS}_task_duration_seconds").values()
        return ({k: v for k, v in series.items() if k not in ("count", "sum")},
                series["count"], series["sum"])

    run("true")
    run("sleep 0.6")  # between 0.5 and 1 s: the default bounds have both
    les, count, total = buckets()
    assert les["0.5"] == 1 and les["1"] == 2 and count == 2 and len(les) == 17  # with +Inf
    p = run("true", ORCHESTRATOR_PUSH_BUCKETS="0.5,5")
    assert "kept with other bucket bounds" in p.stderr
    les, count, total2 = buckets()
    assert les == {"0.5": 2, "5": 3, "+Inf": 3} and count == 3 and total2 > total
    assert "kept with other" not in run("true", ORCHESTRATOR_PUSH_BUCKETS="0.5,5").stderr
    run("true", ORCHESTRATOR_PUSH_BUCKETS="none")
    les, count, total3 = buckets()
    assert les == {"+Inf": 5} and count == 5 and total3 > total2
    with open(store_of(spool).store) as f:
        assert json.load(f)["bounds"] == []


def test_a_pending_file_of_another_shape_is_left_and_the_run_counted(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    assert run_exec(pushgateway.url, spool, 0).returncode == 0
    store = store_of(spool).store
    name = os.path.basename(store)[: -len(".json")]
    pending = os.path.join(os.path.dirname(store), f"pending-{name}-1-1.json")
    with open(pending, "w") as f:
        f.write("[]")  # valid JSON, not a pending file's object
    assert run_exec(pushgateway.url, spool, 0).returncode == 0
    assert host_group(pushgateway) == {"success": 2}
    assert os.path.exists(pending)  # left alone, as a file being written would be


def test_the_senders_delivery_leaves_the_counts_to_one_in_progress(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    """A flush's delivery in progress takes what was counted; the sender's,
    meanwhile, returns at once (its pushes are not held up) and leaves what
    comes after to the next delivery, which a flush waits for."""
    import sys
    import threading
    import time

    from orchestrator_push.config import load_config
    from orchestrator_push.ledger import Ledger
    from orchestrator_push.transport import HttpTransport

    h = store_of(os.path.join(str(tmp_path), "spool"))
    transport = HttpTransport(load_config({}, url=pushgateway.url))
    inside, go = threading.Event(), threading.Event()

    def held_connect() -> HttpTransport:  # the store written, the push about to go
        inside.set()
        go.wait(30)
        return transport

    def deliver(connect: object, wait: bool = True) -> bool:
        return h.deliver(connect, NS, time.monotonic() + 10, Ledger(),  # type: ignore[arg-type]
                         exiting=False, wait=wait)

    run = TaskRecord("exec", "cron", "main", "success", end_time=1.0, duration=0.1)
    h.add(run)
    first: list[bool] = []
    flush = threading.Thread(target=lambda: first.append(deliver(held_connect)))
    flush.start()
    try:
        assert inside.wait(30)
        h.add(run._replace(status="failed"))
        sender: list[bool] = []
        t = threading.Thread(target=lambda: sender.append(deliver(lambda: transport, False)))
        t.start()
        # Until it has returned, or waits for the flush's delivery (its
        # innermost frame: the lock is taken in C).
        deadline = time.monotonic() + 30
        while t.is_alive() and time.monotonic() < deadline:
            frame = sys._current_frames().get(t.ident or 0)
            if frame is not None and frame.f_code.co_name == "deliver":
                break
            time.sleep(0.001)
        assert sender == [False]  # returned, nothing taken
        assert (flush.is_alive(), h.pending()) == (True, 1)
    finally:
        go.set()
        flush.join(30)
    assert first == [True]
    assert host_group(pushgateway) == {"success": 1}
    assert deliver(lambda: transport) is True
    assert host_group(pushgateway) == {"success": 1, "failed": 1}
    transport.close()
