"""Prefect: when each deployment's next scheduled run is due, from the worker.

A task on the event loop of ``prefect worker start``, with the worker's own API
client (no thread, no client of its own), asks every :data:`POLL` seconds for
the deployments of the worker's work pool, and for each one with
an active schedule, its earliest flow run in a SCHEDULED state (Scheduled, or
Late once it is overdue: Prefect's scheduler service creates the runs ahead of
time). What changed is recorded (schedule_watch.py) in the flow's group:

- the earliest scheduled run of any of the flow's deployments;
- a deployment that is paused, or whose schedules are all paused: no next run
  (removed from the gateway), the grace kept;
- no schedule at all: nothing (a next run pushed earlier is removed).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from .engine import Engine
from .logs import warn_limited
from .schedule_watch import Due, Key, ScheduleRecorder

FRAMEWORK = "prefect"
#: Seconds between two reads of the API.
POLL = 15.0


def _period(schedules: list[Any]) -> float | None:
    """The longest interval among interval schedules (cron and rrule: None)."""
    periods = [
        s.schedule.interval.total_seconds()
        for s in schedules
        if isinstance(getattr(s.schedule, "interval", None), timedelta)
    ]
    return max(periods) if periods else None


async def read(client: Any, pool: str, flow_names: dict[Any, str]) -> dict[Key, Due]:
    """The schedules of ``pool``'s deployments, by flow (``flow_names``: a cache
    of flow names by flow id, filled here)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    by_flow: dict[str, list[Due]] = {}
    pools = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    for dep in await client.read_deployments(work_pool_filter=pools):
        name = flow_names.get(dep.flow_id)
        if name is None:
            name = flow_names[dep.flow_id] = str((await client.read_flow(dep.flow_id)).name)
        schedules = list(dep.schedules or [])
        period = _period(schedules)
        if not schedules:
            due = Due(None)
        elif dep.paused or not any(s.active for s in schedules):
            due = Due(None, period, paused=True)
        else:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    ),
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=1,
            )
            start = runs[0].expected_start_time if runs else None
            due = Due(start.timestamp() if start is not None else None, period)
        by_flow.setdefault(name, []).append(due)
    return {(flow, None): _earliest(dues) for flow, dues in by_flow.items()}


def _earliest(dues: list[Due]) -> Due:
    """One flow's deployments together: the earliest next run; else paused if any is."""
    times = [d.next_run for d in dues if isinstance(d.next_run, float)]
    periods = [d.period for d in dues if d.period is not None]
    period = max(periods) if periods else None
    if times:
        return Due(min(times), period)
    return Due(None, period, paused=any(d.paused for d in dues))


async def poll(engine: Engine, client: Any, pool: str) -> None:
    """Read and record ``pool``'s schedules every :data:`POLL` seconds, until
    cancelled (the worker's teardown)."""
    recorder = ScheduleRecorder(engine, FRAMEWORK)
    flow_names: dict[Any, str] = {}
    while True:
        try:
            recorder.update(await read(client, pool, flow_names))
        except asyncio.CancelledError:
            raise
        except Exception:  # an API hiccup: the next poll tries again
            warn_limited("schedules-prefect", "orchestrator_push: could not read the schedules")
        await asyncio.sleep(POLL)
