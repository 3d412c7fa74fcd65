"""Framework-neutral records of finished work: what every adapter produces."""

from __future__ import annotations

from typing import NamedTuple

SUCCESS = "success"
FAILED = "failed"
RETRY = "retry"
SKIPPED = "skipped"
CANCELLED = "cancelled"
CRASHED = "crashed"
REVOKED = "revoked"
UPSTREAM_FAILED = "upstream_failed"

#: The statuses each framework can report; ``last_status`` carries a 0 for every
#: one of them that is not the outcome, so a dashboard never sees a stale 1.
STATUSES: dict[str, tuple[str, ...]] = {
    "airflow": (SUCCESS, FAILED, RETRY, SKIPPED),
    "prefect": (SUCCESS, FAILED, RETRY, CANCELLED, CRASHED, UPSTREAM_FAILED),
    "celery": (SUCCESS, FAILED, RETRY, REVOKED),
    "exec": (SUCCESS, FAILED),
}
ALL_STATUSES = (SUCCESS, FAILED, RETRY, SKIPPED, CANCELLED, CRASHED, REVOKED, UPSTREAM_FAILED)

#: Outcomes that set ``last_failure_timestamp_seconds``: final failures only. A
#: retry will run again; cancelled, revoked and skipped are decisions, not faults.
FAILURE_STATUSES = frozenset({FAILED, CRASHED})


def statuses_for(framework: str) -> tuple[str, ...]:
    return STATUSES.get(framework, ALL_STATUSES)


class TaskRecord(NamedTuple):
    """One finished attempt of a task (immutable; a named tuple because building
    one is on every task's path and costs a third of a frozen dataclass).

    ``end_time`` is a unix timestamp; ``duration`` is in seconds (measure it
    with a monotonic clock where the framework allows). ``attempt`` starts at 1.
    ``run_id`` identifies the run across its attempts (a Celery task id): for
    two attempts of one run the higher attempt is the later outcome, even when
    the framework reports the earlier attempt last. ``queued`` is how long the
    attempt waited between being ready to run and starting, where the framework
    says (seconds; None when unknown).
    """

    framework: str
    flow: str
    task: str
    status: str
    end_time: float
    duration: float
    attempt: int = 1
    exit_code: int | None = None
    run_id: str | None = None
    queued: float | None = None


class FlowRecord(NamedTuple):
    """One finished run of a flow (an Airflow DAG run, a Prefect flow run)."""

    framework: str
    flow: str
    status: str
    end_time: float
    duration: float
