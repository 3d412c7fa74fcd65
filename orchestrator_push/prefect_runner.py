"""What a Prefect worker or ``flow.serve()`` runner decides for a flow run.

A deployed flow run whose process exits non-zero, is SIGKILLed or OOM-killed
is set Crashed, and a run cancelled through the API or UI is set Cancelled, by
the process that started it (``prefect worker start`` or the ``serve``
runner), not by an engine in the run's own process. Both go through the
runner's ``StateProposer``; the worker also proposes on its own when a
submission fails or a run is cancelled before it started. :func:`patch` wraps
those methods: the original runs first and unchanged, then, when the API holds
the state that was proposed, the run is recorded from the API's own copy of
it (end and start times). Our part never raises into the worker.

The worker and the runner also push their liveness (``worker_up``,
``worker_last_seen_timestamp_seconds``; role ``prefect-worker`` or
``prefect-runner``, ``instance`` = its name) from start to a clean stop. A
runner that a worker starts for itself (Prefect 3.8's process worker does) is
part of that worker, not a node of its own: its name is a fresh ``runner-<uuid>``
at every start, so as a node it would leave a group saying "down" behind each
restart.

The modules are patched when they are imported (a flow-run process never
imports them), see :mod:`.after_import`.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import weakref
from collections.abc import Awaitable, Callable
from types import FrameType, ModuleType
from typing import Any

from . import after_import, runtime
from .logs import never_raises, warn_limited
from .records import CANCELLED, CRASHED, FlowRecord
from .schedule_watch import ScheduleRecorder

FRAMEWORK = "prefect"
WORKER_ROLE = "prefect-worker"
RUNNER_ROLE = "prefect-runner"

_PROPOSER = "prefect.runner._state_proposer"
_WORKER = "prefect.workers.base"
_RUNNER = "prefect.runner.runner"

# (module, class, method) -> the original
_originals: dict[tuple[str, str, str], Callable[..., Any]] = {}
_flow_names: dict[Any, str] = {}  # flow id -> name, bounded
_workers_runners: weakref.WeakSet[Any] = weakref.WeakSet()  # started by a worker: no node
#: each worker's (runner's) task that reads its deployments' schedules, and its recorder
_schedules: weakref.WeakKeyDictionary[Any, tuple[asyncio.Task[None], ScheduleRecorder]] = (
    weakref.WeakKeyDictionary()
)
#: How many callers up to look for a worker starting a runner.
_OWNER_DEPTH = 8


def patch() -> None:
    """Wrap the worker's and runner's methods, now or when their modules are
    imported. Idempotent."""
    after_import.when_imported(_PROPOSER, _patch_proposer)
    after_import.when_imported(_WORKER, _patch_worker)
    after_import.when_imported(_RUNNER, _patch_runner)


def unpatch() -> None:
    import sys

    for name in (_PROPOSER, _WORKER, _RUNNER):
        after_import.forget(name)
    for (module, cls, method), original in list(_originals.items()):
        setattr(getattr(sys.modules[module], cls), method, original)
    _originals.clear()


def _wrap(
    module: ModuleType,
    cls: str,
    method: str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    key = (module.__name__, cls, method)
    target = getattr(module, cls, None)
    original = getattr(target, method, None)
    if key in _originals or original is None:
        return
    _originals[key] = original
    setattr(target, method, functools.wraps(original)(make(original)))


def _patch_proposer(module: ModuleType) -> None:
    _wrap(module, "StateProposer", "propose_crashed", _proposer_crashed)
    _wrap(module, "StateProposer", "propose_cancelled", _proposer_cancelled)


def _patch_worker(module: ModuleType) -> None:
    _wrap(module, "BaseWorker", "_propose_crashed_state", _worker_crashed)
    _wrap(module, "BaseWorker", "_mark_flow_run_as_cancelled", _worker_cancelled)
    _wrap(module, "BaseWorker", "setup", _up(WORKER_ROLE))
    _wrap(module, "BaseWorker", "teardown", _down)


def _patch_runner(module: ModuleType) -> None:
    _wrap(module, "Runner", "__aenter__", _up(RUNNER_ROLE))
    _wrap(module, "Runner", "__aexit__", _down)


def _proposer_crashed(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def propose_crashed(self: Any, flow_run: Any, message: str, *a: Any, **kw: Any) -> Any:
        state = await original(self, flow_run, message, *a, **kw)
        if state is not None and state.is_crashed() and state.message == message:
            await _report(self._client, flow_run, CRASHED, message)
        return state

    return propose_crashed


def _proposer_cancelled(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def propose_cancelled(self: Any, flow_run: Any, *a: Any, **kw: Any) -> Any:
        done = await original(self, flow_run, *a, **kw)
        if done is True:
            await _report(self._client, flow_run, CANCELLED, None)
        return done

    return propose_cancelled


def _worker_crashed(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def _propose_crashed_state(
        self: Any, flow_run: Any, message: str, *a: Any, **kw: Any
    ) -> Any:
        result = await original(self, flow_run, message, *a, **kw)
        client = kw.get("client") or (a[0] if a else None) or getattr(self, "_client", None)
        await _report(client, flow_run, CRASHED, message)
        return result

    return _propose_crashed_state


def _worker_cancelled(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def _mark_flow_run_as_cancelled(self: Any, flow_run: Any, *a: Any, **kw: Any) -> Any:
        result = await original(self, flow_run, *a, **kw)
        await _report(getattr(self, "_client", None), flow_run, CANCELLED, None)
        return result

    return _mark_flow_run_as_cancelled


async def _report(client: Any, flow_run: Any, status: str, message: str | None) -> None:
    """Record the run if the API now holds the state that was proposed (a
    Crashed with this message; any Cancelled): one read of the run, and one of
    its flow the first time."""
    try:
        if client is None:
            return
        run = await client.read_flow_run(flow_run.id)
        state = run.state
        if state is None or state.timestamp is None:
            return
        if status == CRASHED and not (state.is_crashed() and state.message == message):
            return  # rejected: the run's own process had already ended it
        if status == CANCELLED and not state.is_cancelled():
            return
        name = await _flow_name(client, run.flow_id)
        start = run.start_time
        duration = (state.timestamp - start).total_seconds() if start is not None else 0.0
        rec = FlowRecord(
            framework=FRAMEWORK,
            flow=name,
            status=status,
            end_time=state.timestamp.timestamp(),
            duration=max(duration, 0.0),
        )
        runtime.record_flow(rec)
        runtime.count(rec)  # the run's own process did not: it is gone, or never started
    except Exception:
        warn_limited(
            "prefect-runner", "orchestrator_push: could not record a flow run's %s state", status
        )


async def _flow_name(client: Any, flow_id: Any) -> str:
    name = _flow_names.get(flow_id)
    if name is None:
        name = str((await client.read_flow(flow_id)).name)
        if len(_flow_names) >= 1024:
            _flow_names.clear()
        _flow_names[flow_id] = name
    return name


def _node(obj: Any) -> tuple[tuple[str, str], ...]:
    return (("instance", str(getattr(obj, "name", None) or "")),)


def _up(role: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    def make(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def start(self: Any, *a: Any, **kw: Any) -> Any:
            result = await original(self, *a, **kw)
            if role == RUNNER_ROLE and _started_by_a_worker():
                _workers_runners.add(self)
            else:
                _register(self, role)
            return result

        return start

    return make


def _down(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def stop(self: Any, *a: Any, **kw: Any) -> Any:
        _unregister(self)
        return await original(self, *a, **kw)

    return stop


def _started_by_a_worker() -> bool:
    """A worker's method is among the callers (awaiting coroutines keep their
    frames linked), i.e. the runner is the worker's own."""
    base = sys.modules.get(_WORKER)
    worker = getattr(base, "BaseWorker", None)
    if worker is None:
        return False
    try:
        frame: FrameType | None = sys._getframe(2)
    except ValueError:
        return False
    for _ in range(_OWNER_DEPTH):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), worker):
            return True
        frame = frame.f_back
    return False


