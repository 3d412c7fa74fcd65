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
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

from celery import Celery, signals

from . import celery_request, runtime
from .config import PREFIX, ConfigError
from .ledger import Loss
from .logs import WARNING, emit, never_raises
from .records import FAILED, RETRY, REVOKED, SUCCESS, TaskRecord
from .relay import Relay

FRAMEWORK = "celery"
ROLE = "celery-worker"
#: The message header an instrumented publisher stamps with the unix time it
#: published, for the worker's queue wait.
PUBLISHED = "orchestrator_push_published"

#: Celery state (``task_postrun``'s ``state``) -> our status. ``None`` comes
#: after an internal error; IGNORED means the task chose not to record a state
#: but ran to the end. REJECTED with ``requeue=True`` is a retry (see
#: ``_status``).
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
#: task id -> (monotonic start, queue wait, the request): the request is read once
#: per attempt (``task.request`` costs as much as the rest of a handler)
_starts: dict[str, tuple[float, float | None, Any]] = {}
_STARTS_MAX = 100_000  # attempts in progress in one process (gevent: its concurrency)
_relay: Relay | None = None
_node: str | None = None  # this process's node (a pool process: its parent's)
_nodes: dict[str, None] = {}  # nodes whose main process is this one
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
        if not celery_request.patch(_request_ended, _request_started):
            emit(
                WARNING,
                "orchestrator_push: this Celery's worker Request lacks the methods it "
                "wraps (checked: %s); hard time limits and lost pool processes are not "
                "reported",
                ", ".join(celery_request.CHECKED),
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
            celery_request.unpatch()


def _app_settings(app: Celery) -> dict[str, str]:
    """``app.conf.orchestrator_push_url = ...`` as ``ORCHESTRATOR_PUSH_URL``."""
    out: dict[str, str] = {}
    for key in list(app.conf.keys()):
        if isinstance(key, str) and key.lower().startswith("orchestrator_push_"):
            value = app.conf[key]
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, (list, tuple)):  # several URLs, bucket bounds
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[PREFIX + key[len("orchestrator_push_") :].upper()] = str(value)
    return out


def _instrumented(task: Any) -> bool:
    app = getattr(task, "app", None)
    return app is not None and id(app) in _apps


def _flow(task: Any) -> str:
    return str(getattr(task.app, "main", None) or "celery")


def _record_of(
    task: Any, status: str, duration: float, request: Any, queued: float | None = None
) -> TaskRecord:
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
        queued,
    )


def _counters_of(instance: str) -> tuple[tuple[str, str], ...]:
    cumulative = _counters.get(instance)
    if cumulative is None:
        cumulative = _counters[instance] = (("instance", instance),)
    return cumulative


def _emit(rec: TaskRecord) -> None:
    """Hand the record of a task that ran here to whoever pushes for this
    process's node: the parent (a prefork pool process), or us."""
    relay = _relay
    if relay is not None and relay.in_child():
        relay.send((rec, _counters_of(_node or socket.gethostname())))
    else:
        node = celery_request.current_node() or _node or socket.gethostname()
        runtime.record_task(rec, cumulative=_counters_of(node))


def _relay_lost(reason: Loss, n: int) -> None:
    engine = runtime.get_engine()
    if engine is not None:
        engine.ledger.lose(reason, n)


def _record_relayed(item: object) -> None:
    rec, cumulative = cast("tuple[TaskRecord, tuple[tuple[str, str], ...]]", item)
    runtime.record_task(rec, cumulative=cumulative)


@never_raises
def _request_ended(request: Any, status: str, duration: float) -> None:
    """An end the worker's main process decided (celery_request.py)."""
    task = request.task
    if not _instrumented(task):
        return
    rec = _record_of(task, status, duration, _Retries(request))
    node = str(request.hostname)
    runtime.record_task(rec, cumulative=_counters_of(node))


@never_raises
def _request_started(request: Any) -> None:
    """A pool process accepted the request: its start, seen while it runs."""
    task = request.task
    if not _instrumented(task):
        return
    engine = runtime.get_engine()
    if engine is None:
        return
    hard = request.time_limits[0] or task.time_limit or task.app.conf.task_time_limit
    engine.record_start(
        FRAMEWORK,
        _flow(task),
        str(task.name),
        at=request.time_start or time.time(),
        timeout=float(hard) if hard else None,
    )


class _Retries:
    """A main-process request's id and retries, read like a task's request."""

    __slots__ = ("id", "retries")

    def __init__(self, request: Any) -> None:
        self.id = request.id
        self.retries = request.request_dict.get("retries", 0)


def _running(node: str) -> dict[tuple[str, str], tuple[int, float]]:
    """The node's attempts in progress, from the worker's own record of them."""
    from celery.worker import state

    out: dict[tuple[str, str], tuple[int, float]] = {}
    for req in list(state.active_requests):
        start = req.time_start
        if not start or req.hostname != node or not _instrumented(req.task):
            continue
        key = (_flow(req.task), str(req.task.name))
        n, oldest = out.get(key, (0, start))
        out[key] = (n + 1, min(oldest, start))
    return out


def _queued(request: Any, now: float) -> float | None:
    """Time from publish (or from the due time of an ETA/countdown) to now,
    when the publisher stamped it."""
    values = getattr(request, "__dict__", None)
    if not values:
        return None
    published = values.get(PUBLISHED)
    if published is None:
        return None
    ready = float(published)
    eta = values.get("eta")
    if eta:
        due = datetime.fromisoformat(str(eta))
        if due.tzinfo is None:
            due = due.replace(tzinfo=timezone.utc)
        ready = max(ready, due.timestamp())
    return max(now - ready, 0.0)


