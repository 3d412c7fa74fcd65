"""A process's life around the engine: fork with locks held, records made during
interpreter shutdown, and an exit flush bounded to the process's own records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from forking import WAIT_FOR_CHILD, fork_with_locks_held
from gateway import Pushgateway, free_port

from orchestrator_push.records import TaskRecord
from orchestrator_push.spool import Entry, Spool

NS = "orchestrator"

def test_a_child_forked_while_our_locks_are_held_does_not_deadlock(
        pushgateway: Pushgateway) -> None:
    p = fork_with_locks_held(pushgateway.url, "logs", "runtime")
    assert p.stdout.strip() == "0", p.stdout + p.stderr
    g = pushgateway.group(job="exec", flow="forked", task="child")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 7.0


# Registered before the engine exists, so it runs after the engine's own exit
# hook; on Python 3.12+ no thread can start then.
RECORD_DURING_SHUTDOWN = textwrap.dedent("""
    import atexit, sys
    import orchestrator_push as op
    def late():
        op.record_task(op.TaskRecord("exec", "shutdown", "late", "success", 9.0, 1.0))
        print("flush", op.flush(float(sys.argv[2])), flush=True)
    atexit.register(late)
    op.configure(url=sys.argv[1], spool_dir="off", timeout=0.5)
""")


def test_a_record_made_during_interpreter_shutdown_is_delivered(
        pushgateway: Pushgateway) -> None:
    p = subprocess.run([sys.executable, "-c", RECORD_DURING_SHUTDOWN, pushgateway.url, "10"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "flush True" in p.stdout, p.stdout + p.stderr
    g = pushgateway.group(job="exec", flow="shutdown", task="late")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 9.0


def test_a_record_made_during_shutdown_with_the_gateway_down_is_not_called_delivered() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([sys.executable, "-c", RECORD_DURING_SHUTDOWN, url, "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "flush False" in p.stdout, p.stdout + p.stderr


EXIT_WITH_A_FULL_SPOOL = textwrap.dedent("""
    import json, sys
    import orchestrator_push as op
    from orchestrator_push.records import TaskRecord
    from orchestrator_push.spool import Entry, Spool
    e = op.Engine(op.load_config({}, url=sys.argv[1], spool_dir=sys.argv[2]))
    e.record_task(op.TaskRecord("exec", "own", "first", "success", 4.0, 1.0))
    assert e.flush_at_exit()  # (Airflow 2's dag.test() calls this after every task)
    # other processes spool meanwhile; the periodic replay is not due for 30 s
    spool = Spool(sys.argv[2], 10**9)
    for i in range(30):
        spool.write([Entry("task", (("job", "exec"), ("flow", "other"), ("task", f"t{i}")),
                           "orchestrator", TaskRecord("exec", "other", f"t{i}", "success",
                                                      100.0 + i, 1.0), 100.0 + i, None, 1)])
    e.record_task(op.TaskRecord("exec", "own", "mine", "success", 5.0, 1.0))
    print(json.dumps({"ok": e.flush_at_exit(), "replayed": e.stats().replayed}), flush=True)
