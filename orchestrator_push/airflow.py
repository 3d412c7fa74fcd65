"""Airflow: a listener plugin, registered by the ``airflow.plugins`` entry point.

Installing ``orchestrator-push[airflow]`` is all it takes: no DAG, airflow.cfg or
plugins-folder change. The listener only translates task-instance and DAG-run
events into records; the core delivers them (task runners flush before exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from . import airflow_marks, airflow_schedules, airflow_supervisor, runtime
from .config import PREFIX
from .logs import never_raises
from .records import FAILED, RETRY, SKIPPED, SUCCESS, UPSTREAM_FAILED, FlowRecord, TaskRecord
from .schedule_watch import Poller

FRAMEWORK = "airflow"
log = logging.getLogger(__name__)

# Airflow 2 has no on_task_instance_skipped hook: a DAG run's skipped task
# instances are reported when the run ends instead (see _record_not_run).
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
    at = poked = start.timestamp() if start is not None else now
    task = getattr(ti, "task", None)
    timeout = _limit(getattr(task, "execution_timeout", None))
    if getattr(task, "mode", None) == "reschedule":
        # A sensor that gives its slot back between pokes: its try started at
        # the first poke and may wait up to the sensor's timeout (a poke's
        # execution_timeout says nothing of the wait between pokes).
        first = _first_poke(ti)
        at = first.timestamp() if first is not None else at
        timeout = _limit(getattr(task, "timeout", None)) or timeout
    # Airflow 2's task instance says when the scheduler queued it; Airflow 3's
    # task runner is not told
    queued = getattr(ti, "queued_dttm", None)
    engine.record_start(
        FRAMEWORK,
        str(ti.dag_id),
        str(ti.task_id),
        at=at,
        timeout=timeout,
        waited=max(poked - queued.timestamp(), 0.0) if queued is not None else None,
    )


def _first_poke(ti: Any) -> datetime | None:
    """When a reschedule-mode sensor's try first poked (None at its first poke):
    Airflow 3's runner asks its supervisor; Airflow 2's keeps it in its
    task_reschedule table."""
    ask = getattr(ti, "get_first_reschedule_date", None)
    context = getattr(ti, "get_template_context", None)
    if ask is not None and context is not None:
        first: datetime | None = ask(context())
        return first
    from airflow.models.taskreschedule import TaskReschedule

    with _session_of(ti) as session:
        return session.scalar(  # type: ignore[no-any-return]
            TaskReschedule.stmt_for_task_instance(ti, descending=False)
            .with_only_columns(TaskReschedule.start_date)
            .limit(1)
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
    if _schedules is not None and os.getpid() == _scheduler_pid:
        _schedules.wake((str(dag_run.dag_id), None))


ROLE = "airflow-scheduler"
_scheduler: tuple[tuple[str, str], ...] | None = None  # this process's node group, if a scheduler
_scheduler_pid = -1  # (its children inherit _scheduler)
_schedules: Poller | None = None  # the scheduler's reader of DAG schedules


def _is_scheduler(component: Any) -> bool:
    """A scheduler's Job. Airflow calls ``on_starting`` before it sets the job's
    type, so the command line says (``airflow scheduler``, also under
    ``airflow standalone``, the Helm chart and systemd units)."""
    return hasattr(component, "job_type") and sys.argv[1:2] == ["scheduler"]


@never_raises
def _note_component_start(component: Any) -> None:
    """The scheduler pushes its liveness in its own group (``instance`` = the
    job's host name) every push interval."""
    global _scheduler, _scheduler_pid
    if not _is_scheduler(component):
        return
    _scheduler_pid = os.getpid()
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if engine is None:
        return
    _scheduler = (("instance", str(getattr(component, "hostname", None) or socket.getfqdn())),)
    engine.register_node(_scheduler, FRAMEWORK, ROLE)
    global _schedules
    if _schedules is None:
        _schedules = airflow_schedules.start(engine)


@never_raises
def _note_component_stop(component: Any) -> None:
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if _scheduler is not None and engine is not None and _is_scheduler(component):
        engine.node_down(_scheduler, FRAMEWORK)
        if _schedules is not None:
            _schedules.stop()


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
        attempt=int(getattr(ti, "try_number", 1) or 0),  # 0: it never ran
    )


@never_raises
def _record_ti(ti: Any, status: str, previous_state: Any = "running") -> None:
    started = _STARTED.pop(_try_key(ti), None)
    # A state set by hand through the API server or UI (Airflow 3) reaches the
    # listener with no previous state and an ORM TaskInstance without its task.
    if previous_state is None and getattr(ti, "task", None) is None:
        _record_marked_ti(ti, status)
        return
    if runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE) is None:
        return
    runtime.record_task(_task_record(ti, status, started))
    if started is None and os.getpid() != _scheduler_pid:
        # Not the try's own process, nor the scheduler: Airflow 2's DAG file
        # processor failing a zombie, a process multiprocessing ends with
        # os._exit (no atexit). Deliver now, bounded by the flush timeout.
        runtime.flush()


