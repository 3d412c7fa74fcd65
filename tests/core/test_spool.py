"""The durable spool: what could not be delivered waits on disk for the next process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from gateway import Pushgateway, free_port, start

import orchestrator_push as op
from orchestrator_push import spool as spool_module
from orchestrator_push.records import TaskRecord
from orchestrator_push.spool import Entry, Spool

NS = "orchestrator"


def engine(url: str, spool: str, **kw: object) -> op.Engine:
    return op.Engine(op.load_config({}, url=url, spool_dir=spool, interval=0.05, **kw))


def rec(status: str, end: float, task: str = "load") -> TaskRecord:
    return TaskRecord("exec", "nightly", task, status, end, 1.0)


def spool_while_down(spool: str, *records: TaskRecord) -> None:
    e = engine(f"http://127.0.0.1:{free_port()}", spool, timeout=0.5)
    for r in records:
        e.record_task(r)
    assert e.close(0.5) is True  # spooled
    assert e.stats().spooled == len(records)


def test_replay_never_overwrites_a_newer_value(pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    spool_while_down(spool, rec("success", 1000.0))  # an old success, undelivered
    e = engine(pushgateway.url, spool)
    e.record_task(rec("failed", 2000.0))  # then a newer failure, delivered directly
    assert e.flush(10)
    e.close(1)
    g = pushgateway.group(job="exec", flow="nightly", task="load")
    # the newer failure stays the last run; the spooled success fills in the last success
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_failure_timestamp_seconds") == 2000.0
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1000.0
    assert os.listdir(spool) == []


def test_replay_delivers_an_older_spool_that_is_newer_than_the_gateway(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 1000.0))
    assert e.flush(10)
    e.close(1)
    spool_while_down(spool, rec("failed", 3000.0), rec("retry", 2000.0, task="other"))
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 500.0, task="third"))  # any push brings the replay along
    assert e.flush(10)
    assert e.stats().replayed == 2
    e.close(1)
    g = pushgateway.group(job="exec", flow="nightly", task="load")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == 1000.0
    assert g.value(f"{NS}_task_last_failure_timestamp_seconds") == 3000.0
    o = pushgateway.group(job="exec", flow="nightly", task="other")
    assert o.value(f"{NS}_task_last_status", status="retry") == 1


def test_concurrent_processes_replay_each_record_once(pushgateway: Pushgateway,
                                                      tmp_path: object) -> None:
    spool = str(tmp_path)
    s = Spool(spool, 10**9)
    entries = 0
    for i in range(120):  # 120 files of 3 groups each: more than one replay batch
        s.write([Entry("task", (("job", "exec"), ("flow", f"f{i}"), ("task", f"t{j}")), NS,
                       rec("success", 1000.0 + i, task=f"t{j}"), 1000.0 + i, None, 1)
                 for j in range(3)])
        entries += 3
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_SPOOL_DIR": spool}
    # Four `replay` commands at once: each replays until it finds no file, and a
    # file is claimed by exactly one of them (rename), so each record counts once.
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator_push", "replay"], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    replayed = sum(int(out.split(" records from ", 1)[0]) for out in outputs)
    assert replayed == entries
    assert os.listdir(spool) == []
    flows = {g.labels.get("flow") for g in pushgateway.groups()}
    assert {f"f{i}" for i in range(120)} <= flows


CRASHER = textwrap.dedent("""
    import os, signal, sys
    import orchestrator_push as op
    from orchestrator_push import spool
    real_fsync = os.fsync
    def crash(fd):  # the worst moment: data written, not yet renamed into place
        os.kill(os.getpid(), signal.SIGKILL)
    e = op.Engine(op.load_config({}, url=sys.argv[1], spool_dir=sys.argv[2], timeout=0.3))
    e.record_task(op.TaskRecord("exec", "nightly", "crashed", "success", 5.0, 1.0))
    os.fsync = crash
    e.flush(0.5)
