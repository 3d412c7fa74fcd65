"""Celery: every finished task attempt, from worker signals.

>>> from celery import Celery
>>> from orchestrator_push.celery import instrument
>>> app = Celery("shop", broker="redis://localhost:6379/0")
>>> instrument(app)  # doctest: +SKIP

``instrument()`` is idempotent and may run at import time, before the worker
forks. It only translates signals into :class:`~orchestrator_push.TaskRecord`
objects: the core delivers them. With the prefork pool, children hand their
records to the worker's main process through a :class:`~orchestrator_push.relay.Relay`,
and only the main process pushes (see docs/celery.md for why).
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from celery import Celery, signals

from . import runtime
from .config import PREFIX, ConfigError
from .ledger import Loss
from .logs import never_raises
from .records import FAILED, RETRY, REVOKED, SUCCESS, TaskRecord
from .relay import Relay

FRAMEWORK = "celery"

#: Celery state (``task_postrun``'s ``state``) -> our status. ``None`` comes
#: after an internal error; IGNORED means the task chose not to record a state
#: but ran to the end.
_STATUS = {
    "SUCCESS": SUCCESS,
    "FAILURE": FAILED,
    "RETRY": RETRY,
    "REVOKED": REVOKED,
    "REJECTED": FAILED,
    "IGNORED": SUCCESS,
}

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
_apps: dict[int, Celery] = {}
_starts: dict[str, float] = {}  # task id -> monotonic time at prerun
_reported_failures: OrderedDict[str, None] = OrderedDict()  # task ids, see _emit
_relay: Relay | None = None
_node: str | None = None
_counters: dict[str, tuple[tuple[str, str], ...]] = {}  # instance -> its counters group


def instrument(app: Celery | None = None) -> None:
    """Report every task of ``app`` (default: the current app). Idempotent.

    Reads configuration from the environment and ``app.conf.orchestrator_push_*``
    (the environment wins); raises :class:`~orchestrator_push.ConfigError` here,
    at start-up, when a value is invalid.
    """
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    runtime.configure(
        fallback=_app_settings(app), fallback_source="app.conf.orchestrator_push_{name}"
    )
    with _lock:
        _apps[id(app)] = app
        for signal, handler in _HANDLERS:
            signal.connect(
                handler, weak=False, dispatch_uid=f"orchestrator_push.{handler.__name__}"
            )


def uninstrument(app: Celery | None = None) -> None:
    """Stop reporting for ``app`` (default: every app); symmetric to :func:`instrument`."""
    with _lock:
        if app is None:
            _apps.clear()
        else:
            _apps.pop(id(app), None)
        if not _apps:
            for signal, handler in _HANDLERS:
                signal.disconnect(handler, dispatch_uid=f"orchestrator_push.{handler.__name__}")


def _app_settings(app: Celery) -> dict[str, str]:
    """``app.conf.orchestrator_push_url = ...`` as ``ORCHESTRATOR_PUSH_URL``."""
    out: dict[str, str] = {}
    for key in list(app.conf.keys()):
        if isinstance(key, str) and key.lower().startswith("orchestrator_push_"):
            value = app.conf[key]
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[PREFIX + key[len("orchestrator_push_") :].upper()] = str(value)
    return out


def _instrumented(task: Any) -> bool:
    app = getattr(task, "app", None)
    return app is not None and id(app) in _apps


def _flow(task: Any) -> str:
    return str(getattr(task.app, "main", None) or "celery")


def _record_of(task: Any, status: str, duration: float, request: Any) -> TaskRecord:
    """``attempt`` is ``request.retries + 1``; the record ends now."""
    task_id = getattr(request, "id", None)
    return TaskRecord(  # positional: this runs for every task
        FRAMEWORK,
        _flow(task),
        str(task.name),
        status,
        time.time(),
        duration,
        int(getattr(request, "retries", 0) or 0) + 1,
        None,
        str(task_id) if task_id is not None else None,
    )


def _emit(rec: TaskRecord, node: str | None, once: str | None = None) -> None:
    """Hand the record to whoever pushes for this process: the parent, or us.

    ``once``: a task id whose failure may be reported from two places (the
    child's ``task_postrun`` without a state, the parent's ``task_failure``
    after a hard time limit); only the first report counts.
    """
    instance = node or _node or socket.gethostname()
    cumulative = _counters.get(instance)
    if cumulative is None:
        cumulative = _counters[instance] = (("instance", instance),)
    relay = _relay
    if relay is not None and relay.in_child():
        relay.send((rec, cumulative, once))
    else:
        _record(rec, cumulative, once)


def _record(rec: TaskRecord, cumulative: tuple[tuple[str, str], ...], once: str | None) -> None:
    if once is not None:
        with _lock:
            if once in _reported_failures:
                return
            _reported_failures[once] = None
            if len(_reported_failures) > 10_000:
                _reported_failures.popitem(last=False)
    runtime.record_task(rec, cumulative=cumulative)


def _relay_lost(reason: Loss, n: int) -> None:
    engine = runtime.get_engine()
    if engine is not None:
        engine.ledger.lose(reason, n)


def _record_relayed(item: object) -> None:
    rec, cumulative, once = cast("tuple[TaskRecord, tuple[tuple[str, str], ...], str | None]", item)
    _record(rec, cumulative, once)


# -- signal handlers: each is a few dict operations; none may raise ------------------


@never_raises
def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool forks: open the relay for prefork children."""
    global _relay, _node
    _node = getattr(sender, "hostname", None) or _node
    if _relay is None and _is_prefork(getattr(sender, "pool_cls", None)):
        _relay = Relay(_record_relayed, on_lost=_relay_lost)
        atexit.register(_parent_exit)


