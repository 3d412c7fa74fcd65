"""Airflow: a listener plugin, registered by the ``airflow.plugins`` entry point.

Installing ``orchestrator-push[airflow]`` is all it takes: no DAG, airflow.cfg or
plugins-folder change. The listener only translates task-instance and DAG-run
events into records; the core delivers them (task runners flush before exit).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from datetime import datetime
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from . import runtime
from .config import PREFIX
from .logs import never_raises
from .records import FAILED, RETRY, SKIPPED, SUCCESS, FlowRecord, TaskRecord

FRAMEWORK = "airflow"
log = logging.getLogger(__name__)

# Airflow 2 has no on_task_instance_skipped hook: a DAG run's skipped task
# instances are reported when the run ends instead (see _record_skipped).
try:
    from airflow import __version__ as _AIRFLOW_VERSION
except ImportError:  # pragma: no cover - every Airflow has it
    _AIRFLOW_VERSION = "3"
SKIPPED_AT_DAG_RUN_END = _AIRFLOW_VERSION.startswith("2.")

# When a try started, by our own clock, for task instances whose start_date the
# hook does not see (Airflow 2's dag.test()). Bounded: entries leave at the end
# of the try, and a runaway map is cleared rather than grown.
_STARTED: dict[tuple[Any, ...], float] = {}
_STARTED_MAX = 10_000


AIRFLOW_SOURCE = "airflow.cfg [orchestrator_push] {name} or AIRFLOW__ORCHESTRATOR_PUSH__{NAME}"


def _airflow_settings() -> dict[str, str]:
    """The ``[orchestrator_push]`` section of airflow.cfg (and its
    ``AIRFLOW__ORCHESTRATOR_PUSH__*`` variables) under our variable names."""
    out: dict[str, str] = {}
    try:
        from airflow.configuration import conf

        section = conf.getsection("orchestrator_push") or {}
        out.update({PREFIX + str(k).upper(): str(v) for k, v in section.items() if v is not None})
    except Exception as exc:  # an unreadable section must be said, not skipped
        log.error(
            "orchestrator-push: cannot read the [orchestrator_push] section of airflow.cfg "
            "(%s: %s); using the environment only",
            type(exc).__name__,
            exc,
        )
    # getsection() ignores these when airflow.cfg has no such section.
    env_prefix = "AIRFLOW__ORCHESTRATOR_PUSH__"
    for key, value in os.environ.items():
        if key.startswith(env_prefix):
            out[PREFIX + key[len(env_prefix) :]] = value
    return out


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    return max((end - start).total_seconds(), 0.0)


def _state(ti: Any) -> str:
    state = getattr(ti, "state", None)
    return str(getattr(state, "value", state) or "")


def _try_key(ti: Any) -> tuple[Any, ...]:
    return tuple(getattr(ti, a, None) for a in ("dag_id", "task_id", "run_id", "map_index"))


@never_raises
def _note_start(ti: Any) -> None:
    """The try runs: remember when, and push its start (seen while it runs)."""
    if len(_STARTED) >= _STARTED_MAX:
        _STARTED.clear()
    now = time.time()
    _STARTED[_try_key(ti)] = now
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if engine is None:
        return
    start = getattr(ti, "start_date", None)
    at = start.timestamp() if start is not None else now
    task = getattr(ti, "task", None)
    # Airflow 2's task instance says when the scheduler queued it; Airflow 3's
    # task runner is not told
    queued = getattr(ti, "queued_dttm", None)
    engine.record_start(
        FRAMEWORK,
        str(ti.dag_id),
        str(ti.task_id),
        at=at,
        timeout=_limit(getattr(task, "execution_timeout", None)),
        waited=max(at - queued.timestamp(), 0.0) if queued is not None else None,
    )


@never_raises
def _note_dag_run_start(dag_run: Any) -> None:
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if engine is None:
        return
    start = getattr(dag_run, "start_date", None)
    at = start.timestamp() if start is not None else time.time()
    dag = getattr(dag_run, "dag", None)
    # when the run should have started: Airflow 3's run_after; Airflow 2's end
    # of the data interval (a scheduled run starts once its interval is over)
    due = getattr(dag_run, "run_after", None) or getattr(dag_run, "data_interval_end", None)
    engine.record_start(
        FRAMEWORK,
        str(dag_run.dag_id),
        None,
        at=at,
        timeout=_limit(getattr(dag, "dagrun_timeout", None)),
        waited=max(at - due.timestamp(), 0.0) if due is not None else None,
    )


ROLE = "airflow-scheduler"
_scheduler: tuple[tuple[str, str], ...] | None = None  # this process's node group, if a scheduler


def _is_scheduler(component: Any) -> bool:
    """A scheduler's Job. Airflow calls ``on_starting`` before it sets the job's
    type, so the command line says (``airflow scheduler``, also under
    ``airflow standalone``, the Helm chart and systemd units)."""
    return hasattr(component, "job_type") and sys.argv[1:2] == ["scheduler"]


@never_raises
def _note_component_start(component: Any) -> None:
    """The scheduler pushes its liveness in its own group (``instance`` = the
    job's host name) every push interval."""
    global _scheduler
    if not _is_scheduler(component):
        return
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if engine is None:
        return
    _scheduler = (("instance", str(getattr(component, "hostname", None) or socket.getfqdn())),)
    engine.register_node(_scheduler, FRAMEWORK, ROLE)


@never_raises
def _note_component_stop(component: Any) -> None:
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if _scheduler is not None and engine is not None and _is_scheduler(component):
        engine.node_down(_scheduler, FRAMEWORK)


def _limit(value: Any) -> float | None:
    """A timedelta (or seconds) limit in seconds; None when unset."""
    if value is None:
        return None
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else float(value)
    return seconds if seconds > 0 else None


def _task_record(ti: Any, status: str, started: float | None = None) -> TaskRecord:
    end = getattr(ti, "end_date", None)
    end_time = end.timestamp() if end is not None else time.time()
    start = getattr(ti, "start_date", None)
    if start is not None and end is not None:
        duration = _seconds(start, end)
    elif started is not None:
        duration = max(end_time - started, 0.0)
    else:
        duration = 0.0
    return TaskRecord(
        framework=FRAMEWORK,
        flow=str(ti.dag_id),
        task=str(ti.task_id),
        status=status,
        end_time=end_time,
        duration=duration,
        attempt=max(int(getattr(ti, "try_number", 1) or 1), 1),
    )


@never_raises
def _record_ti(ti: Any, status: str) -> None:
    started = _STARTED.pop(_try_key(ti), None)
    # A state set by hand through the API server or UI reaches the listener with
    # an ORM TaskInstance that has no task: no run happened, nothing to count.
    if getattr(ti, "task", None) is None:
        log.info(
            "orchestrator-push: %s.%s set to %s by hand, not counted as a run",
            getattr(ti, "dag_id", "?"),
            getattr(ti, "task_id", "?"),
            status,
        )
        return
    if runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE) is None:
        return
    runtime.record_task(_task_record(ti, status, started))


