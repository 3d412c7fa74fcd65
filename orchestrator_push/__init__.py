"""Report every task's duration and outcome to a Prometheus Pushgateway.

>>> import orchestrator_push as op
>>> op.configure(url="http://127.0.0.1:9091")  # doctest: +SKIP
>>> op.record_task(op.TaskRecord("exec", "backup", "main", "success",
...                              end_time=1.7e9, duration=12.5))  # doctest: +SKIP
>>> op.flush(5.0)  # doctest: +SKIP
True
"""

from .config import Config, ConfigError, load_config
from .engine import Engine
from .ledger import Stats
from .records import FlowRecord, TaskRecord
from .runtime import configure, flush, get_engine, record_flow, record_task, reset

__version__ = "0.1.0"

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
