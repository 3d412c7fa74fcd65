"""Prefect 3: every flow run and task run, from the engines' state-hook step.

>>> from orchestrator_push.prefect import instrument
>>> instrument()  # doctest: +SKIP

Prefect has no global hook setting, and hook lists live on each flow and task
object, so hooks added to objects would miss flows defined before the call and
copies made with ``with_options``. Instead ``instrument()`` wraps the engines'
``call_hooks`` step, which every run passes through for each state it enters:
after the user's own hooks ran (in their order, untouched), the run's outcome is
recorded. Recording is in memory; the core pushes in the background and at
process exit.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import prefect_runner, runtime
from .logs import warn_limited
from .records import CANCELLED, CRASHED, FAILED, RETRY, SUCCESS, FlowRecord, TaskRecord

FRAMEWORK = "prefect"
#: ``flow`` label of a task run outside any flow.
NO_FLOW = "none"

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
_originals: dict[tuple[type, str], Callable[..., Any]] = {}


def instrument() -> None:
    """Report every flow run and task run that starts after this call. Idempotent.

    Raises :class:`~orchestrator_push.ConfigError` here when a setting is invalid.
    """
    runtime.configure()
    from prefect import flow_engine, task_engine

    with _lock:
        for cls, kind in (
            (flow_engine.FlowRunEngine, "flow"),
            (flow_engine.AsyncFlowRunEngine, "flow"),
            (task_engine.SyncTaskRunEngine, "task"),
            (task_engine.AsyncTaskRunEngine, "task"),
        ):
            if (cls, "call_hooks") not in _originals:
                original = cls.call_hooks
                _originals[(cls, "call_hooks")] = original
                setattr(cls, "call_hooks", _wrap(original, kind))  # noqa: B010
        prefect_runner.patch()


def uninstrument() -> None:
    """Undo :func:`instrument`; runs that start afterwards are not reported."""
    with _lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()
        prefect_runner.unpatch()


def _wrap(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
    record = _record_flow if kind == "flow" else _record_task
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def acall_hooks(self: Any, state: Any = None) -> None:
            try:
                await original(self, state)
            finally:
                _safely(record, self, state)

        return acall_hooks

    @functools.wraps(original)
    def call_hooks(self: Any, state: Any = None) -> None:
        try:
            original(self, state)
        finally:
            _safely(record, self, state)

    return call_hooks


def _safely(record: Callable[[Any, Any], None], engine: Any, state: Any) -> None:
    try:
        record(engine, state if state is not None else engine.state)
    except Exception:
        warn_limited("prefect-record", "orchestrator_push: could not record a Prefect run")


def _status(state: Any) -> str | None:
    """Prefect state -> our status; None for states that are not an outcome."""
    if state.is_completed():  # includes Cached
        return SUCCESS
    if state.is_crashed():
        return CRASHED
    if state.is_cancelled():
        return CANCELLED
    if state.is_failed():
        return FAILED
    if state.name == "Retrying" or state.name == "AwaitingRetry":
        return RETRY
    return None


def _seconds(delta: Any) -> float:
    return float(delta.total_seconds()) if delta is not None else 0.0


def _started(state: Any, run: Any, flow: str, task: str | None, timeout: Any) -> None:
    """A run entered Running: its start, seen at the gateway while it runs, and
    how long after its expected start time (a task: its queue wait; a flow run
    of a deployment: its lateness)."""
    engine = runtime.get_engine()
    if engine is None:
        return
    at = state.timestamp.timestamp() if state.timestamp else time.time()
    limit = float(timeout) if timeout else None
    expected = getattr(run, "expected_start_time", None)
    waited = max(at - expected.timestamp(), 0.0) if expected is not None else None
    engine.record_start(FRAMEWORK, flow, task, at=at, timeout=limit, waited=waited)


def _record_task(engine: Any, state: Any) -> None:
    if state.is_running():
        _started(
            state,
            engine.task_run,
            _current_flow_name(),
            str(engine.task.name),
            engine.task.timeout_seconds,
        )
        return
    status = _status(state)
    if status is None:
        return
    run = engine.task_run
    end = state.timestamp.timestamp() if state.timestamp else time.time()
    if run.total_run_time and status != RETRY:
        duration = _seconds(run.total_run_time)
    elif run.start_time is not None and state.timestamp is not None:
        duration = _seconds(state.timestamp - run.start_time)
    else:
        duration = 0.0
    runtime.record_task(
        TaskRecord(
            framework=FRAMEWORK,
            flow=_current_flow_name(),
            task=str(engine.task.name),
            status=status,
            end_time=end,
            duration=max(duration, 0.0),
            attempt=max(int(run.run_count or 1), 1),
        )
    )


def _current_flow_name() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow = getattr(ctx, "flow", None)
    return str(flow.name) if flow is not None else NO_FLOW


def _record_flow(engine: Any, state: Any) -> None:
    if state.is_running():
        _started(state, engine.flow_run, str(engine.flow.name), None, engine.flow.timeout_seconds)
        return
    status = _status(state)
    if status is None or status == RETRY:
        return
    run = engine.flow_run
    end = state.timestamp.timestamp() if state.timestamp else time.time()
    # In the hook the run's end time is not set yet and total_run_time is 0.
    duration = (
        _seconds(state.timestamp - run.start_time)
        if run.start_time is not None and state.timestamp is not None
        else 0.0
    )
    runtime.record_flow(
        FlowRecord(
            framework=FRAMEWORK,
            flow=str(engine.flow.name),
            status=status,
            end_time=end,
            duration=max(duration, 0.0),
        )
    )
    if status in (CRASHED, CANCELLED):
        # Prefect re-kills a process it stopped with SIGTERM once the state is
        # set: no exit hook would run.
        runtime.flush()
