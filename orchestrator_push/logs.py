"""Rate-limited warnings: a gateway that is down must not flood a worker's log.

Every line goes to the ``orchestrator_push`` logger, through :func:`emit`.
:mod:`logging` is imported at the first line (or before our threads start,
preimport.py), not with this module: an ``exec`` that has nothing to say
spares its start-up the import (about 4 ms).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

if TYPE_CHECKING:
    from logging import Logger

P = ParamSpec("P")

NAME = "orchestrator_push"
#: logging's levels, its documented values, without importing it
INFO, WARNING, ERROR = 20, 30, 40

_logger: Logger | None = None
_setups: list[Callable[[Logger], None]] = []

_WINDOW = 60.0
_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
_last: dict[str, tuple[float, int]] = {}  # key -> (last time logged, suppressed since)

# Our threads log (a gateway that is down) while the framework forks (Celery's
# pool). A fork in the middle of a write would leave the child a stream whose
# internal lock is held by a thread it does not have, and its next log line
# would hang. So a fork waits (at most a second) for a log call of ours to end.
_writing = threading.RLock()
_held_for_fork = False


def _before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _writing.acquire(timeout=1.0)


def _after_fork_in_parent() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _writing.release()


def _after_fork_in_child() -> None:
    global _writing, _held_for_fork
    _writing, _held_for_fork = threading.RLock(), False


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


def logger() -> Logger:
    """The ``orchestrator_push`` logger, with :func:`on_first_line`'s setups applied."""
    global _logger
    with _writing:
        if _logger is None:
            import logging

            log = logging.getLogger(NAME)
            for setup in _setups:
                setup(log)
            _logger = log
        return _logger


def on_first_line(setup: Callable[[Logger], None]) -> None:
    """Set the logger up (``setup(logger)``) when it is first used, or now if it has been."""
    with _writing:
        if _logger is None:
            _setups.append(setup)
        else:
            setup(_logger)


def emit(level: int, msg: str, *args: object) -> None:
    """Log one line of ours; a fork does not start in the middle of it."""
    with _writing:
        try:
            log = logger()
        except Exception:  # no import at interpreter shutdown: the line is lost, not raised
            return
        log.log(level, msg, *args)


def warn_limited(key: str, msg: str, *args: object, level: int = WARNING) -> None:
    """Log at most once per minute per ``key``, saying how many were held back."""
    now = time.monotonic()
    with _lock:
        last, suppressed = _last.get(key, (-_WINDOW, 0))
        if now - last < _WINDOW:
            _last[key] = (last, suppressed + 1)
            return
        _last[key] = (now, 0)
    if suppressed:
        msg += " (%d similar messages suppressed)"
        args = (*args, suppressed)
    emit(level, msg, *args)


def never_raises(fn: Callable[P, None]) -> Callable[P, None]:
    """For framework hooks: an error of ours is logged (rate-limited), never
    raised into the framework, so it cannot change a task's outcome."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            warn_limited(
                f"hook-{fn.__name__}",
                "orchestrator_push: %s failed",
                fn.__name__,
                level=ERROR,
            )

    return wrapper


def reset() -> None:
    """Forget what was logged (tests; a forked child starts afresh)."""
    with _lock:
        _last.clear()
