"""Report every task's duration and outcome to a Prometheus Pushgateway.

>>> import orchestrator_push as op
>>> op.configure(url="http://127.0.0.1:9091")  # doctest: +SKIP
>>> op.record_task(op.TaskRecord("exec", "backup", "main", "success",
...                              end_time=1.7e9, duration=12.5))  # doctest: +SKIP
>>> op.flush(5.0)  # doctest: +SKIP
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use: ``orchestrator_push.prefect_startup`` is imported at
# every interpreter start where Prefect's plugins are switched on, and must not
# pay for the delivery core (prometheus_client, http.client) in processes that never
# import Prefect.
_PUBLIC = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "Engine": "engine",
    "Stats": "ledger",
    "FlowRecord": "records",
    "TaskRecord": "records",
    "configure": "runtime",
    "flush": "runtime",
    "get_engine": "runtime",
    "record_flow": "runtime",
    "record_task": "runtime",
    "reset": "runtime",
}

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config
    from .engine import Engine
    from .ledger import Stats
    from .records import FlowRecord, TaskRecord
    from .runtime import configure, flush, get_engine, record_flow, record_task, reset


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator_push' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "FlowRecord",
    "Stats",
    "TaskRecord",
    "__version__",
    "configure",
    "flush",
    "get_engine",
    "load_config",
    "record_flow",
    "record_task",
    "reset",
]
