"""Prefect: when each deployment's next scheduled run is due, from the worker
or the ``serve`` runner that runs it.

A task on the event loop of ``prefect worker start`` (or of ``flow.serve()``'s
runner), with its own API client (no thread, no client of its own), asks every
:data:`POLL` seconds for the deployments of the worker's work pool (the
runner's own deployments), and for each one with an active schedule, its
earliest flow run in a SCHEDULED state (Scheduled, or Late once it is overdue:
Prefect's scheduler service creates the runs ahead of time). What changed is
recorded (schedule_watch.py) in the flow's group:

- the earliest scheduled run of any of the flow's deployments;
- a deployment that is paused, or whose schedules are all paused: no next run
  (removed from the gateway), the grace kept;
- no schedule at all: nothing (a next run pushed earlier is removed).

A runner that stops cleanly pauses its deployments' schedules (Prefect's
``pause_on_shutdown``, the default of ``serve``): its next runs are removed
then, as for a schedule paused by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

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


#: Which deployments: a work pool's name, or a runner's deployment ids (read at
#: each poll: a runner may add deployments after it started)
Selection = str | Callable[[], list[Any]]


async def _deployments(client: Any, selection: Selection) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    if isinstance(selection, str):
        pools = WorkPoolFilter(name=WorkPoolFilterName(any_=[selection]))
        return list(await client.read_deployments(work_pool_filter=pools))
    ids = selection()
    if not ids:
        return []
    return list(
        await client.read_deployments(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids))
        )
    )


async def read(client: Any, selection: Selection, flow_names: dict[Any, str]) -> dict[Key, Due]:
    """The schedules of the selected deployments, by flow (``flow_names``: a
    cache of flow names by flow id, filled here)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    by_flow: dict[str, list[Due]] = {}
    for dep in await _deployments(client, selection):
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


async def poll(recorder: ScheduleRecorder, client: Any, selection: Selection) -> None:
    """Read and record the selected schedules every :data:`POLL` seconds, until
    cancelled (the worker's or the runner's teardown)."""
    flow_names: dict[Any, str] = {}
    while True:
        try:
            recorder.update(await read(client, selection, flow_names))
        except asyncio.CancelledError:
            raise
        except Exception:  # an API hiccup: the next poll tries again
            warn_limited("schedules-prefect", "orchestrator_push: could not read the schedules")
        await asyncio.sleep(POLL)
