"""Schedules a framework keeps (Airflow DAGs, Prefect deployments, Celery beat
entries), recorded when they change: one place for what is pushed when.

An adapter reads the whole picture now and then (:class:`Poller`, on a thread
of its own, or Celery beat after each tick) and hands it to
:meth:`ScheduleRecorder.update`, which records only what changed, and all of it
every :data:`RESEND` seconds so a gateway restarted without persistence gets it
back (a scheduler of thousands of DAGs pushes each one that often).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from .engine import Engine
from .logs import warn_limited
from .preimport import before_threads
from .schedules import default_grace

#: Unchanged schedules are recorded again this often, so a gateway restarted
#: without persistence gets them back. Not more often: at 5,000 groups each push
#: costs the gateway ~0.1 s (bench/bench_airflow_schedules.py), and a scheduler
#: of 5,000 DAGs resends 5,000 groups.
RESEND = 3600.0

#: (flow, task): task None for a flow's own schedule
Key = tuple[str, str | None]


@dataclass(frozen=True)
class Due:
    """What a schedule says now. ``next_run``: unix time (or, by entry name,
    several); None when there is no next run now. ``paused``: there is one, but
    the schedule is paused (its grace is kept at the gateway, the mark of
    something scheduled). ``period``: the schedule's interval, where it has one."""

    next_run: float | Mapping[str, float] | None
    period: float | None = None
    paused: bool = False


class ScheduleRecorder:
    """Records the schedules of one framework into an engine when they change."""

    def __init__(self, engine: Engine, framework: str) -> None:
        self.engine = engine
        self.framework = framework
        self._sent: dict[Key, Due] = {}
        self._sent_at = float("-inf")

    def update(self, schedules: Mapping[Key, Due], partial: bool = False) -> None:
        """``schedules``: every schedule there is now; one that had a next run
        and is gone (a deleted DAG, a removed beat entry) loses it (unless
        ``partial``: only some schedules, read again). At most
        half the engine's group cap is recorded per call (a scheduler of
        thousands of DAGs at its first poll): the rest at the next calls, once
        those are delivered, so none is dropped at the cap."""
        now = time.monotonic()
        if not partial and now - self._sent_at >= RESEND:
            self._sent_at = now
            # what is current is sent again; what is gone stays, to be removed
            self._sent = {k: v for k, v in self._sent.items() if k not in schedules}
        budget = max(1, self.engine.config.max_groups // 2)
        for key in [] if partial else list(self._sent.keys() - schedules.keys()):
            if budget <= 0:
                return
            was = self._sent.pop(key)
            if was.next_run is not None:
                self._record(key, Due(None, was.period))
                budget -= 1
        for key, due in schedules.items():
            before = self._sent.get(key)
            had_next = before is not None and before.next_run is not None
            if due.next_run is None and not due.paused and not had_next:
                continue  # nothing scheduled, and no next run of ours to remove
            if before == due:
                continue
            if budget <= 0:
                return
            self._record(key, due)
            self._sent[key] = due
            budget -= 1

    def pause_all(self) -> None:
        """Every schedule recorded is paused now (a Prefect runner that pauses
        its deployments as it stops): next runs removed, graces kept."""
        self.update({k: Due(None, v.period, paused=True) for k, v in self._sent.items()})

    def _record(self, key: Key, due: Due) -> None:
        grace = self.engine.config.schedule_grace
        self.engine.record_schedule(
            self.framework,
            key[0],
            key[1],
            next_run=due.next_run,
            grace=default_grace(due.period) if grace is None else grace,
            interval=due.period,
        )


WAKE_GAP = 1.0  # seconds between two reads of a poller that is woken
WOKEN_MAX = 10_000  # schedules woken between two reads, at most


class Poller:
    """Reads a framework's schedules every ``poll`` seconds on a daemon thread
    and hands them to a :class:`ScheduleRecorder`."""

    def __init__(
        self,
        recorder: ScheduleRecorder,
        read: Callable[[Collection[Key] | None], Mapping[Key, Due]],
        poll: float,
        name: str,
    ) -> None:
        """``read(None)``: every schedule; ``read(keys)``: only those."""
        self._recorder = recorder
        self._read = read
        self._poll = poll
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._woken: set[Key] = set()  # read these at once (bounded: see wake)
        self._woken_lock = threading.Lock()
        self._next_full = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        before_threads()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self, key: Key) -> None:
        """Read ``key``'s schedule now, not at the next poll: a run just
        started, so its schedule moved on. Pushed with the run's start, the
        next run is at the gateway even if the scheduler dies a moment later
        (a next run still equal to the start would never be missed). Only the
        woken schedules are read (thousands of DAGs: one row each, not the
        table), and no more than one read a second."""
        with self._woken_lock:
            if len(self._woken) < WOKEN_MAX:  # (beyond: the next full read has them)
                self._woken.add(key)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with self._woken_lock:
                woken, self._woken = self._woken, set()
            full = time.monotonic() >= self._next_full
            try:
                if full:
                    self._next_full = time.monotonic() + self._poll
                    self._recorder.update(self._read(None))
                elif woken:
                    self._recorder.update(self._read(woken), partial=True)
            except Exception:  # an API or database hiccup: the next poll tries again
                warn_limited(
                    f"schedules-{self._recorder.framework}",
                    "orchestrator_push: could not read the %s schedules",
                    self._recorder.framework,
                )
            # at most one read a second however many runs start (5,000 DAGs at
            # midnight): a wake meanwhile is kept for the next read
            if not self._stop.wait(min(WAKE_GAP, self._poll)):
                self._wake.wait(max(self._next_full - time.monotonic(), 0.0))
