"""Celery beat: when each periodic entry is next due, pushed from the beat process.

``instrument(app)`` in the module beat loads connects ``beat_init``; there the
beat scheduler's ``tick`` is wrapped on the instance (nothing else of beat is
touched). After each tick, on beat's own thread, each entry's next due time
is read with Celery's public schedule API (``remaining_estimate``: a few
microseconds per entry) and recorded when it changed: one series per entry
(label ``schedule``) in its task's group, so a beat that stops leaves its
entries' due times behind and ``OrchestratorTaskMissed`` fires.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .engine import Engine
from .logs import warn_limited
from .schedules import default_grace

FRAMEWORK = "celery"
#: Unchanged due times are recorded again this often, so a gateway restarted
#: without persistence gets them back.
RESEND = 60.0
_MARK = "_orchestrator_push_beat"


class BeatSchedule:
    """What one beat scheduler's entries say, and what was last recorded."""

    def __init__(self, engine: Engine, flow: str) -> None:
        self.engine = engine
        self.flow = flow
        self._sent: dict[str, dict[str, float]] = {}  # task -> entry -> due
        self._sent_at = 0.0

    def update(self, entries: Any) -> None:
        """Record the due times of ``entries`` (the scheduler's ``schedule``
        mapping) that changed since the last call, or all of them every
        :data:`RESEND` seconds; a task left with no entry loses its series."""
        now = time.time()
        due: dict[str, dict[str, float]] = {}
        periods: dict[str, float | None] = {}
        for entry in list(entries.values()):
            try:
                remaining = entry.schedule.remaining_estimate(entry.last_run_at)
            except Exception:  # beat logs its own error for such an entry
                continue
            # 10 ms: the two clocks read here and in Celery differ by microseconds,
            # which would make every tick look like a change
            due.setdefault(entry.task, {})[entry.name] = round(now + remaining.total_seconds(), 2)
            every = getattr(entry.schedule, "run_every", None)
            period = every.total_seconds() if every is not None else None
            if entry.task not in periods or period is None:
                periods[entry.task] = period
            else:
                periods[entry.task] = max(period, periods[entry.task] or 0.0)
        resend = now - self._sent_at >= RESEND
        grace = self.engine.config.schedule_grace
        for task, by_entry in due.items():
            if resend or self._sent.get(task) != by_entry:
                period = periods.get(task)
                self.engine.record_schedule(
                    FRAMEWORK,
                    self.flow,
                    task,
                    next_run=by_entry,
                    grace=default_grace(period) if grace is None else grace,
                    interval=period,
                )
        for task in self._sent.keys() - due.keys():
            self.engine.record_schedule(
                FRAMEWORK, self.flow, task, next_run=None, grace=grace or default_grace(None)
            )
        self._sent = due
        if resend:
            self._sent_at = now


def watch(scheduler: Any, engine: Engine, flow: str) -> bool:
    """Wrap ``scheduler.tick`` (once); False when it has no ``tick`` or
    ``schedule`` to read (another scheduler class), which is left alone."""
    tick: Callable[..., Any] | None = getattr(scheduler, "tick", None)
    if tick is None or not hasattr(scheduler, "schedule"):
        return False
    if getattr(tick, _MARK, False):
        return True
    state = BeatSchedule(engine, flow)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        interval = tick(*args, **kwargs)
        try:
            state.update(scheduler.schedule)
        except Exception:  # nothing of ours may stop beat
            warn_limited("beat", "orchestrator_push: could not read beat's schedule")
        return interval

    setattr(wrapped, _MARK, True)
    scheduler.tick = wrapped
    return True
