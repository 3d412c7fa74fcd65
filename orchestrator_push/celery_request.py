"""What a Celery worker's main process sees of each task request.

Some attempts end where no pool process can report them: a hard time limit, a
pool process that died (SIGKILL, an OOM kill), a message requeued or retried
after that. Celery decides those in the main process, in methods of
``celery.worker.request.Request``, and sends no signal for some of them (a
message requeued by ``reject_on_worker_lost``). So :func:`patch` wraps three
of those methods, as the opentelemetry instrumentors do: the original always
runs first and unchanged, our part never raises, :func:`unpatch` restores them.

``on_accepted`` also says which worker node a request belongs to: a task that
runs in the main process (solo, threads, gevent, eventlet) runs on the thread
that accepted it, and the node's name on the request is the only reliable one
(embedded workers give tasks the machine's name).

The wrappers report an end through ``on_end(request, status, duration)``,
at most once per attempt (Celery reports a hard time limit twice).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .logs import never_raises
from .records import FAILED, RETRY

#: Celery versions whose ``Request`` methods these wrappers were checked against.
CHECKED = ("5.4", "5.5", "5.6", "5.7")

_METHODS = ("on_accepted", "on_timeout", "on_failure")
_originals: dict[str, Callable[..., Any]] = {}
_on_end: Callable[[Any, str, float], None] | None = None
_on_start: Callable[[Any], None] | None = None
_lock = threading.Lock()
_ended: OrderedDict[tuple[str, float], None] = OrderedDict()  # (task id, start) of reported ends
_here = threading.local()  # .node: the node of the request this thread runs; .seen: see _lost


def patch(on_end: Callable[[Any, str, float], None], on_start: Callable[[Any], None]) -> bool:
    """Wrap the methods (idempotent). False when this Celery's ``Request`` does
    not have them (nothing is changed then). ``on_start(request)`` is called
    once a pool process accepted the request (its ``time_start`` is set)."""
    global _on_end, _on_start
    from celery.worker import request as module

    cls = module.Request
    if not all(callable(getattr(cls, name, None)) for name in _METHODS):
        return False
    _on_end, _on_start = on_end, on_start
    if _originals:
        return True
    wrappers = {"on_accepted": _accepted, "on_timeout": _timeout, "on_failure": _failure}
    for name in _METHODS:
        original = getattr(cls, name)
        _originals[name] = original
        setattr(cls, name, wrappers[name](original))
    return True


def unpatch() -> None:
    global _on_end, _on_start
    from celery.worker import request as module

    for name, original in _originals.items():
        setattr(module.Request, name, original)
    _originals.clear()
    _on_end = _on_start = None


def current_node() -> str | None:
    """The node of the request this thread (or green thread) runs, if it was
    accepted in this process."""
    return getattr(_here, "node", None)


def forget_node() -> None:
    """In a new pool process: the thread it forked from accepted for the parent."""
    _here.node = None


def saw(what: str) -> None:
    """Celery sent ``task_failure`` (FAILED) or ``task_retry`` (RETRY): noted
    when it comes from inside a wrapped ``on_failure``."""
    seen = getattr(_here, "seen", None)
    if seen is not None:
        seen.append(what)


def _accepted(original: Callable[..., Any]) -> Callable[..., Any]:
    def on_accepted(self: Any, pid: Any, time_accepted: float) -> Any:
        _here.node = _hostname(self)
        try:
            return original(self, pid, time_accepted)
        finally:
            on_start = _on_start
            if on_start is not None:
                on_start(self)

    return on_accepted


def _timeout(original: Callable[..., Any]) -> Callable[..., Any]:
    def on_timeout(self: Any, soft: bool, timeout: float) -> Any:
        try:
            return original(self, soft, timeout)
        finally:
            if not soft:
                _end(self, FAILED, float(timeout or 0.0))

    return on_timeout


def _failure(original: Callable[..., Any]) -> Callable[..., Any]:
    def on_failure(self: Any, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        exc = _lost_exception(self, exc_info)
        if exc is None:  # reported where the task ran, or revoked (task_revoked)
            return original(self, exc_info, *args, **kwargs)
        seen: list[str] = []
        _here.seen = seen
        try:
            return original(self, exc_info, *args, **kwargs)
        finally:
            _here.seen = None
            _lost(self, exc, seen)

    return on_failure


@never_raises
def _lost(request: Any, exc: BaseException, seen: list[str]) -> None:
    """What Celery made of an attempt whose pool process is gone."""
    timed_out = type(exc).__name__ == "TimeLimitExceeded"
    if RETRY in seen:  # retry_on_worker_lost
        status = RETRY
    elif FAILED in seen or timed_out:
        status = FAILED
    elif request.task.acks_late and request.task.reject_on_worker_lost:
        status = RETRY  # requeued: it runs again, like a retry
    else:
        return  # Celery found its success stored: the pool process reported it
    if timed_out:
        duration = float(exc.args[0]) if exc.args else 0.0
    else:
        start = request.time_start
        duration = max(time.time() - start, 0.0) if start else 0.0
    _end(request, status, duration)


def _lost_exception(request: Any, exc_info: Any) -> BaseException | None:
    """The exception of an attempt that ended with its pool process (or a hard
    time limit), or None for every other end."""
    try:
        exc = getattr(exc_info, "exception", None)
        if type(exc).__name__ == "ExceptionWithTraceback":
            exc = exc.exc  # type: ignore[union-attr]
        name = type(exc).__name__
        if name not in ("WorkerLostError", "TimeLimitExceeded") and not isinstance(
            exc, (SystemExit, KeyboardInterrupt)
        ):
            return None
        if _revoked(request):
            return None
        return exc
    except Exception:
        return None


def _revoked(request: Any) -> bool:
    from celery.worker import state

    return bool(
        getattr(request, "_already_revoked", False)
        or getattr(request, "_already_cancelled", False)
        or request.id in state.revoked
    )


@never_raises
def _end(request: Any, status: str, duration: float) -> None:
    key = (str(request.id), float(request.time_start or 0.0))
    with _lock:
        if key in _ended:
            return
        _ended[key] = None
        if len(_ended) > 10_000:
            _ended.popitem(last=False)
    on_end = _on_end
    if on_end is not None:
        on_end(request, status, duration)


def _hostname(request: Any) -> str | None:
    try:
        return str(request.hostname)
    except Exception:
        return None