""")


def test_the_exit_flush_delivers_its_own_records_and_starts_no_replay(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    p = subprocess.run([sys.executable, "-c", EXIT_WITH_A_FULL_SPOOL, pushgateway.url,
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout) == {"ok": True, "replayed": 0}, p.stderr
    assert pushgateway.group(job="exec", flow="own", task="mine").value(
        f"{NS}_task_last_completion_timestamp_seconds") == 5.0
    assert not [g for g in pushgateway.groups() if g.labels.get("flow") == "other"]
    assert len([n for n in os.listdir(str(tmp_path)) if n.endswith(".spool")]) == 30


def test_a_short_lived_process_replays_earlier_spool_while_it_works(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = Spool(str(tmp_path), 10**9)
    spool.write([Entry("task", (("job", "exec"), ("flow", "earlier"), ("task", "t")), NS,
                       TaskRecord("exec", "earlier", "t", "success", 100.0, 1.0), 100.0, None, 1)])
    script = textwrap.dedent("""
        import sys
        import orchestrator_push as op
        op.configure(url=sys.argv[1], spool_dir=sys.argv[2])
        op.record_task(op.TaskRecord("exec", "now", "t", "success", 200.0, 1.0))
    """)  # exits at once: the pass begun at the sender's start is let finish
    subprocess.run([sys.executable, "-c", script, pushgateway.url, str(tmp_path)], check=True,
                   timeout=60)
    assert pushgateway.group(job="exec", flow="earlier", task="t").value(
        f"{NS}_task_last_completion_timestamp_seconds") == 100.0
    assert os.listdir(str(tmp_path)) == []


def test_a_fork_waits_for_a_log_line_of_ours_being_written() -> None:
    """A child forked in the middle of one of our log writes would inherit the
    stream's lock held by a thread it does not have, and hang at its next line."""
    import logging
    import threading
    import time

    from orchestrator_push import logs

    entered, done = threading.Event(), threading.Event()

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            time.sleep(0.3)  # a write to a slow stream
            done.set()

    handler = Slow()
    logs.logger().addHandler(handler)
    try:
        t = threading.Thread(target=logs.emit, args=(logging.WARNING, "orchestrator_push: slow"))
        t.start()
        assert entered.wait(10)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: was the line written before the fork?
            os.write(w, b"1" if done.is_set() else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.waitpid(pid, 0)
        t.join(10)
    finally:
        logs.logger().removeHandler(handler)


SENDER_IMPORTS = textwrap.dedent("""
    import sys, threading, time
    from orchestrator_push import runtime, TaskRecord
    seen = set()
    def hook(event, args):
        if event == "import" and threading.current_thread() is not threading.main_thread():
            seen.add(args[0])
    sys.addaudithook(hook)
    for url in sys.argv[1:]:
        runtime.configure(url=url, interval=0.05, spool_dir="off", flush_timeout=1)
        runtime.record_task(TaskRecord("exec", "f", "t", "success", end_time=1.0, duration=0.1))
        runtime.flush(1)
    print(sorted(seen))
""")


def test_the_sender_imports_nothing_on_its_own_thread(pushgateway: Pushgateway) -> None:
    """A fork during an import on our thread leaves the child that module's lock,
    held by a thread it does not have: the child hangs at its next import of it
    (a Celery pool child resolving the result backend's host: encodings.idna)."""
    down = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([sys.executable, "-c", SENDER_IMPORTS, pushgateway.url, down],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# An Airflow task runner's last steps: its try's start and end recorded, then
# `before_stopping` flushes (runtime.flush_at_exit), then the interpreter exits.
TASK_RUNNER_EXIT = textwrap.dedent("""
    import sys, time
    import orchestrator_push as op
    from orchestrator_push import runtime
    op.configure(url=sys.argv[1], spool_dir=sys.argv[2], flush_timeout=float(sys.argv[3]))
    runtime.get_engine().record_start("airflow", "dag", "task", at=1.0)
    op.record_task(op.TaskRecord("airflow", "dag", "task", "success", 2.0, 1.0))
    t0 = time.monotonic()
    ok = runtime.flush_at_exit()
    print("before_stopping", ok, round(time.monotonic() - t0, 1), flush=True)
""")


def test_a_gateway_that_never_answers_holds_an_exiting_process_one_flush_timeout(
        tmp_path: object) -> None:
    """It accepts connections and never answers: the exit costs one flush
    timeout (the before-stopping flush), not one more at the interpreter's exit,
    and the record waits in the spool."""
    import socket
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    spool = os.path.join(str(tmp_path), "spool")
    try:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", TASK_RUNNER_EXIT,
                            f"http://127.0.0.1:{hole.getsockname()[1]}", spool, "5"],
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        hole.close()
    assert p.returncode == 0, p.stdout + p.stderr
    _, ok, flushed = next(x for x in p.stdout.splitlines() if x.startswith("before_stopping"))\
        .split()
    assert ok == "True" and 4.9 <= float(flushed) < 6.0, p.stdout  # spooled at its timeout
    # the whole process: that one flush timeout (5 s) and the interpreter, not two timeouts
    assert took < 2 * 5.0, (took, p.stderr)
    assert Spool(spool, 10**9).pending() == 1  # the record, for the next process


# A fork that bypasses os.fork's hooks (a C extension's fork(), here libc's)
# while the engine's lock is held: record_start, which skips getpid() on its
# common path, must notice it on the held lock instead of waiting forever.
RAW_FORK_WITH_THE_ENGINE_LOCKED = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    import orchestrator_push as op
    e = op.Engine(op.load_config({}, url=sys.argv[1], spool_dir="off"))
    held, release = threading.Event(), threading.Event()
    def holder():
        with e._lock:
            held.set()
            release.wait()
    threading.Thread(target=holder, daemon=True).start()
    held.wait()
    pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        e.record_start("exec", "raw-fork", "child", at=6.0)
        e.record_task(op.TaskRecord("exec", "raw-fork", "child", "success", 7.0, 1.0))
        os._exit(0 if e.flush(10) else 3)
""") + WAIT_FOR_CHILD


def test_a_start_in_a_child_forked_past_os_fork_with_the_engine_locked_is_recorded(
        pushgateway: Pushgateway) -> None:
    p = subprocess.run([sys.executable, "-c", RAW_FORK_WITH_THE_ENGINE_LOCKED, pushgateway.url],
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "0", p.stdout + p.stderr
    g = pushgateway.group(job="exec", flow="raw-fork", task="child")
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 7.0
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == 6.0