def _record_skipped(dag_run: Any) -> None:
    """Airflow 2: the run's skipped task instances, reported by the process that
    ends the run (the scheduler). This includes tasks skipped without running
    (branching, short-circuit), which Airflow 3 does not report."""
    from sqlalchemy.orm import object_session

    # The caller's session, never a new one: Airflow 2's NEW_SESSION is the
    # thread's scoped session, and closing it would detach the scheduler's
    # objects (its loop then dies on DetachedInstanceError).
    session = object_session(dag_run)
    if session is not None:
        tis = dag_run.get_task_instances(state=["skipped"], session=session)
    else:  # a detached run (dag.test()): a session of our own, not the scoped one
        from airflow import settings

        own = settings.Session.session_factory()
        try:
            tis = dag_run.get_task_instances(state=["skipped"], session=own)
        finally:
            own.close()
    for ti in tis:
        runtime.record_task(_task_record(ti, SKIPPED))


@never_raises
def _record_dag_run(dag_run: Any, status: str) -> None:
    if runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE) is None:
        return
    if SKIPPED_AT_DAG_RUN_END:
        _record_skipped(dag_run)
    end = getattr(dag_run, "end_date", None)
    now = time.time()
    start = getattr(dag_run, "start_date", None)
    duration = (
        _seconds(start, end)
        if end is not None
        else (max(now - start.timestamp(), 0.0) if start is not None else 0.0)
    )
    runtime.record_flow(
        FlowRecord(
            framework=FRAMEWORK,
            flow=str(dag_run.dag_id),
            status=status,
            end_time=end.timestamp() if end is not None else now,
            duration=duration,
        )
    )


class Listener:
    """Hook implementations; pluggy passes only the arguments each one names."""

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        _note_start(task_instance)

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        _record_ti(task_instance, SUCCESS)

    @hookimpl
    def on_task_instance_failed(
        self, previous_state: Any, task_instance: Any, error: Any = None
    ) -> None:
        status = RETRY if _state(task_instance) == "up_for_retry" else FAILED
        _record_ti(task_instance, status)

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        _record_ti(task_instance, SKIPPED)

    @hookimpl
    def on_dag_run_running(self, dag_run: Any, msg: str) -> None:
        _note_dag_run_start(dag_run)

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        _record_dag_run(dag_run, SUCCESS)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        _record_dag_run(dag_run, FAILED)

    @hookimpl
    def on_starting(self, component: Any) -> None:
        _note_component_start(component)

    @hookimpl
    def before_stopping(self, component: Any) -> None:
        # The task runner (or the scheduler) exits right after this: deliver now, bounded.
        _note_component_stop(component)
        runtime.flush_at_exit()


listener = Listener()


class OrchestratorPushPlugin(AirflowPlugin):
    name = "orchestrator_push"
    listeners = [listener]  # noqa: RUF012 - the attribute Airflow reads