def _newest_run(obj: Any) -> bool:
    """Whether ``obj`` (a task instance or DAG run) belongs to its DAG's newest
    run, the one whose outcome the last-run series show."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    order = getattr(DagRun, "run_after", None) or DagRun.execution_date
    with _session_of(obj) as session:
        newest = session.execute(
            select(DagRun.run_id).where(DagRun.dag_id == obj.dag_id).order_by(order.desc()).limit(1)
        ).scalar()
    return newest is None or newest == obj.run_id


def _record_marked_ti(ti: Any, status: str) -> None:
    """A task instance marked by hand: Airflow shows the mark from now on, so
    does its last-run series (when it is of the newest run). Not counted: no
    try ran."""
    newest = _newest_run(ti)
    log.info(
        "orchestrator-push: %s.%s set to %s by hand%s; not counted as a run",
        ti.dag_id,
        ti.task_id,
        status,
        ": now its last status" if newest else " in an older run than the newest: not reported",
    )
    if newest and runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE) is not None:
        runtime.record_task(_task_record(ti, status))


#: A task instance's final state as counted when its DAG run ends; others
#: (removed, never scheduled) are not attempts.
_COUNTED = {
    "success": SUCCESS,
    "failed": FAILED,
    "skipped": SKIPPED,
    "upstream_failed": UPSTREAM_FAILED,
}
#: An earlier try's state in the history: failed (and run again) is a retry.
_EARLIER = {**_COUNTED, "failed": RETRY}


@contextlib.contextmanager
def _session_of(obj: Any) -> Iterator[Any]:
    """The session ``obj`` (a DAG run or task instance) is in (never a new scoped
    one: closing Airflow 2's would detach the scheduler's objects), or one of
    our own for a detached object (dag.test()), closed afterwards."""
    from sqlalchemy.orm import object_session

    session = object_session(obj)
    if session is not None:
        yield session
        return
    from airflow import settings

    own = settings.Session.session_factory()
    try:
        yield own
    finally:
        own.close()


#: What counting reads of a try: loading whole ORM task instances cost the
#: scheduler ten times as much (bench/bench_airflow_counts.py).
_TRY_COLUMNS = (
    "dag_id",
    "task_id",
    "map_index",
    "try_number",
    "state",
    "start_date",
    "end_date",
    "hostname",  # empty: no task runner ran it
)


def _rows(session: Any, model: str, dag_run: Any, columns: tuple[str, ...]) -> list[Any]:
    """The run's rows of an Airflow model that may not exist in this version
    (only ``columns``, those the model has)."""
    import importlib

    from sqlalchemy import select

    module, name = model.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    wanted = [getattr(cls, c) for c in columns if hasattr(cls, c)]
    query = select(*wanted).where(cls.dag_id == dag_run.dag_id, cls.run_id == dag_run.run_id)
    return list(session.execute(query))


def _earlier_tries(session: Any, dag_run: Any, tis: list[Any]) -> list[TaskRecord]:
    """The tries before each task instance's last one. Airflow keeps the state
    and times of each in its task instance history (Airflow 3: every try;
    2.10: tries cleared by hand); Airflow 2's retries are in its task_fail
    table (times only). A try known only by the try number counts with
    duration 0."""
    history = {
        (h.task_id, h.map_index, int(h.try_number)): h
        for h in _rows(
            session,
            "airflow.models.taskinstancehistory.TaskInstanceHistory",
            dag_run,
            _TRY_COLUMNS,
        )
    }
    fails: dict[tuple[str, int], list[Any]] = {}
    for f in _rows(session, "airflow.models.taskfail.TaskFail", dag_run, _TRY_COLUMNS):
        fails.setdefault((f.task_id, f.map_index), []).append(f)
    for rows in fails.values():
        rows.sort(key=lambda f: f.start_date or datetime.min)
    out = []
    for ti in tis:
        failed = fails.get((ti.task_id, ti.map_index), [])
        for n in range(1, int(getattr(ti, "try_number", 0) or 0)):
            h = history.get((ti.task_id, ti.map_index, n))
            if h is not None:
                if h.start_date is not None:  # it ran
                    out.append(_task_record(h, _EARLIER.get(_state(h), RETRY)))
            elif n <= len(failed):
                out.append(_task_record(failed[n - 1], RETRY)._replace(attempt=n))
            else:
                out.append(_task_record(ti, RETRY)._replace(attempt=n, duration=0.0))
    return out


def _read_run(dag_run: Any) -> tuple[list[Any], list[TaskRecord]]:
    """The run's task instances in a final state, and their earlier tries, from
    Airflow's own record of them (its database), when the run ends: in the
    scheduler, every try is seen there, whether its process reported or died."""
    with _session_of(dag_run) as session:
        tis = [
            ti
            for ti in _rows(
                session, "airflow.models.taskinstance.TaskInstance", dag_run, _TRY_COLUMNS
            )
            if _state(ti) in _COUNTED
        ]
        return tis, _earlier_tries(session, dag_run, tis)


def _record_not_run(tis: list[Any]) -> None:
    """Task instances no task runner reported: those that never ran (try number
    0: skipped by a branch, a short-circuit or a trigger rule, upstream failed),
    those the scheduler set to success itself (EmptyOperator, ExternalTaskMarker:
    no host ran them) and, on Airflow 2 (no skipped hook), every skipped one."""
    for ti in tis:
        state = _state(ti)
        if state == "success":
            if not getattr(ti, "hostname", None):
                runtime.record_task(_task_record(ti, SUCCESS))
            continue
        if state not in ("skipped", "upstream_failed"):
            continue
        if int(getattr(ti, "try_number", 0) or 0) == 0 or (
            SKIPPED_AT_DAG_RUN_END and state == "skipped"
        ):
            runtime.record_task(_task_record(ti, _COUNTED[state]))


def _count(engine: Any, tis: list[Any], earlier: list[TaskRecord], run: FlowRecord) -> None:
    """The run and every try of its task instances, into the host's store."""
    for rec in earlier:
        engine.count(rec)
    for ti in tis:
        engine.count(_task_record(ti, _COUNTED[_state(ti)]))
    engine.count(run)


