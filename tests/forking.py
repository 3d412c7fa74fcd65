"""A fork while one of our module locks is held by another thread (tests of fork safety)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FORK_WITH_LOCKS_HELD = textwrap.dedent("""
    import contextlib, importlib, os, sys, threading, time
    import orchestrator_push as op
    modules = [importlib.import_module(f"orchestrator_push.{m}") for m in sys.argv[2:]]
    held, release = threading.Event(), threading.Event()
    def holder():
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(m._lock)
            held.set()
            release.wait()
    threading.Thread(target=holder, daemon=True).start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        from orchestrator_push import logs
        logs.warn_limited("child", "the child logs")
        op.configure(url=sys.argv[1], spool_dir="off")
        op.record_task(op.TaskRecord("exec", "forked", "child", "success", 7.0, 1.0))
        os._exit(0 if op.flush(10) else 3)
""")

# The parent's side: let the holder go, print the child's exit code (or
# "deadlock" after 20 s, and kill it).
WAIT_FOR_CHILD = textwrap.dedent("""
    release.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        print("deadlock")
""")


def fork_with_locks_held(url: str, *modules: str) -> subprocess.CompletedProcess[str]:
    """Fork while a thread holds the module locks of ``modules``; the child logs,
    configures, records and flushes."""
    return subprocess.run([sys.executable, "-c", FORK_WITH_LOCKS_HELD + WAIT_FOR_CHILD, url,
                           *modules],
                          capture_output=True, text=True, timeout=60)