def _is_prefork(pool_cls: Any) -> bool:
    if pool_cls is None:
        return False
    if isinstance(pool_cls, str):
        return pool_cls.split(":")[0] in ("prefork", "processes", "celery.concurrency.prefork")
    return str(getattr(pool_cls, "__module__", "")).endswith("concurrency.prefork")


@never_raises
def on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is not None and _instrumented(task):
        _starts[task_id] = time.monotonic()


@never_raises
def on_task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    if task_id is None or not _instrumented(task):
        return
    started = _starts.pop(task_id, None)
    duration = time.monotonic() - started if started is not None else 0.0
    request = getattr(task, "request", None)
    rec = _record_of(task, _STATUS.get(state or "", FAILED), duration, request)
    # No state: an internal error, or the child being terminated after a hard
    # time limit, which the main process reports too.
    _emit(rec, getattr(request, "hostname", None), once=task_id if state is None else None)


@never_raises
def on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    """Failures the child could not report: hard time limit, lost worker process.

    They are signalled in the prefork main process (twice for a hard time limit).
    Every other failure is reported by ``task_postrun`` where the task ran.
    """
    relay = _relay
    if relay is None or os.getpid() != relay.owner or task_id is None:
        return
    if not _instrumented(sender) or type(exception).__name__ not in (
        "TimeLimitExceeded",
        "WorkerLostError",
    ):
        return
    limit = getattr(sender, "time_limit", None) or sender.app.conf.task_time_limit
    is_timeout = type(exception).__name__ == "TimeLimitExceeded"
    duration = float(limit) if is_timeout and limit else 0.0
    rec = _record_of(sender, FAILED, duration, getattr(sender, "request", None))
    _emit(rec, _node, once=task_id)


@never_raises
def on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Sent in the main process for a task revoked before or while it ran."""
    if sender is None or not _instrumented(sender):
        return
    rec = _record_of(sender, REVOKED, 0.0, request)
    _emit(rec, getattr(request, "hostname", None) or _node)


@never_raises
def on_worker_process_shutdown(**_: Any) -> None:
    """A pool child is leaving (recycling, shutdown, after a hard time limit):
    hand over what is left; the child then exits with ``os._exit``."""
    relay = _relay
    if relay is not None and relay.in_child():
        engine = runtime.get_engine()
        relay.drain(engine.config.flush_timeout if engine is not None else 1.0)
    else:
        runtime.flush()


@never_raises
def on_worker_shutdown(**_: Any) -> None:
    _parent_exit()


def _parent_exit() -> None:
    """Warm shutdown, then atexit: the second call returns at once."""
    engine = runtime.get_engine()
    relay = _relay
    if engine is not None and relay is not None and os.getpid() == relay.owner:
        relay.sync(engine.config.flush_timeout)
    runtime.flush_at_exit()


_HANDLERS: tuple[tuple[Any, Callable[..., None]], ...] = (
    (signals.worker_init, on_worker_init),
    (signals.task_prerun, on_task_prerun),
    (signals.task_postrun, on_task_postrun),
    (signals.task_failure, on_task_failure),
    (signals.task_revoked, on_task_revoked),
    (signals.worker_process_shutdown, on_worker_process_shutdown),
    (signals.worker_shutdown, on_worker_shutdown),
)

__all__ = ["ConfigError", "instrument", "uninstrument"]
