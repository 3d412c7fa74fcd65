"""Airflow 3: the tries a task runner cannot report, reported by its supervisor.

A task runner killed by a signal (``kill -9``, the OOM killer) or ended by
``os._exit`` with a non-zero code runs no listener. Its supervisor (in the
executor's worker process: a LocalExecutor worker, a Celery worker, ...)
then tells Airflow's API server the try failed (``up_for_retry`` when it has
retries left), through ``ActivitySubprocess.update_task_state_if_needed``.
:func:`patch` wraps that method: the original runs first and unchanged; when
it returned and the runner had sent no state of its own, the try is recorded
with the state the supervisor sent, its own attempt number, its duration from
the fork to now and the time of the report as its end.

The module is patched when it is imported (see :mod:`.after_import`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import after_import
from .logs import never_raises
from .records import FAILED, RETRY, TaskRecord

SUPERVISOR = "airflow.sdk.execution_time.supervisor"
_CLASS = "ActivitySubprocess"
_METHOD = "update_task_state_if_needed"
#: What the wrapper reads of a supervised try (Airflow 3.0 to 3.3).
_NEEDS = ("_terminal_state", "_exit_code", "final_state", "ti", "start_time")
#: The state the supervisor sends for a runner that died, as our status.
_STATUS = {"failed": FAILED, "up_for_retry": RETRY}

log = logging.getLogger(__name__)
_originals: dict[str, Callable[..., Any]] = {}


def patch(record: Callable[[TaskRecord], None]) -> None:
    """Wrap the supervisor's state update now or when its module is imported;
    ``record`` receives the try. Idempotent."""
    after_import.when_imported(SUPERVISOR, functools.partial(_patch, record))


def _patch(record: Callable[[TaskRecord], None], module: ModuleType) -> None:
    cls = getattr(module, _CLASS, None)
    method = getattr(cls, _METHOD, None)
    fields = {a.name for a in getattr(cls, "__attrs_attrs__", ())} | set(dir(cls))
    missing = [n for n in _NEEDS if n not in fields]
    if cls is None or method is None or missing:
        from airflow import __version__

        log.warning(
            "orchestrator-push: Airflow %s's task supervisor is not the one this version "
            "knows (%s.%s.%s; missing %s): tries whose process is killed are reported "
            "only in the counts at the DAG run's end",
            __version__,
            SUPERVISOR,
            _CLASS,
            _METHOD,
            ", ".join(missing) or "the method",
        )
        return
    if _METHOD in _originals:
        return
    _originals[_METHOD] = method

    @functools.wraps(method)
    def update_task_state_if_needed(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)  # Airflow's own, first and unchanged
        _after_update(record, self)
        return result

    setattr(cls, _METHOD, update_task_state_if_needed)


@never_raises
def _after_update(record: Callable[[TaskRecord], None], proc: Any) -> None:
    if proc._terminal_state is not None or proc._exit_code in (None, 0):
        return  # the runner reported its try itself (its listener ran)
    state = proc.final_state
    status = _STATUS.get(str(getattr(state, "value", state)))
    ti = proc.ti
    if status is None or ti is None:
        return
    record(
        TaskRecord(
            framework="airflow",
            flow=str(ti.dag_id),
            task=str(ti.task_id),
            status=status,
            end_time=time.time(),
            duration=max(time.monotonic() - float(proc.start_time), 0.0),
            attempt=int(ti.try_number),
        )
    )