@never_raises
def _register(obj: Any, role: str) -> None:
    engine = runtime.get_engine()
    if engine is None:
        return
    engine.register_node(_node(obj), FRAMEWORK, role)
    client = getattr(obj, "_client", None)
    selection = _selection(obj, role)
    if selection is not None and client is not None and obj not in _schedules:
        from . import prefect_schedules

        recorder = ScheduleRecorder(engine, FRAMEWORK)
        # on its own loop (setup and __aenter__ run on it), with its own client
        task = asyncio.get_running_loop().create_task(
            prefect_schedules.poll(recorder, client, selection)
        )
        _schedules[obj] = (task, recorder)


def _selection(obj: Any, role: str) -> str | Callable[[], list[Any]] | None:
    """Whose schedules: a worker's work pool; a runner's own deployments (Prefect
    3.9 keeps them in a registry, 3.8 in a set)."""
    if role == WORKER_ROLE:
        pool = getattr(obj, "_work_pool_name", None)
        return pool if isinstance(pool, str) else None
    get_ids = getattr(getattr(obj, "_deployment_registry", None), "get_deployment_ids", None)
    if callable(get_ids):
        return lambda: list(get_ids())
    ids = getattr(obj, "_deployment_ids", None)
    if isinstance(ids, set):  # (the set, not the runner: _schedules holds it weakly)
        return lambda: list(ids)
    warn_limited(
        "prefect-runner-deployments",
        "orchestrator_push: this Prefect runner keeps its deployments where this"
        " version does not look; their next runs are not pushed",
    )
    return None


@never_raises
def _unregister(obj: Any) -> None:
    polling = _schedules.pop(obj, None)
    if polling is not None:
        task, recorder = polling
        task.cancel()
        if getattr(obj, "pause_on_shutdown", False) is True:  # (a runner: it pauses them now)
            recorder.pause_all()
    if obj in _workers_runners:
        return
    engine = runtime.get_engine()
    if engine is not None:
        engine.node_down(_node(obj), FRAMEWORK)
