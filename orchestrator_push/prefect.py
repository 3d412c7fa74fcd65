"""Prefect 3: every flow run and task run, from the engines' state step.

>>> from orchestrator_push.prefect import instrument
>>> instrument()  # doctest: +SKIP

Prefect has no global hook setting, and hook lists live on each flow and task
object, so hooks added to objects would miss flows defined before the call and
copies made with ``with_options``. Instead ``instrument()`` wraps the engines'
``set_state`` step, through which every state a run enters passes, with the
state it left: the original runs first and unchanged, then the transition is
recorded in memory (the user's hooks run afterwards, as Prefect calls them).
The core pushes in the background and at process exit.

Each record is one attempt: a retry is recorded when the attempt fails (a
Running state left for ``Retrying`` or ``AwaitingRetry``) with that attempt's
number, duration and end; a final state with its own attempt's duration.

States a worker or ``serve`` runner sets from outside the run's process are
recorded by :mod:`.prefect_runner`, in that process.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import prefect_runner, runtime
from .logs import emit, warn_limited
from .prefect_startup import PLUGIN
from .records import (
    CANCELLED,
    CRASHED,
    FAILED,
    RETRY,
    SUCCESS,
    UPSTREAM_FAILED,
    FlowRecord,
    TaskRecord,
)

FRAMEWORK = "prefect"
#: ``flow`` label of a task run outside any flow.
NO_FLOW = "none"
#: Prefect minor versions whose engines this adapter is tested against.
CHECKED = ("3.8", "3.9")
#: On an engine: when the attempt in progress started (its Running state's time).
_ATTEMPT_START = "_orchestrator_push_attempt_start"

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
_originals: dict[tuple[type, str], Callable[..., Any]] = {}


def instrument() -> None:
    """Report every flow run and task run that starts after this call, and
    (in a worker or ``serve`` runner) the states they set. Idempotent.

    Raises :class:`~orchestrator_push.ConfigError` here when a setting is invalid.
    """
    runtime.configure()
    import prefect
    from prefect import flow_engine, task_engine

    with _lock:
        if not _originals:
            _check_version(str(prefect.__version__))
        for cls, kind in (
            (flow_engine.FlowRunEngine, "flow"),
            (flow_engine.AsyncFlowRunEngine, "flow"),
            (task_engine.SyncTaskRunEngine, "task"),
            (task_engine.AsyncTaskRunEngine, "task"),
        ):
            for name, make in (("set_state", _wrap), ("call_hooks", _wrap_hooks)):
                if (cls, name) not in _originals:
                    original = getattr(cls, name)
                    _originals[(cls, name)] = original
                    setattr(cls, name, make(original, kind))
        prefect_runner.patch()
    _instrument_children()


def instrumented() -> bool:
    """Whether :func:`instrument` is in effect in this process."""
    return bool(_originals)


def uninstrument() -> None:
    """Undo :func:`instrument`; runs that start afterwards are not reported."""
    with _lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()
        prefect_runner.unpatch()
    _uninstrument_children()


#: Prefect's plugin settings; a user who set any of them has chosen.
_PLUGIN_SETTINGS = (
    "PREFECT_PLUGINS_ENABLED",
    "PREFECT_PLUGINS_ALLOW",
    "PREFECT_EXPERIMENTS_PLUGINS_ENABLED",
    "PREFECT_EXPERIMENTS_PLUGINS_ALLOW",
)
_OUR_PLUGIN_SETTINGS = {"PREFECT_PLUGINS_ENABLED": "1", "PREFECT_PLUGINS_ALLOW": PLUGIN}
_set_plugin_settings = False  # by _instrument_children, in this process


def _instrument_children() -> None:
    """The processes Prefect starts for runs (``flow.serve()``'s run
    processes, a worker's flow-run processes) inherit the environment but never
    run the code that called ``instrument()``: let them load our plugin, and
    only ours, unless the user set Prefect's plugin settings."""
    global _set_plugin_settings
    if not any(name in os.environ for name in _PLUGIN_SETTINGS):
        os.environ.update(_OUR_PLUGIN_SETTINGS)
        _set_plugin_settings = True


def _uninstrument_children() -> None:
    """Remove what :func:`_instrument_children` set (not what the user set)."""
    global _set_plugin_settings
    if _set_plugin_settings:
        for name, value in _OUR_PLUGIN_SETTINGS.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        _set_plugin_settings = False


def _check_version(version: str) -> None:
    if ".".join(version.split(".")[:2]) not in CHECKED:
        emit(
            logging.WARNING,
            "orchestrator_push: Prefect %s is not a tested version (tested: %s); "
            "runs are reported if its engines still have the same shape",
            version,
            ", ".join(CHECKED),
        )


def _wrap(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
    record = _flow_transition if kind == "flow" else _task_transition
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def aset_state(self: Any, state: Any, force: bool = False) -> Any:
            left, count = _before(self)
            new = await original(self, state, force)
            _safely(record, self, left, new, count)
            return new

        return aset_state

    @functools.wraps(original)
    def set_state(self: Any, state: Any, force: bool = False) -> Any:
        left, count = _before(self)
        new = original(self, state, force)
        _safely(record, self, left, new, count)
        return new

    return set_state


def _wrap_hooks(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """After the user's hooks for a final state ran, the state the API holds:
    a hook may have set another one (say Failed from ``on_completion``)."""
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def acall_hooks(self: Any, state: Any = None) -> None:
            await original(self, state)
            ended = state if state is not None else self.state
            if _user_hooks(self, kind, ended):
                try:
                    now = await _read(self, kind)
                except Exception:
                    now = None
                _safely(_followed, self, ended, now)

        return acall_hooks

    @functools.wraps(original)
    def call_hooks(self: Any, state: Any = None) -> None:
        original(self, state)
        ended = state if state is not None else self.state
        if _user_hooks(self, kind, ended):
            try:
                now = _read(self, kind)
            except Exception:
                now = None
            _safely(_followed, self, ended, now)

    return call_hooks


def _user_hooks(engine: Any, kind: str, state: Any) -> bool:
    """The user has hooks for this final state (only then can one change it)."""
    try:
        owner = engine.flow if kind == "flow" else engine.task
        if state.is_completed():
            return bool(owner.on_completion_hooks)
        if state.is_failed():
            return bool(owner.on_failure_hooks)
        if state.is_crashed():
            return bool(getattr(owner, "on_crashed_hooks", None))
    except Exception:
        pass
    return False


def _read(engine: Any, kind: str) -> Any:
    """The run as the API has it (awaitable for an async engine's client)."""
    if kind == "flow":
        return engine.client.read_flow_run(engine.flow_run.id)
    return engine.client.read_task_run(engine.task_run.id)


def _followed(engine: Any, ended: Any, run: Any) -> None:
    """A hook set another final state than the one recorded: record that one."""
    if run is None:
        warn_limited("prefect-reread", "orchestrator_push: could not read a run's state")
        return
    now = run.state
    if now is None or not now.is_final() or now.type == ended.type:
        return
    status, end = _status(now), _ts(now)
    if status is None:
        return
    duration = _attempt_duration(engine, None, end)
    if hasattr(engine, "task_run"):
        _task(
            _current_flow_name(),
            str(engine.task.name),
            status,
            end,
            duration,
            max(int(engine.task_run.run_count or 1), 1),
        )
    else:
        _flow(str(engine.flow.name), status, end, duration)


def _before(engine: Any) -> tuple[Any, int]:
    try:
        run = engine.task_run if hasattr(engine, "task_run") else engine.flow_run
        return run.state, int(run.run_count or 0)
    except Exception:
        return None, 0


def _safely(record: Callable[..., None], engine: Any, *args: Any) -> None:
    """``record(engine, *args)``, never raising."""
    try:
        record(engine, *args)
    except Exception:
        warn_limited("prefect-record", "orchestrator_push: could not record a Prefect run")


def _status(state: Any) -> str | None:
    """A final Prefect state -> our status; None for states that are not an outcome."""
    if state.is_completed():  # includes Cached
        return SUCCESS
    if state.is_crashed():
        return CRASHED
    if state.is_cancelled():
        return CANCELLED
    if state.is_failed():
        return FAILED
    if state.name == "NotReady":  # an upstream task failed: it will not run
        return UPSTREAM_FAILED
    return None


def _is_retry(left: Any, new: Any) -> bool:
    return bool(
        left is not None and left.is_running() and new.name in ("Retrying", "AwaitingRetry")
    )


def _ts(state: Any) -> float:
    return state.timestamp.timestamp() if state.timestamp else time.time()


def _attempt_duration(engine: Any, left: Any, end: float) -> float:
    """From the start of the attempt that ends now (0 when none started)."""
    start = (
        left.timestamp.timestamp()
        if left is not None and left.is_running() and left.timestamp
        else getattr(engine, _ATTEMPT_START, None)
    )
    return max(end - start, 0.0) if start is not None else 0.0


def _started(at: float, run: Any, flow: str, task: str | None, timeout: Any) -> None:
    """A run entered Running at ``at``: its start, seen at the gateway while it
    runs, and how long after its expected start time (a task: its queue wait;
    a flow run of a deployment: its lateness)."""
    live = runtime.get_engine()
    if live is None:
        return
    limit = float(timeout) if timeout else None
    expected = getattr(run, "expected_start_time", None)
    waited = max(at - expected.timestamp(), 0.0) if expected is not None else None
    live.record_start(FRAMEWORK, flow, task, at=at, timeout=limit, waited=waited)


def _task_transition(engine: Any, left: Any, new: Any, count: int) -> None:
    run = engine.task_run
    flow, task = _current_flow_name(), str(engine.task.name)
    end = _ts(new)
    if _is_retry(left, new):
        _task(flow, task, RETRY, end, _attempt_duration(engine, left, end), max(count, 1))
    if new.is_running():
        setattr(engine, _ATTEMPT_START, end)
        _started(end, run, flow, task, engine.task.timeout_seconds)
        return
    status = _status(new)
    if status is None or (left is not None and left.id == new.id):
        return
    if status == UPSTREAM_FAILED:
        _task(flow, task, status, end, 0.0, 0)
        return
    _task(
        flow,
        task,
        status,
        end,
        _attempt_duration(engine, left, end),
        max(int(run.run_count or 1), 1),
    )


def _task(flow: str, task: str, status: str, end: float, duration: float, attempt: int) -> None:
    rec = TaskRecord(
        framework=FRAMEWORK,
        flow=flow,
        task=task,
        status=status,
        end_time=end,
        duration=duration,
        attempt=attempt,
    )
    runtime.record_task(rec)
    runtime.count(rec)  # one record per attempt: each counted once, on its host


def _current_flow_name() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow = getattr(ctx, "flow", None)
    return str(flow.name) if flow is not None else NO_FLOW


def _flow_transition(engine: Any, left: Any, new: Any, count: int) -> None:
    flow = str(engine.flow.name)
    end = _ts(new)
    if _is_retry(left, new):
        _flow(flow, RETRY, end, _attempt_duration(engine, left, end))
    if new.is_running():
        setattr(engine, _ATTEMPT_START, end)
        _started(end, engine.flow_run, flow, None, engine.flow.timeout_seconds)
        return
    status = _status(new)
    if status is None or status == UPSTREAM_FAILED or (left is not None and left.id == new.id):
        return
    _flow(flow, status, end, _attempt_duration(engine, left, end))
    if status in (CRASHED, CANCELLED):
        # Prefect re-kills a process it stopped with SIGTERM once the state is
        # set: no exit hook would run.
        runtime.flush()


def _flow(flow: str, status: str, end: float, duration: float) -> None:
    rec = FlowRecord(framework=FRAMEWORK, flow=flow, status=status, end_time=end, duration=duration)
    runtime.record_flow(rec)
    runtime.count(rec)


# Per-flow form: Prefect's own state-hook arguments, for users who instrument
# flow by flow. With instrument() active in the process they do nothing, so
# using both never counts a run twice.
_hook_starts: dict[Any, float] = {}  # run id -> its attempt's start, bounded


def on_flow_state(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow state hook recording what :func:`instrument` records for the flow:

    >>> from prefect import flow
    >>> from orchestrator_push.prefect import on_flow_state
    >>> hooks = [on_flow_state]
    >>> @flow(on_running=hooks, on_completion=hooks, on_failure=hooks,
    ...       on_crashed=hooks, on_cancellation=hooks)
    ... def nightly() -> None: ...

    Never raises. ``on_cancellation`` fires when the run enters Cancelling: it
    is recorded as ``cancelled``.
    """
    _safely_hook(_flow_hook, flow, flow_run, state)


def on_task_state(task: Any, task_run: Any, state: Any) -> None:
    """A task state hook (``on_running``, ``on_completion``, ``on_failure``)
    recording what :func:`instrument` records for the task; a retry is recorded
    when the next attempt starts. Never raises."""
    _safely_hook(_task_hook, task, task_run, state)


def _safely_hook(record: Callable[..., None], obj: Any, run: Any, state: Any) -> None:
    if _originals:
        return  # instrument() records every run of this process already
    try:
        record(obj, run, state)
    except Exception:
        warn_limited("prefect-hook", "orchestrator_push: could not record a Prefect run")


def _hook_start(run: Any, state: Any) -> float | None:
    """The start of the attempt that ``state`` ends (or begins, remembered)."""
    if state.is_running():
        previous = _hook_starts.get(run.id)
        if len(_hook_starts) >= 10_000:
            _hook_starts.clear()
        _hook_starts[run.id] = _ts(state)
        return previous
    return _hook_starts.pop(run.id, run.start_time.timestamp() if run.start_time else None)


def _flow_hook(flow: Any, run: Any, state: Any) -> None:
    name, end = str(flow.name), _ts(state)
    start = _hook_start(run, state)
    if state.is_running():
        _started(end, run, name, None, flow.timeout_seconds)
        return
    status = CANCELLED if state.is_cancelling() else _status(state)
    if status is not None and status != UPSTREAM_FAILED:
        _flow(name, status, end, max(end - start, 0.0) if start is not None else 0.0)


def _task_hook(task: Any, run: Any, state: Any) -> None:
    flow, name, end = _current_flow_name(), str(task.name), _ts(state)
    start = _hook_start(run, state)
    if state.is_running():
        if state.name == "Retrying" and start is not None:
            _task(flow, name, RETRY, end, max(end - start, 0.0), max(int(run.run_count) - 1, 1))
        _started(end, run, flow, name, task.timeout_seconds)
        return
    status = _status(state)
    if status is not None:
        _task(
            flow,
            name,
            status,
            end,
            max(end - start, 0.0) if start is not None else 0.0,
            max(int(run.run_count or 1), 1),
        )
