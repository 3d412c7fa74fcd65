"""Airflow: when each DAG's next scheduled run is due, from the scheduler process.

A daemon thread of the scheduler reads Airflow's ``dag`` table every
:data:`POLL` seconds, in a session of its own, one query of five columns
(never on the scheduler's loop): ``next_dagrun_create_after`` is when the
scheduler will create the DAG's next run (its ``run_after``), set by its
timetable. When a DAG run starts, the scheduler's listener wakes the thread,
which reads that DAG's row at once (its next run moved on). What changed is
recorded (schedule_watch.py):

- a DAG with a next run: that time, and the grace;
- a paused DAG: no next run (its series is removed from the gateway), the
  grace kept, so pausing never pages and unpausing resumes;
- a DAG the scheduler will not create a run for now (no schedule, triggered by
  assets, ``max_active_runs`` reached, past its ``end_date``): its next run is
  removed if one was pushed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .engine import Engine
from .schedule_watch import Due, Key, Poller, ScheduleRecorder

FRAMEWORK = "airflow"
#: Seconds between two reads of the dag table.
POLL = 10.0


def read(session: Any, dag_ids: Collection[str] | None = None) -> dict[Key, Due]:
    """Every active DAG's schedule (or only those of ``dag_ids``), from ``session``."""
    from airflow.models.dag import DagModel
    from sqlalchemy import select

    d = DagModel
    # Airflow 3 marks a DAG whose file is gone stale; 2.10, not active
    active = d.is_stale.is_(False) if hasattr(d, "is_stale") else d.is_active.is_(True)
    q = select(
        d.dag_id,
        d.is_paused,
        d.next_dagrun_create_after,
        d.next_dagrun_data_interval_start,
        d.next_dagrun_data_interval_end,
    ).where(active)
    if dag_ids is not None:
        q = q.where(d.dag_id.in_(list(dag_ids)))
    out: dict[Key, Due] = {}
    for dag_id, paused, due, start, end in session.execute(q):
        if due is None:
            out[(dag_id, None)] = Due(None)
            continue
        period = (end - start).total_seconds() if start is not None and end is not None else 0.0
        out[(dag_id, None)] = Due(
            None if paused else due.timestamp(), period if period > 0 else None, bool(paused)
        )
    return out


def _read_now(keys: Collection[Key] | None = None) -> dict[Key, Due]:
    from airflow import settings

    sessions: Any = settings.Session  # (typed Optional: set once Airflow is configured)
    session = sessions.session_factory()
    try:
        return read(session, None if keys is None else [flow for flow, _ in keys])
    finally:
        session.close()


def start(engine: Engine) -> Poller:
    """Start reading the DAGs' schedules (the scheduler calls it once)."""
    poller = Poller(
        ScheduleRecorder(engine, FRAMEWORK), _read_now, POLL, "orchestrator-push-dag-schedules"
    )
    poller.start()
    return poller
