"""Airflow: when each DAG's next scheduled run is due, from the scheduler process.

A daemon thread of the scheduler reads Airflow's ``dag`` table every
:data:`POLL` seconds, in a session of its own, one query of five columns
(never on the scheduler's loop): ``next_dagrun_create_after`` is when the
scheduler will create the DAG's next run (its ``run_after``), set by its
timetable. It records what changed:

- a DAG with a next run: that time, and the grace;
- a paused DAG: no next run (its series is removed from the gateway), the
  grace kept, so pausing never pages and unpausing resumes;
- a DAG the scheduler will not create a run for now (no schedule, triggered by
  assets, ``max_active_runs`` reached, past its ``end_date``): its next run is
  removed if one was pushed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .engine import Engine
from .logs import warn_limited
from .schedules import default_grace

FRAMEWORK = "airflow"
#: Seconds between two reads of the dag table.
POLL = 10.0
#: Unchanged schedules are recorded again this often (a gateway restarted
#: without persistence gets them back).
RESEND = 60.0

#: dag_id -> (next run, None while paused or not scheduled now; the schedule's
#: period, None when its timetable does not say; paused with a next run)
Schedules = dict[str, tuple[float | None, float | None, bool]]


def read(session: Any) -> Schedules:
    """Every active DAG's next run (None while paused) and period, from ``session``."""
    from airflow.models.dag import DagModel
    from sqlalchemy import select

    d = DagModel
    q = select(
        d.dag_id,
        d.is_paused,
        d.next_dagrun_create_after,
        d.next_dagrun_data_interval_start,
        d.next_dagrun_data_interval_end,
    )
    # Airflow 3 marks a DAG whose file is gone stale; 2.10, not active
    active = d.is_stale.is_(False) if hasattr(d, "is_stale") else d.is_active.is_(True)
    q = q.where(active)
    out: Schedules = {}
    for dag_id, paused, due, start, end in session.execute(q):
        if due is None:
            out[dag_id] = (None, None, False)
            continue
        period = (end - start).total_seconds() if start is not None and end is not None else 0.0
        out[dag_id] = (
            None if paused else due.timestamp(),
            period if period > 0 else None,
            bool(paused),
        )
    return out


class DagSchedules:
    """Reads the schedules and records what changed, on a thread of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sent: Schedules = {}
        self._sent_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, schedules: Schedules) -> None:
        now = time.monotonic()
        resend = now - self._sent_at >= RESEND
        grace = self.engine.config.schedule_grace
        for dag_id, now_is in schedules.items():
            due, period, paused = now_is
            before = self._sent.get(dag_id)
            if due is None and not paused and (before is None or before[0] is None):
                continue  # not scheduled now, and no next run of ours to remove
            if before == now_is and not resend:
                continue
            self.engine.record_schedule(
                FRAMEWORK,
                dag_id,
                next_run=due,
                grace=default_grace(period) if grace is None else grace,
                interval=period,
            )
            self._sent[dag_id] = now_is
        if resend:
            self._sent_at = now

    def poll_once(self) -> None:
        from airflow import settings

        session = settings.Session.session_factory()
        try:
            schedules = read(session)
        finally:
            session.close()
        self.update(schedules)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="orchestrator-push-dag-schedules", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a database hiccup: the next poll tries again
                warn_limited("dag-schedules", "orchestrator_push: could not read DAG schedules")
            self._stop.wait(POLL)
