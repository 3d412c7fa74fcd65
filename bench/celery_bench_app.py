"""The app each benchmark worker runs; BENCH_VARIANT picks the instrumentation."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery, signals
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

url = os.environ["BENCH_REDIS_URL"]
variant = os.environ.get("BENCH_VARIANT", "none")
app = Celery("bench", broker=url)
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True, worker_prefetch_multiplier=64)
r = redis.Redis.from_url(url)

if variant == "instrument":
    from orchestrator_push.celery import instrument

    instrument(app)
elif variant == "naive":
    gateway = os.environ["ORCHESTRATOR_PUSH_URL"]

    @signals.task_postrun.connect(weak=False)
    def push(task_id=None, task=None, state=None, **_):  # type: ignore[no-untyped-def]
        reg = CollectorRegistry()
        Gauge("orchestrator_task_last_completion_timestamp_seconds", "c", registry=reg).set(time.time())
        push_to_gateway(gateway, job="naive", registry=reg, grouping_key={"task": task.name})


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.gate")
def gate(key: str) -> None:
    """Hold the worker until the slice's tasks are queued, then note the start."""
    r.blpop(key, timeout=60)
    r.set(key + ":start", repr(time.perf_counter()))


@app.task(name="bench.mark")
def mark(key: str) -> None:
    r.set(key + ":end", repr(time.perf_counter()))
