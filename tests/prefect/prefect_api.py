"""Prefect's own record of a run, read from its API, for the tests to compare with."""

from __future__ import annotations

from typing import Any

from gateway import wait_until


def task_run_of(flow_run_id: Any, name: str, ended: Any = lambda state: state.is_final()) -> Any:
    """The flow run's task run whose name starts with ``name``, once its state
    is ``ended``. Prefect records task runs from events, in the background:
    wait for it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def found() -> Any:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        matches = [r for r in runs if r.name.startswith(name)]
        assert len(matches) <= 1, matches
        return matches[0] if matches and matches[0].state is not None \
            and ended(matches[0].state) else None

    return wait_until(found, 30, interval=0.1, what=f"the task run {name} in Prefect's API")


def task_runs(client: Any, flow_run_ids: list[Any]) -> list[Any]:
    """Every task run of the flow runs, as the API has them now (it gives at most
    200 at a time: page)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list[Any] = []
    while True:
        page = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
            limit=200, offset=len(runs))
        runs += page
        if len(page) < 200:
            return runs