# -- signal handlers: each is a few dict operations; none may raise ------------------


@never_raises
def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool forks: open the relay for prefork
    children, and say the node is up."""
    global _relay, _node
    hostname = getattr(sender, "hostname", None)
    _node = hostname or _node
    if _relay is None and _is_prefork(getattr(sender, "pool_cls", None)):
        _relay = Relay(_record_relayed, on_lost=_relay_lost)
    if hostname:
        _nodes[hostname] = None
        engine = runtime.get_engine()
        if engine is not None:
            engine.register_node(
                _counters_of(hostname), FRAMEWORK, ROLE, running=lambda: _running(hostname)
            )
    atexit.unregister(_at_exit)  # once, however many nodes start in this process
    atexit.register(_at_exit)


@never_raises
def on_worker_process_init(sender: Any = None, **_: Any) -> None:
    """A new pool process: its node is the parent's (``sender`` is its name)."""
    global _node
    if isinstance(sender, str) and sender:
        _node = sender
    celery_request.forget_node()


def _is_prefork(pool_cls: Any) -> bool:
    if pool_cls is None:
        return False
    if isinstance(pool_cls, str):
        return pool_cls.split(":")[0] in ("prefork", "processes", "celery.concurrency.prefork")
    return str(getattr(pool_cls, "__module__", "")).endswith("concurrency.prefork")


@never_raises
def on_before_task_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """An instrumented publisher stamps the time, for the worker's queue wait."""
    if headers is not None and _apps:
        headers[PUBLISHED] = time.time()


@never_raises
def on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is not None and _instrumented(task):
        if len(_starts) >= _STARTS_MAX:  # postruns that never came (not seen): bounded
            _starts.clear()
        request = task.request
        _starts[task_id] = (time.monotonic(), _queued(request, time.time()), request)


@never_raises
def on_task_postrun(
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    if task_id is None or not _instrumented(task):
        return
    started = _starts.pop(task_id, None)
    if state is None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, Exception):
            # SystemExit & co: the attempt was ended from outside (a terminate,
            # a hard time limit, a shutdown); the main process reports it.
            return
    if started is not None:
        duration, queued, request = time.monotonic() - started[0], started[1], started[2]
    else:
        duration, queued, request = 0.0, None, getattr(task, "request", None)
    _emit(_record_of(task, _status(state, retval), duration, request, queued))


def _status(state: str | None, retval: Any) -> str:
    if state == "REJECTED" and getattr(retval, "requeue", False):
        return RETRY  # Reject(requeue=True): the message runs again
    return _STATUS.get(state or "", FAILED)


@never_raises
def on_task_failure(**_: Any) -> None:
    celery_request.saw(FAILED)


@never_raises
def on_task_retry(**_: Any) -> None:
    celery_request.saw(RETRY)


@never_raises
def on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Sent in the main process for a task revoked before or while it ran."""
    if sender is None or not _instrumented(sender):
        return
    rec = _record_of(sender, REVOKED, 0.0, request)
    node = getattr(request, "hostname", None) or _node or socket.gethostname()
    runtime.record_task(rec, cumulative=_counters_of(node))


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
def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None)
    _node_down([hostname] if hostname in _nodes else [])
    _parent_exit()


def _node_down(nodes: list[str]) -> None:
    engine = runtime.get_engine()
    for node in nodes:
        _nodes.pop(node, None)
        if engine is not None:
            engine.node_down(_counters_of(node), FRAMEWORK)


def _parent_exit() -> None:
    """Warm shutdown, then atexit: the second call returns at once."""
    relay = _relay
    if relay is not None and relay.in_child():
        return
    engine = runtime.get_engine()
    if engine is not None and relay is not None:
        relay.sync(engine.config.flush_timeout)
    runtime.flush_at_exit()


@never_raises
def on_beat_init(sender: Any = None, **_: Any) -> None:
    """Celery beat starts: push when each periodic entry is next due."""
    app = getattr(sender, "app", None)
    if app is None or id(app) not in _apps:
        return
    engine = runtime.get_engine()
    if engine is None:
        return
    from . import celery_beat

    flow = str(getattr(app, "main", None) or "celery")
    if not celery_beat.watch(sender.scheduler, engine, flow):
        emit(
            WARNING,
            "orchestrator_push: beat's scheduler %s has no tick() and schedule to read; "
            "its entries' next runs are not pushed",
            type(sender.scheduler).__name__,
        )


def _at_exit() -> None:
    """Also after a cold shutdown (no ``worker_shutdown``): every node of this
    process is going."""
    relay = _relay
    if relay is None or not relay.in_child():
        _node_down(list(_nodes))
    _parent_exit()


_HANDLERS: tuple[tuple[Any, Callable[..., None]], ...] = (
    (signals.worker_init, on_worker_init),
    (signals.worker_process_init, on_worker_process_init),
    (signals.before_task_publish, on_before_task_publish),
    (signals.task_prerun, on_task_prerun),
    (signals.task_postrun, on_task_postrun),
    (signals.task_failure, on_task_failure),
    (signals.task_retry, on_task_retry),
    (signals.task_revoked, on_task_revoked),
    (signals.worker_process_shutdown, on_worker_process_shutdown),
    (signals.worker_shutdown, on_worker_shutdown),
    (signals.beat_init, on_beat_init),
)

__all__ = ["ConfigError", "instrument", "uninstrument"]
