"""``orchestrator-push exec``: run a command, report its outcome, keep its exit code."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from .config import load_config
from .engine import Engine
from .records import FAILED, SUCCESS, TaskRecord

if TYPE_CHECKING:  # schedules are imported by the runs that have one
    from .schedules import Cron

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
CANNOT_START = 127
TIMED_OUT = 124  # as coreutils timeout
#: After --timeout's SIGTERM, how long the command may take to stop before SIGKILL.
KILL_AFTER = 10.0


def exit_code(returncode: int) -> int:
    """Popen's returncode as a shell reports it: killed by signal N -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def run_and_report(
    cmd: Sequence[str],
    *,
    job: str,
    flow: str,
    task: str,
    timeout: float | None = None,
    schedule: Cron | None = None,
    every: float | None = None,
    grace: float | None = None,
) -> int:
    """Run ``cmd`` and push its outcome. ``schedule`` (a cron line) or ``every``
    (seconds from one run's end to the next's start): when the next run is
    due, pushed at the start (cron) or at the end (every), with ``grace``."""
    config = load_config(job=job)  # raises ConfigError before the command runs
    engine = Engine(config)
    engine.start()  # earlier runs' spool is replayed while the command runs
    started_wall, started = time.time(), time.monotonic()
    # at the gateway within one push interval, so a run that never ends is seen
    engine.record_start("exec", flow, task, at=started_wall, timeout=timeout)
    if schedule is not None:
        _record_tick(engine, schedule, flow, task, started_wall, grace)
    code = _run(cmd, timeout)
    duration = time.monotonic() - started
    if every is not None:
        from .schedules import default_grace

        engine.record_schedule(
            "exec",
            flow,
            task,
            next_run=started_wall + duration + every,
            grace=default_grace(every) if grace is None else grace,
            interval=every,
        )
    rec = TaskRecord(
        framework="exec",
        flow=flow,
        task=task,
        status=SUCCESS if code == 0 else FAILED,
        end_time=started_wall + duration,
        duration=duration,
        exit_code=code,
    )
    engine.record_task(rec)
    engine.count(rec)  # the runs of every process on this host add up
    delivered = engine.flush_at_exit()  # its own record only: nobody else's files
    engine.close(0)
    stats = engine.stats()
    if config.enabled and stats.lost:
        reasons = ", ".join(sorted(stats.lost))
        print(
            f"orchestrator-push: warning: records of job {job!r} given up on ({reasons}; "
            f"see orchestrator_push_records_dropped_total); exit code {code} kept",
            file=sys.stderr,
        )
    elif config.enabled and (not delivered or stats.spooled):
        why = ", ".join(sorted(stats.push_failures)) or "no answer"
        kept = (
            f"; spooled to {config.spool_dir} for the next run that reaches it" if delivered else ""
        )
        print(
            f"orchestrator-push: warning: outcome of job {job!r} not delivered to "
            f"{config.url} within {config.flush_timeout:g}s ({why}){kept}; "
            f"exit code {code} kept",
            file=sys.stderr,
        )
    return code


def _record_tick(
    engine: Engine, cron: Cron, flow: str, task: str, started: float, grace: float | None
) -> None:
    """This run's lateness against its tick, and the next tick."""
    from .schedules import default_grace

    try:
        tick, due, period = cron.at_or_before(started), cron.after(started), cron.period(started)
    except Exception:  # a bug in a date library must not stop the command
        print("orchestrator-push: warning: cannot compute the schedule's ticks", file=sys.stderr)
        return
    engine.record_schedule(
        "exec",
        flow,
        task,
        next_run=due,
        grace=default_grace(period) if grace is None else grace,
        interval=period,
        delay=started - tick,
    )


def _run(cmd: Sequence[str], timeout: float | None = None) -> int:
    try:
        proc = subprocess.Popen(list(cmd))
    except OSError as exc:
        print(f"orchestrator-push: cannot start {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return CANNOT_START

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        if timeout is None:
            return exit_code(proc.wait())
        try:
            return exit_code(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            print(
                f"orchestrator-push: {cmd[0]!r} still running after {timeout:g}s (--timeout); "
                "stopping it",
                file=sys.stderr,
            )
            proc.terminate()
            try:
                proc.wait(KILL_AFTER)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return TIMED_OUT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
