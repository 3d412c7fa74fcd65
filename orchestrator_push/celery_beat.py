"""Celery beat: when each periodic entry is next due, pushed from the beat process.

``instrument(app)`` in the module beat loads connects ``beat_init``; there the
beat scheduler's ``tick`` and ``close`` are wrapped on the instance (nothing
else of beat is touched). After each tick, and as beat stops (perhaps in the
middle of a tick), on beat's own thread, each entry's next due time is read
with Celery's public schedule API (``remaining_estimate``: a few microseconds
per entry) and recorded when it changed (schedule_watch.py): one series per
entry (label ``schedule``) in its task's group, so a beat that stops leaves its
entries' due times behind and ``OrchestratorTaskMissed`` fires.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .engine import Engine
from .logs import warn_limited
from .schedule_watch import Due, Key, ScheduleRecorder

FRAMEWORK = "celery"
_MARK = "_orchestrator_push_beat"


def read(entries: Any, flow: str) -> dict[Key, Due]:
    """The due time of each entry of ``entries`` (the scheduler's ``schedule``
    mapping), by task (of ``flow``): one series per entry name."""
    now = time.time()
    due: dict[str, dict[str, float]] = {}
    periods: dict[str, float] = {}
    for entry in list(entries.values()):
        try:
            remaining = entry.schedule.remaining_estimate(entry.last_run_at)
        except Exception:  # beat logs its own error for such an entry
            continue
        # 10 ms: the two clocks read here and in Celery differ by microseconds,
        # which would make every tick look like a change
        due.setdefault(entry.task, {})[entry.name] = round(now + remaining.total_seconds(), 2)
        every = getattr(entry.schedule, "run_every", None)  # interval schedules
        if every is not None:
            periods[entry.task] = max(every.total_seconds(), periods.get(entry.task, 0.0))
    return {(flow, task): Due(by_entry, periods.get(task)) for task, by_entry in due.items()}


def watch(scheduler: Any, engine: Engine, flow: str) -> bool:
    """Wrap ``scheduler.tick`` and ``scheduler.close`` (once); False when it has
    no ``tick`` or ``schedule`` to read (another scheduler class), which is left
    alone."""
    tick: Callable[..., Any] | None = getattr(scheduler, "tick", None)
    close: Callable[..., Any] = getattr(scheduler, "close", None) or (lambda: None)
    if tick is None or not hasattr(scheduler, "schedule"):
        return False
    if getattr(tick, _MARK, False):
        return True
    recorder = ScheduleRecorder(engine, FRAMEWORK)
    closed = False  # a closed store cannot be read (beat closes twice when it stops)

    def record() -> None:
        try:
            recorder.update(read(scheduler.schedule, flow))
        except Exception:  # nothing of ours may stop beat
            warn_limited("beat", "orchestrator_push: could not read beat's schedule")

    def wrapped_tick(*args: Any, **kwargs: Any) -> Any:
        nonlocal closed
        closed = False
        interval = tick(*args, **kwargs)
        record()
        return interval

    def wrapped_close(*args: Any, **kwargs: Any) -> Any:
        # Beat's SIGTERM handler closes the scheduler and raises SystemExit
        # wherever beat is, often just after a send, before the tick returns: the
        # due time that follows the send is already in the schedule, read here.
        nonlocal closed
        if not closed:
            closed = True
            record()
        return close(*args, **kwargs)

    setattr(wrapped_tick, _MARK, True)
    scheduler.tick = wrapped_tick
    scheduler.close = wrapped_close
    return True