""")


def test_a_crash_mid_write_corrupts_nothing(pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    spool_while_down(spool, rec("success", 1000.0, task="before"))
    p = subprocess.run([sys.executable, "-c", CRASHER, f"http://127.0.0.1:{free_port()}", spool],
                       timeout=60)
    assert p.returncode == -signal.SIGKILL
    names = sorted(os.listdir(spool))
    assert len(names) == 2 and names[0].startswith(".tmp-")  # the half-done write
    # a file that is not a spool (a disk error, an editor) is set aside, not fatal
    with open(os.path.join(spool, "0-1-bad.spool"), "w") as f:
        f.write("[{not json")
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 2000.0, task="after"))
    assert e.flush(10)
    e.close(1)
    assert e.stats().replayed == 1
    tasks = {g.labels.get("task") for g in pushgateway.groups()}
    assert tasks == {"before", "after"}
    left = sorted(os.listdir(spool))
    assert left[0].startswith(".tmp-") and left[1].endswith(".bad") and len(left) == 2


def test_a_claim_left_by_a_dead_process_is_taken_over(pushgateway: Pushgateway,
                                                       tmp_path: object) -> None:
    spool = str(tmp_path)
    spool_while_down(spool, rec("success", 1000.0))
    [name] = os.listdir(spool)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(os.path.join(spool, name), os.path.join(spool, f"{name}.claimed-{dead.pid}"))
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 2.0, task="other"))
    assert e.flush(10)
    e.close(1)
    assert e.stats().replayed == 1 and os.listdir(spool) == []


def test_a_claim_held_too_long_is_taken_over(pushgateway: Pushgateway, tmp_path: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spool = str(tmp_path)
    spool_while_down(spool, rec("success", 1000.0))
    [name] = os.listdir(spool)
    # claimed by a live process (our parent) that never finishes
    os.rename(os.path.join(spool, name), os.path.join(spool, f"{name}.claimed-{os.getppid()}"))
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 2.0, task="other"))
    assert e.flush(10)
    assert e.stats().replayed == 0  # a live claim is respected...
    monkeypatch.setattr(spool_module, "_STALE_CLAIM", 0.0)
    assert e.flush(10)
    e.close(1)
    assert e.stats().replayed == 1 and os.listdir(spool) == []  # ...until it is too old


def test_the_spool_has_a_size_bound(tmp_path: object) -> None:
    spool = str(tmp_path)
    e = engine(f"http://127.0.0.1:{free_port()}", spool, timeout=0.3, spool_max_bytes=600)
    for i in range(20):
        e.record_task(rec("success", float(i), task=f"t{i}"))
    assert e.flush(0.5) is False  # 20 groups do not fit in 600 bytes: dropped, counted
    s = e.stats()
    assert s.dropped_spool_full == 20 and s.spooled == 0
    assert os.listdir(spool) == []
    e.close(0)


def test_self_metrics_reach_the_gateway(pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    spool_while_down(spool, rec("success", 1000.0, task="old"))
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 2000.0))
    assert e.flush(10)
    e.record_task(rec("success", 2001.0))  # the next push carries the replay's count
    assert e.flush(10)
    e.close(1)
    g = pushgateway.group(job="exec", flow="nightly", task="load")
    assert g.value(f"{NS}_push_records_replayed_total", framework="exec") == 1
    assert g.value(f"{NS}_push_records_spooled_total") == 0
    for reason in ("too_many_groups", "rejected", "spool_full", "spool_unreadable"):
        assert g.value(f"{NS}_push_records_dropped_total", reason=reason) == 0


def test_exec_with_the_gateway_down_is_delivered_by_the_next_run(tmp_path: object) -> None:
    port = free_port()
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": f"http://127.0.0.1:{port}",
           "ORCHESTRATOR_PUSH_SPOOL_DIR": str(tmp_path), "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "1"}
    cli = [sys.executable, "-m", "orchestrator_push", "exec", "--job", "cron"]
    p = subprocess.run([*cli, "--task", "first", "--", "true"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "spooled to" in p.stderr
    gw = start(port=port)
    try:
        p = subprocess.run([*cli, "--task", "second", "--", "false"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr == ""
        first = gw.group(job="cron", flow="cron", task="first")
        assert first.value(f"{NS}_task_last_status", status="success") == 1
        second = gw.group(job="cron", flow="cron", task="second")
        assert second.value(f"{NS}_task_last_status", status="failed") == 1
        assert os.listdir(str(tmp_path)) == ["counts"]  # no spool file left; the host's counts
        assert gw.runs_by_status() == {"success": 1, "failed": 1}  # the first run counted too
    finally:
        gw.stop()


def test_an_unreadable_file_is_counted_reported_and_expires(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    bad = os.path.join(spool, "00000000000000000001-1-corrupt.spool")
    with open(bad, "w") as f:
        f.write("[{not json")
    e = engine(pushgateway.url, spool)
    e.record_task(rec("success", 1.0, task="probe"))
    assert e.flush(10)  # another process's loss: this process's records are delivered
    assert e.stats().lost["spool_unreadable"] == 1
    e.record_task(rec("success", 2.0, task="probe"))  # the next push carries the count
    assert e.flush(10)
    e.close(1)
    g = pushgateway.group(job="exec", flow="nightly", task="probe")
    assert g.value(f"{NS}_push_records_dropped_total", reason="spool_unreadable") == 1
    assert os.listdir(spool) == [os.path.basename(bad) + ".bad"]
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_SPOOL_DIR": spool}
    doctor = subprocess.run([sys.executable, "-m", "orchestrator_push", "doctor"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "1 unreadable file(s)" in doctor.stdout and "spool: empty" not in doctor.stdout
    status = subprocess.run([sys.executable, "-m", "orchestrator_push", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "1 unreadable" in status.stdout
    old = time.time() - spool_module.BAD_MAX_AGE - 60
    os.utime(bad + ".bad", (old, old))
    Spool(spool, 10**9)._tidy()
    assert os.listdir(spool) == []
