"""``orchestrator-push exec``: run a command, report its outcome, keep its exit code."""

from __future__ import annotations

import contextlib
import os
import select
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
    # No thread: this one waits for the command, and pushes meanwhile (_wait)
    engine = Engine(config, thread=False)
    started_wall, started = time.time(), time.monotonic()
    # at the gateway within one push interval, so a run that never ends is seen
    engine.record_start("exec", flow, task, at=started_wall, timeout=timeout)
    if schedule is not None:
        _record_tick(engine, schedule, flow, task, started_wall, grace)
    code, ended = _run(cmd, engine, timeout)
    duration = ended - started
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


def _run(cmd: Sequence[str], engine: Engine, timeout: float | None = None) -> tuple[int, float]:
    """The command's exit code, and when it ended (monotonic). Its signals are
    handled on this thread whatever it is doing (a push in progress included),
    so they take effect at once: the forwarded ones, --timeout's (SIGALRM)
    and the command's exit (SIGCHLD)."""
    try:
        proc = subprocess.Popen(list(cmd))
    except OSError as exc:
        print(f"orchestrator-push: cannot start {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return CANNOT_START, time.monotonic()
    ended: list[float] = []
    stopped: list[bool] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(signum)

    def child(_signum: int, _frame: FrameType | None) -> None:
        # The last SIGCHLD is the exit: its time ends the duration, not when
        # this thread (maybe in a push to a slow gateway) gets to see it.
        ended[:] = [time.monotonic()]

    def alarm(_signum: int, _frame: FrameType | None) -> None:
        if stopped:  # KILL_AFTER later, still running
            forward(signal.SIGKILL, None)
            return
        stopped.append(True)
        # os.write: this may interrupt a write to sys.stderr, which is not reentrant
        os.write(
            2,
            f"orchestrator-push: {cmd[0]!r} still running after {timeout:g}s (--timeout); "
            "stopping it\n".encode(errors="replace"),
        )
        forward(signal.SIGTERM, None)
        signal.setitimer(signal.ITIMER_REAL, KILL_AFTER)

    handlers = dict.fromkeys(FORWARDED, forward) | {signal.SIGCHLD: child}
    if timeout is not None:
        handlers[signal.SIGALRM] = alarm
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    if timeout is not None:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        code = exit_code(_wait(proc, engine))
        return TIMED_OUT if stopped else code, ended[0] if ended else time.monotonic()
    finally:
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(proc: subprocess.Popen[bytes], engine: Engine) -> int:
    """Wait for the command, pushing on this thread what is due meanwhile: the
    start, then what the spool holds. Its returncode."""
    pidfd = _pidfd(proc.pid)
    try:
        while not _exited(proc, pidfd, engine.drive()):
            pass
        return proc.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A descriptor readable once the process exits (Linux 5.3+), which select
    waits on with a timeout; Popen.wait with one polls, up to 50 ms late."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _exited(proc: subprocess.Popen[bytes], pidfd: int | None, wait: float | None) -> bool:
    """Whether the command exited within ``wait`` seconds (None: waits for it)."""
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], wait)[0])
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        return False
    return True
