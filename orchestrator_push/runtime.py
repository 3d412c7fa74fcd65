"""The process-wide engine that adapters and users share.

Adapters call :func:`configure` when they are switched on (start-up: a bad
setting raises :class:`~orchestrator_push.config.ConfigError` there) and then
only :func:`record_task` / :func:`record_flow`, which never raise.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping

from .config import Config, load_config
from .engine import Engine
from .logs import ERROR, warn_limited
from .records import FlowRecord, TaskRecord

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
_engine: Engine | None = None
_invalid = False  # the settings get_engine() found were invalid


def configure(
    config: Config | None = None,
    *,
    fallback: Mapping[str, str] | None = None,
    fallback_source: str | None = None,
    **overrides: object,
) -> Engine:
    """Set up the process-wide engine and return it.

    With no arguments the configuration comes from ``ORCHESTRATOR_PUSH_*``
    environment variables; ``fallback`` adds a framework's own settings under the
    same names (``fallback_source`` says where, for error messages); keyword
    arguments are settings in code, parsed like the variables. Calling it
    again with the same configuration keeps the running engine; with a different
    one, the old engine is flushed and replaced.

    >>> import orchestrator_push
    >>> orchestrator_push.configure(url="http://127.0.0.1:9091", job="nightly")  # doctest: +SKIP
    """
    global _engine, _invalid
    new = (
        config
        if config is not None
        else load_config(None, fallback=fallback, fallback_source=fallback_source, **overrides)
    )
    with _lock:
        old = _engine
        if old is not None and old.config == new:
            return old
        _engine = Engine(new)
        _invalid = False
    if old is not None:
        old.close()
    return _engine


def get_engine(
    fallback: Callable[[], Mapping[str, str]] | None = None, fallback_source: str | None = None
) -> Engine | None:
    """The process-wide engine, configured on first use from the environment
    (and ``fallback()``, a framework's own settings, read only then).

    Returns None (and logs once) when the settings are invalid: a recording call
    must not raise in a task. The failure is remembered, so later calls cost
    nothing until :func:`configure` succeeds; call it at start-up to see the
    error instead.
    """
    global _invalid
    engine = _engine
    if engine is not None or _invalid:
        return engine
    try:
        return configure(
            fallback=fallback() if fallback is not None else None,
            fallback_source=fallback_source,
        )
    except Exception as exc:
        _invalid = True
        warn_limited(
            "config",
            "orchestrator_push: disabled, invalid configuration: %s",
            exc,
            level=ERROR,
        )
        return None


def record_task(
    rec: TaskRecord, *, cumulative: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None
) -> None:
    """Record a finished task attempt; it is pushed in the background."""
    engine = get_engine()
    if engine is not None:
        engine.record_task(rec, cumulative=cumulative)


def count(rec: TaskRecord | FlowRecord) -> None:
    """Count a finished attempt or flow run in the host's store: see
    :meth:`Engine.count`."""
    engine = get_engine()
    if engine is not None:
        engine.count(rec)


def record_flow(rec: FlowRecord) -> None:
    """Record a finished flow run; it is pushed in the background."""
    engine = get_engine()
    if engine is not None:
        engine.record_flow(rec)


def flush(timeout: float | None = None) -> bool:
    """Deliver everything recorded so far in this process, waiting at most
    ``timeout`` seconds (default ``ORCHESTRATOR_PUSH_FLUSH_TIMEOUT``).

    True when all of it reached the gateway or the local spool (from which
    the next process that reaches the gateway delivers it) and nothing was
    given up on since the previous flush. Never raises.

    >>> import orchestrator_push
    >>> orchestrator_push.flush(2.0)  # doctest: +SKIP
    True
    """
    engine = _engine
    return True if engine is None else engine.flush(timeout)


def flush_at_exit() -> bool:
    """The process is about to exit: see :meth:`Engine.flush_at_exit`."""
    engine = _engine
    return True if engine is None else engine.flush_at_exit()


def reset() -> None:
    """Close and forget the process-wide engine (tests, re-configuration)."""
    global _engine, _invalid
    with _lock:
        old, _engine, _invalid = _engine, None, False
    if old is not None:
        old.close(0.0)
