"""Airflow 2: states set by hand, which Airflow 2 tells no listener of.

The webserver's UI and REST API mark a task instance through
``DAG.set_task_instance_state``, and a DAG run through
``set_dag_run_state_to_success`` / ``set_dag_run_state_to_failed`` of
``airflow.api.common.mark_tasks`` (which the UI's views and the REST API's
DAG-run endpoint import by name). :func:`patch` wraps them where they are
looked up: the original runs first and unchanged, then what it marked is
handed to the adapter, which applies the rule Airflow 3's listener hooks get.

The modules are patched when they are imported (see :mod:`.after_import`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import after_import
from .logs import never_raises
from .records import FAILED, SKIPPED, SUCCESS

DAG_MODULE = "airflow.models.dag"
MARK_TASKS = "airflow.api.common.mark_tasks"
#: Modules that import the DAG-run marks by name (their copies are wrapped too).
_IMPORTERS = ("airflow.www.views", "airflow.api_connexion.endpoints.dag_run_endpoint")
_DAG_RUN_MARKS = {
    "set_dag_run_state_to_success": SUCCESS,
    "set_dag_run_state_to_failed": FAILED,
}
_STATUS = {"success": SUCCESS, "failed": FAILED, "skipped": SKIPPED}
_WRAPPED = "_orchestrator_push_mark"

OnTaskInstance = Callable[[Any, str], None]  # (task instance, status)
OnDagRun = Callable[[Any, str], None]  # (DAG run, status)


def patch(on_ti: OnTaskInstance, on_dag_run: OnDagRun) -> None:
    """Wrap the marking functions now or when their modules are imported.
    Idempotent."""
    after_import.when_imported(DAG_MODULE, functools.partial(_patch_dag, on_ti))
    for name in (MARK_TASKS, *_IMPORTERS):
        after_import.when_imported(name, functools.partial(_patch_dag_run_marks, on_dag_run))


def _patch_dag(on_ti: OnTaskInstance, module: ModuleType) -> None:
    cls = module.DAG
    method = cls.set_task_instance_state
    if getattr(method, _WRAPPED, False):
        return

    @functools.wraps(method)
    def set_task_instance_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        altered = method(self, *args, **kwargs)  # Airflow's own, first and unchanged
        if kwargs.get("commit", True):
            _marked_tis(on_ti, altered, kwargs.get("state"))
        return altered

    setattr(set_task_instance_state, _WRAPPED, True)
    cls.set_task_instance_state = set_task_instance_state


def _patch_dag_run_marks(on_dag_run: OnDagRun, module: ModuleType) -> None:
    for name, status in _DAG_RUN_MARKS.items():
        fn = getattr(module, name, None)
        if fn is None or getattr(fn, _WRAPPED, False):
            continue
        setattr(module, name, _wrap_dag_run_mark(fn, status, on_dag_run))


def _wrap_dag_run_mark(fn: Callable[..., Any], status: str, on_dag_run: OnDagRun) -> Any:
    @functools.wraps(fn)
    def mark(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)  # Airflow's own, first and unchanged
        if kwargs.get("commit", False):
            _marked_dag_run(on_dag_run, kwargs, status)
        return result

    setattr(mark, _WRAPPED, True)
    return mark


@never_raises
def _marked_tis(on_ti: OnTaskInstance, altered: Any, state: Any) -> None:
    status = _STATUS.get(str(getattr(state, "value", state)))
    if status is not None:
        for ti in altered or ():
            on_ti(ti, status)


@never_raises
def _marked_dag_run(on_dag_run: OnDagRun, kwargs: dict[str, Any], status: str) -> None:
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    dag = kwargs.get("dag")
    if dag is None:
        return
    query = select(DagRun).where(DagRun.dag_id == dag.dag_id)
    if kwargs.get("run_id"):
        query = query.where(DagRun.run_id == kwargs["run_id"])
    elif kwargs.get("execution_date"):
        query = query.where(DagRun.execution_date == kwargs["execution_date"])
    else:
        return
    own = None if kwargs.get("session") is not None else settings.Session.session_factory()
    session: Any = kwargs.get("session") or own
    try:
        dag_run = session.scalar(query)
        if dag_run is not None:
            on_dag_run(dag_run, status)
    finally:
        if own is not None:
            own.close()