#: How Airflow 3's API server says, in the DAG-run hooks' message, that a user
#: set the run's state.
_MARKED = "manually set"


@never_raises
def _record_dag_run(dag_run: Any, status: str, msg: Any = "") -> None:
    engine = runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE)
    if engine is None:
        return
    marked = _MARKED in str(msg or "")
    if marked:
        newest = _newest_run(dag_run)
        log.info(
            "orchestrator-push: DAG run %s.%s set to %s by hand%s; not counted as a run",
            dag_run.dag_id,
            dag_run.run_id,
            status,
            ": now its last status" if newest else " (older than the newest: not reported)",
        )
        if not newest:
            return
    tis, earlier = _read_run(dag_run)
    _record_not_run(tis)
    end = getattr(dag_run, "end_date", None)
    now = time.time()
    start = getattr(dag_run, "start_date", None)
    duration = (
        _seconds(start, end)
        if end is not None
        else (max(now - start.timestamp(), 0.0) if start is not None else 0.0)
    )
    run = FlowRecord(
        framework=FRAMEWORK,
        flow=str(dag_run.dag_id),
        status=status,
        end_time=end.timestamp() if end is not None else now,
        duration=duration,
    )
    runtime.record_flow(run)
    if not marked:  # a mark is not a run; (a run that had ended was counted then)
        _count(engine, tis, earlier, run)


class Listener:
    """Hook implementations; pluggy passes only the arguments each one names."""

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        _note_start(task_instance)

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        _record_ti(task_instance, SUCCESS, previous_state)

    @hookimpl
    def on_task_instance_failed(
        self, previous_state: Any, task_instance: Any, error: Any = None
    ) -> None:
        status = RETRY if _state(task_instance) == "up_for_retry" else FAILED
        _record_ti(task_instance, status, previous_state)

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        _record_ti(task_instance, SKIPPED, previous_state)

    @hookimpl
    def on_dag_run_running(self, dag_run: Any, msg: str) -> None:
        _note_dag_run_start(dag_run)

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        _record_dag_run(dag_run, SUCCESS, msg)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        _record_dag_run(dag_run, FAILED, msg)

    @hookimpl
    def on_starting(self, component: Any) -> None:
        _note_component_start(component)

    @hookimpl
    def before_stopping(self, component: Any) -> None:
        # The task runner (or the scheduler) exits right after this: deliver now, bounded.
        _note_component_stop(component)
        runtime.flush_at_exit()


listener = Listener()


@never_raises
def _record_supervised(rec: TaskRecord) -> None:
    """A try whose task runner died, as its supervisor reported it (Airflow 3)."""
    if runtime.get_engine(_airflow_settings, AIRFLOW_SOURCE) is None:
        return
    runtime.record_task(rec)
    # The executor's worker may be ended with os._exit (a LocalExecutor worker
    # is a multiprocessing child): deliver now, bounded by the flush timeout.
    runtime.flush()


@never_raises
def _record_marked(ti: Any, status: str) -> None:
    _record_marked_ti(ti, status)


def _record_marked_dag_run(dag_run: Any, status: str) -> None:
    _record_dag_run(dag_run, status, _MARKED)


if SKIPPED_AT_DAG_RUN_END:  # Airflow 2 tells no listener of a state set by hand
    airflow_marks.patch(_record_marked, _record_marked_dag_run)
else:  # Airflow 3: the task runner has a supervisor
    airflow_supervisor.patch(_record_supervised)


class OrchestratorPushPlugin(AirflowPlugin):
    name = "orchestrator_push"
    listeners = [listener]  # noqa: RUF012 - the attribute Airflow reads
